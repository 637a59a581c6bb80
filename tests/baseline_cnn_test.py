"""Tests for capsjax.models.baseline_cnn: the paper's parameter count by hand, the forward
pass against a NumPy reference (with and without dropout), modes and errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capsjax import errors
from capsjax.models import count_params
from capsjax.models.baseline_cnn import BaselineCNN


def _abstract(image_shape, num_classes=10, **kw):
  return nnx.eval_shape(
    lambda: BaselineCNN(image_shape=image_shape, num_classes=num_classes, rngs=nnx.Rngs(0), **kw)
  )


def _hand_count(h, w, c, k=10):
  """Parameters of the paper's sizes with 'SAME' convs (H x W kept), by hand."""
  conv1 = 5 * 5 * c * 256 + 256
  conv2 = 5 * 5 * 256 * 256 + 256
  conv3 = 5 * 5 * 256 * 128 + 128
  fc1 = h * w * 128 * 328 + 328
  fc2 = 328 * 192 + 192
  out = 192 * k + k
  return conv1 + conv2 + conv3 + fc1 + fc2 + out


def test_paper_parameter_count_on_mnist():
  # 6,656 + 1,638,656 + 819,328 + 32,915,784 + 63,168 + 1,930
  assert _hand_count(28, 28, 1) == 35_445_522
  assert count_params(_abstract((28, 28, 1))) == 35_445_522
  assert round(35_445_522 / 1e6, 1) == 35.4  # the paper's "35.4M"


def test_parameter_count_on_the_40x40_canvas():
  # fc1 grows to 40 * 40 * 128 * 328 + 328 = 67,174,728.
  assert _hand_count(40, 40, 1) == 69_704_466
  assert count_params(_abstract((40, 40, 1))) == 69_704_466
  assert count_params(_abstract((36, 36, 1))) == _hand_count(36, 36, 1)


# A tiny config whose forward pass is checked against NumPy. The 4x4 kernel makes 'SAME'
# padding asymmetric (1 before, 2 after); Glorot init keeps the ReLUs alive at this size.
TINY = dict(channels=(4, 4), kernel=4, hidden=(16, 8), dropout_rate=0.5, init="keras")


def _tiny(seed=0, **kw):
  return BaselineCNN(image_shape=(6, 7, 2), num_classes=3, rngs=nnx.Rngs(seed), **{**TINY, **kw})


@functools.partial(jax.jit, static_argnums=0, static_argnames="deterministic")
def _apply(graphdef, state, x, labels=None, *, deterministic=None, dropout_key=None):
  model = nnx.merge(graphdef, state)
  return model(x, labels, deterministic=deterministic, dropout_key=dropout_key)


def _call(model, x, labels=None, **kw):
  """model(x, labels, **kw), jitted (eager dispatch would dominate the test time)."""
  graphdef, state = nnx.split(model)
  return _apply(graphdef, state, x, labels, **kw)


def _numpy_forward(model, x, keep=None):
  """float64 NumPy forward of `model` on x [B, H, W, C]; keep: dropout mask or None."""
  k = model.kernel
  for conv in model.convs:
    w = np.asarray(conv.kernel[...], np.float64)  # [k, k, C_in, C_out]
    b = np.asarray(conv.bias[...], np.float64)
    xp = np.pad(x, ((0, 0), ((k - 1) // 2, k // 2), ((k - 1) // 2, k // 2), (0, 0)))
    out = np.zeros(x.shape[:3] + (w.shape[-1],))
    for i in range(k):
      for j in range(k):
        out += xp[:, i : i + x.shape[1], j : j + x.shape[2]] @ w[i, j]
    x = np.maximum(out + b, 0.0)
  x = x.reshape(x.shape[0], -1)
  for n, layer in enumerate(model.dense):
    x = x @ np.asarray(layer.kernel[...], np.float64) + np.asarray(layer.bias[...], np.float64)
    if n < len(model.dense) - 1:
      x = np.maximum(x, 0.0)
      if n == len(model.dense) - 2 and keep is not None:
        x = np.where(keep, x / (1 - model.dropout.rate), 0.0)
  return x


def _x(b=4, seed=0):
  return np.random.default_rng(seed).uniform(0, 1, (b, 6, 7, 2)).astype(np.float32)


def test_numpy_padding_is_xla_same():
  # The reference pads (k - 1) // 2 before and k // 2 after; check that this is XLA's SAME.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 6, 7, 3)).astype(np.float32)
  w = rng.normal(size=(4, 4, 3, 2)).astype(np.float32)
  same = jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  xp = np.pad(x, ((0, 0), (1, 2), (1, 2), (0, 0)))
  ref = sum(xp[:, i : i + 6, j : j + 7] @ w[i, j] for i in range(4) for j in range(4))
  np.testing.assert_allclose(np.asarray(same), ref, rtol=1e-4, atol=1e-4)


def test_deterministic_forward_matches_numpy():
  model = _tiny()
  x = _x()
  out = jax.jit(lambda v: model(v, deterministic=True))(x)
  logits = _numpy_forward(model, x.astype(np.float64))
  assert logits.std(axis=0).mean() > 1e-2  # the examples' logits differ: units are alive
  np.testing.assert_allclose(np.asarray(out["logits"]), logits, rtol=1e-5, atol=1e-6)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(out["class_scores"]), probs, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out["class_scores"]).sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(out["pred"]), logits.argmax(-1))
  assert out["logits"].dtype == out["class_scores"].dtype == jnp.float32
  assert out["pred"].dtype == jnp.int32
  # Deterministic twice: the same bits; labels do not change anything.
  again = _call(model, x, jnp.array([0, 1, 2, 0]), deterministic=True)
  jax.tree.map(np.testing.assert_array_equal, out, again)


def test_dropout_forward_matches_numpy_with_the_same_mask():
  model = _tiny()
  x = _x()
  key = jax.random.key(7)
  out = jax.jit(lambda v, k: model(v, dropout_key=k))(x, key)
  # Inverted dropout on the last hidden layer: keep ~ Bernoulli(1 - rate), kept / (1 - rate).
  keep = np.asarray(jax.random.bernoulli(key, 0.5, (4, TINY["hidden"][-1])))
  assert 0 < keep.sum() < keep.size
  expected = _numpy_forward(model, x.astype(np.float64), keep=keep)
  np.testing.assert_allclose(np.asarray(out["logits"]), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out["class_scores"]).sum(-1), 1.0, rtol=1e-6)
  same = _call(model, x, dropout_key=key)
  np.testing.assert_allclose(np.asarray(same["logits"]), np.asarray(out["logits"]), rtol=1e-6)
  other = _call(model, x, dropout_key=jax.random.key(8))
  plain = _call(model, x, deterministic=True)
  assert not np.allclose(other["logits"], out["logits"])
  assert not np.allclose(plain["logits"], out["logits"])


def test_modes_and_the_missing_key():
  model = _tiny()
  x = _x()
  with pytest.raises(ValueError, match="dropout_key"):
    model(x)  # train mode after construction, no key
  model.eval()
  np.testing.assert_array_equal(
    _call(model, x)["logits"], _call(model, x, deterministic=True)["logits"]
  )
  model.train()
  with pytest.raises(ValueError, match="dropout_key"):
    model(x, deterministic=False)
  no_dropout = _tiny(dropout_rate=0.0)
  np.testing.assert_array_equal(
    _call(no_dropout, x)["logits"], _call(no_dropout, x, deterministic=True)["logits"]
  )


def test_functional_split_merge_step_matches_eager():
  model = _tiny()
  graphdef, state = nnx.split(model)
  assert not nnx.state(model, nnx.RngState)  # no RNG state to thread through steps

  @jax.jit
  def step(state, x, key):
    return nnx.merge(graphdef, state)(x, dropout_key=key)["logits"]

  key = jax.random.key(3)
  np.testing.assert_allclose(
    np.asarray(step(state, _x(), key)),
    np.asarray(_call(model, _x(), dropout_key=key)["logits"]),
    rtol=1e-6,
  )


def test_bfloat16_compute_is_close_and_inits_set_the_biases():
  x = _x()
  ref = np.asarray(_call(_tiny(), x, deterministic=True)["logits"])
  bf = _call(_tiny(dtype="bfloat16"), x, deterministic=True)["logits"]  # same seed and params
  assert bf.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(bf), ref, atol=0.03 * np.abs(ref).max())
  # 'tf': the authors' biases of 0.1 everywhere.
  model = _tiny(init="tf")
  for layer in [*model.convs, *model.dense]:
    np.testing.assert_array_equal(np.asarray(layer.bias[...]), np.float32(0.1))
  keras = _tiny(init="keras")
  for layer in [*keras.convs, *keras.dense]:
    np.testing.assert_array_equal(np.asarray(layer.bias[...]), 0.0)


@pytest.mark.parametrize(
  "kw, match",
  [
    (dict(dropout_rate=1.0), "dropout_rate"),
    (dict(dropout_rate=-0.1), "dropout_rate"),
    (dict(dtype="float16"), "dtype"),
    (dict(init="xavier"), "init"),
    (dict(channels=(3, 0)), r"channels\[1\]"),
    (dict(kernel=0), "kernel"),
    (dict(conv_impl="auto"), "auto"),
  ],
)
def test_bad_constructor_values(kw, match):
  with pytest.raises(ValueError, match=match):
    _tiny(**kw)


def test_bad_image_shape_is_a_value_error():
  model = _tiny()
  with pytest.raises(ValueError, match=r"\[B, 6, 7, 2\]"):
    model(jnp.zeros((2, 7, 6, 2)), deterministic=True)
  assert issubclass(errors.ConfigError, ValueError)
  with pytest.raises(ValueError, match="positive"):
    functools.partial(BaselineCNN, image_shape=(0, 28, 1), num_classes=10)(rngs=nnx.Rngs(0))
