"""CapsNet structure: parameter counts from the paper's sizes, shapes, masking, config
errors; what the models package may import."""

import ast
import inspect
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capsjax import caps_ops
from capsjax import conv
from capsjax import errors
from capsjax import layers
from capsjax import models
from configs import cifar10, common, efficient_capsnet, fashion, matrix_capsules_em


def _model(config, image_shape=(28, 28, 1), num_classes=10):
  return models.create_model(
    config.model,
    image_shape=image_shape,
    num_classes=num_classes,
    rngs=nnx.Rngs(0),
    conv_impl="xla",
  )


def _abstract_model(config, image_shape=(28, 28, 1), num_classes=10):
  return nnx.eval_shape(lambda: _model(config, image_shape, num_classes))


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
  model = _model(config, image_shape=shape)
  x = jax.random.uniform(jax.random.key(1), (3, *shape))
  labels = jnp.array([0, 4, 9])
  out = jax.jit(lambda m, x, y: m(x, y))(model, x, labels)
  r = jax.jit(lambda m, x: m.routed(x))(model, x)
  n_in = model.num_primary
  assert out["v"].shape == (3, 10, 8)
  assert r.assignments.shape == (3, n_in, 10)
  assert out["reconstruction"].shape == (3, *shape)
  np.testing.assert_allclose(r.assignments.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(r.poses, out["v"])  # the same routing
  # Lengths are sqrt(|v|^2 + length_eps) (finite gradient at v = 0); the Keras recipe's
  # 1e-30 leaves the tiny initial lengths distinguishable (1e-7 makes them all ~3.2e-4).
  assert config.model.length_eps == 1e-30
  np.testing.assert_allclose(
    out["class_scores"], np.sqrt(np.sum(np.square(out["v"]), -1) + 1e-30), rtol=1e-4
  )
  assert np.ptp(out["class_scores"]) > 1e-7
  assert np.all(out["class_scores"] < 1.0)
  np.testing.assert_array_equal(out["pred"], np.argmax(out["class_scores"], -1))
  assert np.all((out["reconstruction"] >= 0) & (out["reconstruction"] <= 1))


def test_decoder_masks_by_label_or_prediction():
  model = _model(fashion.get_config("smoke"))
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
  np.testing.assert_allclose(
    model.decoder(v, out_pred["pred"]), model.decoder(v2, out_pred["pred"]), rtol=1e-6
  )


def test_primary_caps_grouping_is_consecutive_channels():
  config = fashion.get_config("smoke")
  model = _model(config)
  x = jax.random.uniform(jax.random.key(3), (1, 28, 28, 1))
  h = jax.nn.relu(model.conv1(x))
  y = model.primary_caps.conv(h)  # [1, 6, 6, types*dim]
  u = model.primary_caps(h)  # [1, N_in, dim]
  dim = config.model.primary_dim
  # Capsule (pixel 0, type 1) is channels dim..2*dim-1 at pixel (0, 0), squashed.
  np.testing.assert_allclose(u[0, 1], caps_ops.squash(y[0, 0, 0, dim : 2 * dim]), rtol=1e-5)


def test_bad_model_config_errors():
  config = fashion.get_config("smoke")
  config.model.routing_iterations = 0
  with pytest.raises(
    errors.ConfigError,
    match=r"^config.model.routing_iterations: num_iterations must be >= 1, "
    r"got 0",
  ):
    _abstract_model(config)
  config = fashion.get_config()
  with pytest.raises(errors.ConfigError, match="too small"):
    _abstract_model(config, image_shape=(12, 12, 1))
  model = _model(fashion.get_config("smoke"))
  with pytest.raises(ValueError, match=r"images must have shape \[B, 28, 28, 1\]"):
    model(jnp.zeros((2, 32, 32, 3)))


_SIZES = [
  "conv1_channels",
  "conv1_kernel",
  "primary_types",
  "primary_dim",
  "primary_kernel",
  "primary_stride",
  "digit_dim",
]


@pytest.mark.parametrize("field", _SIZES)
@pytest.mark.parametrize("value", [0, -2])
def test_bad_sizes_are_config_errors_naming_the_field(field, value):
  """Zero and negative sizes fail before any arithmetic (no ZeroDivisionError)."""
  config = fashion.get_config("smoke")
  config.model[field] = value
  with pytest.raises(
    errors.ConfigError, match=rf"^config.model.{field}: must be an int >= 1, got {value}\b"
  ):
    _abstract_model(config)


@pytest.mark.parametrize("field", _SIZES)
@pytest.mark.parametrize("value", [2.0, True, "8"])
def test_non_int_sizes_are_config_errors(field, value):
  kwargs = dict(fashion.get_config("smoke").model, conv_impl="xla")
  kwargs[field] = value
  with pytest.raises(
    errors.ConfigError, match=rf"^config.model.{field}: must be an int >= 1, got {value!r}"
  ):
    models.CapsNet(**kwargs, image_shape=(28, 28, 1), num_classes=10, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
  "field,value,match",
  [
    (
      "dtype",
      "float16",
      r"config.model.dtype: must be one of \['bfloat16', 'float32'\], got "
      r"'float16'",
    ),
    (
      "init",
      "glorot",
      r"config.model.init: must be one of \('torch', 'keras', 'tf', 'he'\), got "
      r"'glorot'",
    ),
    ("length_eps", 0.0, r"config.model.length_eps: must be in \(0, 1e-3\], got 0.0"),
    ("length_eps", 0.1, r"config.model.length_eps: must be in \(0, 1e-3\], got 0.1"),
    ("conv_impl", "cudnn", r"config.model.conv_impl: .*must be .*'auto'.*, got 'cudnn'"),
    (
      "decoder_hidden",
      (16, 0),
      r"config.model.decoder_hidden\[1\]: must be an int >= 1, "
      r"got 0",
    ),
  ],
)
def test_bad_values_are_config_errors_naming_the_field(field, value, match):
  config = fashion.get_config("smoke")
  config.model[field] = value
  with pytest.raises(errors.ConfigError, match="^" + match):
    _abstract_model(config)


def test_capsnet_keywords_are_the_config_model_fields():
  """`CapsNet(**config.model, ...)` works: one keyword per declared field, no more."""
  params = set(inspect.signature(models.CapsNet.__init__).parameters)
  fields = set(common.get_base_config().model.keys())
  assert params - {"self", "image_shape", "num_classes", "rngs"} == fields
  config = fashion.get_config("smoke")
  direct = nnx.eval_shape(
    lambda: models.CapsNet(
      **dict(config.model, conv_impl="xla"),
      image_shape=(28, 28, 1),
      num_classes=10,
      rngs=nnx.Rngs(0),
    )
  )
  built = _abstract_model(config)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(direct)) == jax.tree.map(
    lambda a: (a.shape, a.dtype), nnx.state(built)
  )


@pytest.mark.parametrize("module", [fashion, efficient_capsnet, matrix_capsules_em])
def test_auto_is_resolved_by_the_caller_not_by_model_code(module):
  config = module.get_config("smoke")
  assert config.model.conv_impl == "auto"

  def build(**kw):
    return nnx.eval_shape(
      lambda: models.create_model(
        config.model, image_shape=(28, 28, 1), num_classes=10, rngs=nnx.Rngs(0), **kw
      )
    )

  unresolved = r"^config.model.conv_impl: 'auto' must be resolved .*resolve_conv_impl"
  with pytest.raises(errors.ConfigError, match=unresolved):
    build()
  cls = models.ARCHITECTURES[config.model.architecture]
  with pytest.raises(errors.ConfigError, match=unresolved):
    cls(**dict(config.model), image_shape=(28, 28, 1), num_classes=10, rngs=nnx.Rngs(0))
  # A caller that resolved it at start-up passes the lowering; the config keeps 'auto'.
  model = build(conv_impl="hybrid")
  impls = {m.impl for _, m in nnx.iter_graph(model) if isinstance(m, layers.Conv2D)}
  assert impls == {"hybrid"}
  assert config.model.conv_impl == "auto"
  # A bad config value is named even when the caller passes a lowering.
  config.model.conv_impl = "cudnn"
  with pytest.raises(errors.ConfigError, match=r"^config.model.conv_impl: .*got 'cudnn'"):
    build(conv_impl="xla")


def test_model_code_imports_no_run_plumbing():
  """Runtime settings (backend, XLA flags) are resolved at start-up, never in model code."""
  root = pathlib.Path(models.__file__).parents[1]
  files = [*root.joinpath("models").glob("*.py"), root / "layers.py", root / "matrix_layers.py"]
  assert len(files) >= 7
  for path in files:
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom):
        names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
      elif isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      else:
        continue
      assert not any(n.startswith("capsjax.run") for n in names), (path, names)


def test_old_configs_without_init_and_length_eps_and_unknown_fields():
  """A config.json without `init`/`length_eps` builds with CapsNet's defaults, one without
  `conv_impl` with the caller's lowering; a field CapsNet does not know is a ConfigError
  naming it, not a TypeError."""
  saved = dict(fashion.get_config("smoke").model)
  del saved["init"], saved["length_eps"]
  saved["decoder_hidden"] = list(saved["decoder_hidden"])  # as JSON gives it back
  del saved["conv_impl"]  # 'auto' then: the caller's lowering applies.
  model = nnx.eval_shape(
    lambda: models.create_model(
      saved, image_shape=(28, 28, 1), num_classes=10, rngs=nnx.Rngs(0), conv_impl="xla"
    )
  )
  assert model.length_eps == 1e-7
  assert model.digit_caps.bias is None  # 'torch': no routing bias
  assert len(model.decoder.layers) == 3
  saved["routing_iteration"] = 2
  with pytest.raises(
    errors.ConfigError,
    match=r"^config.model.routing_iteration: not a "
    r"CapsNet field",
  ):
    models.create_model(
      saved, image_shape=(28, 28, 1), num_classes=10, rngs=nnx.Rngs(0), conv_impl="xla"
    )


def test_every_conv_path_gives_the_same_model():
  """Outputs and parameter gradients of a small CapsNet agree for every conv lowering."""
  from capsjax import losses  # pylint: disable=g-import-not-at-top

  images = jax.random.uniform(jax.random.key(1), (4, 20, 20, 1))
  labels = jnp.array([0, 3, 1, 2])

  def run(impl):
    model = models.CapsNet(
      image_shape=(20, 20, 1),
      num_classes=4,
      conv1_channels=16,
      conv1_kernel=5,
      primary_types=4,
      primary_dim=4,
      primary_kernel=5,
      primary_stride=2,
      digit_dim=6,
      decoder_hidden=(16,),
      conv_impl=impl,
      rngs=nnx.Rngs(0),
    )  # same init for every impl
    graphdef, params = nnx.split(model)

    def loss(params):
      out = nnx.merge(graphdef, params)(images, labels)
      return jnp.mean(
        losses.margin_loss(out["class_scores"], labels)
        + jnp.mean(jnp.square(out["reconstruction"] - images), (1, 2, 3))
      ), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return out, grads

  ref_out, ref_grads = run("xla")
  assert float(jnp.max(jnp.abs(ref_grads["primary_caps"]["conv"]["kernel"][...]))) > 0
  for impl in [i for i in conv.IMPLS if i != "xla"]:
    out, grads = run(impl)
    for k in ("class_scores", "v", "reconstruction"):
      np.testing.assert_allclose(out[k], ref_out[k], rtol=1e-4, atol=1e-5, err_msg=f"{impl} {k}")
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=impl),  # noqa: B023
      grads,
      ref_grads,
    )
