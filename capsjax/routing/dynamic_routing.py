"""Dynamic routing (Sabour, Frosst & Hinton 2017), and its fused predict-and-route gradient."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from capsjax import caps_ops
from capsjax.routing.common import (
  Routed,
  agreement,
  check_broadcast,
  check_iterations,
  prepare,
  stopper,
  weighted_sum,
)

# ----------------------------------------------------------------------------------------
# Dynamic routing (Sabour, Frosst & Hinton 2017)
# ----------------------------------------------------------------------------------------


def dynamic(
  u_hat: jax.Array,
  num_iterations: int,
  *,
  stop_gradient: bool = False,
  bias: jax.Array | None = None,
  eps: float = 1e-7,
) -> Routed:
  """Routing-by-agreement, Procedure 1 of Sabour, Frosst & Hinton (2017).

  For every example the logits start at b = 0, then for each iteration:
  c = softmax(b) over the parents (N_out axis), s_j = sum_i c_ij u_hat_j|i (+ bias_j),
  v_j = squash(s_j), and (except after the last iteration) b_ij += <u_hat_j|i, v_j>.
  Differentiable in forward and reverse mode; for the common u_hat = u W layer,
  `predict_and_route` computes the same values with a much cheaper (reverse-mode only)
  gradient.

  Args:
    u_hat: [..., N_in, N_out, D] votes.
    num_iterations: static integer >= 1.
    stop_gradient: False (the default, as in the authors' code, Sarasra/models research/
      capsules): gradients flow through every iteration. True: the logits are computed
      from stop-gradiented votes (`bias` keeps its gradient through them), the variant
      most re-implementations use.
    bias: optional [N_out, D] (or anything broadcastable to [..., N_out, D]) added to s_j
      before the squash in every iteration, as the authors' code
      (`layers._update_routing`) does. None: the paper's formula.
    eps: under the square root of the squash (`caps_ops.squash`) and of the lengths.

  Returns:
    Routed: poses v [..., N_out, D] (squashed, |v| < 1); activations the lengths
    sqrt(|v|^2 + eps) [..., N_out]; assignments c [..., N_in, N_out], the last
    iteration's coupling coefficients (softmax over the parents).
  """
  num_iterations = check_iterations(num_iterations)
  u, out_dtype = prepare(u_hat, "dynamic routing")  # [..., N_in, N_out, D]
  n_out = u.shape[-2]

  def add_bias(s):
    return s

  if bias is not None:
    bias = jnp.asarray(bias).astype(u.dtype)
    check_broadcast("bias", bias, u.shape[:-3] + u.shape[-2:], "s = [..., N_out, D]")

    def add_bias(s):
      return s + bias

  squash = functools.partial(caps_ops.squash, eps=eps)

  if num_iterations == 1:
    # b = 0, so c = softmax(0) = 1/N_out exactly: no softmax, no agreement.
    c = jnp.full_like(u[..., 0], 1.0 / n_out)  # [..., N_in, N_out]
    v = squash(add_bias(jnp.sum(u, axis=-3) / n_out))  # [..., N_out, D]
  else:
    ut = jnp.swapaxes(u, -3, -2)  # [..., N_out, N_in, D]
    ut_w = stopper(stop_gradient)(ut)  # the votes the logits are computed from

    def route(b, votes):
      c = jax.nn.softmax(b, axis=-2)  # [..., N_out, N_in]
      return c, squash(add_bias(weighted_sum(c, votes)))  # [..., N_out, D]

    def body(_, b):
      _, v = route(b, ut_w)
      return b + agreement(ut_w, v)  # [..., N_out, N_in]

    b0 = jnp.zeros_like(ut[..., 0])  # [..., N_out, N_in]
    b = jax.lax.fori_loop(0, num_iterations - 1, body, b0)
    c_t, v = route(b, ut)
    c = jnp.swapaxes(c_t, -1, -2)  # [..., N_in, N_out]
  return Routed(
    poses=v.astype(out_dtype),
    activations=caps_ops.capsule_lengths(v, eps=eps).astype(out_dtype),
    assignments=c.astype(out_dtype),
  )


def predict_and_route(
  u: jax.Array,
  w: jax.Array,
  num_iterations: int,
  *,
  stop_gradient: bool = False,
  eps: float = 1e-7,
) -> Routed:
  """The fully connected capsule layer: u_hat = u W, then `dynamic(u_hat)`, fused.

  Equal to `dynamic(jnp.einsum('bni,nmio->bnmo', u, w), ...)` (values and gradients, to
  float rounding), but never forms u_hat in that layout: the votes are made directly in the
  [B, N_out, N_in, D_out] layout routing reads, as a fused multiply-add over the D_in axis
  (XLA:CPU runs the equivalent einsum as N_in tiny matmuls, far below its GEMM speed), and
  the hand-written gradient forms d u_hat once, in the [N_in, B, N_out, D_out] layout in
  which the gradients of u and w are each one batched matmul. Iterations run in a
  `lax.scan`. The gradient is a `jax.custom_vjp`: reverse mode only (grad, vjp), not
  jvp/jacfwd. For 3 iterations the backward pass reads u_hat four times and writes its
  gradient once, instead of differentiating through the loop. No `bias`: its gradient is
  not part of the hand-written one (route `dynamic` for that).

  Args:
    u: [B, N_in, D_in] input capsules (float32 or float64).
    w: [N_in, N_out, D_in, D_out] transformation matrices, same dtype as u.
    num_iterations, stop_gradient, eps: as in `dynamic`.

  Returns:
    Routed: poses v [B, N_out, D_out]; activations [B, N_out]; assignments c
    [B, N_in, N_out], as in `dynamic`.
  """
  num_iterations = check_iterations(num_iterations)
  if u.ndim != 3 or w.ndim != 4 or w.shape[0] != u.shape[1] or w.shape[2] != u.shape[2]:
    raise ValueError(
      f"expected u [B, N_in, D_in] and w [N_in, N_out, D_in, D_out], got u {u.shape} "
      f"and w {w.shape}"
    )
  v, c_t = _predict_route(u, w, num_iterations, bool(stop_gradient), float(eps))
  return Routed(
    poses=v,
    activations=caps_ops.capsule_lengths(v, eps=eps).astype(v.dtype),
    assignments=jnp.swapaxes(c_t, -1, -2),  # [B, N_in, N_out]
  )


# The fused path's pieces work on ut = u_hat in the [..., N_out, N_in, D] layout.


def _softmax_vjp(c, g):
  """Cotangent of b for c = softmax(b, axis=-2) and cotangent g of c."""
  return c * (g - jnp.sum(c * g, axis=-2, keepdims=True))  # [..., N_out, N_in]


def _routing_forward(ut, num_iterations, squash):
  """Returns v, c of the last iteration ([..., N_out, N_in]) and the residuals."""
  n_out = ut.shape[-3]
  s0 = jnp.sum(ut, axis=-2) / n_out  # [..., N_out, D], c = 1/N_out
  v0 = squash(s0)
  if num_iterations == 1:
    return v0, jnp.full_like(ut[..., 0], 1.0 / n_out), (s0, None, None, None, None)
  b = agreement(ut, v0)  # [..., N_out, N_in], b_1

  def step(b, _):
    s = weighted_sum(jax.nn.softmax(b, axis=-2), ut)  # [..., N_out, D]
    return b + agreement(ut, squash(s)), (b, s)

  bs = ss = None
  if num_iterations > 2:
    b_last, (bs, ss) = jax.lax.scan(step, b, None, length=num_iterations - 2)
  else:
    b_last = b
  c = jax.nn.softmax(b_last, axis=-2)  # [..., N_out, N_in]
  s = weighted_sum(c, ut)  # [..., N_out, D]
  return squash(s), c, (s0, bs, ss, c, s)


def _routing_grad_terms(ut, res, num_iterations, stop_gradient, squash, gv, gc):
  """d u_hat as a sum of outer products: [(P [k?, ..., N_out, N_in], Q [k?, ..., N_out, D])].

  d ut[..., m, n, o] = sum over terms of P[..., m, n] * Q[..., m, o] (summed over the
  leading k axis of stacked terms). gv, gc: cotangents of v and of the last c.
  """
  n_out = ut.shape[-3]

  def squash_vjp(s, g):
    return jax.vjp(squash, s)[1](g)[0]  # [..., N_out, D]

  s0, bs, ss, c, s = res
  if num_iterations == 1:
    gs0 = squash_vjp(s0, gv)
    return [(jnp.full_like(ut[..., 0], 1.0 / n_out), gs0)], []
  gs = squash_vjp(s, gv)  # [..., N_out, D]
  terms, stacked = [(c, gs)], []
  if stop_gradient:  # c is a constant then.
    return terms, stacked
  gb = _softmax_vjp(c, agreement(ut, gs) + gc)  # d b_{r-1}

  def back(gb, xs):
    # b_{t+1} = b_t + <ut, v_t>, v_t = squash(s_t), s_t = sum_n softmax(b_t) ut.
    b_t, s_t = xs
    c_t = jax.nn.softmax(b_t, axis=-2)
    v_t = squash(s_t)
    gs_t = squash_vjp(s_t, weighted_sum(gb, ut))
    gb_t = gb + _softmax_vjp(c_t, agreement(ut, gs_t))
    return gb_t, (gb, v_t, c_t, gs_t)

  if num_iterations > 2:
    gb, (gbs, vs, cs, gss) = jax.lax.scan(back, gb, (bs, ss), reverse=True)
    stacked = [(gbs, vs), (cs, gss)]
  # Iteration 0: b_1 = <ut, v_0>, c_0 = 1/N_out.
  gs0 = squash_vjp(s0, weighted_sum(gb, ut))
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _predict_route(u, w, num_iterations, stop_gradient, eps):
  squash = functools.partial(caps_ops.squash, eps=eps)
  v, c, _ = _routing_forward(_predictions_t(u, w), num_iterations, squash)
  return v, c


def _predict_route_fwd(u, w, num_iterations, stop_gradient, eps):
  squash = functools.partial(caps_ops.squash, eps=eps)
  # The barrier keeps XLA from fusing (and so recomputing) the product into each pass.
  ut = jax.lax.optimization_barrier(_predictions_t(u, w))  # [B, N_out, N_in, D_out]
  v, c, res = _routing_forward(ut, num_iterations, squash)
  return (v, c), (u, w, ut, res)


def _predict_route_bwd(num_iterations, stop_gradient, eps, saved, g):
  squash = functools.partial(caps_ops.squash, eps=eps)
  u, w, ut, res = saved
  gv, gc = g
  terms, stacked = _routing_grad_terms(ut, res, num_iterations, stop_gradient, squash, gv, gc)
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
