"""Pure capsule operations: `squash` and dynamic routing (Sabour et al. 2017).

No Flax, no config: arrays in, arrays out, keyword-only hyperparameters. Everything here
is shape-polymorphic over leading batch dimensions and safe under `jit`, `vmap` and
`grad`.

Shape legend: N_in input capsules, N_out output capsules (parents),
D capsule pose size. `u_hat` predictions, `b` routing logits, `c` coupling
coefficients, `s` pre-squash sums, `v` output capsules.

Low-precision inputs (bfloat16, float16) are computed in float32 internally and the
result is cast back, because the squash ratio and the routing softmax lose most of their
bits in bfloat16; float64 stays float64.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype capsjax computes and accumulates a `dtype` input in.

  float32 for bfloat16/float16 (and integers), the dtype itself for float32/float64.
  `capsjax.conv` accumulates its convolutions in it too.

  Args:
    dtype: an input's dtype.

  Returns:
    jnp.promote_types(dtype, float32).
  """
  return jnp.promote_types(dtype, jnp.float32)


def squash(s: jax.Array, *, axis: int = -1, eps: float = 1e-7) -> jax.Array:
  """The capsule non-linearity, Eq. 1 of the paper: v = |s|^2/(1+|s|^2) * s/|s|.

  `|s|` is computed as `sqrt(|s|^2 + eps)`, never `norm(s) + eps`, so both the value
  and the gradient are finite at s = 0 (where v = 0). Inputs are first divided by
  max(1, max_i |s_i|) (a constant for autodiff; the formula is invariant to it), so that
  `|s|^2` cannot overflow: an input of 1e20 in float32 gives length 1, not NaN. For
  every |s_i| <= 1 this is exactly the textbook formula.

  Args:
    s: [..., D, ...] pre-activation capsules; `axis` is the pose axis.
    axis: the capsule pose axis.
    eps: added to |s|^2 under the square root.

  Returns:
    v: same shape and dtype as `s`, with |v| = |s|^2/(1+|s|^2) < 1 along `axis`.
  """
  s = jnp.asarray(s)
  t, _, inv_sq = rescale_capsules(s, axis=axis, name="squash")
  sq = jnp.sum(jnp.square(t), axis=axis, keepdims=True)  # [..., 1, ...]
  # |s|^2/(1+|s|^2) / |s| written in the rescaled t = s/m (exactly invariant to m).
  v = t * sq / ((inv_sq + sq) * jnp.sqrt(sq + eps * inv_sq))  # [..., D, ...]
  return v.astype(s.dtype)


def rescale_capsules(s: jax.Array, *, axis: int = -1, name: str = "squash"):
  """s / m with m = max(1, max_i |s_i|) along `axis`, for squash-like non-linearities.

  The rescale only guards against overflow of |s|^2: a squash written in t = s/m is
  invariant to m, so m is a constant for autodiff (stop_gradient) and the gradient stays
  exact. The division is two multiplications by 1/sqrt(m): XLA rewrites `x / m` into
  `x * (1 / m)`, and 1/m is subnormal (flushed to 0) for |s| >= ~1e38 in float32, which
  turned v into 0/0 = NaN; 1/sqrt(m) stays a normal number.

  Args:
    s: [..., D, ...] floating-point capsules; `axis` is the pose axis.
    name: the caller, for the error message.

  Returns:
    (t [..., D, ...], m [..., 1, ...], 1/m^2 [..., 1, ...]), in the compute dtype
    (`compute_dtype`).
  """
  if not jnp.issubdtype(s.dtype, jnp.floating):
    raise TypeError(f"{name} expects a floating-point array, got dtype {s.dtype}")
  x = s.astype(compute_dtype(s.dtype))
  m = jax.lax.stop_gradient(
    jnp.maximum(jnp.max(jnp.abs(x), axis=axis, keepdims=True), 1.0)
  )  # [..., 1, ...]
  r = jax.lax.rsqrt(m)  # [..., 1, ...]
  t = (x * r) * r  # [..., D, ...]
  return t, m, jnp.square(r * r)


def capsule_lengths(v: jax.Array, *, axis: int = -1, eps: float = 1e-7) -> jax.Array:
  """Capsule lengths sqrt(|v|^2 + eps) with a finite gradient at v = 0.

  Args:
    v: [..., D] capsules (pose along `axis`).

  Returns:
    [...] lengths, in float32 (or float64 for float64 input).
  """
  x = jnp.asarray(v)
  x = x.astype(compute_dtype(x.dtype))
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=axis) + eps)


class RoutingResult(NamedTuple):
  """Output of `dynamic_routing(..., return_couplings=True)`.

  v: [..., N_out, D] output capsules.
  c: [..., N_in, N_out] coupling coefficients of the last iteration (sum to 1 over N_out).
  """

  v: jax.Array
  c: jax.Array


def check_iterations(num_iterations) -> int:
  """Returns `num_iterations` if it is a static Python int >= 1; raises otherwise."""
  if isinstance(num_iterations, bool) or not isinstance(num_iterations, int):
    # A traced or float value would silently recompile or fail deep inside fori_loop.
    raise TypeError(
      "num_iterations must be a static Python int >= 1, got "
      f"{num_iterations!r} of type {type(num_iterations).__name__}"
    )
  if num_iterations < 1:
    raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
  return num_iterations


def dynamic_routing(
  u_hat: jax.Array,
  num_iterations: int,
  *,
  stop_gradient: bool = False,
  return_couplings: bool = False,
  bias: jax.Array | None = None,
):
  """Routing-by-agreement, Procedure 1 of Sabour, Frosst & Hinton (2017).

  For every example the logits start at b = 0, then for each iteration:
  c = softmax(b) over the parents (N_out axis), s_j = sum_i c_ij u_hat_j|i (+ bias_j),
  v_j = squash(s_j), and (except after the last iteration) b_ij += <u_hat_j|i, v_j>.
  Iterations run in a `lax.fori_loop`, so the traced program has the same size for any
  iteration count. Differentiable in forward and reverse mode; for the common
  u_hat = u W layer, `predict_and_route` computes the same values with a much cheaper
  (reverse-mode only) gradient.

  Args:
    u_hat: [..., N_in, N_out, D] predictions of each input capsule for each parent;
      any number of leading batch dimensions.
    num_iterations: static Python int >= 1 (changing it recompiles).
    stop_gradient: if False (as in the authors' code, Sarasra/models research/capsules),
      gradients flow through every iteration. If True, `u_hat` is stop-gradiented in all
      iterations but the last, the variant most re-implementations use.
    return_couplings: also return the last iteration's coupling coefficients.
    bias: optional [N_out, D] (or anything broadcastable to [..., N_out, D]) added to
      s_j before the squash in every iteration, as the authors' code (Sarasra/models,
      research/capsules, `layers._update_routing`) does. None: the paper's formula.

  Returns:
    v: [..., N_out, D] output capsules, dtype of `u_hat`; or, with
    `return_couplings=True`, a `RoutingResult(v, c)` with c: [..., N_in, N_out].
  """
  num_iterations = check_iterations(num_iterations)
  u_hat = jnp.asarray(u_hat)
  if not jnp.issubdtype(u_hat.dtype, jnp.floating):
    # The output is cast back to the input dtype, and |v| < 1 would truncate to 0.
    raise TypeError(f"dynamic_routing expects a floating-point u_hat, got dtype {u_hat.dtype}")
  if u_hat.ndim < 3:
    raise ValueError(
      f"u_hat must have shape [..., N_in, N_out, D] (at least 3 dims), got shape {u_hat.shape}"
    )
  out_dtype = u_hat.dtype
  u = u_hat.astype(compute_dtype(out_dtype))  # [..., N_in, N_out, D]
  n_out = u.shape[-2]
  add_bias = lambda s: s
  if bias is not None:
    bias = jnp.asarray(bias).astype(u.dtype)
    s_shape = u.shape[:-3] + u.shape[-2:]
    try:
      if jnp.broadcast_shapes(bias.shape, s_shape) != s_shape:
        raise ValueError
    except ValueError:
      raise ValueError(
        f"bias of shape {bias.shape} does not broadcast to s = [..., N_out, D] = {s_shape}"
      ) from None
    add_bias = lambda s: s + bias

  if num_iterations == 1:
    # b = 0, so c = softmax(0) = 1/N_out exactly: no softmax, no agreement.
    c = jnp.full_like(u[..., 0], 1.0 / n_out)  # [..., N_in, N_out]
    v = squash(add_bias(jnp.sum(u, axis=-3) / n_out))  # [..., N_out, D]
  else:
    # Route in the [..., N_out, N_in, D] layout, transposed once outside the loop: both
    # contractions are then batched mat-vecs with leading batch axes, which XLA runs
    # much faster on CPU than the same einsums on [..., N_in, N_out, D] (those transpose
    # or reduce over strided axes in every iteration; RESULTS.md). HIGHEST precision keeps float32
    # routing exact on GPU/TPU (no TF32/bf16 passes).
    ut = jnp.swapaxes(u, -3, -2)  # [..., N_out, N_in, D]
    ut_inner = jax.lax.stop_gradient(ut) if stop_gradient else ut
    hi = jax.lax.Precision.HIGHEST

    def route(b, preds):
      c = jax.nn.softmax(b, axis=-2)  # [..., N_out, N_in]
      s = jnp.einsum("...mn,...mno->...mo", c, preds, precision=hi)  # [..., N_out, D]
      return c, squash(add_bias(s))  # [..., N_out, D]

    def body(_, b):
      _, v = route(b, ut_inner)
      return b + jnp.einsum("...mno,...mo->...mn", ut_inner, v, precision=hi)  # [..., N_out, N_in]

    b0 = jnp.zeros_like(ut[..., 0])  # [..., N_out, N_in]
    b = jax.lax.fori_loop(0, num_iterations - 1, body, b0)
    c_t, v = route(b, ut)
    c = jnp.swapaxes(c_t, -1, -2)  # [..., N_in, N_out]
  v = v.astype(out_dtype)
  if return_couplings:
    return RoutingResult(v=v, c=c.astype(out_dtype))
  return v


def predict_and_route(
  u: jax.Array,
  w: jax.Array,
  num_iterations: int,
  *,
  stop_gradient: bool = False,
  return_couplings: bool = False,
):
  """The fully connected capsule layer: u_hat = u W, then `dynamic_routing(u_hat)`.

  Equal to `dynamic_routing(jnp.einsum('bni,nmio->bnmo', u, w), ...)` (values and
  gradients, to float rounding), but never forms u_hat in that layout: the predictions
  are made directly in the [B, N_out, N_in, D_out] layout routing reads, as a fused
  multiply-add over the D_in axis (XLA:CPU runs the equivalent einsum as N_in tiny
  matmuls, far below its GEMM speed), and the hand-written gradient forms d u_hat once,
  in the [N_in, B, N_out, D_out] layout in which the gradients of u and w are each one
  batched matmul. Iterations run in a `lax.scan`. The gradient is hand-written
  (`jax.custom_vjp`): reverse mode only (grad, vjp), not jvp/jacfwd. For 3 iterations
  the backward pass reads u_hat four times and writes its gradient once, instead of
  differentiating through the loop.

  Args:
    u: [B, N_in, D_in] input capsules (float32 or float64).
    w: [N_in, N_out, D_in, D_out] transformation matrices, same dtype as u.
    num_iterations, stop_gradient, return_couplings: as in `dynamic_routing`.

  Returns:
    v: [B, N_out, D_out]; or `RoutingResult(v, c)` with c: [B, N_in, N_out].
  """
  num_iterations = check_iterations(num_iterations)
  if u.ndim != 3 or w.ndim != 4 or w.shape[0] != u.shape[1] or w.shape[2] != u.shape[2]:
    raise ValueError(
      f"expected u [B, N_in, D_in] and w [N_in, N_out, D_in, D_out], got u {u.shape} "
      f"and w {w.shape}"
    )
  v, c_t = _predict_route(u, w, num_iterations, stop_gradient)
  if return_couplings:
    return RoutingResult(v=v, c=jnp.swapaxes(c_t, -1, -2))  # c: [B, N_in, N_out]
  return v


# ----------------------------------------------------------------------------------------
# Routing core on ut = u_hat in the [..., N_out, N_in, D] layout. Both contractions are
# then batched mat-vecs over leading axes, which XLA:CPU runs much faster than the same
# einsums on [..., N_in, N_out, D] (RESULTS.md). HIGHEST precision keeps float32 routing exact on
# GPU/TPU (no TF32/bf16 passes); XLA:CPU computes float32 dots in float32 anyway.
# ----------------------------------------------------------------------------------------
_HI = jax.lax.Precision.HIGHEST


def _weighted_sum(c, ut):
  return jnp.einsum("...mn,...mno->...mo", c, ut, precision=_HI)  # [..., N_out, D]


def _agreement(ut, v):
  return jnp.einsum("...mno,...mo->...mn", ut, v, precision=_HI)  # [..., N_out, N_in]


def _softmax_vjp(c, g):
  """Cotangent of b for c = softmax(b, axis=-2) and cotangent g of c."""
  return c * (g - jnp.sum(c * g, axis=-2, keepdims=True))  # [..., N_out, N_in]


def _squash_vjp(s, g):
  return jax.vjp(squash, s)[1](g)[0]  # [..., N_out, D]


def _routing_forward(ut, num_iterations):
  """Returns v, c of the last iteration ([..., N_out, N_in]) and the residuals."""
  n_out = ut.shape[-3]
  s0 = jnp.sum(ut, axis=-2) / n_out  # [..., N_out, D], c = 1/N_out
  v0 = squash(s0)
  if num_iterations == 1:
    return v0, jnp.full_like(ut[..., 0], 1.0 / n_out), (s0, None, None, None, None)
  b = _agreement(ut, v0)  # [..., N_out, N_in], b_1

  def step(b, _):
    s = _weighted_sum(jax.nn.softmax(b, axis=-2), ut)  # [..., N_out, D]
    return b + _agreement(ut, squash(s)), (b, s)

  bs = ss = None
  if num_iterations > 2:
    b_last, (bs, ss) = jax.lax.scan(step, b, None, length=num_iterations - 2)
  else:
    b_last = b
  c = jax.nn.softmax(b_last, axis=-2)  # [..., N_out, N_in]
  s = _weighted_sum(c, ut)  # [..., N_out, D]
  return squash(s), c, (s0, bs, ss, c, s)


def _routing_grad_terms(ut, res, num_iterations, stop_gradient, gv, gc):
  """d u_hat as a sum of outer products: [(P [k?, ..., N_out, N_in], Q [k?, ..., N_out, D])].

  d ut[..., m, n, o] = sum over terms of P[..., m, n] * Q[..., m, o] (summed over the
  leading k axis of stacked terms). gv, gc: cotangents of v and of the last c.
  """
  n_out = ut.shape[-3]
  s0, bs, ss, c, s = res
  if num_iterations == 1:
    gs0 = _squash_vjp(s0, gv)
    return [(jnp.full_like(ut[..., 0], 1.0 / n_out), gs0)], []
  gs = _squash_vjp(s, gv)  # [..., N_out, D]
  terms, stacked = [(c, gs)], []
  if stop_gradient:  # c is a constant then.
    return terms, stacked
  gb = _softmax_vjp(c, _agreement(ut, gs) + gc)  # d b_{r-1}

  def back(gb, xs):
    # b_{t+1} = b_t + <ut, v_t>, v_t = squash(s_t), s_t = sum_n softmax(b_t) ut.
    b_t, s_t = xs
    c_t = jax.nn.softmax(b_t, axis=-2)
    v_t = squash(s_t)
    gs_t = _squash_vjp(s_t, _weighted_sum(gb, ut))
    gb_t = gb + _softmax_vjp(c_t, _agreement(ut, gs_t))
    return gb_t, (gb, v_t, c_t, gs_t)

  if num_iterations > 2:
    gb, (gbs, vs, cs, gss) = jax.lax.scan(back, gb, (bs, ss), reverse=True)
    stacked = [(gbs, vs), (cs, gss)]
  # Iteration 0: b_1 = <ut, v_0>, c_0 = 1/N_out.
  gs0 = _squash_vjp(s0, _weighted_sum(gb, ut))
  terms += [(gb, squash(s0)), (jnp.full_like(gb, 1.0 / n_out), gs0)]
  return terms, stacked


def _outer_sum(terms, stacked, p_map, q_map):
  """sum_k p_map(P_k) * q_map(Q_k) over plain and stacked (leading k axis) terms."""
  out = None
  for p, q in terms:
    t = p_map(p) * q_map(q)
    out = t if out is None else out + t
  for ps, qs in stacked:
    for k in range(ps.shape[0]):
      out = out + p_map(ps[k]) * q_map(qs[k])
  return out


def _predictions_t(u, w):
  """u [B, N_in, D_in], w [N_in, N_out, D_in, D_out] -> u_hat [B, N_out, N_in, D_out]."""
  wt = jnp.transpose(w, (2, 1, 0, 3))  # [D_in, N_out, N_in, D_out]
  ut = None
  for i in range(u.shape[-1]):  # one fused multiply-add
    t = u[:, None, :, i, None] * wt[i][None]  # [B, N_out, N_in, D_out]
    ut = t if ut is None else ut + t
  return ut


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _predict_route(u, w, num_iterations, stop_gradient):
  v, c, _ = _routing_forward(_predictions_t(u, w), num_iterations)
  return v, c


def _predict_route_fwd(u, w, num_iterations, stop_gradient):
  # The barrier keeps XLA from fusing (and so recomputing) the product into each pass.
  ut = jax.lax.optimization_barrier(_predictions_t(u, w))  # [B, N_out, N_in, D_out]
  v, c, res = _routing_forward(ut, num_iterations)
  return (v, c), (u, w, ut, res)


def _predict_route_bwd(num_iterations, stop_gradient, saved, g):
  u, w, ut, res = saved
  gv, gc = g
  terms, stacked = _routing_grad_terms(ut, res, num_iterations, stop_gradient, gv, gc)
  # d u_hat in the [N_in, B, N_out, D_out] layout: both gradients are then one matmul
  # batched over N_in.
  n_in, b, n_out, d_out = ut.shape[2], ut.shape[0], ut.shape[1], ut.shape[3]
  d_in = u.shape[-1]
  gn = _outer_sum(
    terms, stacked, lambda p: jnp.transpose(p, (2, 0, 1))[..., None], lambda q: q[None]
  )  # [N_in, B, N_out, D_out]
  # The barrier keeps XLA from fusing the sum into (and recomputing it in) both dots.
  gn = jax.lax.optimization_barrier(gn.reshape(n_in, b, n_out * d_out))  # [N_in, B, N_out*D_out]
  wn = jnp.transpose(w, (0, 2, 1, 3)).reshape(
    n_in, d_in, n_out * d_out
  )  # [N_in, D_in, N_out*D_out]
  du = jax.lax.dot_general(gn, wn, (((2,), (2,)), ((0,), (0,))))  # [N_in, B, D_in]
  dw = jax.lax.dot_general(
    jnp.transpose(u, (1, 2, 0)), gn, (((2,), (1,)), ((0,), (0,)))
  )  # [N_in, D_in, N_out*D_out]
  dw = jnp.transpose(
    dw.reshape(n_in, d_in, n_out, d_out), (0, 2, 1, 3)
  )  # [N_in, N_out, D_in, D_out]
  return jnp.transpose(du, (1, 0, 2)), dw


_predict_route.defvjp(_predict_route_fwd, _predict_route_bwd)
