"""Efficient-CapsNet (Mazzia, Salvetti & Chiaberge 2021): conv stack -> depthwise PrimaryCaps
-> FCCaps with self-attention routing -> masked decoder."""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from capsjax import errors
from capsjax import layers
from capsjax import routing as routing_lib
from capsjax.models import common


class EfficientCapsNet(common.CapsuleModel):
  """Efficient-CapsNet. Call as `model(images, labels=None)` (`common.CapsuleModel`); its
  class scores are the capsule lengths.

  The sizes of the authors' MNIST model (EscVM/Efficient-CapsNet,
  `models/efficient_capsnet_graph_mnist.py`, `efficient_capsnet_graph`): Conv 5x5x32,
  3x3x64, 3x3x64, 3x3x128 stride 2, each ReLU then BatchNorm, he_normal kernels; a
  depthwise 9x9 conv whose 128 outputs are 16 capsules of 8 dimensions, squashed with
  `routing.efficient_squash`; FCCaps W [16, 10, 8, 16] (he_normal) and the log prior B
  [16, 10] (zeros), routed by `routing.self_attention`. Without the decoder that is
  161,824 trainable parameters on 28x28x1 inputs (the paper's "161K"). The decoder is
  `layers.Decoder` (160 -> 512 -> 1024 -> image).

  BatchNorm (`layers.BatchNorm`) keeps running statistics, as Keras' does: the batch's
  statistics in training, the running ones in evaluation (`model.eval()`). They are
  576 non-trainable numbers (a mean and a variance per channel of the 288), not counted
  in the 161,824, as Keras lists them apart and the paper's count leaves them out.

  Keywords are the `config.model` fields of configs/efficient_capsnet.py; `init` is the
  decoder's scheme (`layers.initializers`) and `em_final_lambda` is unused (fields every
  architecture takes, see `common.check_shared`).
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
    h, w, c = common.check_image_shape(image_shape, num_classes)
    f = common.check_shared(
      architecture=architecture,
      expected="efficient_capsnet",
      routing=routing,
      allowed=("self_attention",),
      routing_iterations=routing_iterations,
      init=init,
      length_eps=length_eps,
      em_final_lambda=em_final_lambda,
      conv_impl=conv_impl,
      dtype=dtype,
      decoder_hidden=decoder_hidden,
      use_decoder=use_decoder,
    )
    channels = common.check_sizes("conv_channels", conv_channels)
    kernels = common.check_sizes("conv_kernels", conv_kernels)
    strides = common.check_sizes("conv_strides", conv_strides)
    if not len(channels) == len(kernels) == len(strides) >= 1:
      raise errors.ConfigError(
        f"config.model.conv_channels, conv_kernels, conv_strides: must have the same "
        f"length >= 1, got {len(channels)}, {len(kernels)}, {len(strides)}"
      )
    kp = common.positive_int("primary_kernel", primary_kernel)
    dim = common.positive_int("primary_dim", primary_dim)
    digit_dim = common.positive_int("digit_dim", digit_dim)
    gh, gw = common.grid_after((h, w), (*kernels, kp), (*strides, 1))
    if min(gh, gw) < 1:
      raise errors.ConfigError(
        f"config.model.conv_kernels/conv_strides/primary_kernel: the image shape "
        f"{(h, w, c)} is too small for them (PrimaryCaps grid {gh}x{gw})"
      )
    if (gh * gw * channels[-1]) % dim:
      raise errors.ConfigError(
        f"config.model.primary_dim: {dim} must divide the {gh * gw * channels[-1]} "
        "outputs of the depthwise PrimaryCaps conv"
      )
    self.image_shape = (h, w, c)
    self.num_classes = int(num_classes)
    self.num_primary = gh * gw * channels[-1] // dim
    self.length_eps = float(length_eps)
    self.routing = f.routing
    # A 1x1 grid (the paper's) has its capsules as types; else each cell holds
    # channels/dim of them.
    self.primary_grid = (1, 1, self.num_primary) if gh * gw == 1 else (gh, gw, channels[-1] // dim)
    he = nnx.initializers.he_normal()
    convs, norms, c_in = [], [], c
    for ch, k, st in zip(channels, kernels, strides, strict=False):
      convs.append(
        layers.Conv2D(
          c_in,
          ch,
          k,
          stride=st,
          impl=f.conv_impl,
          dtype=f.dtype,
          kernel_init=he,
          bias_init=nnx.initializers.zeros_init(),
          rngs=rngs,
        )
      )
      norms.append(layers.BatchNorm(ch))
      c_in = ch
    self.convs, self.norms = nnx.List(convs), nnx.List(norms)
    self.primary_caps = layers.DepthwiseConv2D(c_in, kp, dtype=f.dtype, rngs=rngs)
    self.primary_dim = dim
    self.digit_caps = layers.RoutedCaps(
      self.num_primary,
      dim,
      self.num_classes,
      digit_dim,
      routing_iterations=routing_iterations,
      dtype=f.dtype,
      routing=f.routing,
      w_init=he,
      rngs=rngs,
    )
    self.decoder = common.make_decoder(
      f, self.num_classes, digit_dim, self.image_shape, init=init, rngs=rngs
    )

  def routed(self, images: jax.Array) -> routing_lib.Routed:
    """images [B, H, W, C] -> self-attention's `routing.Routed` for the class capsules
    (poses [B, N_out, D_out], activations [B, N_out], assignments [B, N_in, N_out])."""
    self.check_images(images)
    x = images
    for conv, norm in zip(self.convs, self.norms, strict=False):
      x = norm(jax.nn.relu(conv(x)))  # [B, H', W', ch]
    y = self.primary_caps(x)  # [B, h, w, C_last]
    u = y.reshape(y.shape[0], -1, self.primary_dim)  # [B, N_in, D_in]
    u = routing_lib.efficient_squash(u)  # [B, N_in, D_in]
    return self.digit_caps.route(u)
