"""A matrix-capsule network with EM routing (Hinton, Sabour & Frosst 2018): Conv1 ->
PrimaryCaps -> ConvCaps layers -> class capsules."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from capsjax import errors
from capsjax import layers
from capsjax import matrix_layers
from capsjax import routing as routing_lib
from capsjax.models import common


class MatrixCapsNet(common.CapsuleModel):
  """A matrix-capsule network. Call as `model(images, labels=None)`
  (`common.CapsuleModel`): 'v' are the class poses, the class scores their activations.

  ReLU Conv1 (K x K, stride s, A channels) -> PrimaryCaps (1x1 conv: B types of 4x4 pose
  matrices and sigmoid activations per cell) -> ConvCaps layers
  (`matrix_layers.MatrixConvCaps`, one per entry of `convcaps_types`, with its kernel and
  stride; the paper's ConvCaps1 (K = 3, stride 2, C types) and ConvCaps2 (K = 3, stride 1,
  D types)) -> class capsules (`matrix_layers.MatrixClassCaps`: votes M W_tj shared over
  positions, coordinate addition, `routing.em`). A capsule seen by several ConvCaps cells
  has its assignments normalised over all their parents, as in the paper, or, with
  `convcaps_per_cell`, within each cell alone, as yl-1993/Matrix-Capsules-EM-PyTorch does.
  `convcaps_types=()` routes PrimaryCaps straight to the class capsules.

  configs/matrix_capsules_em.py trains the class activations with the paper's spread loss
  (`config.loss.class_loss='spread'`).

  Images are standardised, (x - input_mean) / input_std, then zero-padded by
  `conv1_padding` pixels on each side before Conv1, as yl-1993's code does (torchvision's
  Normalize((0.1307,), (0.3081,)) in train.py L51-55; nn.Conv2d(padding=2) in
  model/capsules.py L322-323): the padding is zero in the standardised images.

  Keywords are the `config.model` fields of configs/matrix_capsules_em.py; `init` is the
  scheme of the convs and decoder, and `length_eps` is unused (fields every architecture
  takes, see `common.check_shared`).
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
    conv1_padding: int = 0,
    input_mean: float = 0.0,
    input_std: float = 1.0,
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
    h, w, c = common.check_image_shape(image_shape, num_classes)
    f = common.check_shared(
      architecture=architecture,
      expected="matrix_capsnet",
      routing=routing,
      allowed=("em",),
      routing_iterations=routing_iterations,
      init=init,
      length_eps=length_eps,
      em_final_lambda=em_final_lambda,
      conv_impl=conv_impl,
      dtype=dtype,
      decoder_hidden=decoder_hidden,
      use_decoder=use_decoder,
    )
    ch1 = common.positive_int("conv1_channels", conv1_channels)
    k1 = common.positive_int("conv1_kernel", conv1_kernel)
    s1 = common.positive_int("conv1_stride", conv1_stride)
    self.conv1_padding = common.non_negative_int("conv1_padding", conv1_padding)
    self.input_mean = common.finite_float("input_mean", input_mean)
    self.input_std = common.positive_float("input_std", input_std)
    types = common.positive_int("primary_types", primary_types)
    cc_types = common.check_sizes("convcaps_types", convcaps_types)
    cc_kernels = common.check_sizes("convcaps_kernels", convcaps_kernels)
    cc_strides = common.check_sizes("convcaps_strides", convcaps_strides)
    per_cell = common.check_bool("convcaps_per_cell", convcaps_per_cell)
    if not len(cc_types) == len(cc_kernels) == len(cc_strides):
      raise errors.ConfigError(
        f"config.model.convcaps_types={cc_types}, convcaps_kernels={cc_kernels} and "
        f"convcaps_strides={cc_strides} must have one entry per ConvCaps layer (the same length)"
      )
    coordinate_addition = common.check_bool("coordinate_addition", coordinate_addition)
    pad = 2 * self.conv1_padding
    grid = common.grid_after((h + pad, w + pad), (k1,), (s1,))
    if min(grid) < 1:
      raise errors.ConfigError(
        f"config.model.conv1_kernel={k1}, conv1_stride={s1}: the "
        f"image shape {(h, w, c)} is too small for them"
      )
    for i, (k, st) in enumerate(zip(cc_kernels, cc_strides, strict=False)):
      grid = common.grid_after(grid, (k,), (st,))
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
    self.routing = f.routing
    conv = {"impl": f.conv_impl, "dtype": f.dtype, "init": init, "rngs": rngs}
    self.conv1 = layers.Conv2D(c, ch1, k1, stride=s1, role="conv1", **conv)
    self.primary_poses = layers.Conv2D(ch1, types * 16, 1, role="primary", **conv)
    self.primary_activations = layers.Conv2D(ch1, types, 1, role="primary", **conv)
    em = {
      "routing_iterations": routing_iterations,
      "final_lambda": f.em_final_lambda,
      "dtype": f.dtype,
    }
    self.conv_caps = nnx.List(
      [
        matrix_layers.MatrixConvCaps(
          t_in, t_out, kernel=k, stride=st, per_cell=per_cell, rngs=rngs, **em
        )
        for t_in, t_out, k, st in zip(
          (types, *cc_types), cc_types, cc_kernels, cc_strides, strict=False
        )
      ]
    )
    self.digit_caps = matrix_layers.MatrixClassCaps(
      self.primary_grid[-1],
      self.num_classes,
      coordinate_addition=coordinate_addition,
      rngs=rngs,
      **em,
    )
    self.decoder = common.make_decoder(
      f, self.num_classes, 16, self.image_shape, init=init, rngs=rngs
    )

  def routed(self, images: jax.Array) -> routing_lib.Routed:
    """images [B, H, W, C] -> EM's `routing.Routed` for the class capsules (poses
    [B, N_out, 16], activations [B, N_out], assignments [B, N_in, N_out])."""
    self.check_images(images)
    x = (images - self.input_mean) / self.input_std  # [B, H, W, C]
    p = self.conv1_padding
    x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))  # [B, H + 2p, W + 2p, C]
    x = jax.nn.relu(self.conv1(x))  # [B, H1, W1, A]
    p = self.primary_poses(x)  # [B, H1, W1, types*16]
    poses = p.reshape(*p.shape[:3], -1, 16)  # [B, H1, W1, types, 16]
    a = jax.nn.sigmoid(self.primary_activations(x))  # [B, H1, W1, types]
    for layer in self.conv_caps:
      poses, a = layer(poses, a)  # [B, H', W', T, 16], [B, H', W', T]
    return self.digit_caps(poses, a.reshape(a.shape[0], -1))
