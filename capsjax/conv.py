"""2-D convolutions for CapsNet (VALID padding, square stride), with selectable lowering.

`conv2d(x, w, stride=..., impl=...)` computes the same function with every lowering:

* 'xla': `lax.conv_general_dilated` (cuDNN on GPU). On XLA:CPU its input gradient for
  strided convs is very slow: ~22 s for the PrimaryCaps conv at batch 100, ~30x its
  forward.
* 'im2col': patches from kh*kw strided slices, one dot_general against the kernel
  reshaped to [kh*kw*C_in, C_out], with a custom VJP: dw is one dot of the patches with
  the cotangent, and dx is one dot (cotangent x kernel^T, giving per-patch gradients)
  followed by col2im. col2im is split by stride phase (dx[s*a + p] only receives taps
  i = p + s*m), so it sums shifted, zero-padded slices of no more than
  ceil(kh/s)*ceil(kw/s) taps per phase, and interleaves the s*s phases. Forward and both
  gradients are a GEMM each, plus memory-bound slicing. Being a `jax.custom_vjp`, it
  supports reverse mode (grad, vjp, grad-of-grad) but not forward mode (jvp, jacfwd).
* 's2d': space-to-depth: pad to a multiple of the stride, fold each s x s block into the
  channels and run a stride-1 `lax` conv with a ceil(kh/s) x ceil(kw/s) kernel (the
  original kernel zero-padded and folded the same way). Stride 1 is plain 'xla'.
* 'auto': `resolve_impl('auto')`, the fastest measured lowering for
  `jax.default_backend()`: 'im2col' on CPU, 'xla' (cuDNN/TPU convs) elsewhere.

All lowerings keep the batch axis in front and never merge it with another axis, so a
batch sharded over a mesh axis (`P('data')`) stays sharded. Low-precision inputs
accumulate in float32 and the result has the promoted input dtype.
`benchmarks/conv.py` times them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

IMPLS = ("xla", "im2col", "s2d", "auto")
_DIMS = ("NHWC", "HWIO", "NHWC")
# Fastest lowering per `jax.default_backend()`; see benchmarks/conv.py.
_AUTO = {"cpu": "im2col"}


def resolve_impl(impl: str) -> str:
  """Maps an impl name (one of IMPLS) to a concrete lowering; 'auto' by backend."""
  if impl not in IMPLS:
    raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return _AUTO.get(jax.default_backend(), "xla")
  return impl


def _accum_dtype(dtype) -> jnp.dtype:
  """float32 for bfloat16/float16, the dtype itself for float32/float64."""
  return jnp.promote_types(dtype, jnp.float32)


def _out_size(n: int, k: int, stride: int) -> int:
  return (n - k) // stride + 1


def _check(x: jax.Array, w: jax.Array, stride) -> None:
  if x.ndim != 4:
    raise ValueError(f"x must have shape [B, H, W, C_in], got shape {x.shape}")
  if w.ndim != 4:
    raise ValueError(f"w must have shape [kh, kw, C_in, C_out], got shape {w.shape}")
  if x.shape[3] != w.shape[2]:
    raise ValueError(
        f"x has C_in={x.shape[3]} channels but w expects C_in={w.shape[2]} "
        f"(x shape {x.shape}, w shape {w.shape})")
  if x.shape[1] < w.shape[0] or x.shape[2] < w.shape[1]:
    raise ValueError(
        f"kernel {w.shape[:2]} is larger than the image {x.shape[1:3]} (VALID padding)")
  if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
    raise ValueError(f"stride must be a Python int >= 1, got {stride!r}")


def _reshape(a: jax.Array, shape) -> jax.Array:
  """Reshape that keeps the batch axis 0 and its mesh sharding (other axes replicated).

  Under an Explicit mesh, reshapes that merge or split axes next to a sharded batch axis
  need an explicit output sharding.
  """
  sharding = jax.typeof(a).sharding
  spec = sharding.spec
  out = sharding.update(spec=P(spec[0] if len(spec) else None, *([None] * (len(shape) - 1))))
  return lax.reshape(a, tuple(shape), out_sharding=out)


def _xla(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
  y = lax.conv_general_dilated(
      x, w, window_strides=(stride, stride), padding="VALID",
      dimension_numbers=_DIMS, preferred_element_type=_accum_dtype(x.dtype))
  return y.astype(x.dtype)                                 # [B, Ho, Wo, C_out]


# ----------------------------------------------------------------------------------------
# im2col with a custom VJP.
# ----------------------------------------------------------------------------------------
def _patches(x: jax.Array, kh: int, kw: int, stride: int) -> jax.Array:
  """[B, H, W, C] -> [B, Ho, Wo, kh*kw*C]; feature order (i, j, c) as in HWIO."""
  b, h, w, c = x.shape
  ho, wo = _out_size(h, kh, stride), _out_size(w, kw, stride)
  cols = [
      lax.slice(x, (0, i, j, 0),
                (b, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                (1, stride, stride, 1))                    # [B, Ho, Wo, C]
      for i in range(kh) for j in range(kw)]
  p = jnp.stack(cols, axis=3)                              # [B, Ho, Wo, kh*kw, C]
  return _reshape(p, (b, ho, wo, kh * kw * c))             # [B, Ho, Wo, K]


def _col2im(dp: jax.Array, x_shape, kh: int, kw: int, stride: int) -> jax.Array:
  """The transpose of `_patches`: sums per-patch gradients back onto the image.

  Args:
    dp: [B, Ho, Wo, kh*kw*C] gradients w.r.t. the patches.
    x_shape: (B, H, W, C) of the image.

  Returns:
    [B, H, W, C], dtype of dp.
  """
  b, h, w, c = x_shape
  _, ho, wo, _ = dp.shape
  s = stride
  dp = _reshape(dp, (b, ho, wo, kh * kw, c))               # [B, Ho, Wo, kh*kw, C]
  zero = jnp.zeros((), dp.dtype)
  dx = None
  for pi in range(min(s, h)):
    hpi = len(range(pi, h, s))                             # rows pi, pi + s, ... < H
    for pj in range(min(s, w)):
      wpj = len(range(pj, w, s))
      # dx[pi + s*a, pj + s*e] += dp[a - m, e - n, tap (pi + s*m, pj + s*n)].
      acc = None
      for m, i in enumerate(range(pi, kh, s)):
        for n, j in enumerate(range(pj, kw, s)):
          t = dp[:, :, :, i * kw + j, :]                   # [B, Ho, Wo, C]
          t = lax.pad(t, zero, ((0, 0, 0), (m, hpi - m - ho, 0),
                                (n, wpj - n - wo, 0), (0, 0, 0)))  # [B, hpi, wpj, C]
          acc = t if acc is None else acc + t
      if acc is None:                                      # kernel smaller than stride
        continue
      # Interleave the phase back onto the full grid (interior padding s - 1).
      acc = lax.pad(acc, zero, ((0, 0, 0), (pi, h - pi - s * (hpi - 1) - 1, s - 1),
                                (pj, w - pj - s * (wpj - 1) - 1, s - 1), (0, 0, 0)))
      dx = acc if dx is None else dx + acc                 # [B, H, W, C]
  return dx


def _im2col_fwd_math(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
  kh, kw, c_in, c_out = w.shape
  p = _patches(x, kh, kw, stride)                          # [B, Ho, Wo, K]
  y = lax.dot_general(p, w.reshape(kh * kw * c_in, c_out), (((3,), (0,)), ((), ())),
                      preferred_element_type=_accum_dtype(x.dtype))
  return y.astype(x.dtype)                                 # [B, Ho, Wo, C_out]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _im2col(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
  return _im2col_fwd_math(x, w, stride)


def _im2col_fwd(x, w, stride):
  # Only x and w are saved; the backward pass rebuilds the patches (under jit, XLA
  # shares them with the forward pass's copy when that is cheaper).
  return _im2col_fwd_math(x, w, stride), (x, w)


def _im2col_bwd(stride, res, g):
  x, w = res                                               # g: [B, Ho, Wo, C_out]
  kh, kw, c_in, c_out = w.shape
  acc = _accum_dtype(x.dtype)
  p = _patches(x, kh, kw, stride)                          # [B, Ho, Wo, K]
  g = g.astype(x.dtype)
  b, ho, wo, _ = g.shape
  p = _reshape(p, (b, ho, wo, kh, kw, c_in))               # [B, Ho, Wo, kh, kw, C_in]
  # Contracting the (possibly sharded) batch axis: under an Explicit mesh the output
  # sharding must be given; it is w's (the compiler inserts the all-reduce).
  dw = lax.dot_general(p, g, (((0, 1, 2), (0, 1, 2)), ((), ())),
                       preferred_element_type=acc,
                       out_sharding=jax.typeof(w).sharding)  # [kh, kw, C_in, C_out]
  dw = dw.astype(w.dtype)
  dp = lax.dot_general(g, w.reshape(kh * kw * c_in, c_out), (((3,), (1,)), ((), ())),
                       preferred_element_type=acc)         # [B, Ho, Wo, K]
  dx = _col2im(dp, x.shape, kh, kw, stride).astype(x.dtype)  # [B, H, W, C_in]
  return dx, dw


_im2col.defvjp(_im2col_fwd, _im2col_bwd)


# ----------------------------------------------------------------------------------------
# Space-to-depth.
# ----------------------------------------------------------------------------------------
def _space_to_depth(x: jax.Array, s: int) -> jax.Array:
  """[B, s*H', s*W', C] -> [B, H', W', s*s*C], channel order (p, q, c)."""
  b, h, w, c = x.shape
  x = _reshape(x, (b, h // s, s, w // s, s, c))            # [B, H', s, W', s, C]
  x = x.transpose(0, 1, 3, 2, 4, 5)                        # [B, H', W', s, s, C]
  return _reshape(x, (b, h // s, w // s, s * s * c))       # [B, H', W', s*s*C]


def _s2d(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
  s = stride
  if s == 1:
    return _xla(x, w, 1)
  b, h, wd, c_in = x.shape
  kh, kw, _, c_out = w.shape
  ho, wo = _out_size(h, kh, s), _out_size(wd, kw, s)
  kh2, kw2 = -(-kh // s), -(-kw // s)                      # folded kernel size
  # Exactly the input rows/cols the output reads, padded up to a multiple of s.
  hh, ww = s * (ho - 1 + kh2), s * (wo - 1 + kw2)
  x = x[:, :min(h, hh), :min(wd, ww), :]
  x = jnp.pad(x, ((0, 0), (0, hh - x.shape[1]), (0, ww - x.shape[2]), (0, 0)))
  xs = _space_to_depth(x, s)                               # [B, hh/s, ww/s, s*s*C_in]
  wpad = jnp.pad(w, ((0, s * kh2 - kh), (0, s * kw2 - kw), (0, 0), (0, 0)))
  wpad = wpad.reshape(kh2, s, kw2, s, c_in, c_out)         # [kh2, s, kw2, s, C_in, C_out]
  wpad = wpad.transpose(0, 2, 1, 3, 4, 5)                  # [kh2, kw2, s, s, C_in, C_out]
  ws = wpad.reshape(kh2, kw2, s * s * c_in, c_out)         # [kh2, kw2, s*s*C_in, C_out]
  return _xla(xs, ws, 1)                                   # [B, Ho, Wo, C_out]


def conv2d(x: jax.Array, w: jax.Array, *, stride: int = 1, impl: str = "xla") -> jax.Array:
  """VALID 2-D convolution, equal to `lax.conv_general_dilated` for every impl.

  Args:
    x: [B, H, W, C_in] images.
    w: [kh, kw, C_in, C_out] kernel (HWIO).
    stride: the same stride along both spatial axes (static Python int).
    impl: one of IMPLS; 'auto' picks the fastest lowering for the backend.

  Returns:
    [B, (H - kh) // stride + 1, (W - kw) // stride + 1, C_out], in the promoted dtype
    of x and w (accumulated in at least float32).
  """
  impl = resolve_impl(impl)
  x = jnp.asarray(x)
  w = jnp.asarray(w)
  _check(x, w, stride)
  dtype = jnp.result_type(x, w)
  x, w = x.astype(dtype), w.astype(dtype)
  if impl == "xla":
    return _xla(x, w, stride)
  if impl == "im2col":
    return _im2col(x, w, stride)
  return _s2d(x, w, stride)
