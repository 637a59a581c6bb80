"""Pure losses and metrics for two-object images (MultiMNIST, Sec. 6 of the paper), and the
softmax cross-entropy of the baseline CNN; one value per example, callers reduce.

Two-object labels are int [..., 2]: the two classes present, in either order. Every
function here gives the same result for (a, b) and (b, a).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from capsjax import losses
from capsjax.losses import LossWeights


def _check_scores(scores, labels, name: str, label_axis: bool):
  """(scores in at least float32 [..., K], int labels); checks shapes and dtypes.

  label_axis: labels are [..., 2] (True) or [...] (False).
  """
  scores = jnp.asarray(scores)
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}")
  if scores.ndim < 1:
    raise ValueError(f"{name} must have shape [..., K] (a class axis), got shape {scores.shape}")
  expected = scores.shape[:-1] + ((2,) if label_axis else ())
  if labels.shape != expected:
    what = "[..., 2], the 2 classes present" if label_axis else "[...], one class"
    raise ValueError(
      f"labels shape {labels.shape} must be {expected} ({what} per example of {name} "
      f"shape {scores.shape})"
    )
  return scores.astype(jnp.promote_types(scores.dtype, jnp.float32)), labels


def pair_targets(labels: jax.Array, num_classes: int, dtype=jnp.float32) -> jax.Array:
  """Two-hot targets: T_k = 1 for both classes of labels [..., 2], else 0 -> [..., K].

  A repeated class (labels (a, a)) gives one 1, not a 2.
  """
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=dtype)  # [..., 2, K]
  return jnp.max(one_hot, axis=-2)  # [..., K]


def two_target_margin_loss(
  lengths: jax.Array,
  labels: jax.Array,
  *,
  m_plus: float = LossWeights.m_plus,
  m_minus: float = LossWeights.m_minus,
  lam: float = LossWeights.lam,
) -> jax.Array:
  """The margin loss (Eq. 4) with both present classes as targets, summed over classes.

  L_k = T_k max(0, m+ - |v_k|)^2 + lam (1 - T_k) max(0, |v_k| - m-)^2 with T_k = 1 for the
  two classes of `labels`: `capsjax.losses.margin_loss` with two-hot targets (same
  hyperparameter names and defaults, same reduction).

  Args:
    lengths: [..., K] capsule lengths |v_k|.
    labels: int [..., 2], the two classes present.
    m_plus, m_minus, lam: the paper's 0.9, 0.1, 0.5.

  Returns:
    [...] per-example loss, dtype of `lengths` (at least float32).
  """
  x, labels = _check_scores(lengths, labels, "lengths", label_axis=True)
  t = pair_targets(labels, x.shape[-1], x.dtype)  # [..., K]
  return losses.margin_loss_with_targets(x, t, m_plus=m_plus, m_minus=m_minus, lam=lam)


def pair_accuracy(scores: jax.Array, labels: jax.Array) -> jax.Array:
  """1.0 where the two largest scores are exactly the two labels, else 0.0.

  The paper's MultiMNIST metric ("we count an example correct if the two most active
  digit capsules are exactly the two labels"); the authors' code computes the same set
  comparison with `tf.nn.top_k`. The top two come from `jax.lax.top_k`, which breaks ties
  towards the lower class index: with scores tied for second place only the lower class
  counts as predicted. A repeated class (labels (a, a)) is correct when a is in the top two.

  Args:
    scores: [..., K] class scores (capsule lengths, probabilities or logits), K >= 2.
    labels: int [..., 2].

  Returns:
    float32 [...].
  """
  x, labels = _check_scores(scores, labels, "scores", label_axis=True)
  if x.shape[-1] < 2:
    raise ValueError(f"scores needs K >= 2 classes for a top-2 metric, got shape {x.shape}")
  _, top2 = jax.lax.top_k(x, 2)  # [..., 2]
  found = jnp.any(labels[..., :, None] == top2[..., None, :], axis=-1)  # [..., 2]
  return jnp.all(found, axis=-1).astype(jnp.float32)  # [...]


def sigmoid_pair_xent(
  logits: jax.Array, labels: jax.Array, *, positive_target: float = 1.0
) -> jax.Array:
  """Per-class sigmoid cross-entropy against two-hot targets, summed over classes.

  sum_k BCE(sigmoid(z_k), T_k), T_k = positive_target for the two classes of `labels`,
  else 0 (`optax.sigmoid_binary_cross_entropy`): the multi-label loss of a softmax-free
  baseline on pairs. The authors' code (Sarasra/models research/capsules,
  `models/layers/layers.py`, `evaluate`, loss_type 'sigmoid') takes two-hot labels / 2,
  i.e. positive_target=0.5, and averages over classes instead of summing (K times
  smaller).

  Args:
    logits: [..., K].
    labels: int [..., 2].
    positive_target: T_k of the present classes, in (0, 1].

  Returns:
    [...] per-example loss, at least float32.
  """
  if not 0.0 < positive_target <= 1.0:
    raise ValueError(f"positive_target must be in (0, 1], got {positive_target!r}")
  x, labels = _check_scores(logits, labels, "logits", label_axis=True)
  t = positive_target * pair_targets(labels, x.shape[-1], x.dtype)  # [..., K]
  return jnp.sum(optax.sigmoid_binary_cross_entropy(x, t), axis=-1)  # [...]


def softmax_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy with integer labels: -log softmax(z)_y.

  The baseline CNN's class loss (the paper's "10 class softmax layer with cross entropy
  loss"), `optax.softmax_cross_entropy_with_integer_labels` in at least float32.

  Args:
    logits: [..., K].
    labels: int [...] in [0, K).

  Returns:
    [...] per-example loss, at least float32.
  """
  x, labels = _check_scores(logits, labels, "logits", label_axis=False)
  return optax.softmax_cross_entropy_with_integer_labels(x, labels)  # [...]
