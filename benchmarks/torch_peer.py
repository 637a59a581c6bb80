"""An independent PyTorch CapsNet, timed as a side-by-side peer for capsjax (issue 6).

Not part of capsjax and never imported by it; needs `pip install torch==2.13.0`
(the `peer` extra). The model is the same as capsjax's CapsNet:

  Conv1       9x9 stride 1, 1 -> 256 channels, ReLU          [B, 256, 20, 20]
  PrimaryCaps 9x9 stride 2, 256 -> 256 channels               [B, 256, 6, 6]
              -> 1152 capsules of 8D, squash                  [B, 1152, 8]
  DigitCaps   W [1152, 10, 16, 8], no bias, 3 routing iters   [B, 10, 16]
  Decoder     masked by the label: 160 -> 512 -> 1024 -> 784 sigmoid
  Loss        margin (0.9, 0.1, 0.5) + 0.392 * per-pixel MSE; Adam 1e-3.

Capsule grouping matches capsjax's NHWC reshape [B, 6, 6, 32, 8]: capsule n =
(h * 6 + w) * 32 + type, and its 8 poses are the 8 consecutive channels
type * 8 .. type * 8 + 7 at pixel (h, w). In NCHW torch that is a permute to NHWC
before the reshape. Gradients flow through every routing iteration (the authors' code,
capsjax's default `stop_gradient=False`). Parameter count: 8,215,568.

Run: `python -m benchmarks.torch_peer [--batch 100] [--steps 5] [--threads 2] [--compile]`.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

NUM_PARAMS = 8_215_568


def squash(s: torch.Tensor, dim: int = -1, eps: float = 1e-7) -> torch.Tensor:
  """v = |s|^2/(1+|s|^2) * s/|s|, with |s| = sqrt(|s|^2 + eps). s: [..., D]."""
  sq = (s * s).sum(dim=dim, keepdim=True)                      # [..., 1]
  return s * (sq / (1.0 + sq)) / torch.sqrt(sq + eps)          # [..., D]


class CapsNet(nn.Module):
  """The CapsNet of Sabour et al. (2017) for 28x28x1 images and 10 classes."""

  def __init__(self, routing_iterations: int = 3):
    super().__init__()
    self.routing_iterations = routing_iterations
    self.conv1 = nn.Conv2d(1, 256, 9)
    self.primary = nn.Conv2d(256, 256, 9, stride=2)
    # W[n, m, o, i]: N_in=1152, N_out=10, D_out=16, D_in=8.
    self.w = nn.Parameter(0.01 * torch.randn(1152, 10, 16, 8))
    self.decoder = nn.Sequential(
        nn.Linear(160, 512), nn.ReLU(), nn.Linear(512, 1024), nn.ReLU(),
        nn.Linear(1024, 784), nn.Sigmoid())

  def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
    """x: [B, 1, 28, 28]; labels: [B] or None (mask by the predicted class).

    Returns (lengths [B, 10], reconstructions [B, 784]).
    """
    b = x.shape[0]
    h = F.relu(self.conv1(x))                                    # [B, 256, 20, 20]
    h = self.primary(h)                                          # [B, 256, 6, 6]
    u = h.permute(0, 2, 3, 1).reshape(b, 6 * 6 * 32, 8)          # [B, 1152, 8]
    u = squash(u)                                                # [B, 1152, 8]
    u_hat = torch.einsum('nmoi,bni->bnmo', self.w, u)            # [B, 1152, 10, 16]
    logits = torch.zeros(u_hat.shape[:3], dtype=u_hat.dtype)     # [B, 1152, 10]
    for it in range(self.routing_iterations):
      c = torch.softmax(logits, dim=2)                           # [B, 1152, 10]
      s = torch.einsum('bnm,bnmo->bmo', c, u_hat)                # [B, 10, 16]
      v = squash(s)                                              # [B, 10, 16]
      if it < self.routing_iterations - 1:
        logits = logits + torch.einsum('bnmo,bmo->bnm', u_hat, v)
    lengths = torch.sqrt((v * v).sum(-1) + 1e-7)                 # [B, 10]
    if labels is None:
      labels = lengths.argmax(dim=1)
    mask = F.one_hot(labels, 10).to(v.dtype)                     # [B, 10]
    recon = self.decoder((v * mask[:, :, None]).reshape(b, 160))  # [B, 784]
    return lengths, recon


def loss_fn(lengths, recon, images, labels):
  """Mean over the batch of margin loss + 0.392 * per-pixel MSE."""
  t = F.one_hot(labels, 10).to(lengths.dtype)                    # [B, 10]
  margin = (t * F.relu(0.9 - lengths) ** 2
            + 0.5 * (1 - t) * F.relu(lengths - 0.1) ** 2).sum(1)  # [B]
  mse = ((recon - images.reshape(images.shape[0], -1)) ** 2).mean(1)  # [B]
  return (margin + 0.392 * mse).mean()


def num_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def _data(batch: int):
  g = torch.Generator().manual_seed(0)
  images = torch.rand(batch, 1, 28, 28, generator=g)
  labels = torch.randint(0, 10, (batch,), generator=g)
  return images, labels


def train_images_per_s(batch: int = 100, steps: int = 5, threads: int = 2,
                       compile: bool = False, warmup: int = 2) -> float:
  """Train-step (forward, backward, Adam) images/s, median over `steps` timed steps."""
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = CapsNet()
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  images, labels = _data(batch)

  fwd = torch.compile(model) if compile else model   # Adam stays eager

  def step(images, labels):
    opt.zero_grad(set_to_none=True)
    lengths, recon = fwd(images, labels)
    loss = loss_fn(lengths, recon, images, labels)
    loss.backward()
    opt.step()
    return loss

  for _ in range(warmup):
    step(images, labels)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step(images, labels)
    times.append(time.perf_counter() - t0)
  return batch / float(np.median(times))


def eval_images_per_s(batch: int = 100, steps: int = 5, threads: int = 2,
                      compile: bool = False, warmup: int = 2) -> float:
  """Eval (no-grad forward incl. decoder masked by the prediction) images/s, median."""
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = CapsNet().eval()
  fwd = torch.compile(model) if compile else model
  images, _ = _data(batch)
  with torch.no_grad():
    for _ in range(warmup):
      fwd(images)
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      fwd(images)
      times.append(time.perf_counter() - t0)
  return batch / float(np.median(times))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=100)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--compile", action="store_true", help="also time torch.compile")
  args = parser.parse_args(argv)

  n = num_params(CapsNet())
  if n != NUM_PARAMS:
    raise RuntimeError(f"parameter count {n:,} != expected {NUM_PARAMS:,}")
  rows = {"train_img_s": train_images_per_s(args.batch, args.steps, args.threads),
          "eval_img_s": eval_images_per_s(args.batch, args.steps, args.threads)}
  if args.compile:
    rows["compile_train_img_s"] = train_images_per_s(
        args.batch, args.steps, args.threads, compile=True)
    rows["compile_eval_img_s"] = eval_images_per_s(
        args.batch, args.steps, args.threads, compile=True)
  print(f"PyTorch {torch.__version__} CapsNet peer: batch {args.batch}, "
        f"{args.threads} threads, {n:,} params")
  print(f"{'metric':<22}{'images/s':>10}")
  for k, v in rows.items():
    print(f"{k:<22}{v:>10.1f}")
  print(json.dumps({"batch": args.batch, "threads": args.threads, "params": n,
                    "torch": torch.__version__,
                    **{k: round(v, 2) for k, v in rows.items()}}))


if __name__ == "__main__":
  main()
