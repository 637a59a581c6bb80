"""Tests for capsjax.pair_losses against values worked out by hand or in NumPy float64.

Every call goes through `jax.jit`; every two-label function is checked with the labels in
both orders.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capsjax import losses
from capsjax import pair_losses as pl

_MARGIN = jax.jit(pl.two_target_margin_loss)
_ACCURACY = jax.jit(pl.pair_accuracy)
_SIGMOID = jax.jit(pl.sigmoid_pair_xent)
_SOFTMAX = jax.jit(pl.softmax_xent)


def _swap(labels):
  return np.asarray(labels)[..., ::-1].copy()


# ---------------------------------------------------------------------------------------
# two_target_margin_loss
# ---------------------------------------------------------------------------------------

# Lengths [B=2, K=4] and labels [B, 2] with the loss worked out by hand (m+ 0.9, m- 0.1,
# lambda 0.5):
#   ex 0: labels (0, 2), |v| = [0.95, 0.2, 0.5, 0.05]
#         present: max(0, 0.9 - 0.95)^2 = 0;  (0.9 - 0.5)^2 = 0.16
#         absent:  0.5 (0.2 - 0.1)^2 = 0.005;  0.5 max(0, 0.05 - 0.1)^2 = 0
#         total 0.165
#   ex 1: labels (3, 1), |v| = [0.6, 0.3, 0.0, 1.0]
#         present: (0.9 - 0.3)^2 = 0.36;  max(0, 0.9 - 1.0)^2 = 0
#         absent:  0.5 (0.6 - 0.1)^2 = 0.125;  0
#         total 0.485
HAND_LENGTHS = np.array([[0.95, 0.2, 0.5, 0.05], [0.6, 0.3, 0.0, 1.0]], np.float32)
HAND_LABELS = np.array([[0, 2], [3, 1]], np.int32)
HAND_LOSS = np.array([0.165, 0.485])


def test_margin_hand_computed_in_either_order():
  loss = _MARGIN(HAND_LENGTHS, HAND_LABELS)
  assert loss.shape == (2,) and loss.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(loss), HAND_LOSS, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(loss, _MARGIN(HAND_LENGTHS, _swap(HAND_LABELS)))


def test_margin_matches_numpy_on_random_batch_and_custom_hyperparameters():
  rng = np.random.default_rng(0)
  lengths = rng.uniform(0, 1, (2, 5, 10)).astype(np.float32)  # [B1, B2, K]
  labels = (
    np.stack([rng.permutation(10)[:2] for _ in range(10)]).reshape(2, 5, 2).astype(np.int32)
  )  # [B1, B2, 2], two different classes each
  for m_plus, m_minus, lam in [(0.9, 0.1, 0.5), (0.8, 0.2, 1.0)]:
    expected = np.zeros((2, 5))
    for idx in np.ndindex(2, 5):
      for k in range(10):
        x = float(lengths[idx + (k,)])
        if k in labels[idx]:
          expected[idx] += max(0.0, m_plus - x) ** 2
        else:
          expected[idx] += lam * max(0.0, x - m_minus) ** 2
    fn = jax.jit(
      lambda x, y, a=m_plus, b=m_minus, c=lam: pl.two_target_margin_loss(
        x, y, m_plus=a, m_minus=b, lam=c
      )
    )
    np.testing.assert_allclose(np.asarray(fn(lengths, labels)), expected, rtol=1e-5, atol=1e-7)


def test_margin_relates_to_the_single_target_loss():
  # Two targets = one target plus class b moved from the absent to the present term.
  rng = np.random.default_rng(1)
  x = rng.uniform(0, 1, (6, 10)).astype(np.float32)
  a, b = np.array([0, 3, 5, 9, 1, 2]), np.array([7, 4, 2, 0, 8, 6])
  xb = x[np.arange(6), b].astype(np.float64)
  single = np.asarray(jax.jit(losses.margin_loss)(x, a), np.float64)
  expected = single - 0.5 * np.maximum(0, xb - 0.1) ** 2 + np.maximum(0, 0.9 - xb) ** 2
  got = _MARGIN(x, np.stack([a, b], -1).astype(np.int32))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
  # A repeated class is one target: the single-target loss.
  same = _MARGIN(x, np.stack([a, a], -1).astype(np.int32))
  np.testing.assert_allclose(np.asarray(same), single, rtol=1e-6)


def test_margin_upcasts_low_precision():
  loss = _MARGIN(jnp.asarray(HAND_LENGTHS, jnp.bfloat16), HAND_LABELS)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(loss), HAND_LOSS, rtol=2e-2, atol=2e-3)


def test_margin_rejects_bad_labels():
  with pytest.raises(ValueError, match="labels shape"):
    pl.two_target_margin_loss(HAND_LENGTHS, HAND_LABELS[:, 0])
  with pytest.raises(ValueError, match="labels shape"):
    pl.two_target_margin_loss(HAND_LENGTHS, np.zeros((2, 3), np.int32))
  with pytest.raises(TypeError, match="integer"):
    pl.two_target_margin_loss(HAND_LENGTHS, HAND_LABELS.astype(np.float32))
  with pytest.raises(ValueError, match="class axis"):
    pl.two_target_margin_loss(np.float32(0.5), np.zeros((2,), np.int32))


# ---------------------------------------------------------------------------------------
# pair_accuracy
# ---------------------------------------------------------------------------------------


def test_pair_accuracy_by_hand():
  scores = np.array(
    [
      [0.1, 0.9, 0.8, 0.2],  # top two {1, 2}
      [0.1, 0.9, 0.8, 0.2],
      [0.5, 0.9, 0.5, 0.5],  # tie for second: lax.top_k keeps the lower index, 0
      [0.5, 0.9, 0.5, 0.5],
      [0.3, 0.3, 0.3, 0.3],  # all tied: top two {0, 1}
      [0.2, 0.7, 0.6, 0.1],
    ],
    np.float32,
  )
  labels = np.array([[1, 2], [1, 3], [1, 0], [1, 2], [1, 0], [1, 1]], np.int32)
  expected = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])  # (1, 1): 1 is in the top two
  for lab in (labels, _swap(labels)):
    acc = _ACCURACY(scores, lab)
    assert acc.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(acc), expected)


def test_pair_accuracy_matches_numpy_with_leading_axes():
  rng = np.random.default_rng(2)
  # Rounded scores make ties common; NumPy's stable sort also puts the lower index first.
  scores = np.round(rng.uniform(0, 1, (3, 40, 10)), 1).astype(np.float32)
  labels = rng.integers(0, 10, (3, 40, 2)).astype(np.int32)
  top2 = np.argsort(-scores, axis=-1, kind="stable")[..., :2]
  expected = np.array(
    [set(lab) <= set(t) for lab, t in zip(labels.reshape(-1, 2), top2.reshape(-1, 2), strict=True)],
    np.float32,
  ).reshape(3, 40)
  np.testing.assert_array_equal(np.asarray(_ACCURACY(scores, labels)), expected)
  assert 0.0 < expected.mean() < 1.0


def test_pair_accuracy_needs_two_classes():
  with pytest.raises(ValueError, match="K >= 2"):
    pl.pair_accuracy(np.ones((3, 1), np.float32), np.zeros((3, 2), np.int32))


# ---------------------------------------------------------------------------------------
# sigmoid_pair_xent / softmax_xent
# ---------------------------------------------------------------------------------------


def _bce(z, t):
  """Stable NumPy BCE with logits: max(z, 0) - z t + log(1 + exp(-|z|))."""
  z = np.asarray(z, np.float64)
  return np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))


def test_sigmoid_pair_xent_by_hand():
  # logits [0, 2, -1], labels (1, 2): -log s(2) = log(1 + e^-2), -log s(-1) = log(1 + e),
  # class 0 absent: -log(1 - s(0)) = log 2.
  z = np.array([[0.0, 2.0, -1.0]], np.float32)
  expected = np.log(2) + np.log1p(np.exp(-2)) + np.log1p(np.e)
  for lab in ([[1, 2]], [[2, 1]]):
    np.testing.assert_allclose(float(_SIGMOID(z, np.array(lab, np.int32))[0]), expected, rtol=1e-6)


def test_sigmoid_pair_xent_matches_numpy_and_the_authors_half_targets():
  rng = np.random.default_rng(3)
  z = rng.normal(0, 3, (7, 10)).astype(np.float32)
  z[0, :2] = [80.0, -80.0]  # saturated logits stay finite
  labels = np.stack([rng.permutation(10)[:2] for _ in range(7)]).astype(np.int32)
  t = np.zeros((7, 10))
  t[np.arange(7)[:, None], labels] = 1.0
  np.testing.assert_allclose(
    np.asarray(_SIGMOID(z, labels)), _bce(z, t).sum(-1), rtol=1e-5, atol=1e-5
  )
  half = jax.jit(lambda x, y: pl.sigmoid_pair_xent(x, y, positive_target=0.5))(z, labels)
  np.testing.assert_allclose(np.asarray(half), _bce(z, 0.5 * t).sum(-1), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="positive_target"):
    pl.sigmoid_pair_xent(z, labels, positive_target=0.0)


def test_softmax_xent_matches_numpy_including_large_logits():
  rng = np.random.default_rng(4)
  z = rng.normal(0, 2, (2, 6, 10)).astype(np.float32)
  z[0, 0] += 1000.0  # log-sum-exp must not overflow
  y = rng.integers(0, 10, (2, 6)).astype(np.int32)
  z64 = z.astype(np.float64)
  top = z64.max(-1, keepdims=True)
  lse = np.log(np.exp(z64 - top).sum(-1)) + top[..., 0]
  expected = lse - np.take_along_axis(z64, y[..., None], -1)[..., 0]
  loss = _SOFTMAX(z, y)
  assert loss.shape == (2, 6) and loss.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-5, atol=1e-4)
  # By hand: logits [0, log 3], label 1 -> -log(3 / 4).
  two = _SOFTMAX(np.array([[0.0, np.log(3.0)]], np.float32), np.array([1], np.int32))
  np.testing.assert_allclose(float(two[0]), -np.log(0.75), rtol=1e-6)
  with pytest.raises(ValueError, match="labels shape"):
    pl.softmax_xent(z, y[..., None])
