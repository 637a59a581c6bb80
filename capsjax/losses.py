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


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """The loss hyperparameters, with the paper's values as defaults (Sec. 3 and 4.1).

  The one place these defaults are written: `margin_loss` and the configs
  (`configs/common.py`) read them from here.
  """

  m_plus: float = 0.9
  m_minus: float = 0.1
  lam: float = 0.5
  recon_weight: float = 0.392  # x per-pixel MSE on 28x28 == the paper's 0.0005 x SSE.

  @classmethod
  def from_config(cls, loss_cfg) -> LossWeights:
    """From a `config.loss` ConfigDict (or any mapping with the four fields)."""
    return cls(*(float(loss_cfg[f.name]) for f in dataclasses.fields(cls)))


PAPER = LossWeights()


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
  m_plus: float = PAPER.m_plus,
  m_minus: float = PAPER.m_minus,
  lam: float = PAPER.lam,
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
  present = t * jnp.square(jnp.maximum(0.0, m_plus - x))  # [..., K]
  absent = lam * (1.0 - t) * jnp.square(jnp.maximum(0.0, x - m_minus))
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


def spread_loss(activations: jax.Array, labels: jax.Array, *, margin: float = 0.2) -> jax.Array:
  """Spread loss of EM routing (Hinton, Sabour & Frosst 2018, Sec. 3.1, Eq. 3).

  L = sum over the wrong classes i of max(0, m - (a_t - a_i))^2, with a_t the target
  class's activation. It asks only that a_t exceed every other activation by the margin,
  not that activations reach fixed levels as the margin loss does; the paper raises m
  linearly from 0.2 to 0.9 during training (the caller's schedule).

  Args:
    activations: [..., K] class activations a_i.
    labels: [...] integer class ids in [0, K).
    margin: m.

  Returns:
    [...] per-example loss, dtype of `activations` (at least float32).
  """
  a, t = _scores_and_targets(activations, labels, "activations")
  a_t = jnp.sum(a * t, axis=-1, keepdims=True)  # [..., 1]
  per_class = jnp.square(jnp.maximum(0.0, margin - (a_t - a)))  # [..., K]
  return jnp.sum((1.0 - t) * per_class, axis=-1)  # [...]
