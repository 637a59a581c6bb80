"""2-D convolutions for CapsNet (VALID padding, square stride), with selectable lowering.

`conv2d(x, w, stride=..., impl=...)` computes the same function with every lowering in
IMPLS; `benchmarks/conv.py` times them and RESULTS.md records the timings.

* 'xla': `lax.conv_general_dilated` (cuDNN on GPU). On XLA:CPU its input gradient for
  strided convs is very slow (tens of times its forward).
* 'im2col': explicit patches + GEMMs with a custom VJP: patches from kh*kw strided slices,
  one dot_general against the kernel reshaped to [kh*kw*C_in, C_out]; dw is one dot of
  the patches with the cotangent, and dx is one dot (cotangent x kernel^T) followed by
  col2im, split by stride phase (dx[s*a + p] only receives taps i = p + s*m).
  Being a `jax.custom_vjp`, it supports reverse mode (grad, vjp, grad-of-grad) but not
  forward mode (jvp, jacfwd).
* 'hybrid': 'xla' for the forward pass and the weight gradient; the input gradient of
  strided convs is one GEMM per kernel tap, accumulated in place into the stride phases
  of the image (custom VJP, reverse mode only). XLA:CPU sends convolutions to YNNPACK by
  default; once they are taken off it (`capsjax.run.cpu_runtime.use_xla_cpu_convs`), XLA's
  own conv and weight gradient run near GEMM speed on CPU, but the input gradient of a
  strided conv does not.
* 's2d': space-to-depth: pad to a multiple of the stride, fold each s x s block into the
  channels and run a stride-1 `lax` conv with a ceil(kh/s) x ceil(kw/s) kernel (the
  original kernel zero-padded and folded the same way). Stride 1 is plain 'xla'.
* 'winograd': the same fold, then Winograd minimal filtering F(3x3, r x r) of the
  stride-1 conv: input and weight transforms, (3 + r - 1)^2 batched GEMMs over the
  channels, an output transform; the backward pass is the same stages transposed (custom
  VJP, reverse mode only). On PrimaryCaps (9x9 stride 2 -> folded 5x5) its GEMMs do 3.7x
  fewer multiplies than the direct conv (2.9x fewer FLOPs with the transforms), the
  fastest lowering on XLA:CPU. Rounding happens in the transformed domain, so its float32
  error is larger than the direct conv's (tests/conv_test.py bounds it at 1e-5 of the
  output scale and 20x XLA's error). It always computes in float32 or wider: bfloat16 /
  float16 inputs are cast up (rounded transforms would multiply the error of a bfloat16
  direct conv). Folded kernels larger than 5x5 (e.g. Conv1, 9x9 stride 1) or 1 wide, and
  non-float inputs, fall back to 'hybrid'.

The config value 'auto' is not a lowering: `capsjax.run.cpu_runtime.resolve_conv_impl` maps it
to the fastest one for the backend once, at start-up, and this module never reads the
environment. No lowering merges the batch axis with another axis (all but 'winograd' keep
it in front), so under the trainer's Auto mesh a batch sharded over `P('data')` stays
sharded without annotations. Low-precision inputs accumulate in float32 and the result
has the promoted input dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from capsjax import caps_ops

IMPLS = ("xla", "im2col", "s2d", "hybrid", "winograd")
_DIMS = ("NHWC", "HWIO", "NHWC")


def out_size(size: int, kernel: int, stride: int) -> int:
  """Output size of a VALID conv along one axis: (size - kernel) // stride + 1."""
  return (size - kernel) // stride + 1


def _check(x: jax.Array, w: jax.Array, stride) -> None:
  if x.ndim != 4:
    raise ValueError(f"x must have shape [B, H, W, C_in], got shape {x.shape}")
  if w.ndim != 4:
    raise ValueError(f"w must have shape [kh, kw, C_in, C_out], got shape {w.shape}")
  if x.shape[3] != w.shape[2]:
    raise ValueError(
      f"x has C_in={x.shape[3]} channels but w expects C_in={w.shape[2]} "
      f"(x shape {x.shape}, w shape {w.shape})"
    )
  if x.shape[1] < w.shape[0] or x.shape[2] < w.shape[1]:
    raise ValueError(
      f"kernel {w.shape[:2]} is larger than the image {x.shape[1:3]} (VALID padding)"
    )
  if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
    raise ValueError(f"stride must be a Python int >= 1, got {stride!r}")


def _xla(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
  y = lax.conv_general_dilated(
    x,
    w,
    window_strides=(stride, stride),
    padding="VALID",
    dimension_numbers=_DIMS,
    preferred_element_type=caps_ops.compute_dtype(x.dtype),
  )
  return y.astype(x.dtype)  # [B, Ho, Wo, C_out]


# ----------------------------------------------------------------------------------------
# im2col with a custom VJP.
# ----------------------------------------------------------------------------------------
def _patches(x: jax.Array, kh: int, kw: int, stride: int) -> jax.Array:
  """[B, H, W, C] -> [B, Ho, Wo, kh*kw*C]; feature order (i, j, c) as in HWIO."""
  b, h, w, c = x.shape
  ho, wo = out_size(h, kh, stride), out_size(w, kw, stride)
  cols = [
    lax.slice(
      x,
      (0, i, j, 0),
      (b, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
      (1, stride, stride, 1),
    )  # [B, Ho, Wo, C]
    for i in range(kh)
    for j in range(kw)
  ]
  p = jnp.stack(cols, axis=3)  # [B, Ho, Wo, kh*kw, C]
  return p.reshape(b, ho, wo, kh * kw * c)  # [B, Ho, Wo, K]


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
  dp = dp.reshape(b, ho, wo, kh * kw, c)  # [B, Ho, Wo, kh*kw, C]
  zero = jnp.zeros((), dp.dtype)
  dx = None
  for pi in range(min(s, h)):
    hpi = len(range(pi, h, s))  # rows pi, pi + s, ... < H
    for pj in range(min(s, w)):
      wpj = len(range(pj, w, s))
      # dx[pi + s*a, pj + s*e] += dp[a - m, e - n, tap (pi + s*m, pj + s*n)].
      acc = None
      for m, i in enumerate(range(pi, kh, s)):
        for n, j in enumerate(range(pj, kw, s)):
          t = dp[:, :, :, i * kw + j, :]  # [B, Ho, Wo, C]
          t = lax.pad(
            t, zero, ((0, 0, 0), (m, hpi - m - ho, 0), (n, wpj - n - wo, 0), (0, 0, 0))
          )  # [B, hpi, wpj, C]
          acc = t if acc is None else acc + t
      if acc is None:  # kernel smaller than stride
        continue
      # Interleave the phase back onto the full grid (interior padding s - 1).
      acc = lax.pad(
        acc,
        zero,
        (
          (0, 0, 0),
          (pi, h - pi - s * (hpi - 1) - 1, s - 1),
          (pj, w - pj - s * (wpj - 1) - 1, s - 1),
          (0, 0, 0),
        ),
      )
      dx = acc if dx is None else dx + acc  # [B, H, W, C]
  return dx


def _im2col_fwd_math(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
  kh, kw, c_in, c_out = w.shape
  p = _patches(x, kh, kw, stride)  # [B, Ho, Wo, K]
  y = lax.dot_general(
    p,
    w.reshape(kh * kw * c_in, c_out),
    (((3,), (0,)), ((), ())),
    preferred_element_type=caps_ops.compute_dtype(x.dtype),
  )
  return y.astype(x.dtype)  # [B, Ho, Wo, C_out]


def _im2col_bwd(stride, res, g):
  x, w = res  # g: [B, Ho, Wo, C_out]
  g = g.astype(x.dtype)
  kh, kw, c_in, c_out = w.shape
  acc = caps_ops.compute_dtype(x.dtype)
  p = _patches(x, kh, kw, stride)  # [B, Ho, Wo, K]
  b, ho, wo, _ = g.shape
  p = p.reshape(b, ho, wo, kh, kw, c_in)  # [B, Ho, Wo, kh, kw, C_in]
  dw = lax.dot_general(
    p, g, (((0, 1, 2), (0, 1, 2)), ((), ())), preferred_element_type=acc
  )  # [kh, kw, C_in, C_out]
  dw = dw.astype(w.dtype)
  dp = lax.dot_general(
    g, w.reshape(kh * kw * c_in, c_out), (((3,), (1,)), ((), ())), preferred_element_type=acc
  )  # [B, Ho, Wo, K]
  dx = _col2im(dp, x.shape, kh, kw, stride).astype(x.dtype)  # [B, H, W, C_in]
  return dx, dw


def _with_vjp(forward, backward):
  """forward(x, w, stride) with the gradient `backward(stride, (x, w), g) -> (dx, dw)`.

  Only x and w are saved for the backward pass, which rebuilds what it needs from them.
  """
  f = jax.custom_vjp(forward, nondiff_argnums=(2,))
  f.defvjp(lambda x, w, stride: (forward(x, w, stride), (x, w)), backward)
  return f


_im2col = _with_vjp(_im2col_fwd_math, _im2col_bwd)


# ----------------------------------------------------------------------------------------
# Hybrid: XLA's conv forward and weight gradient, a per-tap input gradient.
# ----------------------------------------------------------------------------------------
def _taps_dx(x, w, g, stride):
  """dx of a conv by one GEMM per tap, without a patch-sized buffer: [B, H, W, C_in].

  g: [B, Ho, Wo, C_out] in x's dtype.
  """
  kh, kw, c_in, _ = w.shape
  b, h, wd, _ = x.shape
  s = stride
  acc = caps_ops.compute_dtype(x.dtype)
  # dx: tap (i, j) sends g w[i, j]^T to pixels (i + s*a, j + s*e), i.e. to the stride
  # phase (i % s, j % s) at offset (i // s, j // s). Each phase [B, ceil(H/s), ceil(W/s),
  # C_in] is accumulated in place (dynamic_update_slice), then the s*s phases are
  # interleaved: no scatter, no patch-sized buffer.
  hc, wc = -(-h // s), -(-wd // s)
  zero = jnp.zeros((b, hc, wc, c_in), acc)
  phases = {}
  for i in range(kh):
    for j in range(kw):
      d = lax.dot_general(
        g, w[i, j], (((3,), (1,)), ((), ())), preferred_element_type=acc
      )  # [B, Ho, Wo, C_in]
      key, start = (i % s, j % s), (0, i // s, j // s, 0)
      a = phases.get(key, zero)
      phases[key] = lax.dynamic_update_slice(
        a, lax.dynamic_slice(a, start, d.shape) + d, start
      )  # [B, Hc, Wc, C_in]
  rows = [
    jnp.stack([phases.get((pi, pj), zero) for pj in range(s)], axis=3) for pi in range(s)
  ]  # s x [B, Hc, Wc, s, C_in]
  dx = jnp.stack(rows, axis=2)  # [B, Hc, s, Wc, s, C_in]
  dx = dx.reshape(b, hc * s, wc * s, c_in)[:, :h, :wd, :]  # [B, H, W, C_in]
  return dx.astype(x.dtype)


def _dw_stride1(x: jax.Array, g: jax.Array) -> jax.Array:
  """The weight gradient of a stride-1 VALID conv, written as the conv XLA:CPU runs.

  XLA:CPU rewrites a weight-gradient conv into this form (batch and channels swapped, run
  by Eigen) only in a program's entry computation; in a loop body (the scanned training
  loop, `steps.train_chunk`) it runs its own conv instead, which rounds differently.
  Written out, the conv is the same everywhere, and equal to the rewritten one bit for bit.

  Args:
    x: [B, H, W, C_in].
    g: [B, Ho, Wo, C_out], the output's cotangent.

  Returns:
    [kh, kw, C_in, C_out].
  """
  dw = lax.conv_general_dilated(
    jnp.transpose(x, (3, 1, 2, 0)),
    jnp.transpose(g, (1, 2, 0, 3)),  # [C_in,H,W,B], [Ho,Wo,B,C_out]
    window_strides=(1, 1),
    padding="VALID",
    dimension_numbers=_DIMS,
    preferred_element_type=caps_ops.compute_dtype(x.dtype),
  )  # [C_in, kh, kw, C_out]
  return jnp.transpose(dw, (1, 2, 0, 3)).astype(x.dtype)  # [kh, kw, C_in, C_out]


def _hybrid_bwd(stride, res, g):
  x, w = res  # g: [B, Ho, Wo, C_out]
  g = g.astype(x.dtype)
  if stride == 1:
    dw = _dw_stride1(x, g)  # [kh, kw, C_in, C_out]
  else:
    # linear_transpose, unlike vjp, does not run the forward conv again (outside jit).
    (dw,) = jax.linear_transpose(lambda w: _xla(x, w, stride), w)(g)  # [kh, kw, C_in, C_out]
  if stride == 1:
    (dx,) = jax.linear_transpose(lambda x: _xla(x, w, 1), x)(g)  # [B, H, W, C_in]
  else:
    # One GEMM per tap rather than one patch-matrix GEMM + col2im: no patch-sized
    # buffer, at about the same speed (RESULTS.md, "Conv lowering measurements").
    dx = _taps_dx(x, w, g, stride)  # [B, H, W, C_in]
  return dx, dw


# With convolutions off YNNPACK (`cpu_runtime.use_xla_cpu_convs`), XLA's own conv forward
# and weight gradient run near GEMM speed on CPU, faster than im2col, whose patch matrix
# build costs as much as its GEMM. XLA's input gradient of a strided conv (a conv with lhs
# dilation) stays far slower, so that one is per tap (benchmarks/conv.py, RESULTS.md).
_hybrid = _with_vjp(_xla, _hybrid_bwd)


# ----------------------------------------------------------------------------------------
# Space-to-depth.
# ----------------------------------------------------------------------------------------
def _space_to_depth(x: jax.Array, s: int) -> jax.Array:
  """[B, s*H', s*W', C] -> [B, H', W', s*s*C], channel order (p, q, c)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // s, s, w // s, s, c)  # [B, H', s, W', s, C]
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, H', W', s, s, C]
  return x.reshape(b, h // s, w // s, s * s * c)  # [B, H', W', s*s*C]


def _s2d(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
  xs, ws = _fold(x, w, stride)
  return _xla(xs, ws, 1)  # [B, Ho, Wo, C_out]


# ----------------------------------------------------------------------------------------
# Winograd: the stride-1 conv of the space-to-depth fold, by minimal filtering.
# ----------------------------------------------------------------------------------------
# Winograd F(m x m, r x r) (Lavin & Gray 2016) computes an m x m output tile of a stride-1
# r x r correlation from an n x n input tile (n = m + r - 1) with n*n products instead of
# m*m*r*r: Y = A^T [(G g G^T) * (B^T d B)] A. For a conv the products become n*n batched
# GEMMs over the channels. The PrimaryCaps conv (9x9 stride 2) folds to a 5x5 stride-1 conv
# over 4x the channels (4 x 25 = 100 taps, 19 of them zero padding); F(3x3, 5x5) then needs
# 49 products per 9 outputs: 4 x 49 / 9 = 21.8 multiplies per output and input channel
# against the direct conv's 81: 3.7x fewer GEMM FLOPs. The transforms, dense kron-product
# matrices applied as small GEMMs, add ~26% of that back (the input one ~19%), so 2.9x fewer
# FLOPs in all.
_WINOGRAD_M = 3
# The finite interpolation points (infinity is the last one); the first n - 1 are used.
# Chosen for float32 error: 0, +-1, +-2 and -1/2 were among the best of the sets tried for
# F(3, 5). On PrimaryCaps the mean error is still ~15x the direct conv's (~1e-6 of the
# output scale; tests/conv_test.py bounds it).
_WINOGRAD_POINTS = (0.0, 1.0, -1.0, 2.0, -2.0, -0.5)
# Folded kernels larger than this (e.g. Conv1's 9x9 stride 1) would need more points, with
# larger transform entries and more float32 error; such convs fall back to 'hybrid'.
_WINOGRAD_MAX_R = 5


@functools.cache
def winograd_matrices(m: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Toom-Cook matrices of Winograd F(m, r), in float64.

  For d of length n = m + r - 1 and g of length r, the 1-D correlation
  y[i] = sum_k d[i + k] g[k] (i < m) equals A^T ((G g) * (B^T d)).

  Returns:
    (A^T [m, n], G [n, r], B^T [n, n]). Rows of B^T are scaled to a largest entry of 1
    (the inverse scale is folded into G, which is applied to the weights).
  """
  n = m + r - 1
  if not 1 <= n - 1 <= len(_WINOGRAD_POINTS):
    raise ValueError(
      f"Winograd F({m}, {r}) needs {n - 1} points; at most {len(_WINOGRAD_POINTS)} are defined"
    )
  points = _WINOGRAD_POINTS[: n - 1]

  def evaluation(k):  # rows: a polynomial of degree < k evaluated at points
    e = np.zeros((n, k))
    for j, a in enumerate(points):
      e[j] = np.power(a, np.arange(k))
    e[n - 1, k - 1] = 1.0  # "at infinity": the leading coefficient
    return e

  # Polynomial product s = h * g (deg h < m, deg g < r) by evaluation, pointwise product
  # and interpolation: s = V^-1 ((E_g g) * (E_h h)). Correlation is its transpose in h:
  # y = E_h^T ((E_g g) * (V^-T d)).
  at = evaluation(m).T
  g = evaluation(r)
  bt = np.linalg.inv(evaluation(n)).T
  bt[np.abs(bt) < 1e-12] = 0.0
  scale = np.abs(bt).max(axis=1)
  out = (at, g * scale[:, None], bt / scale[:, None])
  for a in out:  # shared through functools.cache
    a.flags.writeable = False
  return out


def _fold(x: jax.Array, w: jax.Array, s: int):
  """Space-to-depth: a stride-s conv as a stride-1 conv over s*s times the channels.

  Returns (xs [B, H', W', s*s*C_in], ws [ceil(kh/s), ceil(kw/s), s*s*C_in, C_out]) with
  conv(x, w, stride s) == conv(xs, ws, stride 1). Stride 1 returns (x, w).
  """
  if s == 1:
    return x, w
  b, h, wd, c_in = x.shape
  kh, kw, _, c_out = w.shape
  ho, wo = out_size(h, kh, s), out_size(wd, kw, s)
  kh2, kw2 = -(-kh // s), -(-kw // s)  # folded kernel size
  # Exactly the input rows/cols the output reads, padded up to a multiple of s.
  hh, ww = s * (ho - 1 + kh2), s * (wo - 1 + kw2)
  x = x[:, : min(h, hh), : min(wd, ww), :]
  x = jnp.pad(x, ((0, 0), (0, hh - x.shape[1]), (0, ww - x.shape[2]), (0, 0)))
  xs = _space_to_depth(x, s)  # [B, hh/s, ww/s, s*s*C_in]
  wpad = jnp.pad(w, ((0, s * kh2 - kh), (0, s * kw2 - kw), (0, 0), (0, 0)))
  wpad = wpad.reshape(kh2, s, kw2, s, c_in, c_out)  # [kh2, s, kw2, s, C_in, C_out]
  wpad = wpad.transpose(0, 2, 1, 3, 4, 5)  # [kh2, kw2, s, s, C_in, C_out]
  return xs, wpad.reshape(kh2, kw2, s * s * c_in, c_out)  # [kh2, kw2, s*s*C_in, C_out]


def _winograd_geometry(x_shape, w_shape, m: int):
  """Tile counts and kron-product transforms for a stride-1 conv of these shapes."""
  _, h, wd, _ = x_shape
  rh, rw = w_shape[:2]
  th, tw = -(-(h - rh + 1) // m), -(-(wd - rw + 1) // m)  # output tiles per axis
  (ath, gh, bth), (atw, gw, btw) = winograd_matrices(m, rh), winograd_matrices(m, rw)
  return th, tw, np.kron(ath, atw), np.kron(gh, gw), np.kron(bth, btw)


def _winograd_tiles(xs: jax.Array, m: int, nh: int, nw: int, th: int, tw: int) -> jax.Array:
  """Overlapping input tiles: [B, H, W, C] -> [nh*nw, B, th*tw, C].

  Tile (t, u) is xs[:, m*t : m*t + nh, m*u : m*u + nw] (zero-padded past the image). Entry
  (i, j) of every tile comes from one strided slice. The tile-position axis comes first so
  that the transforms and the GEMMs need no transposes.
  """
  b, h, wd, c = xs.shape
  # m*th + nh - m = m*th + r - 1 >= H: the tiles cover the image.
  xs = jnp.pad(xs, ((0, 0), (0, m * th + nh - m - h), (0, m * tw + nw - m - wd), (0, 0)))
  d = jnp.stack(
    [
      xs[:, i : i + m * (th - 1) + 1 : m, j : j + m * (tw - 1) + 1 : m]
      for i in range(nh)
      for j in range(nw)
    ]
  )  # [nh*nw, B, th, tw, C]
  return d.reshape(nh * nw, b, th * tw, c)  # [nh*nw, B, th*tw, C]


def _winograd_untile(
  dd: jax.Array, x_shape, m: int, nh: int, nw: int, th: int, tw: int
) -> jax.Array:
  """The transpose of `_winograd_tiles`: overlap-adds [nh*nw, B, T, C] tiles into [B, H, W, C].

  The image is cut into m x m blocks and each tile adds into ceil(n/m)^2 of them, block-
  aligned (plain pads, no interior padding), several times faster than autodiff's
  transpose of the strided slices (RESULTS.md, "Conv lowering measurements").
  """
  b, h, wd, c = x_shape
  qh, qw = -(-nh // m), -(-nw // m)
  hb, wb = th + qh - 1, tw + qw - 1
  dd = dd.reshape(nh, nw, b, th, tw, c)
  dd = jnp.pad(dd, ((0, qh * m - nh), (0, qw * m - nw), (0, 0), (0, 0), (0, 0), (0, 0)))
  dd = dd.reshape(qh, m, qw, m, b, th, tw, c)
  dd = dd.transpose(0, 2, 4, 5, 1, 6, 3, 7)  # [qh, qw, B, th, m, tw, m, C]
  out = None
  for i in range(qh):
    for j in range(qw):  # block (t + i, u + j) of tile (t, u)
      t = jnp.pad(
        dd[i, j], ((0, 0), (i, hb - th - i), (0, 0), (j, wb - tw - j), (0, 0), (0, 0))
      )  # [B, hb, m, wb, m, C]
      out = t if out is None else out + t
  return out.reshape(b, hb * m, wb * m, c)[:, :h, :wd]  # [B, H, W, C]


def _winograd_math(xs, ws, m):
  """Forward pass of `_winograd_s1`; returns (y, (V, U)) with the GEMM operands.

  xs and ws are float32 or float64 (`_winograd` casts lower precisions up), and every
  stage runs in that dtype.
  """
  b, h, wd, c_in = xs.shape
  rh, rw, _, c_out = ws.shape
  nh, nw = m + rh - 1, m + rw - 1
  th, tw, at, g, bt = _winograd_geometry(xs.shape, ws.shape, m)
  dt = xs.dtype
  d = _winograd_tiles(xs, m, nh, nw, th, tw)  # [n*n, B, T, C_in]
  v = jnp.einsum("st,tbzc->sbzc", bt.astype(dt), d)  # [n*n, B, T, C_in]
  u = jnp.einsum("st,tco->sco", g.astype(dt), ws.reshape(rh * rw, c_in, c_out))
  p = jnp.einsum("sbzc,sco->sbzo", v, u)  # [n*n, B, T, C_out]
  y = jnp.einsum("us,sbzo->ubzo", at.astype(dt), p)  # [m*m, B, T, C_out]
  y = y.reshape(m, m, b, th, tw, c_out).transpose(2, 3, 0, 4, 1, 5)
  y = y.reshape(b, th * m, tw * m, c_out)[:, : h - rh + 1, : wd - rw + 1]
  return y, (v, u)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _winograd_s1(xs: jax.Array, ws: jax.Array, m: int) -> jax.Array:
  """Stride-1 VALID conv by Winograd F(m x m, kh x kw): [B, H, W, C_in] -> [B, Ho, Wo, C_out]."""
  return _winograd_math(xs, ws, m)[0]


def _winograd_s1_fwd(xs, ws, m):
  y, (v, u) = _winograd_math(xs, ws, m)
  # xs's H, W and ws's kh, kw are not recoverable from V and U: the zero-size arrays carry
  # them as static shapes (residuals must be JAX values).
  return y, (v, u, jnp.zeros((*xs.shape[1:3], 0), v.dtype), jnp.zeros((*ws.shape[:2], 0), v.dtype))


def _winograd_s1_bwd(m, res, gy):
  # Every stage is linear, so the backward pass is the same stages transposed: the output
  # transform, two batched GEMMs, the transposed input and weight transforms and an
  # overlap-add of block-aligned pads (see `_winograd_untile`).
  v, u, x_hw, w_hw = res
  b, c_in, c_out = v.shape[1], u.shape[1], u.shape[2]
  (h, wd), (rh, rw) = x_hw.shape[:2], w_hw.shape[:2]
  x_shape, w_shape = (b, h, wd, c_in), (rh, rw, c_in, c_out)
  nh, nw = m + rh - 1, m + rw - 1
  th, tw, at, g, bt = _winograd_geometry(x_shape, w_shape, m)
  dt = v.dtype  # gy's dtype too (= y's)
  ho, wo = h - rh + 1, wd - rw + 1
  gy = jnp.pad(gy, ((0, 0), (0, th * m - ho), (0, tw * m - wo), (0, 0)))
  gy = gy.reshape(b, th, m, tw, m, c_out).transpose(2, 4, 0, 1, 3, 5)
  gy = gy.reshape(m * m, b, th * tw, c_out)  # [m*m, B, T, C_out]
  dp = jnp.einsum("us,ubzo->sbzo", at.astype(dt), gy)  # [n*n, B, T, C_out]
  dv = jnp.einsum("sbzo,sco->sbzc", dp, u)  # [n*n, B, T, C_in]
  du = jnp.einsum("sbzc,sbzo->sco", v, dp)  # [n*n, C_in, C_out]
  dws = jnp.einsum("st,sco->tco", g.astype(dt), du).reshape(w_shape)
  dd = jnp.einsum("st,sbzc->tbzc", bt.astype(dt), dv)  # [n*n, B, T, C_in]
  return _winograd_untile(dd, x_shape, m, nh, nw, th, tw), dws


_winograd_s1.defvjp(_winograd_s1_fwd, _winograd_s1_bwd)


def _winograd_applies(w_shape, stride: int, dtype=jnp.float32) -> bool:
  """Whether 'winograd' handles this conv itself (else it falls back to 'hybrid')."""
  r = [-(-k // stride) for k in w_shape[:2]]
  return jnp.issubdtype(dtype, jnp.floating) and 2 <= min(r) and max(r) <= _WINOGRAD_MAX_R


def _winograd(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
  if not _winograd_applies(w.shape, stride, x.dtype):
    return _hybrid(x, w, stride)
  dtype = caps_ops.compute_dtype(x.dtype)  # bfloat16/float16 -> float32 (see the module doc)
  xs, ws = _fold(x.astype(dtype), w.astype(dtype), stride)
  return _winograd_s1(xs, ws, _WINOGRAD_M).astype(x.dtype)


def conv2d(x: jax.Array, w: jax.Array, *, stride: int = 1, impl: str = "xla") -> jax.Array:
  """VALID 2-D convolution, equal to `lax.conv_general_dilated` for every impl.

  Args:
    x: [B, H, W, C_in] images.
    w: [kh, kw, C_in, C_out] kernel (HWIO).
    stride: the same stride along both spatial axes (static Python int).
    impl: one of IMPLS (a concrete lowering; `capsjax.run.cpu_runtime.resolve_conv_impl`
      maps the config value 'auto' to one).

  Returns:
    [B, (H - kh) // stride + 1, (W - kw) // stride + 1, C_out], in the promoted dtype
    of x and w (accumulated in at least float32).
  """
  if impl not in IMPLS:
    # 'auto' is a config value, resolved once at start-up by
    # capsjax.run.cpu_runtime.resolve_conv_impl; this module never reads the environment.
    raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}")
  x = jnp.asarray(x)
  w = jnp.asarray(w)
  _check(x, w, stride)
  dtype = jnp.result_type(x, w)
  x, w = x.astype(dtype), w.astype(dtype)
  if impl == "xla":
    return _xla(x, w, stride)
  if impl == "im2col":
    return _im2col(x, w, stride)
  if impl == "hybrid":
    return _hybrid(x, w, stride)
  if impl == "winograd":
    return _winograd(x, w, stride)
  return _s2d(x, w, stride)
