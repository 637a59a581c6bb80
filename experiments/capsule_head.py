r"""Routing as a reusable component: a capsule head on a tiny conv net for 32x32x3 images.

Not CapsNet: a two-layer strided conv trunk, `capsjax.layers.PrimaryCaps`, and one of
two capsule heads, trained with `capsjax.losses.margin_loss` and no decoder:

  'routed'  `capsjax.layers.RoutedCaps`: one W_ij per (primary capsule, class), as in
            CapsNet's DigitCaps.
  'shared'  a head written here that calls `capsjax.routing.dynamic` directly with
            weights shared over positions (one W per (capsule type, class), a
            "convolutional" transform, as in the paper's Sec. 4 for ConvCaps layers), so
            its parameter count does not grow with the image size.

  python -m experiments.capsule_head --steps=20
  python -m experiments.capsule_head --head=shared --routing_iterations=1 --steps=50

The `__main__` trains on a fixed synthetic, learnable batch (class k is a coloured
square at a class-dependent position over noise) and logs the loss per step.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from capsjax import caps_ops
from capsjax import layers
from capsjax import losses
from capsjax import metrics as metrics_lib
from capsjax import models
from capsjax import routing

HEADS = ("routed", "shared")


class SharedCapsHead(nnx.Module):
  """Class capsules from a grid of primary capsules, weights shared across positions.

  u [B, P*T, D_in] (P positions, T types, position-major as PrimaryCaps emits) ->
  u_hat [B, P*T, N_out, D_out] with W [T, N_out, D_in, D_out] -> dynamic routing.
  """

  def __init__(
    self,
    types: int,
    in_dim: int,
    num_out: int,
    out_dim: int,
    *,
    routing_iterations: int,
    rngs: nnx.Rngs,
  ):
    self.types = types
    self.routing_iterations = routing_iterations
    self.w = nnx.Param(
      0.05 * jax.random.normal(rngs.params(), (types, num_out, in_dim, out_dim), jnp.float32)
    )

  def route(self, u: jax.Array) -> routing.Routed:
    """u: [B, N_in, D_in] -> Routed(v [B, N_out, D_out], |v| [B, N_out], c [B, N_in, N_out])."""
    b, n_in, d_in = u.shape
    if n_in % self.types:
      raise ValueError(f"SharedCapsHead: N_in={n_in} is not a multiple of types={self.types}")
    u = u.reshape(b, n_in // self.types, self.types, d_in)  # [B, P, T, D_in]
    u_hat = jnp.einsum("bpti,tmio->bptmo", u, self.w[...])  # [B, P, T, N_out, D_out]
    u_hat = u_hat.reshape(b, n_in, *u_hat.shape[3:])  # [B, N_in, N_out, D_out]
    return routing.dynamic(u_hat, self.routing_iterations)


class TinyCapsNet(nnx.Module):
  """Conv(5, stride 2) -> ReLU -> PrimaryCaps(5, stride 2) -> capsule head.

  For 32x32x3 inputs: 14x14x`channels` -> 5x5 grid x `types` primary capsules.
  """

  def __init__(
    self,
    *,
    image_shape: Sequence[int] = (32, 32, 3),
    num_classes: int = 10,
    channels: int = 32,
    types: int = 8,
    primary_dim: int = 8,
    class_dim: int = 8,
    routing_iterations: int = 3,
    head: str = "routed",
    rngs: nnx.Rngs,
  ):
    if head not in HEADS:
      raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    h, w, c = (int(d) for d in image_shape)
    self.image_shape = (h, w, c)
    self.conv = layers.Conv2D(c, channels, 5, stride=2, rngs=rngs)
    self.primary = layers.PrimaryCaps(channels, types, primary_dim, 5, 2, rngs=rngs)
    g1h, g1w = (h - 5) // 2 + 1, (w - 5) // 2 + 1
    grid = ((g1h - 5) // 2 + 1) * ((g1w - 5) // 2 + 1)
    if grid < 1:
      raise ValueError(f"image shape {tuple(image_shape)} is too small for TinyCapsNet")
    if head == "routed":
      self.head = layers.RoutedCaps(
        grid * types,
        primary_dim,
        num_classes,
        class_dim,
        routing_iterations=routing_iterations,
        rngs=rngs,
      )
    else:
      self.head = SharedCapsHead(
        types, primary_dim, num_classes, class_dim, routing_iterations=routing_iterations, rngs=rngs
      )

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """images [B, H, W, C] -> {'v': [B, K, D], 'class_scores': [B, K],
    'assignments': [B, N_in, K]}."""
    if tuple(images.shape[1:]) != self.image_shape:
      raise ValueError(
        f"images must have shape [B, {', '.join(map(str, self.image_shape))}],"
        f" got {tuple(images.shape)}"
      )
    x = jax.nn.relu(self.conv(images))  # [B, H1, W1, channels]
    u = self.primary(x)  # [B, N_in, D_in]
    r = self.head.route(u)  # poses [B, K, D], assignments [B, N_in, K]
    return {
      "v": r.poses,
      "class_scores": caps_ops.capsule_lengths(r.poses),
      "assignments": r.assignments,
    }


def loss_fn(model: TinyCapsNet, images: jax.Array, labels: jax.Array):
  """Mean margin loss over the batch, and {'loss', 'accuracy'}. images [B,H,W,C], labels [B]."""
  out = model(images)
  loss = jnp.mean(losses.margin_loss(out["class_scores"], labels))  # []
  return loss, {"loss": loss, "accuracy": metrics_lib.accuracy(out["class_scores"], labels)}


def create(
  *,
  head: str = "routed",
  routing_iterations: int = 3,
  learning_rate: float = 3e-3,
  seed: int = 0,
  **model_kwargs,
):
  """Builds (graphdef, state) of (TinyCapsNet, nnx.Optimizer(Adam))."""
  model = TinyCapsNet(
    head=head,
    routing_iterations=routing_iterations,
    rngs=nnx.Rngs(params=jax.random.key(seed)),
    **model_kwargs,
  )
  optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
  return nnx.split((model, optimizer))


def make_train_step(graphdef):
  """Jitted pure step (state, batch) -> (state, {'loss','accuracy'}); state is donated."""

  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    grad_fn = nnx.value_and_grad(lambda m: loss_fn(m, batch["image"], batch["label"]), has_aux=True)
    (_, aux), grads = grad_fn(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), aux

  return jax.jit(step, donate_argnums=0)


def synthetic_batch(n: int, *, seed: int = 0, shape=(32, 32, 3), num_classes: int = 10):
  """{'image': float32 [n, H, W, C], 'label': int32 [n]}: class k is a coloured 8x8 square
  at a class-dependent position over uniform noise."""
  rng = np.random.default_rng(seed)
  labels = (np.arange(n) % num_classes).astype(np.int32)
  images = rng.uniform(0, 0.3, (n, *shape)).astype(np.float32)
  h, w, c = shape
  for i, k in enumerate(labels):
    y, x = (3 * k) % (h - 8), (7 * k) % (w - 8)
    images[i, y : y + 8, x : x + 8, :] = 0.2
    images[i, y : y + 8, x : x + 8, k % c] = 1.0
  return {"image": images, "label": labels}


def train(
  *,
  steps: int,
  batch_size: int = 32,
  head: str = "routed",
  routing_iterations: int = 3,
  seed: int = 0,
) -> list[float]:
  """Trains on one fixed synthetic batch for `steps` steps; returns the losses."""
  graphdef, state = create(head=head, routing_iterations=routing_iterations, seed=seed)
  model, _ = nnx.merge(graphdef, state)
  logging.info(
    "TinyCapsNet (%s head, %d routing iterations): %d parameters",
    head,
    routing_iterations,
    models.count_params(model),
  )
  step_fn = make_train_step(graphdef)
  batch = synthetic_batch(batch_size, seed=seed)
  out = []
  for i in range(steps):
    state, m = step_fn(state, batch)
    out.append(float(m["loss"]))
    logging.info("step %d: loss %.4f, accuracy %.3f", i + 1, out[-1], float(m["accuracy"]))
  return out


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from capsjax import errors  # pylint: disable=g-import-not-at-top

  with errors.exit_on_user_error():
    if len(argv) > 1:
      raise errors.ConfigError(f"unexpected arguments: {argv[1:]}; only flags are taken")
    from capsjax.run import cpu_runtime  # pylint: disable=g-import-not-at-top

    cpu_runtime.configure_cpu_runtime()  # before JAX starts its backends.
    f = flags.FLAGS
    for name in ("steps", "batch_size", "routing_iterations"):
      if f[name].value < 1:
        raise errors.ConfigError(f"--{name}={f[name].value}: expected an integer >= 1")
    losses_ = train(
      steps=f.steps,
      batch_size=f.batch_size,
      head=f.head,
      routing_iterations=f.routing_iterations,
      seed=f.seed,
    )
  print(
    f"{f.head} head, {f.routing_iterations} routing iterations: loss "
    f"{losses_[0]:.4f} (step 1) -> {losses_[-1]:.4f} (step {len(losses_)})",
    flush=True,
  )


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_integer("steps", 20, "Training steps on the fixed synthetic batch.")
  flags.DEFINE_integer("batch_size", 32, "Batch size.")
  flags.DEFINE_enum("head", "routed", HEADS, "Capsule head.")
  flags.DEFINE_integer("routing_iterations", 3, "Routing iterations.")
  flags.DEFINE_integer("seed", 0, "Seed.")
  from capsjax import errors  # pylint: disable=g-import-not-at-top

  app.run(main, flags_parser=errors.parse_flags)
