"""An independent PyTorch CapsNet, timed as a side-by-side peer for capsjax.

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
before the reshape. By default gradients flow through every routing iteration (the
authors' code, capsjax's default `stop_gradient=False`). Parameter count: 8,215,568.

Besides the speed benchmark, this file is a PyTorch port of the CapsNet-Fashion-MNIST
recipe (XifengGuo/CapsNet-Fashion-MNIST, Keras 2.0.9), used by `benchmarks.recipe_curves`
for learning curves next to capsjax's (`train_recipe`, `KerasRecipe`):

  init       Keras glorot_uniform for every conv/dense kernel and for W, zero biases
             (`CapsNet(init='keras')`, `keras_glorot_limit`);
  routing    u_hat stopped in every iteration but the last (`stop_gradient=True`);
  data       ImageDataGenerator(width/height_shift_range=0.1, horizontal_flip=True):
             offsets uniform(-2.8, 2.8) px rounded to whole pixels, edge fill, then a
             left-right flip with p 0.5 (`keras_shift_flip`);
  optimiser  Adam(1e-3, 0.9, 0.999, eps 1e-8), lr 1e-3 * 0.95**epoch set at the start
             of each epoch (Keras' LearningRateScheduler), batch 100;
  loss       margin + 0.392 * per-pixel MSE, decoder masked by the true label in
             training and by the predicted class at test time.

Run: `python -m benchmarks.torch_peer [--batch 100] [--steps 5] [--threads 2] [--compile]`;
`python -m benchmarks.torch_peer --self_check` checks the recipe pieces in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

NUM_PARAMS = 8_215_568
INITS = ("torch", "keras")


def squash(s: torch.Tensor, dim: int = -1, eps: float = 1e-7) -> torch.Tensor:
  """v = |s|^2/(1+|s|^2) * s/|s|, with |s| = sqrt(|s|^2 + eps). s: [..., D]."""
  sq = (s * s).sum(dim=dim, keepdim=True)  # [..., 1]
  return s * (sq / (1.0 + sq)) / torch.sqrt(sq + eps)  # [..., D]


def keras_glorot_limit(shape: Sequence[int]) -> float:
  """Bound of Keras 2.0.9's glorot_uniform for a kernel of Keras shape `shape`.

  Keras' `_compute_fans` (channels_last): a 2-D shape [in, out] has fan_in = in,
  fan_out = out; 3- to 5-D shapes [..., in, out] multiply both by the receptive field
  prod(shape[:-2]); any other rank uses sqrt(prod(shape)) for both.

  Args:
    shape: the kernel's shape in Keras' layout: [in, out] for Dense, [kh, kw, in, out]
      for Conv2D, [num_capsule, input_num_capsule, dim_capsule, input_dim_capsule]
      for CapsNet-Keras' W.

  Returns:
    sqrt(6 / (fan_in + fan_out)); weights are drawn from uniform(-limit, limit).
  """
  shape = tuple(int(d) for d in shape)
  if len(shape) == 2:
    fan_in, fan_out = shape
  elif 3 <= len(shape) <= 5:
    receptive_field = math.prod(shape[:-2])
    fan_in, fan_out = shape[-2] * receptive_field, shape[-1] * receptive_field
  else:
    fan_in = fan_out = math.sqrt(math.prod(shape))
  return math.sqrt(6.0 / (fan_in + fan_out))


class CapsNet(nn.Module):
  """The CapsNet of Sabour et al. (2017) for 28x28x1 images and 10 classes."""

  def __init__(
    self,
    routing_iterations: int = 3,
    init: str = "torch",
    stop_gradient: bool = False,
    length_eps: float = 1e-7,
  ):
    """Builds the model.

    Args:
      routing_iterations: routing iterations (>= 1).
      init: 'torch' = PyTorch's default layer init and W ~ 0.01 * randn (the speed
        peer); 'keras' = Keras glorot_uniform on every kernel and on W, zero biases
        (CapsNet-Keras / CapsNet-Fashion-MNIST).
      stop_gradient: True = u_hat is detached in every routing iteration but the last,
        as in CapsNet-Fashion-MNIST; False = gradients through all iterations.
      length_eps: capsule length = sqrt(|v|^2 + length_eps). 1e-7 as capsjax; Keras'
        Length layer uses 0. It matters at the Keras init, where |v|^2 is far below
        1e-7 (see `KerasRecipe`).
    """
    super().__init__()
    if init not in INITS:
      raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if routing_iterations < 1:
      raise ValueError(f"routing_iterations must be >= 1, got {routing_iterations}")
    self.routing_iterations = routing_iterations
    self.stop_gradient = stop_gradient
    self.length_eps = length_eps
    # Built in the same order for both inits, so init='torch' draws exactly the numbers
    # it always has for a given torch seed.
    self.conv1 = nn.Conv2d(1, 256, 9)
    self.primary = nn.Conv2d(256, 256, 9, stride=2)
    # W[n, m, o, i]: N_in=1152, N_out=10, D_out=16, D_in=8.
    self.w = nn.Parameter(0.01 * torch.randn(1152, 10, 16, 8))
    self.decoder = nn.Sequential(
      nn.Linear(160, 512),
      nn.ReLU(),
      nn.Linear(512, 1024),
      nn.ReLU(),
      nn.Linear(1024, 784),
      nn.Sigmoid(),
    )
    if init == "keras":
      self._keras_init()

  @torch.no_grad()
  def _keras_init(self) -> None:
    """Redraws every kernel from Keras' glorot_uniform (fans from Keras' shapes)."""
    for conv in (self.conv1, self.primary):
      out_c, in_c, kh, kw = conv.weight.shape
      limit = keras_glorot_limit((kh, kw, in_c, out_c))
      conv.weight.uniform_(-limit, limit)
      conv.bias.zero_()
    n_in, n_out, d_out, d_in = self.w.shape
    # CapsNet-Keras stores W as [num_capsule, input_num_capsule, dim_capsule,
    # input_dim_capsule]; its receptive field 10 * 1152 makes W's limit tiny (4.66e-3).
    limit = keras_glorot_limit((n_out, n_in, d_out, d_in))
    self.w.uniform_(-limit, limit)
    for layer in self.decoder:
      if isinstance(layer, nn.Linear):
        limit = keras_glorot_limit((layer.in_features, layer.out_features))
        layer.weight.uniform_(-limit, limit)
        layer.bias.zero_()

  def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
    """x: [B, 1, 28, 28]; labels: [B] or None (mask by the predicted class).

    Returns (lengths [B, 10], reconstructions [B, 784]).
    """
    b = x.shape[0]
    h = F.relu(self.conv1(x))  # [B, 256, 20, 20]
    h = self.primary(h)  # [B, 256, 6, 6]
    u = h.permute(0, 2, 3, 1).reshape(b, 6 * 6 * 32, 8)  # [B, 1152, 8]
    u = squash(u)  # [B, 1152, 8]
    u_hat = torch.einsum("nmoi,bni->bnmo", self.w, u)  # [B, 1152, 10, 16]
    u_stop = u_hat.detach() if self.stop_gradient else u_hat  # [B, 1152, 10, 16]
    logits = torch.zeros(u_hat.shape[:3], dtype=u_hat.dtype, device=u_hat.device)  # [B, 1152, 10]
    for it in range(self.routing_iterations):
      last = it == self.routing_iterations - 1
      # Only the last iteration's output carries gradient to u_hat in the stopped
      # variant, so the earlier ones (and the logits) are constants for backprop.
      src = u_hat if last else u_stop  # [B, 1152, 10, 16]
      c = torch.softmax(logits, dim=2)  # [B, 1152, 10]
      s = torch.einsum("bnm,bnmo->bmo", c, src)  # [B, 10, 16]
      v = squash(s)  # [B, 10, 16]
      if not last:
        logits = logits + torch.einsum("bnmo,bmo->bnm", src, v)
    lengths = torch.sqrt((v * v).sum(-1) + self.length_eps)  # [B, 10]
    if labels is None:
      labels = lengths.argmax(dim=1)
    mask = F.one_hot(labels, 10).to(v.dtype)  # [B, 10]
    recon = self.decoder((v * mask[:, :, None]).reshape(b, 160))  # [B, 784]
    return lengths, recon


def loss_terms(lengths, recon, images, labels):
  """Per-example margin loss (0.9, 0.1, 0.5) and per-pixel MSE of the reconstruction.

  Args:
    lengths: [B, 10] capsule lengths.
    recon: [B, 784] reconstructions.
    images: [B, 1, 28, 28] targets.
    labels: [B] int64.

  Returns:
    (margin [B], mse [B]).
  """
  t = F.one_hot(labels, 10).to(lengths.dtype)  # [B, 10]
  margin = (t * F.relu(0.9 - lengths) ** 2 + 0.5 * (1 - t) * F.relu(lengths - 0.1) ** 2).sum(
    1
  )  # [B]
  mse = ((recon - images.reshape(images.shape[0], -1)) ** 2).mean(1)  # [B]
  return margin, mse


def loss_fn(lengths, recon, images, labels):
  """Mean over the batch of margin loss + 0.392 * per-pixel MSE."""
  margin, mse = loss_terms(lengths, recon, images, labels)
  return (margin + 0.392 * mse).mean()


def num_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def _data(batch: int):
  g = torch.Generator().manual_seed(0)
  images = torch.rand(batch, 1, 28, 28, generator=g)
  labels = torch.randint(0, 10, (batch,), generator=g)
  return images, labels


def train_images_per_s(
  batch: int = 100, steps: int = 5, threads: int = 2, compile: bool = False, warmup: int = 2
) -> float:
  """Train-step (forward, backward, Adam) images/s, median over `steps` timed steps."""
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = CapsNet()
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  images, labels = _data(batch)

  fwd = torch.compile(model) if compile else model  # Adam stays eager

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


def eval_images_per_s(
  batch: int = 100, steps: int = 5, threads: int = 2, compile: bool = False, warmup: int = 2
) -> float:
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


# ----------------------------------------------------------------------------------------
# The CapsNet-Fashion-MNIST recipe (XifengGuo/CapsNet-Fashion-MNIST, Keras 2.0.9).
# ----------------------------------------------------------------------------------------


def shift_nearest(images: np.ndarray, offsets: np.ndarray) -> np.ndarray:
  """Moves pixel (r, c) of image i to (r + dy_i, c + dx_i), repeating edge pixels.

  The same as slicing `np.pad(image, mode='edge')`, and as scipy's affine_transform with
  order=0, mode='nearest' (what Keras' ImageDataGenerator calls) for a whole-pixel shift.

  Args:
    images: [B, H, W, C], any dtype.
    offsets: int [B, 2], (dy, dx) per image; any size (beyond the image, every pixel
      is an edge pixel).

  Returns:
    [B, H, W, C], same dtype.
  """
  b, h, w = images.shape[:3]
  offsets = np.asarray(offsets, np.int64)
  rows = np.clip(np.arange(h)[None, :] - offsets[:, :1], 0, h - 1)  # [B, H]
  cols = np.clip(np.arange(w)[None, :] - offsets[:, 1:], 0, w - 1)  # [B, W]
  return images[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def sample_keras_offsets(
  rng: np.random.Generator, batch: int, height: int, width: int, shift_fraction: float
) -> np.ndarray:
  """ImageDataGenerator's shifts in whole pixels: int64 [B, 2] (dy, dx).

  Keras draws uniform(-f, f) * size per axis; scipy's order-0 interpolation then reads
  the nearest pixel, i.e. the offset rounded. With f = 0.1 on 28 px that is +-2.8 px,
  so +-3 occurs (p ~ 0.054 each) and 0, +-1, +-2 with p ~ 0.179 each.
  """
  dy = rng.uniform(-shift_fraction * height, shift_fraction * height, size=batch)
  dx = rng.uniform(-shift_fraction * width, shift_fraction * width, size=batch)
  return np.rint(np.stack([dy, dx], axis=1)).astype(np.int64)  # [B, 2]


def keras_shift_flip(
  images: np.ndarray,
  rng: np.random.Generator,
  *,
  shift_fraction: float = 0.1,
  horizontal_flip: bool = True,
) -> np.ndarray:
  """Keras ImageDataGenerator(width/height_shift_range, horizontal_flip) on a batch.

  Per image: a shift by `sample_keras_offsets` with 'nearest' (edge) fill, then, with
  `horizontal_flip`, a left-right flip with probability 0.5 (Keras' order).

  Args:
    images: [B, H, W, C], uint8 or float.
    rng: the generator to draw from (seeded per epoch by `train_recipe`).
    shift_fraction: Keras' width_shift_range = height_shift_range.
    horizontal_flip: also flip.

  Returns:
    [B, H, W, C], same dtype; `images` is not modified.
  """
  b, h, w = images.shape[:3]
  out = images
  if shift_fraction:
    out = shift_nearest(images, sample_keras_offsets(rng, b, h, w, shift_fraction))
  if horizontal_flip:
    flip = rng.random(b) < 0.5  # [B]
    out = np.where(flip[:, None, None, None], out[:, :, ::-1], out)  # [B, H, W, C]
  return out


@dataclasses.dataclass(frozen=True)
class KerasRecipe:
  """CapsNet-Fashion-MNIST's hyperparameters (capsulenet.py defaults).

  Adam's epsilon: Keras 2.0.9 (the README's version) defaults to 1e-8 (Keras >= 2.1.3
  uses K.epsilon() = 1e-7). Keras adds it to sqrt(v_t) before the bias correction,
  torch (and optax) after it; the two differ by a factor sqrt(1 - 0.999**t) on epsilon,
  a shift below 1e-8 relative to gradients of ~1e-4 or more, so torch's Adam is used.
  Capsule lengths are sqrt(|v|^2) as in Keras' Length layer (`length_eps` 0). capsjax
  and the speed peer add 1e-7 under the root. At the Keras init, on Fashion-MNIST test
  images, |v|^2 is 2e-22 .. 5e-13 (median 5e-15), so with 1e-7 every length reads
  ~3.2e-4 and d length / d v is scaled by |v| / 3.2e-4 ~ 1e-4 against Keras' unit
  vector: the margin loss barely moves the capsules until |v| grows past ~3e-4, while
  the reconstruction term is unaffected.
  """

  batch_size: int = 100
  learning_rate: float = 1e-3
  lr_decay: float = 0.95  # lr * lr_decay**epoch, set when each epoch starts.
  adam_eps: float = 1e-8
  recon_weight: float = 0.392  # x per-pixel MSE (= 0.0005 x SSE on 28x28).
  shift_fraction: float = 0.1
  horizontal_flip: bool = True
  init: str = "keras"
  stop_gradient: bool = True
  routing_iterations: int = 3
  length_eps: float = 0.0
  # Keras draws its augmentation from numpy's global state; here one generator per epoch,
  # default_rng([seed, epoch, AUG_STREAM]), so an epoch's draws do not depend on earlier ones.
  aug_stream: int = 1


def _nchw(images: np.ndarray) -> torch.Tensor:
  """float [B, H, W, C] NumPy -> float32 [B, C, H, W] torch."""
  return torch.from_numpy(
    np.ascontiguousarray(np.asarray(images, np.float32).transpose(0, 3, 1, 2))
  )


@torch.no_grad()
def evaluate(
  model: CapsNet,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  batch_size: int = 100,
  recon_weight: float = 0.392,
) -> dict[str, float]:
  """Accuracy and mean losses over every test example, decoder masked by the prediction.

  Args:
    model: the CapsNet (put in eval mode here; it has no dropout or batch norm).
    images: float [N, 28, 28, 1] in [0, 1].
    labels: int [N].
    batch_size: examples per forward pass (Keras' predict used 100).
    recon_weight: weight of the MSE term in `loss`.

  Returns:
    {'accuracy', 'loss', 'margin_loss', 'recon_loss'}, means over the N examples.
  """
  model.eval()
  correct, margin_sum, mse_sum = 0, 0.0, 0.0
  n = len(labels)
  for start in range(0, n, batch_size):
    x = _nchw(images[start : start + batch_size])  # [b, 1, 28, 28]
    y = torch.from_numpy(np.asarray(labels[start : start + batch_size], np.int64))  # [b]
    lengths, recon = model(x)
    margin, mse = loss_terms(lengths, recon, x, y)
    correct += int((lengths.argmax(1) == y).sum())
    margin_sum += float(margin.sum())
    mse_sum += float(mse.sum())
  return {
    "accuracy": correct / n,
    "loss": (margin_sum + recon_weight * mse_sum) / n,
    "margin_loss": margin_sum / n,
    "recon_loss": mse_sum / n,
  }


def train_recipe(
  batches: Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]],
  test_images: np.ndarray,
  test_labels: np.ndarray,
  *,
  epochs: int,
  seed: int = 0,
  threads: int = 2,
  recipe: KerasRecipe = KerasRecipe(),
  log_every: int = 100,
  on_epoch: Callable[[dict], None] | None = None,
) -> list[dict]:
  """Trains the CapsNet-Fashion-MNIST recipe; one evaluation on the test set per epoch.

  The example order is the caller's (`benchmarks.recipe_curves` passes capsjax's), the
  augmentation is `keras_shift_flip` with default_rng([seed, epoch, recipe.aug_stream]).

  Args:
    batches: batches(epoch) yields (images float [B, 28, 28, 1] in [0, 1], labels int
      [B]) for 0-based `epoch`, un-augmented.
    test_images: float [N, 28, 28, 1] in [0, 1].
    test_labels: int [N].
    epochs: number of epochs.
    seed: torch seed of the initialisation, and of the augmentation draws.
    threads: torch intra-op threads.
    recipe: the hyperparameters.
    log_every: print the running training loss every this many steps (0 = never).
    on_epoch: called with each epoch's row as soon as it is measured.

  Returns:
    One dict per epoch: epoch (1-based, as capsjax's epochs.csv), step, learning_rate,
    train_loss, train_accuracy, test_accuracy, test_loss, test_margin_loss,
    test_recon_loss, seconds (training only, as capsjax), eval_seconds, images_per_s.
  """
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  model = CapsNet(
    recipe.routing_iterations,
    init=recipe.init,
    stop_gradient=recipe.stop_gradient,
    length_eps=recipe.length_eps,
  )
  if num_params(model) != NUM_PARAMS:
    raise RuntimeError(f"parameter count {num_params(model):,} != {NUM_PARAMS:,}")
  opt = torch.optim.Adam(
    model.parameters(), lr=recipe.learning_rate, betas=(0.9, 0.999), eps=recipe.adam_eps
  )
  rows, step = [], 0
  for epoch in range(epochs):
    lr = recipe.learning_rate * recipe.lr_decay**epoch
    for group in opt.param_groups:
      group["lr"] = lr
    rng = np.random.default_rng([seed, epoch, recipe.aug_stream])
    model.train()
    loss_sum, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
    run_loss, run_n, t_log = 0.0, 0, t0
    for images, labels in batches(epoch):
      images = keras_shift_flip(
        images, rng, shift_fraction=recipe.shift_fraction, horizontal_flip=recipe.horizontal_flip
      )
      x = _nchw(images)  # [B, 1, 28, 28]
      y = torch.from_numpy(np.asarray(labels, np.int64))  # [B]
      opt.zero_grad(set_to_none=True)
      lengths, recon = model(x, y)  # decoder masked by the true label
      margin, mse = loss_terms(lengths, recon, x, y)
      loss = (margin + recipe.recon_weight * mse).mean()
      loss.backward()
      opt.step()
      step += 1
      b = len(y)
      loss_value = float(loss.detach())
      loss_sum += loss_value * b
      correct += int((lengths.detach().argmax(1) == y).sum())
      seen += b
      run_loss, run_n = run_loss + loss_value * b, run_n + b
      if log_every and step % log_every == 0:
        now = time.perf_counter()
        print(
          f"torch epoch {epoch + 1} step {step}: loss {run_loss / run_n:.4f}, "
          f"{run_n / (now - t_log):.1f} img/s",
          flush=True,
        )
        run_loss, run_n, t_log = 0.0, 0, now
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    test = evaluate(model, test_images, test_labels, recon_weight=recipe.recon_weight)
    row = {
      "epoch": epoch + 1,
      "step": step,
      "learning_rate": lr,
      "train_loss": loss_sum / max(seen, 1),
      "train_accuracy": correct / max(seen, 1),
      **{f"test_{k}": v for k, v in test.items()},
      "seconds": seconds,
      "eval_seconds": time.perf_counter() - t1,
      "images_per_s": seen / max(seconds, 1e-9),
    }
    print(
      f"torch epoch {epoch + 1}: test accuracy {100 * row['test_accuracy']:.2f}% "
      f"(loss {row['test_loss']:.4f}), {seconds:.1f} s, "
      f"{row['images_per_s']:.1f} img/s",
      flush=True,
    )
    rows.append(row)
    if on_epoch is not None:
      on_epoch(row)
  return rows


def self_check() -> None:
  """Seconds-long checks of the recipe pieces; raises AssertionError on a failure."""
  # Shift: a ramp whose every pixel is distinct shows both the direction and the fill.
  ramp = np.arange(28 * 28, dtype=np.float32).reshape(1, 28, 28, 1)  # [1, 28, 28, 1]
  for dy, dx in [(0, 0), (3, -3), (-2, 1), (1, 0), (-3, 3)]:
    got = shift_nearest(ramp, np.array([[dy, dx]]))
    padded = np.pad(ramp[0, :, :, 0], 3, mode="edge")  # [34, 34]
    want = padded[3 - dy : 3 - dy + 28, 3 - dx : 3 - dx + 28]
    assert np.array_equal(got[0, :, :, 0], want), (dy, dx)
    r, c = 10, 12  # an interior pixel moves by (dy, dx)
    assert got[0, r + dy, c + dx, 0] == ramp[0, r, c, 0], (dy, dx)
  got = shift_nearest(ramp, np.array([[2, 0]]))
  assert (got[0, :3, :, 0] == ramp[0, 0, :, 0]).all()  # top row repeated into the gap
  # Offsets: whole pixels in [-3, 3] (+-2.8 rounded), every value in that range drawn.
  rng = np.random.default_rng(0)
  offs = sample_keras_offsets(rng, 20000, 28, 28, 0.1)
  assert offs.min() == -3 and offs.max() == 3, (offs.min(), offs.max())
  assert set(np.unique(offs)) == set(range(-3, 4))
  p3 = np.mean(np.abs(offs) == 3) / 2
  assert abs(p3 - 0.3 / 5.6) < 0.01, p3
  # Augmented uint8 and float batches agree, and keep their dtype.
  u8 = np.random.default_rng(1).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
  a = keras_shift_flip(u8, np.random.default_rng(2))
  f = keras_shift_flip(u8.astype(np.float32) / 255, np.random.default_rng(2))
  assert a.dtype == np.uint8 and f.dtype == np.float32
  assert np.allclose(a.astype(np.float32) / 255, f)
  flips = [keras_shift_flip(ramp, np.random.default_rng(s), shift_fraction=0.0) for s in range(64)]
  n_flip = sum(bool(np.array_equal(x, ramp[:, :, ::-1])) for x in flips)
  assert 16 <= n_flip <= 48, n_flip
  # Keras' glorot limits.
  assert math.isclose(keras_glorot_limit((10, 1152, 16, 8)), math.sqrt(6 / ((16 + 8) * 11520)))
  assert math.isclose(keras_glorot_limit((9, 9, 1, 256)), math.sqrt(6 / (81 * 257)))
  assert math.isclose(keras_glorot_limit((160, 512)), math.sqrt(6 / 672))
  # Keras init: same parameter count, W within its limit, zero biases.
  torch.manual_seed(0)
  model = CapsNet(init="keras", stop_gradient=True)
  assert num_params(model) == NUM_PARAMS
  w_lim = keras_glorot_limit((10, 1152, 16, 8))
  w_max = float(model.w.detach().abs().max())
  assert 0.9 * w_lim < w_max <= w_lim, (w_max, w_lim)
  assert float(model.conv1.bias.detach().abs().max()) == 0.0
  # stop_gradient changes gradients only, and only through the earlier iterations: the
  # same forward; with 1 iteration the same W gradient, with 3 a different one. W is
  # scaled up because at the Keras init routing is ~uniform and the difference ~1e-11.
  with torch.no_grad():
    model.w.mul_(300.0)
  x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
  y = torch.tensor([3, 7])
  for iters, differ in ((1, False), (3, True)):
    model.routing_iterations = iters
    grads, outs = [], []
    for stop in (False, True):
      model.stop_gradient = stop
      model.zero_grad()
      lengths, recon = model(x, y)
      loss_fn(lengths, recon, x, y).backward()
      outs.append(lengths.detach())
      grads.append(model.w.grad.clone())
    assert torch.allclose(outs[0], outs[1])
    rel = float((grads[0] - grads[1]).norm() / grads[0].norm())
    assert (rel > 1e-3) if differ else (rel < 1e-6), (iters, rel)
  print("torch_peer self-check: OK")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=100)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--compile", action="store_true", help="also time torch.compile")
  parser.add_argument(
    "--self_check",
    action="store_true",
    help="check the recipe pieces (shift, init, routing) and exit",
  )
  args = parser.parse_args(argv)
  if args.self_check:
    self_check()
    return

  n = num_params(CapsNet())
  if n != NUM_PARAMS:
    raise RuntimeError(f"parameter count {n:,} != expected {NUM_PARAMS:,}")
  rows = {
    "train_img_s": train_images_per_s(args.batch, args.steps, args.threads),
    "eval_img_s": eval_images_per_s(args.batch, args.steps, args.threads),
  }
  if args.compile:
    rows["compile_train_img_s"] = train_images_per_s(
      args.batch, args.steps, args.threads, compile=True
    )
    rows["compile_eval_img_s"] = eval_images_per_s(
      args.batch, args.steps, args.threads, compile=True
    )
  print(
    f"PyTorch {torch.__version__} CapsNet peer: batch {args.batch}, "
    f"{args.threads} threads, {n:,} params"
  )
  print(f"{'metric':<22}{'images/s':>10}")
  for k, v in rows.items():
    print(f"{k:<22}{v:>10.1f}")
  print(
    json.dumps(
      {
        "batch": args.batch,
        "threads": args.threads,
        "params": n,
        "torch": torch.__version__,
        **{k: round(v, 2) for k, v in rows.items()},
      }
    )
  )


if __name__ == "__main__":
  main()
