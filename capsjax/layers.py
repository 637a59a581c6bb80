"""Flax NNX vector-capsule layers: Conv2D (fast lowerings), PrimaryCaps, RoutedCaps, Decoder,
and Efficient-CapsNet's BatchNorm and DepthwiseConv2D. (Matrix capsules: `capsjax.matrix_layers`.)

`RoutedCaps` routes with any algorithm of `capsjax.routing` (`routing=` a name in
`routing.ROUTINGS`); 'dynamic' takes the fast `routing.predict_and_route` path.

Why NNX: it is the API Flax points new users to, and its modules are plain Python
objects researchers can subclass and poke at (`model.digit_caps.w[...]`). The training
step still uses NNX's functional form (split/merge around a pure `jax.jit` step, see
`capsjax.steps`), so there is no `nnx.jit` overhead in the hot loop.

Every layer takes a `dtype` for its matmuls/convs ('float32' or 'bfloat16'); parameters
are always float32 and squash/routing run in float32 (capsjax.caps_ops upcasts).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from capsjax import caps_ops
from capsjax import conv as conv_lib
from capsjax import routing as routing_lib

INITS = ("torch", "keras", "tf", "he")
# Truncated-normal stddevs of the authors' code (Sarasra/models, research/capsules):
# conv1 5e-2 (models/capsule_model.py L181-183), every other weight 0.1
# (models/layers/variables.py L29); every bias starts at 0.1 (variables.py L52-67).
_TF_STDDEV = {
  "conv1": 0.05,
  "primary": 0.1,
  "capsule": 0.1,
  "decoder": 0.1,
  "decoder_output": 0.1,
}
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
      including a bias on the routed capsules' s_j; 'he': Efficient-CapsNet's
      (EscVM/Efficient-CapsNet models/efficient_capsnet_graph_mnist.py L32-38, L60-62):
      Keras' he_normal kernels (truncated normal, variance 2 / fan_in) with zero biases,
      glorot_normal for the decoder's sigmoid output layer.
    role: 'conv1', 'primary', 'capsule' (the routed W), 'decoder' (a hidden layer) or
      'decoder_output'.
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
      None if role == "capsule" else nnx.initializers.zeros_init()
    )
  if scheme == "he":
    # Flax's he_normal and glorot_normal are Keras' (TF2) VarianceScaling definitions.
    kernel = nnx.initializers.glorot_normal() if role == "decoder_output" else None
    return kernel or nnx.initializers.he_normal(), (
      None if role == "capsule" else nnx.initializers.zeros_init()
    )
  return (nnx.initializers.truncated_normal(_TF_STDDEV[role]), nnx.initializers.constant(0.1))


class Conv2D(nnx.Module):
  """VALID 2-D convolution with bias, lowered through `capsjax.conv.conv2d`.

  `impl` is a concrete lowering (one of `capsjax.conv.IMPLS`); the config value 'auto' is
  resolved before any layer is built (`capsjax.run.cpu_runtime.resolve_conv_impl`).
  """

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    kernel: int,
    *,
    stride: int = 1,
    impl: str = "xla",
    dtype=jnp.float32,
    init: str = "torch",
    role: str = "conv1",
    kernel_init=None,
    bias_init=None,
    rngs: nnx.Rngs,
  ):
    if impl not in conv_lib.IMPLS:
      raise ValueError(
        f"conv impl must be one of {conv_lib.IMPLS}, got {impl!r} ('auto' is "
        "resolved at start-up by cpu_runtime.resolve_conv_impl)"
      )
    self.stride = stride
    self.impl = impl
    self.dtype = jnp.dtype(dtype)
    scheme_kernel, scheme_bias = initializers(init, role, kernel * kernel * in_channels)
    # Architectures from other papers (Efficient-CapsNet's he_normal) pass their own.
    kernel_init = kernel_init or scheme_kernel
    bias_init = bias_init or scheme_bias
    self.kernel = nnx.Param(
      kernel_init(rngs.params(), (kernel, kernel, in_channels, out_channels), jnp.float32)
    )
    self.bias = nnx.Param(bias_init(rngs.params(), (out_channels,), jnp.float32))

  def __call__(self, x: jax.Array, *, scale: float = 1.0) -> jax.Array:
    """x: [B, H, W, C_in] -> scale * conv(x) + bias: [B, H', W', C_out] in float32."""
    y = conv_lib.conv2d(
      x.astype(self.dtype), self.kernel[...].astype(self.dtype), stride=self.stride, impl=self.impl
    ).astype(jnp.float32)  # [B, H', W', C_out]
    if scale != 1.0:
      y = y * scale
    return y + self.bias[...]


# How each routing's inputs are made from PrimaryCaps' conv output: the nonlinearity the
# algorithm's authors put on their primary capsules, and whether EM's input activations
# come from a sigmoid head.
PRIMARY_NONLINEARITY = {
  "dynamic": "squash",  # Sabour et al.: squash.
  "em": "none",  # Hinton et al.: raw poses + sigmoid activations.
  "inverted_dot_product": "layer_norm",  # Tsai et al.: nn.LayerNorm(caps_dim).
  "self_attention": "efficient_squash",  # Mazzia et al.: their Squash.
}
NONLINEARITIES = ("squash", "efficient_squash", "layer_norm", "none")


class PrimaryCaps(nnx.Module):
  """Conv -> capsules -> nonlinearity: `types` capsule types of `dim` dimensions per pixel.

  The `dim` consecutive channels at one pixel form one capsule (channel
  t*dim + d is dimension d of type t), the grouping of the authors' code
  (Sarasra/models research/capsules).

  `nonlinearity`: 'squash' (Sabour et al.), 'efficient_squash' (Efficient-CapsNet's),
  'layer_norm' (the learned `nn.LayerNorm(caps_dim)` that inverted dot-product routing's
  authors put on their primary capsules: apple/ml-capsules-inverted-attention-routing,
  `src/capsule_model.py`, `self.nonlinear_act`) or 'none'. `activation_head=True` adds a
  second conv with the same kernel and stride and one sigmoid output per capsule: the
  input activations of EM routing.

  `preact_scale` multiplies the conv's output before its bias. The authors' code
  (Sarasra/models research/capsules, models/capsule_model.py L54-65) makes its primary
  capsules with a capsule layer from one input type to 32 output types and one routing
  iteration, whose coupling coefficients are a softmax over 32 zero logits
  (models/layers.py L110-113): its pre-activation is conv(x) / 32 + bias, which
  `preact_scale=1/32` reproduces.
  """

  def __init__(
    self,
    in_channels: int,
    types: int,
    dim: int,
    kernel: int,
    stride: int,
    *,
    impl: str = "xla",
    dtype=jnp.float32,
    init: str = "torch",
    nonlinearity: str = "squash",
    activation_head: bool = False,
    preact_scale: float = 1.0,
    rngs: nnx.Rngs,
  ):
    if nonlinearity not in NONLINEARITIES:
      raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}")
    self.types = types
    self.dim = dim
    self.nonlinearity = nonlinearity
    self.preact_scale = float(preact_scale)
    conv = functools.partial(
      Conv2D, in_channels, kernel=kernel, stride=stride, impl=impl, dtype=dtype, init=init
    )
    self.conv = conv(types * dim, role="primary", rngs=rngs)
    # Attributes that are None add no parameters: each routing's layer holds only the
    # parameters it uses.
    self.ln_scale = nnx.Param(jnp.ones((dim,))) if nonlinearity == "layer_norm" else None
    self.ln_bias = nnx.Param(jnp.zeros((dim,))) if nonlinearity == "layer_norm" else None
    self.activation_conv = conv(types, role="primary", rngs=rngs) if activation_head else None

  def __call__(self, x: jax.Array):
    """x: [B, H, W, C] -> u: [B, N_in, D_in] with N_in = H' * W' * types.

    With `activation_head`, returns (u, a) with a: [B, N_in] in (0, 1), in the order of u.
    """
    y = self.conv(x, scale=self.preact_scale)  # [B, H', W', types*D_in]
    u = y.reshape(y.shape[0], -1, self.dim)  # [B, N_in, D_in]
    if self.nonlinearity == "squash":
      u = caps_ops.squash(u)
    elif self.nonlinearity == "efficient_squash":
      u = routing_lib.efficient_squash(u)
    elif self.nonlinearity == "layer_norm":
      u = routing_lib.layer_norm(u, scale=self.ln_scale[...], bias=self.ln_bias[...])
    if self.activation_conv is None:
      return u
    a = jax.nn.sigmoid(self.activation_conv(x))  # [B, H', W', types]
    return u, a.reshape(a.shape[0], -1)  # [B, N_in]


class RoutedCaps(nnx.Module):
  """Fully connected capsule layer: votes u_hat = u W, then a routing of `capsjax.routing`.

  A weight matrix W_ij per (input capsule, output capsule) and, as in the paper, no
  bias; `init='tf'` adds the bias b_j [N_out, D_out] of the authors' code
  (Sarasra/models research/capsules) to every s_j of dynamic routing.

  `routing` names the algorithm (`routing.ROUTINGS`), and the layer holds its learned
  parameters:
    'dynamic': none (the fast `routing.predict_and_route` path);
    'em': beta_u, beta_a [N_out] (zeros), and `em_final_lambda` (the λ schedule's limit);
    'inverted_dot_product': ln_scale [D_out] (ones), ln_bias [D_out] (zeros), the
      affine LayerNorm of the routing;
    'self_attention': log_prior [N_in, N_out] (zeros), the log prior B.
  """

  def __init__(
    self,
    num_in: int,
    in_dim: int,
    num_out: int,
    out_dim: int,
    *,
    routing_iterations: int,
    stop_gradient: bool = False,
    dtype=jnp.float32,
    init: str = "torch",
    routing: str = "dynamic",
    em_final_lambda: float = 0.01,
    w_init=None,
    rngs: nnx.Rngs,
  ):
    routing_lib.check_iterations(routing_iterations)  # fail at construction, not in jit.
    routing_lib.get(routing)  # ValueError naming the valid ones.
    self.routing_iterations = routing_iterations
    self.stop_gradient = stop_gradient
    self.routing = routing
    self.em_final_lambda = float(em_final_lambda)
    self.dtype = jnp.dtype(dtype)
    scheme_w_init, bias_init = initializers(init, "capsule", in_dim)
    w_init = w_init or scheme_w_init
    self.w = nnx.Param(w_init(rngs.params(), (num_in, num_out, in_dim, out_dim), jnp.float32))
    self.bias = (
      None
      if bias_init is None or routing != "dynamic"
      else nnx.Param(bias_init(rngs.params(), (num_out, out_dim), jnp.float32))
    )
    em, idp = routing == "em", routing == "inverted_dot_product"
    self.beta_u = nnx.Param(jnp.zeros((num_out,))) if em else None
    self.beta_a = nnx.Param(jnp.zeros((num_out,))) if em else None
    self.ln_scale = nnx.Param(jnp.ones((out_dim,))) if idp else None
    self.ln_bias = nnx.Param(jnp.zeros((out_dim,))) if idp else None
    self.log_prior = (
      nnx.Param(jnp.zeros((num_in, num_out))) if routing == "self_attention" else None
    )

  def predictions(self, u: jax.Array) -> jax.Array:
    """u: [B, N_in, D_in] -> u_hat: [B, N_in, N_out, D_out] in float32."""
    u_hat = jnp.einsum(
      "bni,nmio->bnmo",
      u.astype(self.dtype),
      self.w[...].astype(self.dtype),
      preferred_element_type=jnp.float32,
    )  # [B, N_in, N_out, D_out]
    return u_hat

  def route_votes(self, u_hat: jax.Array, *, a_in: jax.Array | None = None) -> routing_lib.Routed:
    """Routes given votes with this layer's algorithm and parameters.

    Args:
      u_hat: [B, N_in, N_out, D_out] votes.
      a_in: [B, N_in] input activations (EM only; None: all ones).

    Returns:
      routing.Routed(poses [B, N_out, D_out], activations [B, N_out],
      assignments [B, N_in, N_out]).
    """
    fn = routing_lib.get(self.routing)
    n, sg = self.routing_iterations, self.stop_gradient
    if self.routing == "dynamic":
      return fn(u_hat, n, stop_gradient=sg, bias=None if self.bias is None else self.bias[...])
    if self.routing == "em":
      return fn(
        u_hat,
        n,
        stop_gradient=sg,
        a_in=a_in,
        beta_u=self.beta_u[...],
        beta_a=self.beta_a[...],
        final_lambda=self.em_final_lambda,
      )
    if self.routing == "inverted_dot_product":
      return fn(u_hat, n, stop_gradient=sg, ln_scale=self.ln_scale[...], ln_bias=self.ln_bias[...])
    return fn(u_hat, n, stop_gradient=sg, log_prior=self.log_prior[...])

  def route(self, u: jax.Array, *, a_in: jax.Array | None = None) -> routing_lib.Routed:
    """u: [B, N_in, D_in] (a_in: [B, N_in] for EM) -> the routing's `routing.Routed`.

    The values of `route_votes(predictions(u), a_in=a_in)`. Dynamic routing without a
    bias computes them with `routing.predict_and_route`, which never builds u_hat in the
    [B, N_in, N_out, D_out] layout (much faster forward and backward on CPU); with a
    bfloat16 dtype, u and W are rounded to bfloat16 and their products accumulated in
    float32, as in `predictions`. With a bias it takes the autodiff path: the
    hand-written gradient of `predict_and_route` has no bias term.

    Returns:
      routing.Routed(poses [B, N_out, D_out], activations [B, N_out],
      assignments [B, N_in, N_out]).
    """
    if self.routing != "dynamic" or self.bias is not None:
      return self.route_votes(self.predictions(u), a_in=a_in)
    f32 = jnp.float32
    return routing_lib.predict_and_route(
      u.astype(self.dtype).astype(f32),
      self.w[...].astype(self.dtype).astype(f32),
      self.routing_iterations,
      stop_gradient=self.stop_gradient,
    )

  def __call__(self, u: jax.Array, *, a_in: jax.Array | None = None) -> jax.Array:
    """u: [B, N_in, D_in] (a_in: [B, N_in] for EM) -> v: [B, N_out, D_out], the poses
    of `route`."""
    return self.route(u, a_in=a_in).poses


class Decoder(nnx.Module):
  """Masked-capsule decoder: [B, N_out, D_out] -> hidden ReLU layers -> sigmoid image."""

  def __init__(
    self,
    num_caps: int,
    caps_dim: int,
    hidden: Sequence[int],
    image_shape: Sequence[int],
    *,
    dtype=jnp.float32,
    init: str = "torch",
    rngs: nnx.Rngs,
  ):
    self.image_shape = tuple(int(d) for d in image_shape)
    sizes = [num_caps * caps_dim, *hidden, math.prod(self.image_shape)]
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
      role = "decoder_output" if i == len(sizes) - 2 else "decoder"
      kernel_init, bias_init = initializers(init, role, a)
      layers.append(
        nnx.Linear(
          a,
          b,
          kernel_init=kernel_init,
          bias_init=bias_init,
          dtype=dtype,
          param_dtype=jnp.float32,
          rngs=rngs,
        )
      )
    self.layers = nnx.List(layers)

  def __call__(self, v: jax.Array, mask_class: jax.Array) -> jax.Array:
    """v: [B, N_out, D_out], mask_class: [B] int -> reconstruction [B, H, W, C] in [0, 1]."""
    mask = jax.nn.one_hot(mask_class, v.shape[-2], dtype=v.dtype)  # [B, N_out]
    x = (v * mask[..., None]).reshape(v.shape[0], -1)  # [B, N_out*D_out]
    for layer in self.layers[:-1]:
      x = jax.nn.relu(layer(x))  # [B, hidden]
    x = jax.nn.sigmoid(self.layers[-1](x).astype(jnp.float32))  # [B, H*W*C]
    return x.reshape(x.shape[0], *self.image_shape)  # [B, H, W, C]


class BatchNorm(nnx.Module):
  """Batch normalisation with learned scale and bias and running statistics.

  In training (`use_running_average=False`, the default) it normalises over every axis
  but the last with the batch's own mean and (biased) variance, and moves the running
  statistics towards them: running = momentum * running + (1 - momentum) * batch. In
  evaluation (`model.eval()` sets `use_running_average=True`, as `steps.eval_step` and
  `analysis.load_run` do) it normalises with the running statistics, so an example's
  output does not depend on the rest of its batch or on the zero images that pad an
  evaluation's last batch. momentum = 0.99 and eps = 1e-3 are the defaults of Keras'
  `BatchNormalization`, which Efficient-CapsNet's code uses without arguments.
  """

  def __init__(self, features: int, *, eps: float = 1e-3, momentum: float = 0.99):
    self.eps = eps
    self.momentum = momentum
    self.use_running_average = False
    self.scale = nnx.Param(jnp.ones((features,)))
    self.bias = nnx.Param(jnp.zeros((features,)))
    self.mean = nnx.BatchStat(jnp.zeros((features,)))
    self.var = nnx.BatchStat(jnp.ones((features,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, ..., C] -> same shape, float32."""
    x = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axis=axes)  # [C]
      var = jnp.mean(jnp.square(x - mean), axis=axes)  # [C]
      m = self.momentum
      # The statistics get no gradient: they are state, not parameters.
      self.mean[...] = m * self.mean[...] + (1 - m) * jax.lax.stop_gradient(mean)
      self.var[...] = m * self.var[...] + (1 - m) * jax.lax.stop_gradient(var)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


class DepthwiseConv2D(nnx.Module):
  """VALID depthwise 2-D convolution with bias: one k x k filter per channel.

  Keras `Conv2D(F, K, groups=F)` as Efficient-CapsNet's PrimaryCaps uses it
  (EscVM/Efficient-CapsNet, `utils/layers.py`, `PrimaryCaps.build`), with Keras' default
  glorot_uniform kernel and zero bias: k*k*C + C parameters.
  """

  def __init__(self, channels: int, kernel: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(dtype)
    self.kernel = nnx.Param(
      nnx.initializers.glorot_uniform()(rngs.params(), (kernel, kernel, 1, channels), jnp.float32)
    )
    self.bias = nnx.Param(jnp.zeros((channels,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, H - k + 1, W - k + 1, C] in float32."""
    y = jax.lax.conv_general_dilated(
      x.astype(self.dtype),
      self.kernel[...].astype(self.dtype),
      (1, 1),
      "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1],
      preferred_element_type=jnp.float32,
    )  # [B, H', W', C]
    return y + self.bias[...]
