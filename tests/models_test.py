"""CapsNet structure: parameter counts from the paper's sizes, shapes, masking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capsjax import caps_ops
from capsjax import models
from configs import cifar10, fashion


def _abstract_model(config, image_shape=(28, 28, 1), num_classes=10):
  return nnx.eval_shape(lambda: models.create_model(
      config.model, image_shape=image_shape, num_classes=num_classes, rngs=nnx.Rngs(0)))


def test_paper_parameter_count():
  # Conv1 9*9*1*256+256, PrimaryCaps 9*9*256*256+256, W 1152*10*8*16, decoder
  # 160*512+512 + 512*1024+1024 + 1024*784+784, computed by hand.
  conv1 = 9 * 9 * 1 * 256 + 256
  primary = 9 * 9 * 256 * 256 + 256
  digit = 1152 * 10 * 8 * 16
  decoder = 160 * 512 + 512 + 512 * 1024 + 1024 + 1024 * 784 + 784
  config = fashion.get_config()
  assert models.count_params(_abstract_model(config)) == conv1 + primary + digit + decoder
  assert conv1 + primary + digit + decoder == 8_215_568
  config.model.use_decoder = False
  assert models.count_params(_abstract_model(config)) == 6_804_224


def test_cifar_shapes():
  config = cifar10.get_config()
  model = _abstract_model(config, image_shape=(32, 32, 3))
  assert model.num_primary == 8 * 8 * 32
  assert model.digit_caps.w.shape == (2048, 10, 8, 16)
  assert model.decoder.layers[-1].kernel.shape == (1024, 32 * 32 * 3)


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_forward_shapes_and_values(shape):
  config = fashion.get_config("smoke")
  model = models.create_model(config.model, image_shape=shape, num_classes=10,
                              rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(1), (3, *shape))
  labels = jnp.array([0, 4, 9])
  out = jax.jit(lambda m, x, y: m(x, y, return_couplings=True))(model, x, labels)
  n_in = model.num_primary
  assert out["v"].shape == (3, 10, 8)
  assert out["couplings"].shape == (3, n_in, 10)
  assert out["reconstruction"].shape == (3, *shape)
  np.testing.assert_allclose(out["couplings"].sum(-1), 1.0, rtol=1e-5)
  # Lengths are sqrt(|v|^2 + length_eps) (finite gradient at v = 0); the Keras recipe's
  # 1e-30 leaves the tiny initial lengths distinguishable (1e-7 makes them all ~3.2e-4).
  assert config.model.length_eps == 1e-30
  np.testing.assert_allclose(
      out["lengths"], np.sqrt(np.sum(np.square(out["v"]), -1) + 1e-30), rtol=1e-4)
  assert np.ptp(out["lengths"]) > 1e-7
  assert np.all(out["lengths"] < 1.0)
  np.testing.assert_array_equal(out["pred"], np.argmax(out["lengths"], -1))
  assert np.all((out["reconstruction"] >= 0) & (out["reconstruction"] <= 1))


def test_decoder_masks_by_label_or_prediction():
  config = fashion.get_config("smoke")
  model = models.create_model(config.model, image_shape=(28, 28, 1), num_classes=10,
                              rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(2), (2, 28, 28, 1))
  out_pred = model(x)
  # Masking by the predicted class equals passing the prediction as labels.
  out_lab = model(x, out_pred["pred"])
  np.testing.assert_allclose(out_pred["reconstruction"], out_lab["reconstruction"])
  # The decoder only sees the masked capsule: perturbing another class's capsule
  # leaves the reconstruction unchanged.
  v = out_pred["v"]
  other = (out_pred["pred"] + 1) % 10
  v2 = v.at[jnp.arange(2), other].add(0.3)
  np.testing.assert_allclose(model.decoder(v, out_pred["pred"]),
                             model.decoder(v2, out_pred["pred"]), rtol=1e-6)


def test_primary_caps_grouping_is_consecutive_channels():
  config = fashion.get_config("smoke")
  model = models.create_model(config.model, image_shape=(28, 28, 1), num_classes=10,
                              rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(3), (1, 28, 28, 1))
  h = jax.nn.relu(model.conv1(x))
  y = model.primary_caps.conv(h)                       # [1, 6, 6, types*dim]
  u = model.primary_caps(h)                            # [1, N_in, dim]
  dim = config.model.primary_dim
  # Capsule (pixel 0, type 1) is channels dim..2*dim-1 at pixel (0, 0), squashed.
  np.testing.assert_allclose(u[0, 1], caps_ops.squash(y[0, 0, 0, dim:2 * dim]), rtol=1e-5)


def test_bad_model_config_errors():
  config = fashion.get_config("smoke")
  config.model.routing_iterations = 0
  with pytest.raises(ValueError, match="num_iterations must be >= 1, got 0"):
    _abstract_model(config)
  config = fashion.get_config("smoke")
  config.model.dtype = "float16"
  with pytest.raises(ValueError, match="model.dtype must be one of"):
    _abstract_model(config)
  config = fashion.get_config()
  with pytest.raises(ValueError, match="too small"):
    _abstract_model(config, image_shape=(12, 12, 1))
  model = models.create_model(fashion.get_config("smoke").model, image_shape=(28, 28, 1),
                              num_classes=10, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"images must have shape \[B, 28, 28, 1\]"):
    model(jnp.zeros((2, 32, 32, 3)))


def test_every_conv_path_gives_the_same_model():
  """Outputs and parameter gradients of a small CapsNet agree for every conv lowering."""
  from capsjax import conv  # pylint: disable=g-import-not-at-top
  from capsjax import losses  # pylint: disable=g-import-not-at-top
  images = jax.random.uniform(jax.random.key(1), (4, 20, 20, 1))
  labels = jnp.array([0, 3, 1, 2])

  def run(impl):
    model = models.CapsNet(image_shape=(20, 20, 1), num_classes=4, conv1_channels=16,
                           conv1_kernel=5, primary_types=4, primary_dim=4, primary_kernel=5,
                           primary_stride=2, digit_dim=6, decoder_hidden=(16,),
                           conv_impl=impl, rngs=nnx.Rngs(0))       # same init for every impl
    graphdef, params = nnx.split(model)

    def loss(params):
      out = nnx.merge(graphdef, params)(images, labels)
      return jnp.mean(losses.margin_loss(out["lengths"], labels)
                      + jnp.mean(jnp.square(out["reconstruction"] - images), (1, 2, 3))), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return out, grads

  ref_out, ref_grads = run("xla")
  assert float(jnp.max(jnp.abs(ref_grads["primary_caps"]["conv"]["kernel"][...]))) > 0
  for impl in [i for i in conv.IMPLS if i not in ("xla", "auto")]:
    out, grads = run(impl)
    for k in ("lengths", "v", "reconstruction"):
      np.testing.assert_allclose(out[k], ref_out[k], rtol=1e-4, atol=1e-5, err_msg=f"{impl} {k}")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6,
                                                         err_msg=impl), grads, ref_grads)
