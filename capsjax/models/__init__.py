"""CapsNet (Sabour, Frosst & Hinton 2017): Conv1 -> PrimaryCaps -> DigitCaps -> decoder,
with any routing of `capsjax.routing` (`routing=`), and two paper architectures:
`EfficientCapsNet` (Mazzia et al. 2021) and `MatrixCapsNet` (a small EM network, Hinton
et al. 2018). `create_model` builds the one `config.model.architecture` names.

For 28x28x1 inputs and 10 classes with the paper's sizes the model has 8,215,568
parameters (6,804,224 without the decoder); `init='tf'` adds the 160 routing biases.
Every size comes from the model config; any input shape and channel count works (32x32x3
gives 2048 primary capsules).

`CapsNet`'s keyword arguments are the fields of `config.model`, so a config builds it as
`CapsNet(**config.model, image_shape=..., num_classes=..., rngs=...)`; `create_model` does
that and also resolves the config value `conv_impl='auto'` (see there).

Why one module this long: the three architectures share the config-field validation
and the output dict that the steps, analysis and checkpoints rely on; split apart, each
file would import the others' private helpers.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from capsjax import caps_ops
from capsjax import conv as conv_lib

# Only `create_model` uses it, to turn the config value conv_impl='auto' into a lowering;
# CapsNet and the layers take a concrete one and never read the environment.
from capsjax.run import cpu_runtime
from capsjax import errors
from capsjax import layers
from capsjax import routing as routing_lib

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The positive integer sizes of `config.model`.
_SIZE_FIELDS = (
  "conv1_channels",
  "conv1_kernel",
  "primary_types",
  "primary_dim",
  "primary_kernel",
  "primary_stride",
  "digit_dim",
)


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise errors.ConfigError(f"config.model.{name}: must be an int >= 1, got {value!r}")
  return int(value)


def _check_bool(name: str, value) -> bool:
  if not isinstance(value, bool):
    raise errors.ConfigError(f"config.model.{name}: must be True or False, got {value!r}")
  return value


def _positive_float(name: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
    raise errors.ConfigError(f"config.model.{name}: must be a number > 0, got {value!r}")
  return float(value)


def check_routing(routing, allowed: Sequence[str] | None = None) -> str:
  """`routing` if it names a routing of `capsjax.routing` (and is in `allowed`).

  Raises:
    errors.ConfigError: naming config.model.routing and the valid names.
  """
  with errors.config_field("model.routing"):
    routing_lib.get(routing)
  if allowed is not None and routing not in allowed:
    raise errors.ConfigError(
      f"config.model.routing: this architecture supports "
      f"{', '.join(map(repr, allowed))}, got {routing!r}"
    )
  return routing


def _check_architecture(value, expected: str) -> None:
  if value != expected:
    raise errors.ConfigError(
      f"config.model.architecture: this class builds {expected!r}, "
      f"got {value!r}; models.create_model picks the class from it"
    )


def _check_sizes(name: str, values) -> tuple[int, ...]:
  try:
    values = tuple(values)  # a JSON config gives a list.
  except TypeError:
    raise errors.ConfigError(
      f"config.model.{name}: must be a sequence of ints >= 1, got {values!r}"
    ) from None
  return tuple(_positive_int(f"{name}[{i}]", v) for i, v in enumerate(values))


class CapsNet(nnx.Module):
  """CapsNet. Call as `model(images, labels=None)`; returns a dict of named outputs.

  Every keyword but `image_shape`, `num_classes` and `rngs` is the `config.model` field of
  the same name (configs/common.py documents them). The defaults are the paper's sizes;
  `init` and `length_eps` default to what runs saved before those fields existed used.
  A bad field value raises `errors.ConfigError` naming it ("config.model.primary_stride:
  ...") before anything is allocated.

  `conv_impl` must be a concrete lowering (one of `capsjax.conv.IMPLS`; default 'xla', the
  reference). The config value 'auto' depends on the backend and XLA's flags, so it is
  resolved at start-up (`cpu_runtime.resolve_conv_impl`, which `create_model` calls) and
  raises here.

  `routing` (a name in `routing.ROUTINGS`) picks the class capsules' routing, the
  primary-capsule nonlinearity its authors use (`layers.PRIMARY_NONLINEARITY`), EM's
  sigmoid activation head and the routing's learned parameters (`layers.RoutedCaps`);
  `class_scores` says what 'lengths' is for each. `stop_gradient` applies to dynamic
  routing only; `em_final_lambda` to EM only. The default, 'dynamic', is the model
  (parameters, values and gradients) of before the routing field existed.
  """

  def __init__(
    self,
    *,
    image_shape: Sequence[int],
    num_classes: int,
    conv1_channels: int = 256,
    conv1_kernel: int = 9,
    primary_types: int = 32,
    primary_dim: int = 8,
    primary_kernel: int = 9,
    primary_stride: int = 2,
    digit_dim: int = 16,
    routing_iterations: int = 3,
    stop_gradient: bool = False,
    decoder_hidden: Sequence[int] = (512, 1024),
    use_decoder: bool = True,
    conv_impl: str = "xla",
    dtype: str = "float32",
    init: str = "torch",
    length_eps: float = 1e-7,
    architecture: str = "capsnet",
    routing: str = "dynamic",
    em_final_lambda: float = 0.01,
    rngs: nnx.Rngs,
  ):
    h, w, c = (int(d) for d in image_shape)
    if min(h, w, c) < 1 or int(num_classes) < 1:
      raise ValueError(
        f"image_shape {tuple(image_shape)} and num_classes {num_classes} must be positive"
      )
    sizes = dict(
      conv1_channels=conv1_channels,
      conv1_kernel=conv1_kernel,
      primary_types=primary_types,
      primary_dim=primary_dim,
      primary_kernel=primary_kernel,
      primary_stride=primary_stride,
      digit_dim=digit_dim,
    )
    sizes = {name: _positive_int(name, sizes[name]) for name in _SIZE_FIELDS}
    try:
      decoder_hidden = tuple(decoder_hidden)  # a JSON config gives a list.
    except TypeError:
      raise errors.ConfigError(
        f"config.model.decoder_hidden: must be a sequence of ints >= 1, got {decoder_hidden!r}"
      ) from None
    for i, units in enumerate(decoder_hidden):
      _positive_int(f"decoder_hidden[{i}]", units)
    decoder_hidden = tuple(int(u) for u in decoder_hidden)
    with errors.config_field("model.routing_iterations"):
      caps_ops.check_iterations(routing_iterations)  # fail at construction, not in jit.
    _check_architecture(architecture, "capsnet")
    routing = check_routing(routing)
    _check_shared(init, length_eps, em_final_lambda)
    em_final_lambda = float(em_final_lambda)
    stop_gradient = _check_bool("stop_gradient", stop_gradient)
    use_decoder = _check_bool("use_decoder", use_decoder)
    if conv_impl == "auto":
      raise errors.ConfigError(
        "config.model.conv_impl: 'auto' must be resolved before the model is built: pass "
        "cpu_runtime.resolve_conv_impl('auto') (models.create_model does)"
      )
    conv_impl, dt = _check_impl_and_dtype(conv_impl, dtype)
    k1, kp, sp = sizes["conv1_kernel"], sizes["primary_kernel"], sizes["primary_stride"]
    h1, w1 = conv_lib.out_size(h, k1, 1), conv_lib.out_size(w, k1, 1)
    h2, w2 = conv_lib.out_size(h1, kp, sp), conv_lib.out_size(w1, kp, sp)
    if min(h1, w1) < 1 or min(h2, w2) < 1:
      raise errors.ConfigError(
        f"config.model.conv1_kernel={k1}, primary_kernel={kp}, primary_stride={sp}: the "
        f"image shape {(h, w, c)} is too small for them (PrimaryCaps grid would be "
        f"{h2}x{w2})"
      )
    self.image_shape = (h, w, c)
    self.num_classes = int(num_classes)
    self.num_primary = h2 * w2 * sizes["primary_types"]
    self.length_eps = float(length_eps)
    self.routing = routing
    self.primary_grid = (h2, w2, sizes["primary_types"])
    ch1, types, dim = sizes["conv1_channels"], sizes["primary_types"], sizes["primary_dim"]
    self.conv1 = layers.Conv2D(
      c, ch1, k1, impl=conv_impl, dtype=dt, init=init, role="conv1", rngs=rngs
    )
    self.primary_caps = layers.PrimaryCaps(
      ch1,
      types,
      dim,
      kp,
      sp,
      impl=conv_impl,
      dtype=dt,
      init=init,
      nonlinearity=layers.PRIMARY_NONLINEARITY[routing],
      activation_head=routing == "em",
      rngs=rngs,
    )
    self.digit_caps = layers.RoutedCaps(
      self.num_primary,
      dim,
      self.num_classes,
      sizes["digit_dim"],
      routing_iterations=routing_iterations,
      stop_gradient=stop_gradient,
      dtype=dt,
      init=init,
      routing=routing,
      em_final_lambda=em_final_lambda,
      rngs=rngs,
    )
    # Inverted dot-product routing has no activation: its authors score each class
    # capsule with one linear layer shared by all classes (`final_fc`,
    # apple/ml-capsules-inverted-attention-routing `src/capsule_model.py`); a sigmoid
    # turns that score into the (0, 1) class score the margin loss reads.
    self.class_fc = (
      nnx.Linear(sizes["digit_dim"], 1, param_dtype=jnp.float32, rngs=rngs)
      if routing == "inverted_dot_product"
      else None
    )
    self.decoder = (
      layers.Decoder(
        self.num_classes,
        sizes["digit_dim"],
        decoder_hidden,
        self.image_shape,
        dtype=dt,
        init=init,
        rngs=rngs,
      )
      if use_decoder
      else None
    )

  def check_images(self, images) -> None:
    """Raises ValueError unless images have shape [B, *image_shape] (trace-time check)."""
    if tuple(images.shape[1:]) != self.image_shape:
      raise ValueError(
        f"images must have shape [B, {', '.join(map(str, self.image_shape))}] for this "
        f"model, got {tuple(images.shape)}"
      )

  def capsules(self, images: jax.Array, *, return_couplings: bool = False):
    """images [B, H, W, C] -> v [B, N_out, D_out] (and couplings c [B, N_in, N_out]).

    The couplings are the routing's `assignments` for every algorithm.
    """
    self.check_images(images)
    x = jax.nn.relu(self.conv1(images))  # [B, H1, W1, conv1]
    if self.routing == "em":
      u, a_in = self.primary_caps(x)  # [B, N_in, D_in], [B, N_in]
      r = self.digit_caps.route(u, a_in=a_in)
      return caps_ops.RoutingResult(r.poses, r.assignments) if return_couplings else r.poses
    u = self.primary_caps(x)  # [B, N_in, D_in]
    return self.digit_caps(u, return_couplings=return_couplings)

  def routed(self, images: jax.Array) -> routing_lib.Routed:
    """images [B, H, W, C] -> the class capsules' `routing.Routed` (poses, activations,
    assignments) under this model's routing."""
    self.check_images(images)
    x = jax.nn.relu(self.conv1(images))  # [B, H1, W1, conv1]
    if self.routing == "em":
      u, a_in = self.primary_caps(x)
      return self.digit_caps.route(u, a_in=a_in)
    return self.digit_caps.route(self.primary_caps(x))

  def class_scores(self, v: jax.Array, activations: jax.Array | None = None) -> jax.Array:
    """The [B, N_out] class scores in (0, 1) the margin loss reads ('lengths').

    Capsule lengths for dynamic and self-attention routing (what their papers classify
    with), EM's activations a_j (`activations`, [B, N_out]), and sigmoid(final_fc(v_j))
    for inverted dot-product routing.
    """
    if self.routing == "em":
      return activations.astype(jnp.float32)
    if self.routing == "inverted_dot_product":
      return jax.nn.sigmoid(self.class_fc(v.astype(jnp.float32))[..., 0])  # [B, N_out]
    return caps_ops.capsule_lengths(v, eps=self.length_eps)  # [B, N_out]

  def __call__(
    self, images: jax.Array, labels: jax.Array | None = None, *, return_couplings: bool = False
  ) -> dict[str, jax.Array]:
    """Runs CapsNet.

    Args:
      images: [B, H, W, C] float in [0, 1].
      labels: [B] int class ids: the decoder is masked by the true class (training);
        None masks by the predicted class (evaluation).
      return_couplings: also return the final coupling coefficients.

    Returns:
      dict with 'v' [B, N_out, D_out], 'lengths' [B, N_out] (float32; the class scores
      in (0, 1) of `class_scores`, the capsule lengths for dynamic routing), 'pred' [B] int32,
      'reconstruction' [B, H, W, C] (if the model has a decoder) and 'couplings'
      [B, N_in, N_out] (if asked for).
    """
    out = {}
    if self.routing == "em":
      r = self.routed(images)
      v, lengths = r.poses, self.class_scores(r.poses, r.activations)  # [B, N_out, D], [B, N_out]
      if return_couplings:
        out["couplings"] = r.assignments
    else:
      if return_couplings:
        v, out["couplings"] = self.capsules(images, return_couplings=True)
      else:
        v = self.capsules(images)
      lengths = self.class_scores(v)  # [B, N_out]
    pred = jnp.argmax(lengths, axis=-1).astype(jnp.int32)  # [B]
    out.update(v=v, lengths=lengths, pred=pred)
    if self.decoder is not None:
      out["reconstruction"] = self.decoder(v, pred if labels is None else labels)
    return out


class EfficientCapsNet(nnx.Module):
  """Efficient-CapsNet (Mazzia, Salvetti & Chiaberge 2021): conv stack -> depthwise
  PrimaryCaps -> FCCaps with self-attention routing -> masked decoder.

  The sizes of the authors' MNIST model (EscVM/Efficient-CapsNet,
  `models/efficient_capsnet_graph_mnist.py`, `efficient_capsnet_graph`): Conv 5x5x32,
  3x3x64, 3x3x64, 3x3x128 stride 2, each ReLU then BatchNorm, he_normal kernels; a
  depthwise 9x9 conv whose 128 outputs are 16 capsules of 8 dimensions, squashed with
  `routing.efficient_squash`; FCCaps W [16, 10, 8, 16] (he_normal) and the log prior B
  [16, 10] (zeros), routed by `routing.self_attention`; class scores are the capsule
  lengths. Without the decoder that is 161,824 trainable parameters on 28x28x1 inputs
  (the paper's "161K"). The decoder is `layers.Decoder` (160 -> 512 -> 1024 -> image).

  BatchNorm (`layers.BatchNorm`) keeps running statistics, as Keras' does: the batch's
  statistics in training, the running ones in evaluation (`model.eval()`). They are
  576 non-trainable numbers (a mean and a variance per channel of the 288), not counted
  in the 161,824, as Keras lists them apart and the paper's count leaves them out.

  Keywords are the `config.model` fields of configs/efficient_capsnet.py; `init` is the
  decoder's scheme (`layers.initializers`) and `em_final_lambda` is unused (shared
  fields, see `_check_shared`).
  """

  def __init__(
    self,
    *,
    image_shape: Sequence[int],
    num_classes: int,
    architecture: str = "efficient_capsnet",
    conv_channels: Sequence[int] = (32, 64, 64, 128),
    conv_kernels: Sequence[int] = (5, 3, 3, 3),
    conv_strides: Sequence[int] = (1, 1, 1, 2),
    primary_kernel: int = 9,
    primary_dim: int = 8,
    digit_dim: int = 16,
    routing: str = "self_attention",
    routing_iterations: int = 1,
    decoder_hidden: Sequence[int] = (512, 1024),
    use_decoder: bool = True,
    conv_impl: str = "xla",
    dtype: str = "float32",
    length_eps: float = 1e-7,
    init: str = "keras",
    em_final_lambda: float = 0.01,
    rngs: nnx.Rngs,
  ):
    _check_paper_model(
      architecture,
      "efficient_capsnet",
      routing,
      ("self_attention",),
      routing_iterations,
      init,
      length_eps,
      em_final_lambda,
    )
    channels = _check_sizes("conv_channels", conv_channels)
    kernels = _check_sizes("conv_kernels", conv_kernels)
    strides = _check_sizes("conv_strides", conv_strides)
    if not len(channels) == len(kernels) == len(strides) >= 1:
      raise errors.ConfigError(
        f"config.model.conv_channels, conv_kernels, conv_strides: must have the same "
        f"length >= 1, got {len(channels)}, {len(kernels)}, {len(strides)}"
      )
    kp = _positive_int("primary_kernel", primary_kernel)
    dim = _positive_int("primary_dim", primary_dim)
    digit_dim = _positive_int("digit_dim", digit_dim)
    decoder_hidden = _check_sizes("decoder_hidden", decoder_hidden)
    use_decoder = _check_bool("use_decoder", use_decoder)
    conv_impl, dt = _check_impl_and_dtype(conv_impl, dtype)
    h, w, c = (int(d) for d in image_shape)
    for k, st in zip(kernels, strides):
      h, w = conv_lib.out_size(h, k, st), conv_lib.out_size(w, k, st)
    h, w = conv_lib.out_size(h, kp, 1), conv_lib.out_size(w, kp, 1)
    if min(h, w) < 1:
      raise errors.ConfigError(
        f"config.model.conv_kernels/conv_strides/primary_kernel: the image shape "
        f"{tuple(image_shape)} is too small for them (PrimaryCaps grid {h}x{w})"
      )
    if (h * w * channels[-1]) % dim:
      raise errors.ConfigError(
        f"config.model.primary_dim: {dim} must divide the {h * w * channels[-1]} "
        "outputs of the depthwise PrimaryCaps conv"
      )
    self.image_shape = tuple(int(d) for d in image_shape)
    self.num_classes = int(num_classes)
    self.num_primary = h * w * channels[-1] // dim
    self.length_eps = float(length_eps)
    self.routing = routing
    self.primary_grid = (1, 1, self.num_primary) if h * w == 1 else (h, w, channels[-1] // dim)
    he = nnx.initializers.he_normal()
    convs, norms, c_in = [], [], c
    for ch, k, st in zip(channels, kernels, strides):
      convs.append(
        layers.Conv2D(
          c_in,
          ch,
          k,
          stride=st,
          impl=conv_impl,
          dtype=dt,
          kernel_init=he,
          bias_init=nnx.initializers.zeros_init(),
          rngs=rngs,
        )
      )
      norms.append(layers.BatchNorm(ch))
      c_in = ch
    self.convs, self.norms = nnx.List(convs), nnx.List(norms)
    self.primary_caps = layers.DepthwiseConv2D(c_in, kp, dtype=dt, rngs=rngs)
    self.primary_dim = dim
    self.digit_caps = layers.RoutedCaps(
      self.num_primary,
      dim,
      self.num_classes,
      digit_dim,
      routing_iterations=routing_iterations,
      dtype=dt,
      routing=routing,
      w_init=he,
      rngs=rngs,
    )
    self.decoder = (
      layers.Decoder(
        self.num_classes,
        digit_dim,
        decoder_hidden,
        self.image_shape,
        dtype=dt,
        init=init,
        rngs=rngs,
      )
      if use_decoder
      else None
    )

  check_images = CapsNet.check_images

  def capsules(self, images: jax.Array, *, return_couplings: bool = False):
    """images [B, H, W, C] -> v [B, 10, 16] (and assignments c [B, N_in, N_out])."""
    self.check_images(images)
    x = images
    for conv, norm in zip(self.convs, self.norms):
      x = norm(jax.nn.relu(conv(x)))  # [B, H', W', ch]
    y = self.primary_caps(x)  # [B, h, w, 128]
    u = y.reshape(y.shape[0], -1, self.primary_dim)  # [B, N_in, D_in]
    u = routing_lib.efficient_squash(u)  # [B, N_in, D_in]
    return self.digit_caps(u, return_couplings=return_couplings)

  def __call__(
    self, images: jax.Array, labels: jax.Array | None = None, *, return_couplings: bool = False
  ) -> dict[str, jax.Array]:
    """As `CapsNet.__call__`: 'lengths' are the capsule lengths."""
    return _capsule_outputs(self, images, labels, return_couplings)


class MatrixCapsNet(nnx.Module):
  """A matrix-capsule network with EM routing (Hinton, Sabour & Frosst 2018).

  ReLU Conv1 (K x K, stride s, A channels) -> PrimaryCaps (1x1 conv: B types of 4x4 pose
  matrices and sigmoid activations per cell) -> ConvCaps layers (`layers.MatrixConvCaps`,
  one per entry of `convcaps_types`, with its kernel and stride; the paper's ConvCaps1
  (K = 3, stride 2, C types) and ConvCaps2 (K = 3, stride 1, D types)) -> class capsules
  (`layers.MatrixClassCaps`: votes M W_tj shared over positions, coordinate addition,
  `routing.em`). A capsule seen by several ConvCaps cells has its assignments
  normalised over all their parents, as in the paper, or, with `convcaps_per_cell`, within
  each cell alone, as yl-1993/Matrix-Capsules-EM-PyTorch does (`layers.MatrixConvCaps`).
  `convcaps_types=()` routes PrimaryCaps straight to the class capsules.

  Class scores are the class activations a_j; configs/matrix_capsules_em.py trains them
  with the paper's spread loss (`config.loss.class_loss='spread'`).

  Keywords are the `config.model` fields of configs/matrix_capsules_em.py; `init` is the
  scheme of the convs and decoder, and `length_eps` is unused (shared fields, see
  `_check_shared`).
  """

  def __init__(
    self,
    *,
    image_shape: Sequence[int],
    num_classes: int,
    architecture: str = "matrix_capsnet",
    conv1_channels: int = 64,
    conv1_kernel: int = 5,
    conv1_stride: int = 2,
    primary_types: int = 8,
    convcaps_types: Sequence[int] = (),
    convcaps_kernels: Sequence[int] = (),
    convcaps_strides: Sequence[int] = (),
    convcaps_per_cell: bool = False,
    routing: str = "em",
    routing_iterations: int = 3,
    em_final_lambda: float = 0.01,
    coordinate_addition: bool = True,
    decoder_hidden: Sequence[int] = (512, 1024),
    use_decoder: bool = False,
    conv_impl: str = "xla",
    dtype: str = "float32",
    init: str = "torch",
    length_eps: float = 1e-7,
    rngs: nnx.Rngs,
  ):
    _check_paper_model(
      architecture,
      "matrix_capsnet",
      routing,
      ("em",),
      routing_iterations,
      init,
      length_eps,
      em_final_lambda,
    )
    ch1 = _positive_int("conv1_channels", conv1_channels)
    k1 = _positive_int("conv1_kernel", conv1_kernel)
    s1 = _positive_int("conv1_stride", conv1_stride)
    types = _positive_int("primary_types", primary_types)
    cc_types = _check_sizes("convcaps_types", convcaps_types)
    cc_kernels = _check_sizes("convcaps_kernels", convcaps_kernels)
    cc_strides = _check_sizes("convcaps_strides", convcaps_strides)
    per_cell = _check_bool("convcaps_per_cell", convcaps_per_cell)
    if not len(cc_types) == len(cc_kernels) == len(cc_strides):
      raise errors.ConfigError(
        f"config.model.convcaps_types={cc_types}, convcaps_kernels={cc_kernels} and "
        f"convcaps_strides={cc_strides} must have one entry per ConvCaps layer (the same length)"
      )
    em_final_lambda = _positive_float("em_final_lambda", em_final_lambda)
    coordinate_addition = _check_bool("coordinate_addition", coordinate_addition)
    decoder_hidden = _check_sizes("decoder_hidden", decoder_hidden)
    use_decoder = _check_bool("use_decoder", use_decoder)
    conv_impl, dt = _check_impl_and_dtype(conv_impl, dtype)
    h, w, c = (int(d) for d in image_shape)
    h1, w1 = conv_lib.out_size(h, k1, s1), conv_lib.out_size(w, k1, s1)
    if min(h1, w1) < 1:
      raise errors.ConfigError(
        f"config.model.conv1_kernel={k1}, conv1_stride={s1}: the "
        f"image shape {(h, w, c)} is too small for them"
      )
    grid = (h1, w1)
    for i, (k, st) in enumerate(zip(cc_kernels, cc_strides)):
      grid = tuple(conv_lib.out_size(n, k, st) for n in grid)
      if min(grid) < 1:
        raise errors.ConfigError(
          f"config.model.convcaps_kernels[{i}]={k}, convcaps_strides[{i}]={st}: the capsule "
          f"grid before it is too small for them (image {(h, w, c)})"
        )
    self.image_shape = (h, w, c)
    self.num_classes = int(num_classes)
    # The grid the class capsules route from (the last ConvCaps layer's, else
    # PrimaryCaps'): what `analysis.couplings` and the routing figure index.
    self.primary_grid = (*grid, cc_types[-1] if cc_types else types)
    self.num_primary = math.prod(self.primary_grid)
    self.routing = routing
    self.conv1 = layers.Conv2D(
      c, ch1, k1, stride=s1, impl=conv_impl, dtype=dt, init=init, role="conv1", rngs=rngs
    )
    self.primary_poses = layers.Conv2D(
      ch1, types * 16, 1, impl=conv_impl, dtype=dt, init=init, role="primary", rngs=rngs
    )
    self.primary_activations = layers.Conv2D(
      ch1, types, 1, impl=conv_impl, dtype=dt, init=init, role="primary", rngs=rngs
    )
    self.conv_caps = nnx.List(
      [
        layers.MatrixConvCaps(
          t_in,
          t_out,
          kernel=k,
          stride=st,
          routing_iterations=routing_iterations,
          final_lambda=em_final_lambda,
          per_cell=per_cell,
          dtype=dt,
          rngs=rngs,
        )
        for t_in, t_out, k, st in zip((types, *cc_types), cc_types, cc_kernels, cc_strides)
      ]
    )
    self.digit_caps = layers.MatrixClassCaps(
      cc_types[-1] if cc_types else types,
      self.num_classes,
      routing_iterations=routing_iterations,
      final_lambda=em_final_lambda,
      coordinate_addition=coordinate_addition,
      dtype=dt,
      rngs=rngs,
    )
    self.decoder = (
      layers.Decoder(
        self.num_classes, 16, decoder_hidden, self.image_shape, dtype=dt, init=init, rngs=rngs
      )
      if use_decoder
      else None
    )

  check_images = CapsNet.check_images

  def routed(self, images: jax.Array) -> routing_lib.Routed:
    """images [B, H, W, C] -> EM's `routing.Routed` for the class capsules."""
    self.check_images(images)
    x = jax.nn.relu(self.conv1(images))  # [B, H1, W1, A]
    p = self.primary_poses(x)  # [B, H1, W1, types*16]
    poses = p.reshape(*p.shape[:3], -1, 16)  # [B, H1, W1, types, 16]
    a = jax.nn.sigmoid(self.primary_activations(x))  # [B, H1, W1, types]
    for layer in self.conv_caps:
      poses, a = layer(poses, a)  # [B, H', W', T, 16], [B, H', W', T]
    return self.digit_caps(poses, a.reshape(a.shape[0], -1))

  def capsules(self, images: jax.Array, *, return_couplings: bool = False):
    """images -> poses [B, N_out, 16] (and assignments c [B, N_in, N_out])."""
    r = self.routed(images)
    return caps_ops.RoutingResult(r.poses, r.assignments) if return_couplings else r.poses

  def __call__(
    self, images: jax.Array, labels: jax.Array | None = None, *, return_couplings: bool = False
  ) -> dict[str, jax.Array]:
    """As `CapsNet.__call__`: 'lengths' are the class activations a_j, 'v' the poses."""
    r = self.routed(images)
    return _outputs(
      self,
      r.poses,
      r.activations.astype(jnp.float32),
      labels,
      r.assignments if return_couplings else None,
    )


def _check_paper_model(
  architecture,
  expected: str,
  routing,
  allowed: Sequence[str],
  routing_iterations,
  init,
  length_eps,
  em_final_lambda,
) -> None:
  """The checks every paper architecture shares: its name, routing and shared fields."""
  _check_architecture(architecture, expected)
  check_routing(routing, allowed)
  _check_shared(init, length_eps, em_final_lambda)
  with errors.config_field("model.routing_iterations"):
    caps_ops.check_iterations(routing_iterations)


def _check_shared(init, length_eps, em_final_lambda) -> None:
  """Validates the fields every architecture takes, used or not.

  Every class accepts init, length_eps, em_final_lambda (with architecture, routing,
  routing_iterations, conv_impl, dtype, decoder_hidden, use_decoder), because
  `run_config.LEGACY_DEFAULTS` fills them into saved configs that lack them: a saved
  config of any architecture must build again on resume and in evaluation.
  """
  if init not in layers.INITS:
    raise errors.ConfigError(f"config.model.init: must be one of {layers.INITS}, got {init!r}")
  if (
    isinstance(length_eps, bool)
    or not isinstance(length_eps, numbers.Real)
    or not 0 < length_eps <= 1e-3
  ):
    raise errors.ConfigError(f"config.model.length_eps: must be in (0, 1e-3], got {length_eps!r}")
  _positive_float("em_final_lambda", em_final_lambda)


def _check_impl_and_dtype(conv_impl, dtype):
  if conv_impl not in conv_lib.IMPLS:
    raise errors.ConfigError(
      f"config.model.conv_impl: must be 'auto' (resolved by "
      f"create_model) or one of {conv_lib.IMPLS}, got {conv_impl!r}"
    )
  if dtype not in _DTYPES:
    raise errors.ConfigError(f"config.model.dtype: must be one of {sorted(_DTYPES)}, got {dtype!r}")
  return conv_impl, _DTYPES[dtype]


def _outputs(model, v, scores, labels, couplings) -> dict[str, jax.Array]:
  """The output dict every architecture returns (see `CapsNet.__call__`)."""
  pred = jnp.argmax(scores, axis=-1).astype(jnp.int32)  # [B]
  out = dict(v=v, lengths=scores, pred=pred)
  if couplings is not None:
    out["couplings"] = couplings
  if model.decoder is not None:
    out["reconstruction"] = model.decoder(v, pred if labels is None else labels)
  return out


def _capsule_outputs(model, images, labels, return_couplings):
  if return_couplings:
    v, c = model.capsules(images, return_couplings=True)
  else:
    v, c = model.capsules(images), None
  return _outputs(model, v, caps_ops.capsule_lengths(v, eps=model.length_eps), labels, c)


# `config.model.architecture` -> the class `create_model` builds; each class's keywords
# (but image_shape, num_classes, rngs) are that architecture's config.model fields.
ARCHITECTURES = {
  "capsnet": CapsNet,
  "efficient_capsnet": EfficientCapsNet,
  "matrix_capsnet": MatrixCapsNet,
}


def model_fields(architecture: str = "capsnet") -> set[str]:
  """The config.model fields of an architecture: its class's keywords."""
  return set(inspect.signature(ARCHITECTURES[architecture].__init__).parameters) - {
    "self",
    "image_shape",
    "num_classes",
    "rngs",
  }


def create_model(
  model_cfg,
  *,
  image_shape: Sequence[int],
  num_classes: int,
  rngs: nnx.Rngs,
  conv_impl: str | None = None,
) -> nnx.Module:
  """Builds the model of a `config.model` ConfigDict (or a dict with its fields).

  `ARCHITECTURES[model_cfg.architecture](**model_cfg, image_shape=..., num_classes=...,
  rngs=...)` (CapsNet when the field is absent, as in configs saved before it), with the config's
  conv_impl replaced by a concrete lowering: `conv_impl` when the caller resolved it at
  start-up (the config keeps 'auto', so a saved run's config means the same on every
  machine), else `cpu_runtime.resolve_conv_impl(model_cfg.conv_impl)`, which reads the
  default backend and XLA_FLAGS (call it after `cpu_runtime.configure_cpu_runtime()`).

  Args:
    model_cfg: `config.model`; a config saved before `init`/`length_eps` existed may
      lack them (CapsNet's defaults apply).
    image_shape: (H, W, C) of the images.
    num_classes: N_out, the number of class capsules.
    rngs: nnx.Rngs with a `params` stream.
    conv_impl: a concrete lowering (one of `capsjax.conv.IMPLS`), or None.

  Returns:
    The model (CapsNet, EfficientCapsNet or MatrixCapsNet).

  Raises:
    errors.ConfigError: a field of `model_cfg` is unknown or has a bad value.
  """
  fields = dict(model_cfg.items())
  architecture = fields.get("architecture", "capsnet")
  if architecture not in ARCHITECTURES:
    raise errors.ConfigError(
      f"config.model.architecture: must be one of {sorted(ARCHITECTURES)}, got {architecture!r}"
    )
  cls = ARCHITECTURES[architecture]
  known = model_fields(architecture)
  unknown = sorted(set(fields) - known)
  if unknown:
    raise errors.ConfigError(
      f"config.model.{unknown[0]}: not a {cls.__name__} field; expected one of {sorted(known)}"
    )
  if conv_impl is None:
    with errors.config_field("model.conv_impl"):
      conv_impl = cpu_runtime.resolve_conv_impl(fields.get("conv_impl", "auto"))
  fields["conv_impl"] = conv_impl
  return cls(**fields, image_shape=image_shape, num_classes=num_classes, rngs=rngs)


def count_params(model: nnx.Module) -> int:
  """Number of scalar parameters (nnx.Param leaves) of a model."""
  state = nnx.state(model, nnx.Param)
  return sum(int(x.size) for x in jax.tree.leaves(state))
