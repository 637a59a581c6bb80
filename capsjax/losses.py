"""Pure CapsNet losses with one value per example; callers reduce (`.mean()`).

The paper's total loss is  margin + 0.0005 * sum-of-squared-errors  over 784 pixels.
CapsNet-Keras and CapsNet-Fashion-MNIST write the same thing as
margin + 0.392 * mean-squared-error (0.392 / 784 = 0.0005). capsjax configs use the
per-pixel mean with weight 0.392, which keeps the balance between the two terms for other
image sizes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


CLASS_LOSSES = ("margin", "spread")


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """The loss hyperparameters, with the paper's values as defaults (Sec. 3 and 4.1).

  The one place these defaults are written: `margin_loss` and the configs
  (`configs/common.py`, through `config_defaults`) read them from here.

  The total loss is class_weight x class loss + recon_weight x reconstruction.
  `class_loss` picks the loss on the class scores: 'margin' (Sabour et al., Eq. 4, with
  m_plus, m_minus, lam) or 'spread' (Hinton et al. 2018, Eq. 3, for EM routing's
  activations). The spread loss's margin rises linearly from `spread_margin_start` to
  `spread_margin_end` over the first `spread_ramp_fraction` of the run's steps, as the
  EM paper's "starting with a small margin of 0.2 and linearly increasing it during
  training to 0.9" (Sec. 3.1). `total_steps` is the run's length (num_epochs x steps
  per epoch), set by `steps.make_steps` (not a config field); 0 (a run of unknown
  length) means the margin has finished rising.
  """

  m_plus: float = 0.9
  m_minus: float = 0.1
  lam: float = 0.5
  recon_weight: float = 0.392  # x per-pixel MSE on 28x28 == the paper's 0.0005 x SSE.
  # x the class loss in the total. The authors' code (Sarasra/models research/capsules,
  # models/layers.py L357-362 and L396) halves the margin loss and averages it over the
  # classes: the paper's sum / (2K), 0.05 for 10 classes.
  class_weight: float = 1.0
  class_loss: str = "margin"
  spread_margin_start: float = 0.2
  spread_margin_end: float = 0.9
  spread_ramp_fraction: float = 1.0
  total_steps: int = 0

  @classmethod
  def config_defaults(cls) -> dict:
    """The `config.loss` fields and their defaults (every field but `total_steps`)."""
    return {k: v for k, v in dataclasses.asdict(cls()).items() if k != "total_steps"}

  @classmethod
  def from_config(cls, loss_cfg, total_steps: int = 0) -> LossWeights:
    """From a `config.loss` ConfigDict (or any mapping with `config_defaults`' fields).

    Missing fields take their defaults: a config.json without the class-loss fields
    trains with the margin loss, the class loss its run was trained with.
    """
    values = {}
    for name, default in cls.config_defaults().items():
      value = loss_cfg[name] if name in loss_cfg else default
      values[name] = str(value) if isinstance(default, str) else float(value)
    return cls(**values, total_steps=int(total_steps))

  def spread_margin(self, step) -> jax.Array:
    """The spread loss's margin m at train step `step` (a scalar, traced or not)."""
    start, end = self.spread_margin_start, self.spread_margin_end
    ramp = self.spread_ramp_fraction * self.total_steps
    if self.total_steps <= 0 or ramp <= 0:
      return jnp.asarray(end, jnp.float32)
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / ramp, 0.0, 1.0)
    return start + (end - start) * progress

  def class_loss_per_example(self, scores: jax.Array, labels: jax.Array, step) -> jax.Array:
    """[..., K] class scores, [...] labels -> [...] margin or spread loss (`class_loss`)."""
    if self.class_loss == "margin":
      return margin_loss(scores, labels, m_plus=self.m_plus, m_minus=self.m_minus, lam=self.lam)
    if self.class_loss == "spread":
      return spread_loss(scores, labels, margin=self.spread_margin(step))
    raise ValueError(f"class_loss must be one of {CLASS_LOSSES}, got {self.class_loss!r}")


def _scores_and_targets(scores, labels, name: str):
  """(scores in at least float32 [..., K], one-hot targets [..., K]); checks the shapes."""
  scores = jnp.asarray(scores)
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}")
  if scores.ndim < 1:
    raise ValueError(f"{name} must have shape [..., K] (a class axis), got shape {scores.shape}")
  if labels.shape != scores.shape[:-1]:
    raise ValueError(
      f"labels shape {labels.shape} must equal {name} shape without the class axis "
      f"{scores.shape[:-1]} ({name} shape {scores.shape})"
    )
  x = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
  return x, jax.nn.one_hot(labels, x.shape[-1], dtype=x.dtype)


def margin_loss(
  lengths: jax.Array,
  labels: jax.Array,
  *,
  m_plus: float = LossWeights.m_plus,
  m_minus: float = LossWeights.m_minus,
  lam: float = LossWeights.lam,
) -> jax.Array:
  """Margin loss, Eq. 4 of the paper, summed over classes.

  L_k = T_k max(0, m+ - |v_k|)^2 + lam (1 - T_k) max(0, |v_k| - m-)^2.

  Args:
    lengths: [..., K] capsule lengths |v_k|.
    labels: [...] integer class ids in [0, K).
    m_plus, m_minus, lam: the paper's 0.9, 0.1, 0.5.

  Returns:
    [...] per-example loss, dtype of `lengths` (at least float32).
  """
  x, t = _scores_and_targets(lengths, labels, "lengths")
  return margin_loss_with_targets(x, t, m_plus=m_plus, m_minus=m_minus, lam=lam)


def margin_loss_with_targets(
  lengths: jax.Array,
  targets: jax.Array,
  *,
  m_plus: float = LossWeights.m_plus,
  m_minus: float = LossWeights.m_minus,
  lam: float = LossWeights.lam,
) -> jax.Array:
  """Eq. 4 of the paper for any set of present classes, summed over classes.

  Args:
    lengths: [..., K] capsule lengths |v_k| (float).
    targets: [..., K] T_k, 1 for a present class and 0 otherwise (one-hot for
      `margin_loss`, two-hot for overlapping pairs).
    m_plus, m_minus, lam: the paper's 0.9, 0.1, 0.5.

  Returns:
    [...] per-example loss.
  """
  present = targets * jnp.square(jnp.maximum(0.0, m_plus - lengths))  # [..., K]
  absent = lam * (1.0 - targets) * jnp.square(jnp.maximum(0.0, lengths - m_minus))
  return jnp.sum(present + absent, axis=-1)  # [...]


def reconstruction_loss(
  images: jax.Array, reconstructions: jax.Array, *, reduction: str = "sum", batch_dims: int = 1
) -> jax.Array:
  """Per-example squared reconstruction error.

  Args:
    images: [*batch, ...] targets, e.g. [B, H, W, C] in [0, 1].
    reconstructions: same shape as `images` (a flat [B, H*W*C] decoder output is
      accepted and reshaped).
    reduction: 'sum' (the paper's sum of squared errors, weighted by 0.0005) or
      'mean' (per-pixel mean, weighted by 0.392 in CapsNet-Keras and CapsNet-Fashion-MNIST).
    batch_dims: number of leading batch axes that are kept.

  Returns:
    [*batch] per-example loss, at least float32.
  """
  images = jnp.asarray(images)
  reconstructions = jnp.asarray(reconstructions)
  if (
    isinstance(batch_dims, bool)
    or not isinstance(batch_dims, int)
    or not 0 <= batch_dims <= images.ndim
  ):
    raise ValueError(
      f"batch_dims must be an int in [0, images.ndim={images.ndim}], got {batch_dims!r}"
    )
  if reconstructions.shape != images.shape:
    # Only the per-example axes may be flattened; the batch axes must match, otherwise
    # a reshape would silently mix pixels of different examples.
    if (
      reconstructions.size != images.size
      or reconstructions.shape[:batch_dims] != images.shape[:batch_dims]
    ):
      raise ValueError(
        f"reconstructions shape {reconstructions.shape} does not match images shape "
        f"{images.shape} (the first batch_dims={batch_dims} axes must be equal and "
        "the sizes must match)"
      )
    reconstructions = reconstructions.reshape(images.shape)
  if reduction not in ("sum", "mean"):
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
  dtype = jnp.promote_types(jnp.result_type(images, reconstructions), jnp.float32)
  err = jnp.square(images.astype(dtype) - reconstructions.astype(dtype))
  axes = tuple(range(batch_dims, err.ndim))
  return jnp.sum(err, axis=axes) if reduction == "sum" else jnp.mean(err, axis=axes)


def spread_loss(
  activations: jax.Array, labels: jax.Array, *, margin: float | jax.Array = 0.2
) -> jax.Array:
  """Spread loss of EM routing (Hinton, Sabour & Frosst 2018, Sec. 3.1, Eq. 3).

  L = sum over the wrong classes i of max(0, m - (a_t - a_i))^2, with a_t the target
  class's activation. It asks only that a_t exceed every other activation by the margin,
  not that activations reach fixed levels as the margin loss does; the paper raises m
  linearly from 0.2 to 0.9 during training (the caller's schedule).

  Args:
    activations: [..., K] class activations a_i.
    labels: [...] integer class ids in [0, K).
    margin: m, a Python float or a traced scalar (the trainer's schedule).

  Returns:
    [...] per-example loss, dtype of `activations` (at least float32).
  """
  a, t = _scores_and_targets(activations, labels, "activations")
  a_t = jnp.sum(a * t, axis=-1, keepdims=True)  # [..., 1]
  per_class = jnp.square(jnp.maximum(0.0, margin - (a_t - a)))  # [..., K]
  return jnp.sum((1.0 - t) * per_class, axis=-1)  # [...]
