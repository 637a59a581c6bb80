"""The pure train and eval steps, and evaluation over a whole split.

Flax NNX in its functional form: `graphdef, state = nnx.split((model, optimizer))` once,
then a jitted step `(state, batch, key) -> (state, metrics)` merges once, differentiates,
updates and splits again (as Flax's NNX functional-API example does). The state is
donated; the routing iteration count is part of `graphdef`, so it is static.
`train_chunk` runs the same step over a chunk of batches gathered on the device, as one
program (the scanned training loop, `config.loop='scan'`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from capsjax import augment
from capsjax.data import input_pipeline
from capsjax import losses
from capsjax import metrics as metrics_lib
from capsjax import models
from capsjax import optim
from capsjax import parallel
from capsjax.run import cpu_runtime

LossWeights = losses.LossWeights


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  """Plain (hashable) augmentation settings pulled out of `config.augment`."""

  max_shift: int = 0
  flip: bool = False
  cutout_size: int = 0
  shift_fraction: float = 0.0
  fill: str = "zero"
  efficient_capsnet: bool = False

  @classmethod
  def from_config(cls, aug_cfg) -> AugmentSpec:
    return cls(
      int(aug_cfg.max_shift),
      bool(aug_cfg.flip),
      int(aug_cfg.cutout_size),
      float(aug_cfg.get("shift_fraction", 0.0)),
      str(aug_cfg.get("fill", "zero")),
      bool(aug_cfg.get("efficient_capsnet", False)),
    )

  def __call__(self, key: jax.Array, images: jax.Array) -> jax.Array:
    """images [B, H, W, C] -> augmented images, the same shape."""
    return augment.augment_batch(
      key,
      images,
      max_shift=self.max_shift,
      flip=self.flip,
      cutout_size=self.cutout_size,
      shift_fraction=self.shift_fraction,
      fill=self.fill,
      efficient_capsnet=self.efficient_capsnet,
    )


def create_model_and_optimizer(
  config, info: input_pipeline.DatasetInfo, steps_per_epoch: int, init_key: jax.Array
):
  """Builds (model, nnx.Optimizer) from the config. Returns (graphdef, state)."""
  model = models.create_model(
    config.model,
    image_shape=info.image_shape,
    num_classes=info.num_classes,
    rngs=nnx.Rngs(params=init_key),
    conv_impl=cpu_runtime.resolve_conv_impl(config.model.conv_impl),
  )
  tx = optim.make_optimizer(config.optim, steps_per_epoch)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  return nnx.split((model, optimizer))


def per_example_losses(
  out: dict[str, jax.Array], images: jax.Array, labels: jax.Array, weights: LossWeights, step
) -> tuple[jax.Array, jax.Array]:
  """(class loss [B], reconstruction [B]) of a model's output dict at train step `step`.

  The class loss is `weights.class_loss` (margin or spread) on out['class_scores']; it is
  reported as 'class_loss' whichever it is, so every run's epochs.csv
  has the same columns. Zero reconstruction loss for a model without a decoder.
  """
  margin = weights.class_loss_per_example(out["class_scores"], labels, step)
  if "reconstruction" in out:
    recon = losses.reconstruction_loss(images, out["reconstruction"], reduction="mean")
  else:
    recon = jnp.zeros_like(margin)
  return margin, recon


def compute_losses(
  model: models.CapsNet, images: jax.Array, labels: jax.Array, weights: LossWeights, step=0
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean total loss over the batch and a dict of float32 batch metrics.

  images [B, H, W, C], labels [B] -> (loss [], {'loss', 'class_loss', 'recon_loss',
  'accuracy'} scalars). The decoder is masked by the true labels; `step` sets the
  spread loss's margin (unused by the margin loss).
  """
  out = model(images, labels)
  margin, recon = per_example_losses(out, images, labels, weights, step)
  loss = jnp.mean(weights.class_weight * margin + weights.recon_weight * recon)
  aux = {
    "loss": loss,
    "class_loss": jnp.mean(margin),
    "recon_loss": jnp.mean(recon),
    "accuracy": metrics_lib.accuracy(out["class_scores"], labels),
  }
  return loss, aux


def _loss_and_grads(model, step, batch, key, weights: LossWeights, aug: AugmentSpec):
  # The augmentation key is fold_in(key, step): a resumed run draws the same
  # augmentations as an uninterrupted one.
  images = aug(jax.random.fold_in(key, step), batch["image"])
  grad_fn = nnx.value_and_grad(
    lambda m: compute_losses(m, images, batch["label"], weights, step), has_aux=True
  )
  (loss, aux), grads = grad_fn(model)
  return loss, aux, grads


def loss_and_grads(graphdef, state, batch, key, *, weights: LossWeights, aug: AugmentSpec):
  """Pure: (loss [], aux, grads) of the model in `state` on one (augmented) batch.

  The same computation as `train_step` without the update (for tests and analysis).
  """
  model, optimizer = nnx.merge(graphdef, state)
  return _loss_and_grads(model, optimizer.step[...], batch, key, weights, aug)


def train_step(
  graphdef, state, batch, key, *, weights: LossWeights, aug: AugmentSpec, schedule: optax.Schedule
):
  """One Adam step: (state, batch {'image' [B,H,W,C], 'label' [B]}, key) -> (state, aux).

  state: nnx.State of (model, optimizer). aux: scalar loss terms, accuracy,
  learning_rate and grad_norm. One merge: the model differentiated is the one updated.
  """
  model, optimizer = nnx.merge(graphdef, state)
  step = optimizer.step[...]
  _, aux, grads = _loss_and_grads(model, step, batch, key, weights, aug)
  aux["grad_norm"] = optax.tree.norm(grads)
  # The batch's training error feeds a plateau schedule (`optim.reduce_on_plateau`);
  # optax's chain drops it for transformations that take no extra arguments.
  optimizer.update(model, grads, value=1.0 - aux["accuracy"])
  # The rate this update used: the plateau's scale is read after the update, which
  # applies a reduction at the end of an epoch to that same update.
  aux["learning_rate"] = schedule(step) * optim.plateau_scale(optimizer.opt_state)
  return nnx.state((model, optimizer)), aux


def train_chunk(
  graphdef,
  state,
  data,
  indices,
  start,
  num_steps,
  key,
  *,
  weights: LossWeights,
  aug: AugmentSpec,
  schedule: optax.Schedule,
  max_steps: int,
  mesh,
):
  """Up to `max_steps` train steps as one loop on the device, batches gathered there.

  Step i trains on batch `start + i` of the epoch: the examples `indices[start + i]`,
  cast by `input_pipeline.batch_at` as the host loop casts them, then exactly
  `train_step`. `num_steps` is traced, so one compiled program serves every chunk
  length (a chunk ends early at a log step, an epoch end or a time bound).

  Args:
    state: nnx.State of (model, optimizer).
    data: {'image': uint8 [N, H, W, C], 'label': int32 [N]}, the training set
      (`parallel.put_dataset`).
    indices: int32 [S, B], the examples of each batch of the epoch
      (`input_pipeline.epoch_batch_indices`, placed by `parallel.put_batch_indices`).
    start: int32 [], the epoch's batch index of the first step.
    num_steps: int32 [], steps to run, 1 <= num_steps <= max_steps, start + num_steps <= S.
    key: the augmentation key, as for `train_step`.
    max_steps: static length of the returned metric buffers.
    mesh: the data-parallel mesh the batches are split over.

  Returns:
    (state, aux): aux holds each metric of `train_step` per step, float32 [max_steps];
    entries from num_steps on are 0.
  """

  def one_step(state, i):
    idx = jax.lax.dynamic_index_in_dim(indices, start + i, keepdims=False)  # [B]
    batch = parallel.constrain_batch(
      input_pipeline.batch_at(data["image"], data["label"], idx), mesh
    )  # [B, H, W, C]
    return train_step(graphdef, state, batch, key, weights=weights, aug=aug, schedule=schedule)

  return run_steps(one_step, state, num_steps, max_steps)


def run_steps(one_step, state, num_steps, max_steps: int):
  """`one_step(state, i) -> (state, aux)` for i = 0 .. num_steps - 1 as one `fori_loop`.

  `num_steps` may be traced (one program for every chunk length). Returns (state, aux):
  each metric of every step stacked, {name: [max_steps, ...]}; entries from num_steps on
  are 0.
  """
  aux_shapes = jax.eval_shape(one_step, state, 0)[1]
  stacked = {k: jnp.zeros((max_steps, *v.shape), v.dtype) for k, v in aux_shapes.items()}

  def body(i, carry):
    state, stacked = carry
    state, aux = one_step(state, i)
    return state, {k: stacked[k].at[i].set(aux[k]) for k in stacked}

  return jax.lax.fori_loop(0, num_steps, body, (state, stacked))


def eval_step(graphdef, state, batch, *, weights: LossWeights):
  """Masked sums over one padded eval batch: {'correct','class_loss','recon_loss','count'}.

  batch: {'image' [B,H,W,C], 'label' [B], 'mask' [B]}. The decoder is masked by the
  predicted class, as at test time in the paper.
  """
  model, optimizer = nnx.merge(graphdef, state)
  model.eval()  # BatchNorm reads its running statistics (Efficient-CapsNet).
  images, labels = batch["image"], batch["label"]
  out = model(images)
  margin, recon = per_example_losses(out, images, labels, weights, optimizer.step[...])
  m = batch["mask"].astype(jnp.float32)
  return {
    "correct": jnp.sum((out["pred"] == labels) * m),
    "class_loss": jnp.sum(margin * m),
    "recon_loss": jnp.sum(recon * m),
    "count": jnp.sum(m),
  }


def _hyperparameters(config, steps_per_epoch: int):
  """(LossWeights, AugmentSpec, learning-rate schedule) of a run: what both the per-step
  and the scanned train step close over, so the two loops cannot drift apart."""
  weights = LossWeights.from_config(config.loss, config.num_epochs * steps_per_epoch)
  return (
    weights,
    AugmentSpec.from_config(config.augment),
    optim.make_schedule(config.optim, steps_per_epoch),
  )


def make_steps(graphdef, config, steps_per_epoch: int, mesh):
  """Jitted (train_step, eval_step) closed over the static graphdef and hyperparameters."""
  weights, aug, schedule = _hyperparameters(config, steps_per_epoch)
  train = parallel.jit_data_parallel(
    lambda state, batch, key: train_step(
      graphdef, state, batch, key, weights=weights, aug=aug, schedule=schedule
    ),
    mesh,
    donate_argnums=0,
  )
  evaluate_fn = parallel.jit_data_parallel(
    lambda state, batch: eval_step(graphdef, state, batch, weights=weights), mesh
  )
  return train, evaluate_fn


def make_train_chunk(graphdef, config, steps_per_epoch: int, mesh, max_steps: int):
  """Jitted `train_chunk` (state, data, indices, start, num_steps, key) -> (state, aux).

  The state is donated; outputs are replicated over `mesh`, as `make_steps`' step.
  """
  weights, aug, schedule = _hyperparameters(config, steps_per_epoch)
  return parallel.jit_data_parallel(
    lambda state, data, indices, start, num_steps, key: train_chunk(
      graphdef,
      state,
      data,
      indices,
      start,
      num_steps,
      key,
      weights=weights,
      aug=aug,
      schedule=schedule,
      max_steps=max_steps,
      mesh=mesh,
    ),
    mesh,
    donate_argnums=0,
  )


def evaluate_split(
  eval_fn: Callable,
  state,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  batch_size: int,
  mesh,
  weights: LossWeights,
) -> dict[str, float]:
  """Accuracy and mean losses over every example of (images [N,H,W,C], labels [N]) once.

  Returns {'accuracy', 'class_loss', 'recon_loss', 'loss' (margin + weighted recon),
  'count'}.
  """
  totals: dict[str, float] = {}
  batches = input_pipeline.eval_batches(
    images, labels, batch_size=batch_size, multiple_of=parallel.num_devices(mesh)
  )
  for batch in parallel.prefetch(batches, mesh):
    for k, v in jax.device_get(eval_fn(state, batch)).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return metrics_from_sums(totals, weights)


def metrics_from_sums(totals: dict[str, float], weights: LossWeights) -> dict[str, float]:
  """`eval_step`'s sums over a split -> {'accuracy', 'class_loss', 'recon_loss', 'loss',
  'count'}, the losses averaged over the examples."""
  n = totals["count"]
  class_loss, recon = totals["class_loss"] / n, totals["recon_loss"] / n
  return {
    "accuracy": totals["correct"] / n,
    "class_loss": class_loss,
    "recon_loss": recon,
    "loss": weights.class_weight * class_loss + weights.recon_weight * recon,
    "count": n,
  }
