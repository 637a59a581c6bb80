"""Initialisation schemes (`model.init`): bounds and statistics computed independently,
the way Keras, PyTorch and the authors' TF code compute them."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from capsjax import models
from tests import helpers
from configs import common
from configs import efficient_capsnet


def _model(init, **model):
  config = common.get_base_config().model
  for k, v in model.items():
    config[k] = v
  config.init = init
  return models.create_model(
    config,
    image_shape=(28, 28, 1),
    num_classes=10,
    rngs=nnx.Rngs(params=jax.random.key(0)),
    conv_impl="xla",
  )


def np_dynamic_routing(u_hat, num_iterations, bias=0.0):
  """Procedure 1 of Sabour et al. in float64 NumPy, with s_j + bias_j in every iteration.

  u_hat [B, N_in, N_out, D] -> v [B, N_out, D].
  """
  b = np.zeros(u_hat.shape[:-1])  # [B, N_in, N_out]
  for _ in range(num_iterations):
    c = np.exp(b - b.max(-1, keepdims=True))
    c /= c.sum(-1, keepdims=True)  # softmax over the parents
    s = np.einsum("bnm,bnmd->bmd", c, u_hat) + bias  # [B, N_out, D]
    sq = np.sum(s * s, -1, keepdims=True)
    v = s * sq / (1 + sq) / np.sqrt(sq + 1e-7)  # squash
    b = b + np.einsum("bnmd,bmd->bnm", u_hat, v)
  return v


def keras_glorot_limit(shape):
  """keras/initializers.py (2.0.9) `_compute_fans` + VarianceScaling(1, fan_avg, uniform)."""
  if len(shape) == 2:
    fan_in, fan_out = shape
  else:
    receptive_field = int(np.prod(shape[:-2]))
    fan_in, fan_out = shape[-2] * receptive_field, shape[-1] * receptive_field
  return math.sqrt(6.0 / (fan_in + fan_out))


@pytest.fixture(scope="module")
def keras_model():
  return _model("keras")


def _check_uniform(x, limit):
  x = np.asarray(x, np.float64).ravel()
  assert np.abs(x).max() <= limit
  # The largest of many U(-limit, limit) draws lies within a fraction of a percent of it.
  assert np.abs(x).max() > 0.99 * limit
  np.testing.assert_allclose(x.std(), limit / math.sqrt(3), rtol=0.02)
  assert abs(x.mean()) < 0.02 * limit


def test_keras_glorot_bounds_of_a_conv_kernel(keras_model):
  kernel = keras_model.primary_caps.conv.kernel[...]  # [9, 9, 256, 256]
  limit = keras_glorot_limit((9, 9, 256, 256))
  assert limit == pytest.approx(math.sqrt(6 / (81 * 256 + 81 * 256)))
  _check_uniform(kernel, limit)
  _check_uniform(keras_model.conv1.kernel[...], keras_glorot_limit((9, 9, 1, 256)))
  np.testing.assert_array_equal(keras_model.conv1.bias[...], 0.0)
  np.testing.assert_array_equal(keras_model.primary_caps.conv.bias[...], 0.0)


def test_keras_glorot_bounds_of_the_capsule_w(keras_model):
  # Keras' W is [N_out, N_in, D_out, D_in] = [10, 1152, 16, 8] (CapsNet-Keras): its limit
  # is sqrt(6 / ((16 + 8) * 11520)) = 0.004658; capsjax's [N_in, N_out, D_in, D_out] gets
  # the same bound.
  limit = keras_glorot_limit((10, 1152, 16, 8))
  assert limit == pytest.approx(0.004658, abs=1e-6)
  w = keras_model.digit_caps.w[...]
  assert w.shape == (1152, 10, 8, 16)
  _check_uniform(w, limit)
  assert keras_model.digit_caps.bias is None


def test_keras_dense_layers(keras_model):
  for layer, shape in zip(
    keras_model.decoder.layers, [(160, 512), (512, 1024), (1024, 784)], strict=False
  ):
    _check_uniform(layer.kernel[...], keras_glorot_limit(shape))
    np.testing.assert_array_equal(layer.bias[...], 0.0)


def test_torch_defaults():
  model = _model("torch", conv1_channels=64, primary_types=8)
  # nn.Conv2d / nn.Linear reset_parameters: kernel and bias uniform in +-1/sqrt(fan_in).
  _check_uniform(model.primary_caps.conv.kernel[...], 1 / math.sqrt(9 * 9 * 64))
  bound = 1 / math.sqrt(9 * 9 * 1)
  b = np.asarray(model.conv1.bias[...])
  assert np.abs(b).max() <= bound and b.std() > 0.4 * bound
  _check_uniform(model.decoder.layers[1].kernel[...], 1 / math.sqrt(512))
  w = np.asarray(model.digit_caps.w[...])
  np.testing.assert_allclose(w.std(), 0.01, rtol=0.02)


def test_tf_truncated_normal_and_biases():
  model = _model("tf")
  rng = np.random.default_rng(0)
  # TF's truncated_normal(stddev=s): N(0, s^2) redrawn outside +-2s, std 0.8796 s.
  ref = rng.standard_normal(2_000_000)
  ref_std = ref[np.abs(ref) <= 2].std()
  assert ref_std == pytest.approx(0.8796, abs=2e-3)
  for x, s in (
    (model.conv1.kernel[...], 0.05),
    (model.primary_caps.conv.kernel[...], 0.1),
    (model.digit_caps.w[...], 0.1),
    (model.decoder.layers[0].kernel[...], 0.1),
  ):
    x = np.asarray(x)
    assert np.abs(x).max() <= 2 * s + 1e-7
    np.testing.assert_allclose(x.std(), ref_std * s, rtol=0.03)
  for b in (model.conv1.bias, model.primary_caps.conv.bias, model.decoder.layers[2].bias):
    np.testing.assert_array_equal(b[...], np.float32(0.1))
  np.testing.assert_array_equal(model.digit_caps.bias[...], np.full((10, 16), 0.1, np.float32))
  # The capsule bias is the only parameter the scheme adds.
  assert models.count_params(model) == 8_215_568 + 160


def test_tf_capsule_bias_enters_every_routing_iteration():
  model = _model("tf", conv1_channels=8, primary_types=2, decoder_hidden=(8, 8))
  x = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
  bias = jax.random.normal(jax.random.key(2), (10, 16))
  model.digit_caps.bias[...] = bias
  v = model.routed(x).poses
  u = model.primary_caps(jax.nn.relu(model.conv1(x)))
  u_hat = np.einsum(
    "bni,nmio->bnmo", np.asarray(u, np.float64), np.asarray(model.digit_caps.w[...], np.float64)
  )
  # The NumPy Procedure 1 with s_j + b_j in each of the 3 iterations.
  np.testing.assert_allclose(
    v, np_dynamic_routing(u_hat, 3, bias=np.asarray(bias)), rtol=1e-4, atol=1e-6
  )
  assert not np.allclose(v, np_dynamic_routing(u_hat, 3), atol=1e-4)


def test_unknown_scheme_is_named():
  with pytest.raises(ValueError, match="config.model.init: must be one of .* got 'xavier'"):
    _model("xavier")


def test_primary_scale_reproduces_the_authors_primary_capsules():
  """The authors' code: a one-iteration routing from 1 input type to 32 types, whose
  couplings are a softmax over 32 zero logits, then + bias and their norm-based squash."""
  model = _model("tf", conv1_channels=8, primary_types=32, primary_scale=1 / 32)
  x = jax.random.uniform(jax.random.key(3), (2, 28, 28, 1))
  h = np.asarray(jax.nn.relu(model.conv1(x)))
  u = model.primary_caps(h)  # [B, 6*6*32, 8]
  route = np.exp(np.zeros(32)) / np.exp(np.zeros(32)).sum()  # softmax of zero logits
  kernel = np.asarray(model.primary_caps.conv.kernel[...], np.float64)
  s = helpers.numpy_conv(h, kernel, 2) * route[0] + 0.1  # [B, 6, 6, 256]
  s = s.reshape(2, -1, 8)
  norm = np.linalg.norm(s, axis=-1, keepdims=True)
  v = s / norm * norm**2 / (1 + norm**2)  # Sarasra/models layers.py `_squash`
  np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
  # 1 (the default) is the paper's conv + bias.
  plain = _model("tf", conv1_channels=8, primary_types=32)
  nnx.update(plain, nnx.state(model))
  assert not np.allclose(plain.primary_caps(h), u, atol=1e-2)


def test_primary_scale_must_be_positive():
  with pytest.raises(ValueError, match="config.model.primary_scale: must be a number > 0, got 0"):
    _model("tf", primary_scale=0)


def test_he_scheme_is_efficient_capsnets_decoder():
  """EscVM/Efficient-CapsNet's generator: Dense 512 and 1024 with he_normal, the sigmoid
  output with glorot_normal (Keras' truncated normals: std sqrt(2 / fan_in) and
  sqrt(2 / (fan_in + fan_out))), zero biases."""
  config = efficient_capsnet.get_config()
  model = models.create_model(
    config.model,
    image_shape=(28, 28, 1),
    num_classes=10,
    rngs=nnx.Rngs(params=jax.random.key(0)),
    conv_impl="xla",
  )
  expected = (np.sqrt(2 / 160), np.sqrt(2 / 512), np.sqrt(2 / (1024 + 784)))
  for layer, std in zip(model.decoder.layers, expected, strict=True):
    k = np.asarray(layer.kernel[...])
    np.testing.assert_allclose(k.std(), std, rtol=0.03)
    assert np.abs(k).max() <= 2 * std / 0.87962566 + 1e-7  # cut at two stddevs
    np.testing.assert_array_equal(layer.bias[...], 0.0)
