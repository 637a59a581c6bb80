"""Tests for capsjax.losses: margin_loss and reconstruction_loss.

Expected values are written out by hand (Eq. 4 of Sabour et al. 2017 with m+ = 0.9,
m- = 0.1, lambda = 0.5) or computed in NumPy. Every call goes through `jax.jit`.
"""

import functools

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from capsjax import losses
from capsjax import steps
from capsjax.losses import margin_loss, reconstruction_loss


# ---------------------------------------------------------------------------------------
# margin_loss
# ---------------------------------------------------------------------------------------

# Lengths [B=3, K=3] and labels [B] with the loss worked out by hand:
#   ex 0: label 0, |v| = [0.95, 0.05, 0.5]
#         present: max(0, 0.9 - 0.95)^2 = 0
#         absent:  0.5 * max(0, 0.05 - 0.1)^2 = 0;  0.5 * (0.5 - 0.1)^2 = 0.5 * 0.16 = 0.08
#         total 0.08
#   ex 1: label 2, |v| = [0.2, 0.7, 0.1]
#         present: (0.9 - 0.1)^2 = 0.64
#         absent:  0.5 * (0.2 - 0.1)^2 = 0.005;  0.5 * (0.7 - 0.1)^2 = 0.18
#         total 0.825
#   ex 2: label 1, |v| = [0.3, 0.95, 0.0]
#         present: 0;  absent: 0.5 * (0.3 - 0.1)^2 = 0.02;  0
#         total 0.02
HAND_LENGTHS_F64 = np.array([[0.95, 0.05, 0.5], [0.2, 0.7, 0.1], [0.3, 0.95, 0.0]])
HAND_LENGTHS = HAND_LENGTHS_F64.astype(np.float32)
HAND_LABELS = np.array([0, 2, 1], np.int32)
HAND_LOSS = np.array([0.08, 0.825, 0.02])


class TestMarginLoss:
  def test_hand_computed(self):
    loss = jax.jit(margin_loss)(HAND_LENGTHS, HAND_LABELS)
    assert loss.shape == (3,) and loss.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(loss), HAND_LOSS, rtol=1e-6, atol=1e-7)

  def test_hand_computed_custom_hyperparameters(self):
    # label 0, |v| = [0.5, 0.5], m+ = 0.8, m- = 0.2, lam = 1:
    #   (0.8 - 0.5)^2 + 1 * (0.5 - 0.2)^2 = 0.09 + 0.09 = 0.18
    # label 1, |v| = [0.1, 0.9]: present max(0, 0.8-0.9)^2 = 0, absent max(0, 0.1-0.2)^2 = 0
    loss_fn = jax.jit(functools.partial(margin_loss, m_plus=0.8, m_minus=0.2, lam=1.0))
    loss = loss_fn(np.array([[0.5, 0.5], [0.1, 0.9]], np.float32), np.array([0, 1]))
    np.testing.assert_allclose(np.asarray(loss), [0.18, 0.0], rtol=1e-6, atol=1e-7)
    # With the defaults the first example is (0.9 - 0.5)^2 + 0.5 (0.5 - 0.1)^2 = 0.24.
    np.testing.assert_allclose(
      float(jax.jit(margin_loss)(np.array([0.5, 0.5], np.float32), np.array(0))), 0.24, rtol=1e-6
    )

  def test_matches_numpy_on_random_batch(self):
    rng = np.random.default_rng(0)
    lengths = rng.uniform(0, 1, (2, 5, 10)).astype(np.float32)  # [B1, B2, K]
    labels = rng.integers(0, 10, (2, 5)).astype(np.int32)  # [B1, B2]
    expected = np.zeros((2, 5))
    for idx in np.ndindex(2, 5):
      for k in range(10):
        x = float(lengths[idx + (k,)])
        if k == labels[idx]:
          expected[idx] += max(0.0, 0.9 - x) ** 2
        else:
          expected[idx] += 0.5 * max(0.0, x - 0.1) ** 2
    loss = jax.jit(margin_loss)(lengths, labels)
    assert loss.shape == (2, 5)
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-5, atol=1e-7)

  def test_zero_when_confident_and_correct(self):
    lengths = np.array([[0.91, 0.0, 0.09, 0.05], [0.02, 0.08, 0.03, 0.99]], np.float32)
    loss = jax.jit(margin_loss)(lengths, np.array([0, 3], np.int32))
    np.testing.assert_array_equal(np.asarray(loss), [0.0, 0.0])
    # Same lengths with the wrong labels are penalised.
    assert np.all(np.asarray(jax.jit(margin_loss)(lengths, np.array([1, 0]))) > 0.1)

  def test_vmap_and_grad(self):
    grad = jax.jit(jax.vmap(jax.grad(margin_loss)))(HAND_LENGTHS, HAND_LABELS)
    # d/dx: present -2 max(0, m+ - x), absent lam * 2 max(0, x - m-).
    expected = np.array([[0.0, 0.0, 0.4], [0.1, 0.6, -1.6], [0.2, 0.0, 0.0]])
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-7)

  @pytest.mark.parametrize(
    "dtype, expected",
    [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32), (jnp.float16, jnp.float32)],
  )
  def test_dtype_at_least_float32(self, dtype, expected):
    loss = jax.jit(margin_loss)(jnp.asarray(HAND_LENGTHS, dtype), HAND_LABELS)
    assert loss.dtype == expected
    np.testing.assert_allclose(np.asarray(loss), HAND_LOSS, rtol=2e-2, atol=2e-3)

  def test_float64(self):
    with jax.enable_x64(True):
      loss = jax.jit(margin_loss)(HAND_LENGTHS_F64, HAND_LABELS)
      assert loss.dtype == jnp.float64
      np.testing.assert_allclose(np.asarray(loss), HAND_LOSS, rtol=1e-12)

  def test_labels_shape_mismatch(self):
    with pytest.raises(ValueError, match="labels shape"):
      margin_loss(HAND_LENGTHS, np.array([0, 1], np.int32))
    with pytest.raises(ValueError, match="labels shape"):
      margin_loss(HAND_LENGTHS, HAND_LABELS[:, None])

  def test_one_hot_labels_rejected(self):
    with pytest.raises(ValueError, match="labels shape"):
      margin_loss(HAND_LENGTHS, np.eye(3, dtype=np.int32))

  def test_float_labels_rejected(self):
    with pytest.raises(TypeError, match="integer"):
      margin_loss(HAND_LENGTHS, HAND_LABELS.astype(np.float32))

  def test_scalar_lengths_rejected(self):
    with pytest.raises(ValueError, match="class axis"):
      margin_loss(np.float32(0.5), np.int32(0))

  def test_check_grads_float64(self):
    # Points away from the kinks at m+ and m- so finite differences are valid.
    lengths = np.array([[0.95, 0.3, 0.05, 0.6], [0.5, 0.8, 0.2, 0.02]])
    labels = np.array([1, 0], np.int32)
    with jax.enable_x64(True):
      fn = jax.jit(functools.partial(margin_loss, labels=labels))
      # Second order in forward mode, first order in reverse mode (reverse-over-reverse
      # compiles several more programs and is slow on CPU).
      check_grads(fn, (jnp.asarray(lengths),), order=2, modes=["fwd"])
      check_grads(fn, (jnp.asarray(lengths),), order=1, modes=["rev"])


# ---------------------------------------------------------------------------------------
# reconstruction_loss
# ---------------------------------------------------------------------------------------

# images / reconstructions [B=2, 2, 2, 1]:
#   ex 0: image [[0, 1], [1, 0]], recon [[0.5, 1], [0, 0]]
#         squared errors 0.25, 0, 1, 0 -> sum 1.25, mean 0.3125
#   ex 1: image all 0.5, recon all 0 -> errors 0.25 x 4 -> sum 1.0, mean 0.25
HAND_IMAGES = np.array([[[0.0, 1.0], [1.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]], np.float32)[..., None]
HAND_RECONS = np.array([[[0.5, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]], np.float32)[..., None]
HAND_SUM = np.array([1.25, 1.0])
HAND_MEAN = np.array([0.3125, 0.25])


class TestReconstructionLoss:
  @pytest.mark.parametrize("reduction, expected", [("sum", HAND_SUM), ("mean", HAND_MEAN)])
  def test_hand_computed(self, reduction, expected):
    fn = jax.jit(functools.partial(reconstruction_loss, reduction=reduction))
    loss = fn(HAND_IMAGES, HAND_RECONS)
    assert loss.shape == (2,) and loss.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-7)

  def test_default_is_sum(self):
    np.testing.assert_allclose(
      np.asarray(jax.jit(reconstruction_loss)(HAND_IMAGES, HAND_RECONS)), HAND_SUM, rtol=1e-7
    )

  @pytest.mark.parametrize("reduction, expected", [("sum", HAND_SUM), ("mean", HAND_MEAN)])
  def test_flat_reconstructions_accepted(self, reduction, expected):
    fn = jax.jit(functools.partial(reconstruction_loss, reduction=reduction))
    loss = fn(HAND_IMAGES, HAND_RECONS.reshape(2, 4))  # [B, H*W*C]
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-7)

  def test_matches_numpy_mnist_shapes(self):
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 1, (4, 28, 28, 1)).astype(np.float32)
    recons = rng.uniform(0, 1, (4, 784)).astype(np.float32)
    err = (images.reshape(4, -1).astype(np.float64) - recons) ** 2
    loss_sum = jax.jit(reconstruction_loss)(images, recons)
    np.testing.assert_allclose(np.asarray(loss_sum), err.sum(-1), rtol=1e-5)
    loss_mean = jax.jit(functools.partial(reconstruction_loss, reduction="mean"))(images, recons)
    np.testing.assert_allclose(np.asarray(loss_mean), err.mean(-1), rtol=1e-5)
    # The paper's 0.0005 * sum equals the reference projects' 0.392 * mean on 784 pixels.
    np.testing.assert_allclose(
      0.0005 * np.asarray(loss_sum), 0.392 * np.asarray(loss_mean), rtol=1e-5
    )

  def test_batch_dims(self):
    images = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 24
    fn = jax.jit(functools.partial(reconstruction_loss, batch_dims=2))
    loss = fn(images, np.zeros_like(images))
    assert loss.shape == (2, 3)
    np.testing.assert_allclose(
      np.asarray(loss), (images.astype(np.float64) ** 2).sum(-1), rtol=1e-6
    )

  def test_uint8_images_promoted(self):
    images = np.array([[0, 2], [1, 3]], np.uint8)
    loss = jax.jit(reconstruction_loss)(images, np.ones((2, 2), np.float32))
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(loss), [1.0 + 1.0, 0.0 + 4.0])

  def test_bfloat16_gives_float32(self):
    loss = jax.jit(reconstruction_loss)(
      jnp.asarray(HAND_IMAGES, jnp.bfloat16), jnp.asarray(HAND_RECONS, jnp.bfloat16)
    )
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(loss), HAND_SUM, rtol=1e-2)

  def test_mismatched_sizes_raise(self):
    with pytest.raises(ValueError, match="does not match"):
      reconstruction_loss(HAND_IMAGES, np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="does not match"):
      reconstruction_loss(HAND_IMAGES, np.zeros((3, 4), np.float32))

  def test_same_size_different_batch_raises(self):
    # 8 values either way, but [4, 2] would silently mix pixels of the two examples.
    with pytest.raises(ValueError, match="batch_dims"):
      reconstruction_loss(HAND_IMAGES, np.zeros((4, 2), np.float32))

  def test_bad_reduction_and_batch_dims(self):
    with pytest.raises(ValueError, match="reduction"):
      reconstruction_loss(HAND_IMAGES, HAND_RECONS, reduction="max")
    with pytest.raises(ValueError, match="batch_dims"):
      reconstruction_loss(HAND_IMAGES, HAND_RECONS, batch_dims=5)
    with pytest.raises(ValueError, match="batch_dims"):
      reconstruction_loss(HAND_IMAGES, HAND_RECONS, batch_dims=-1)

  def test_check_grads_float64(self):
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
      images = jnp.asarray(rng.uniform(0, 1, (2, 3, 3, 1)))
      recons = jnp.asarray(rng.uniform(0, 1, (2, 9)))
      for reduction in ("sum", "mean"):
        fn = jax.jit(functools.partial(reconstruction_loss, reduction=reduction))
        check_grads(fn, (images, recons), order=2, modes=["fwd"])
        check_grads(fn, (images, recons), order=1, modes=["rev"])


def test_spread_loss_against_numpy_and_hand_values():
  """Spread loss (Hinton et al. 2018, Eq. 3) against a NumPy loop over classes."""
  rng = np.random.default_rng(0)
  a = rng.uniform(0, 1, (6, 5)).astype(np.float32)
  y = rng.integers(0, 5, 6).astype(np.int32)
  for m in (0.2, 0.9):
    expected = np.array(
      [
        sum(max(0.0, m - (a[b, y[b]] - a[b, i])) ** 2 for i in range(5) if i != y[b])
        for b in range(6)
      ]
    )
    got = jax.jit(lambda a, y, m=m: losses.spread_loss(a, y, margin=m))(a, y)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  # Target ahead of every other class by more than the margin: zero; all equal: (K-1) m^2.
  np.testing.assert_allclose(
    losses.spread_loss(jnp.array([[0.9, 0.1, 0.5]]), jnp.array([0]), margin=0.3), [0.0]
  )
  np.testing.assert_allclose(
    losses.spread_loss(jnp.full((1, 4), 0.5), jnp.array([2]), margin=0.2), [3 * 0.04], rtol=1e-6
  )
  with pytest.raises(TypeError, match="integer class ids"):
    losses.spread_loss(a, y.astype(np.float32))


def test_spread_margin_rises_linearly_over_the_ramp():
  """m(step) = 0.2 + 0.7 * min(1, step / (fraction * total_steps)), worked by hand."""
  w = losses.LossWeights(class_loss="spread", spread_ramp_fraction=0.5, total_steps=400)
  # The ramp is 200 steps: 0.2 at step 0, 0.2 + 0.7 * 50/200 = 0.375 at 50, 0.9 from 200 on.
  for step, expected in ((0, 0.2), (50, 0.375), (100, 0.55), (200, 0.9), (399, 0.9)):
    np.testing.assert_allclose(jax.jit(w.spread_margin)(step), expected, rtol=1e-6)
  # A run of unknown length (a checkpoint evaluated alone) uses the final margin.
  np.testing.assert_allclose(losses.LossWeights().spread_margin(0), 0.9)


def test_class_loss_per_example_picks_margin_or_spread():
  rng = np.random.default_rng(1)
  a = rng.uniform(0, 1, (4, 10)).astype(np.float32)
  y = rng.integers(0, 10, 4).astype(np.int32)
  spread = losses.LossWeights(class_loss="spread", total_steps=100)
  # At step 25 of a 100-step ramp the margin is 0.2 + 0.7 / 4 = 0.375.
  expected = [
    sum(max(0.0, 0.375 - (a[b, y[b]] - a[b, i])) ** 2 for i in range(10) if i != y[b])
    for b in range(4)
  ]
  got = jax.jit(spread.class_loss_per_example)(a, y, 25)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_allclose(
    losses.LossWeights().class_loss_per_example(a, y, 25), margin_loss(a, y), rtol=1e-6
  )


def test_loss_weights_from_a_config_saved_before_the_class_loss_fields():
  """A run saved with only the four margin-loss fields trains with the margin loss."""
  old = {"m_plus": 0.8, "m_minus": 0.2, "lam": 0.25, "recon_weight": 0.0}
  w = losses.LossWeights.from_config(old, total_steps=7)
  assert (w.m_plus, w.m_minus, w.lam, w.recon_weight) == (0.8, 0.2, 0.25, 0.0)
  assert (w.class_loss, w.total_steps) == ("margin", 7)
  assert (w.class_weight, w.total_steps) == (1.0, 7)
  assert set(losses.LossWeights.config_defaults()) == set(old) | {
    "class_weight",
    "class_loss",
    "spread_margin_start",
    "spread_margin_end",
    "spread_ramp_fraction",
  }


def test_class_weight_reproduces_the_authors_loss():
  """The authors' code (Sarasra/models research/capsules, models/layers.py): a margin loss
  of 0.5 * present + 0.5 * 0.5 * absent per class, averaged over batch and classes, plus
  0.0005 x the per-image sum of squared errors averaged over the batch; the config's
  class_weight 1/20 and recon_weight 0.392 (x the per-pixel mean) give the same total."""
  rng = np.random.default_rng(2)
  lengths = rng.uniform(0, 1, (5, 10)).astype(np.float32)
  labels = rng.integers(0, 10, 5).astype(np.int32)
  images = rng.uniform(0, 1, (5, 28, 28, 1)).astype(np.float32)
  recon = rng.uniform(0, 1, (5, 784)).astype(np.float32)
  t = np.eye(10)[labels]
  present = t * np.maximum(0, 0.9 - lengths.astype(np.float64)) ** 2
  absent = (1 - t) * np.maximum(0, lengths - 0.1) ** 2
  authors = np.mean(0.5 * present + 0.5 * 0.5 * absent)
  authors += np.mean(0.0005 * np.sum((recon - images.reshape(5, 784)) ** 2, axis=-1))

  def model(x, y):  # a stand-in for a CapsuleModel's output dict
    return {"class_scores": jnp.asarray(lengths), "reconstruction": jnp.asarray(recon)}

  weights = losses.LossWeights(class_weight=1 / 20, recon_weight=0.392)
  loss, aux = jax.jit(lambda x, y: steps.compute_losses(model, x, y, weights))(images, labels)
  np.testing.assert_allclose(loss, authors, rtol=1e-5)
  # epochs.csv's class_loss stays the paper's (unscaled) sum over classes.
  np.testing.assert_allclose(aux["class_loss"], np.mean(margin_loss(lengths, labels)), rtol=1e-6)
  paper, _ = steps.compute_losses(model, images, labels, losses.LossWeights())
  assert paper > 5 * loss
