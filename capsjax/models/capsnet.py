"""CapsNet (Sabour, Frosst & Hinton 2017): Conv1 -> PrimaryCaps -> DigitCaps -> decoder, with
any routing of `capsjax.routing`."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from capsjax import errors
from capsjax import layers
from capsjax import routing as routing_lib
from capsjax.models import common


class CapsNet(common.CapsuleModel):
  """CapsNet. Call as `model(images, labels=None)`; returns a dict of named outputs
  (`common.CapsuleModel.__call__`).

  For 28x28x1 inputs and 10 classes with the paper's sizes (the defaults) the model has
  8,215,568 parameters (6,804,224 without the decoder); `init='tf'` adds the 160 routing
  biases. Any input shape and channel count works (32x32x3 gives 2048 primary capsules).

  Every keyword but `image_shape`, `num_classes` and `rngs` is the `config.model` field of
  the same name (configs/common.py documents them), so a config builds it as
  `CapsNet(**config.model, image_shape=..., num_classes=..., rngs=...)`. `init` and
  `length_eps` default to the values of configs that lack those fields. A bad field value
  raises `errors.ConfigError` naming it ("config.model.primary_stride: ...") before
  anything is allocated.

  `conv_impl` must be a concrete lowering (one of `capsjax.conv.IMPLS`; default 'xla', the
  reference): the config value 'auto' is resolved at start-up and raises here.

  `routing` (a name in `routing.ROUTINGS`) picks the class capsules' routing, the
  primary-capsule nonlinearity its authors use (`layers.PRIMARY_NONLINEARITY`), EM's
  sigmoid activation head and the routing's learned parameters (`layers.RoutedCaps`);
  `class_scores` says what the class scores are for each. `stop_gradient` applies to
  every routing (`capsjax.routing`); `em_final_lambda` to EM only.
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
    primary_scale: float = 1.0,
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
    h, w, c = common.check_image_shape(image_shape, num_classes)
    ch1 = common.positive_int("conv1_channels", conv1_channels)
    k1 = common.positive_int("conv1_kernel", conv1_kernel)
    types = common.positive_int("primary_types", primary_types)
    dim = common.positive_int("primary_dim", primary_dim)
    kp = common.positive_int("primary_kernel", primary_kernel)
    sp = common.positive_int("primary_stride", primary_stride)
    primary_scale = common.positive_float("primary_scale", primary_scale)
    digit_dim = common.positive_int("digit_dim", digit_dim)
    f = common.check_shared(
      architecture=architecture,
      expected="capsnet",
      routing=routing,
      allowed=None,
      routing_iterations=routing_iterations,
      init=init,
      length_eps=length_eps,
      em_final_lambda=em_final_lambda,
      conv_impl=conv_impl,
      dtype=dtype,
      decoder_hidden=decoder_hidden,
      use_decoder=use_decoder,
    )
    stop_gradient = common.check_bool("stop_gradient", stop_gradient)
    h2, w2 = common.grid_after((h, w), (k1, kp), (1, sp))
    if min(h2, w2) < 1:
      raise errors.ConfigError(
        f"config.model.conv1_kernel={k1}, primary_kernel={kp}, primary_stride={sp}: the "
        f"image shape {(h, w, c)} is too small for them (PrimaryCaps grid would be "
        f"{h2}x{w2})"
      )
    self.image_shape = (h, w, c)
    self.num_classes = int(num_classes)
    self.num_primary = h2 * w2 * types
    self.length_eps = float(length_eps)
    self.routing = f.routing
    self.primary_grid = (h2, w2, types)
    self.conv1 = layers.Conv2D(
      c, ch1, k1, impl=f.conv_impl, dtype=f.dtype, init=init, role="conv1", rngs=rngs
    )
    self.primary_caps = layers.PrimaryCaps(
      ch1,
      types,
      dim,
      kp,
      sp,
      impl=f.conv_impl,
      dtype=f.dtype,
      init=init,
      nonlinearity=layers.PRIMARY_NONLINEARITY[f.routing],
      activation_head=f.routing == "em",
      preact_scale=primary_scale,
      rngs=rngs,
    )
    self.digit_caps = layers.RoutedCaps(
      self.num_primary,
      dim,
      self.num_classes,
      digit_dim,
      routing_iterations=routing_iterations,
      stop_gradient=stop_gradient,
      dtype=f.dtype,
      init=init,
      routing=f.routing,
      em_final_lambda=f.em_final_lambda,
      rngs=rngs,
    )
    # Inverted dot-product routing has no activation: its authors score each class
    # capsule with one linear layer shared by all classes (`final_fc`,
    # apple/ml-capsules-inverted-attention-routing `src/capsule_model.py`); a sigmoid
    # turns that score into the (0, 1) class score the margin loss reads.
    self.class_fc = (
      nnx.Linear(digit_dim, 1, param_dtype=jnp.float32, rngs=rngs)
      if f.routing == "inverted_dot_product"
      else None
    )
    self.decoder = common.make_decoder(
      f, self.num_classes, digit_dim, self.image_shape, init=init, rngs=rngs
    )

  def routed(self, images: jax.Array) -> routing_lib.Routed:
    """images [B, H, W, C] -> the class capsules' `routing.Routed` (poses [B, N_out, D_out],
    activations [B, N_out], assignments [B, N_in, N_out]) under this model's routing."""
    self.check_images(images)
    x = jax.nn.relu(self.conv1(images))  # [B, H1, W1, conv1]
    if self.routing == "em":
      u, a_in = self.primary_caps(x)  # [B, N_in, D_in], [B, N_in]
      return self.digit_caps.route(u, a_in=a_in)
    return self.digit_caps.route(self.primary_caps(x))  # u: [B, N_in, D_in]

  def class_scores(self, routed: routing_lib.Routed) -> jax.Array:
    """The [B, N_out] class scores in (0, 1) the margin loss reads.

    Capsule lengths for dynamic and self-attention routing (what their papers classify
    with), EM's activations a_j, and sigmoid(final_fc(v_j)) for inverted dot-product
    routing.
    """
    if self.routing == "inverted_dot_product":
      v = routed.poses.astype(jnp.float32)  # [B, N_out, D_out]
      return jax.nn.sigmoid(self.class_fc(v)[..., 0])  # [B, N_out]
    return super().class_scores(routed)
