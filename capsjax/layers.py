"""Flax NNX capsule layers: Conv2D (fast lowerings), PrimaryCaps, RoutedCaps, Decoder.

Why NNX: it is the API Flax points new users to, and its modules are plain Python
objects researchers can subclass and poke at (`model.digit_caps.w[...]`). The training
step still uses NNX's functional form (split/merge around a pure `jax.jit` step, see
`capsjax.train`), so there is no `nnx.jit` overhead in the hot loop.

Every layer takes a `dtype` for its matmuls/convs ('float32' or 'bfloat16'); parameters
are always float32 and squash/routing run in float32 (capsjax.caps_ops upcasts).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from capsjax import caps_ops
from capsjax import conv as conv_lib

INITS = ("torch", "keras", "tf")
# Truncated-normal stddevs of the authors' code (Sarasra/models, research/capsules):
# conv1 5e-2 (models/capsule_model.py L181-183), every other weight 0.1
# (models/layers/variables.py L29); every bias starts at 0.1 (variables.py L52-67).
_TF_STDDEV = {"conv1": 0.05, "primary": 0.1, "capsule": 0.1, "decoder": 0.1}
_ROLES = tuple(_TF_STDDEV)


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def initializers(scheme: str, role: str, fan_in: int):
  """(kernel_init, bias_init) of one layer under an initialisation scheme.

  Args:
    scheme: 'torch': PyTorch's nn.Conv2d/nn.Linear defaults (kernel and bias uniform in
      +-1/sqrt(fan_in)) and W ~ N(0, 0.01^2), as PyTorch ports and benchmarks/torch_peer.py
      do; 'keras': glorot_uniform kernels and W with zero biases, Keras' defaults, which
      CapsNet-Keras (XifengGuo/CapsNet-Keras), CapsNet-Fashion-MNIST, the Fashion seed
      notebook and the K-MNIST seed's TF2 port use (Flax's fan computation for a rank-4
      W [N_in, N_out, D_in, D_out] gives the same fan_in + fan_out as Keras' for its
      [N_out, N_in, D_out, D_in]); 'tf': the authors' code (Sarasra/models
      research/capsules), truncated normal (cut at 2 stddev) and biases of 0.1,
      including a bias on the routed capsules' s_j.
    role: 'conv1', 'primary', 'capsule' (the routed W) or 'decoder'.
    fan_in: inputs per output unit (kernel_h * kernel_w * C_in for a conv).

  Returns:
    (kernel_init, bias_init): initializers `(key, shape, dtype) -> array`; bias_init is
    None for the routed capsules unless the scheme has a capsule bias ('tf').
  """
  if scheme not in INITS:
    raise ValueError(f"model.init must be one of {INITS}, got {scheme!r}")
  if role not in _ROLES:
    raise ValueError(f"unknown layer role {role!r}; expected one of {_ROLES}")
  if scheme == "torch":
    if role == "capsule":
      return nnx.initializers.normal(0.01), None
    # kaiming_uniform(a=sqrt(5)) of PyTorch's reset_parameters is uniform +-1/sqrt(fan_in).
    bound = 1.0 / math.sqrt(fan_in)
    return _uniform(bound), _uniform(bound)
  if scheme == "keras":
    return nnx.initializers.glorot_uniform(), (
        None if role == "capsule" else nnx.initializers.zeros_init())
  return (nnx.initializers.truncated_normal(_TF_STDDEV[role]),
          nnx.initializers.constant(0.1))


class Conv2D(nnx.Module):
  """VALID 2-D convolution with bias, lowered through `capsjax.conv.conv2d`.

  `impl` is a concrete lowering (one of `capsjax.conv.IMPLS`); the config value 'auto' is
  resolved before any layer is built (`capsjax.cpu_runtime.resolve_conv_impl`).
  """

  def __init__(self, in_channels: int, out_channels: int, kernel: int, *, stride: int = 1,
               impl: str = "xla", dtype=jnp.float32, init: str = "torch",
               role: str = "conv1", rngs: nnx.Rngs):
    if impl not in conv_lib.IMPLS:
      raise ValueError(f"conv impl must be one of {conv_lib.IMPLS}, got {impl!r} ('auto' is "
                       "resolved at start-up by cpu_runtime.resolve_conv_impl)")
    self.stride = stride
    self.impl = impl
    self.dtype = jnp.dtype(dtype)
    kernel_init, bias_init = initializers(init, role, kernel * kernel * in_channels)
    self.kernel = nnx.Param(kernel_init(
        rngs.params(), (kernel, kernel, in_channels, out_channels), jnp.float32))
    self.bias = nnx.Param(bias_init(rngs.params(), (out_channels,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C_in] -> [B, H', W', C_out] in float32."""
    y = conv_lib.conv2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                        stride=self.stride, impl=self.impl)
    return y.astype(jnp.float32) + self.bias[...]


class PrimaryCaps(nnx.Module):
  """Conv -> capsules -> squash: `types` capsule types of `dim` dimensions per pixel.

  The `dim` consecutive channels at one pixel form one capsule (channel
  t*dim + d is dimension d of type t), the grouping of the authors' code
  (Sarasra/models research/capsules).
  """

  def __init__(self, in_channels: int, types: int, dim: int, kernel: int, stride: int, *,
               impl: str = "xla", dtype=jnp.float32, init: str = "torch", rngs: nnx.Rngs):
    self.types = types
    self.dim = dim
    self.conv = Conv2D(in_channels, types * dim, kernel, stride=stride, impl=impl,
                       dtype=dtype, init=init, role="primary", rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> u: [B, N_in, D_in] with N_in = H' * W' * types."""
    y = self.conv(x)                                                   # [B, H', W', types*D_in]
    u = y.reshape(y.shape[0], -1, self.dim)                            # [B, N_in, D_in]
    return caps_ops.squash(u)                                          # [B, N_in, D_in]


class RoutedCaps(nnx.Module):
  """Fully connected capsule layer with dynamic routing (DigitCaps).

  A weight matrix W_ij per (input capsule, output capsule) and, as in the paper, no
  bias; `init='tf'` adds the bias b_j [N_out, D_out] of the authors' code
  (Sarasra/models research/capsules) to every s_j.
  """

  def __init__(self, num_in: int, in_dim: int, num_out: int, out_dim: int, *,
               routing_iterations: int, stop_gradient: bool = False, dtype=jnp.float32,
               init: str = "torch", rngs: nnx.Rngs):
    caps_ops.check_iterations(routing_iterations)  # fail at construction, not in jit.
    self.routing_iterations = routing_iterations
    self.stop_gradient = stop_gradient
    self.dtype = jnp.dtype(dtype)
    w_init, bias_init = initializers(init, "capsule", in_dim)
    self.w = nnx.Param(w_init(rngs.params(), (num_in, num_out, in_dim, out_dim), jnp.float32))
    self.bias = (None if bias_init is None else
                 nnx.Param(bias_init(rngs.params(), (num_out, out_dim), jnp.float32)))

  def predictions(self, u: jax.Array) -> jax.Array:
    """u: [B, N_in, D_in] -> u_hat: [B, N_in, N_out, D_out] in float32."""
    u_hat = jnp.einsum('bni,nmio->bnmo', u.astype(self.dtype), self.w[...].astype(self.dtype),
                       preferred_element_type=jnp.float32)             # [B, N_in, N_out, D_out]
    return u_hat

  def __call__(self, u: jax.Array, *, return_couplings: bool = False):
    """u: [B, N_in, D_in] -> v: [B, N_out, D_out] (and c: [B, N_in, N_out]).

    Equal to `dynamic_routing(self.predictions(u), ...)`, computed by
    `caps_ops.predict_and_route`, which never builds u_hat in the [B, N_in, N_out, D_out]
    layout (much faster forward and backward on CPU; RESULTS.md). With a bfloat16 dtype, u and W are
    rounded to bfloat16 and their products accumulated in float32, as in `predictions`.
    A layer with a bias routes `predictions(u)` through `dynamic_routing` (autodiff;
    the hand-written gradient of `predict_and_route` has no bias term).
    """
    f32 = jnp.float32
    if self.bias is not None:
      return caps_ops.dynamic_routing(
          self.predictions(u), self.routing_iterations, stop_gradient=self.stop_gradient,
          return_couplings=return_couplings, bias=self.bias[...])
    return caps_ops.predict_and_route(
        u.astype(self.dtype).astype(f32), self.w[...].astype(self.dtype).astype(f32),
        self.routing_iterations, stop_gradient=self.stop_gradient,
        return_couplings=return_couplings)


class Decoder(nnx.Module):
  """Masked-capsule decoder: [B, N_out, D_out] -> hidden ReLU layers -> sigmoid image."""

  def __init__(self, num_caps: int, caps_dim: int, hidden: Sequence[int],
               image_shape: Sequence[int], *, dtype=jnp.float32, init: str = "torch",
               rngs: nnx.Rngs):
    self.image_shape = tuple(int(d) for d in image_shape)
    sizes = [num_caps * caps_dim, *hidden, math.prod(self.image_shape)]
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
      kernel_init, bias_init = initializers(init, "decoder", a)
      layers.append(nnx.Linear(a, b, kernel_init=kernel_init, bias_init=bias_init,
                               dtype=dtype, param_dtype=jnp.float32, rngs=rngs))
    self.layers = nnx.List(layers)

  def __call__(self, v: jax.Array, mask_class: jax.Array) -> jax.Array:
    """v: [B, N_out, D_out], mask_class: [B] int -> reconstruction [B, H, W, C] in [0, 1]."""
    mask = jax.nn.one_hot(mask_class, v.shape[-2], dtype=v.dtype)      # [B, N_out]
    x = (v * mask[..., None]).reshape(v.shape[0], -1)                  # [B, N_out*D_out]
    for layer in self.layers[:-1]:
      x = jax.nn.relu(layer(x))                                        # [B, hidden]
    x = jax.nn.sigmoid(self.layers[-1](x).astype(jnp.float32))         # [B, H*W*C]
    return x.reshape(x.shape[0], *self.image_shape)                    # [B, H, W, C]
