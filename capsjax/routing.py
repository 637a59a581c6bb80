"""Routing algorithms under one contract: votes in, `Routed(poses, activations, assignments)` out.

Every algorithm is a pure function

  fn(u_hat, num_iterations, *, stop_gradient=False, eps=..., **algorithm_kwargs) -> Routed

with u_hat [..., N_in, N_out, D] the votes (predictions) of every input capsule for every
parent, any number of leading batch dimensions, and `num_iterations` a static integer >= 1
(`check_iterations`; changing it recompiles). `ROUTINGS` maps a name to each function and
`get(name)` looks one up; algorithm-specific inputs have defaults, so `get(name)(u_hat, r)`
works for every name. `predict_and_route` is dynamic routing fused with the fully connected
layer's votes u W, with a hand-written gradient.

Keywords every algorithm shares:
  stop_gradient: the votes are stop-gradiented wherever they feed the routing weights, so
    the gradient reaches u_hat only through the last pass (the weighted sum of the votes and
    what follows it), never through how the weights were found; values are unchanged. Where
    the weights do not depend on the votes (one iteration of dynamic, EM or inverted
    dot-product routing from zero parents: uniform weights) it has no effect; self-attention
    computes its one pass's weights from the votes, so it detaches them. Each function says
    what happens to its other inputs' gradients.
  eps: the algorithm's one numerical epsilon: under the square root of the squash and of the
    capsule lengths (dynamic, self-attention), in the LayerNorm (inverted dot-product), the
    variance floor and empty-parent guard of the M-step (EM).

Defaults compute each paper's equations as its authors' published code does: where the code
departs from the text, the code wins, because it produced the reported numbers, and the
text's variant is a keyword (inverted dot-product's agreement scale: 1/sqrt(D) in the code,
`agreement_scale=1.0` for the paper's formula). EM has no code by its authors, so its
defaults are the paper's, with the λ schedule the authors gave on OpenReview. Learned
parameters are optional arguments whose default (None or 0) leaves them out.

Two additive parameters live in different spaces, hence two names: dynamic routing's `bias`
b_j [N_out, D] is added to every pre-squash pose s_j (pose space, the authors' code), while
self-attention's `log_prior` B_ij [N_in, N_out] is added to the coupling coefficients after
their softmax (weight space; the paper's name, though it is not added in log space).

Shape legend: N_in input capsules, N_out parents, D pose size. Einsum letters: n=N_in,
m=N_out, o=D. The votes are transposed once to [..., N_out, N_in, D], where both routing
contractions are batched mat-vecs over leading axes, which XLA:CPU runs much faster than the
same einsums on [..., N_in, N_out, D] (RESULTS.md). HIGHEST precision keeps float32 routing
exact on GPU/TPU (no TF32/bf16 passes).

dtypes: bfloat16/float16 votes are routed in float32 and the results cast back to the input
dtype (softmaxes, logs and normalisations lose most of their bits in bfloat16); float32 and
float64 stay as they are. Each function is safe under `jit`, `vmap` and `grad` (forward and
reverse mode, except `predict_and_route`: reverse only); iterations run in a `lax.fori_loop`
(or `lax.scan`), so the traced program has the same size for any iteration count.
"""

from __future__ import annotations

import functools
import math
import numbers
import types
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from capsjax import caps_ops

_HI = jax.lax.Precision.HIGHEST


class Routed(NamedTuple):
  """The result of every routing algorithm in this module.

  poses: [..., N_out, D] parent poses, dtype of the votes.
  activations: [..., N_out] each parent's presence score, dtype of the votes: how strongly
    the routing itself (no learned read-out) finds the parent present, in [0, 1] and
    comparable across the parents of one example (the argmax is the predicted parent).
    Dynamic and self-attention: the length of the squashed pose, sqrt(|v_j|^2 + eps);
    EM: the sigmoid activation a_j; inverted dot-product, whose paper defines none: the
    share of the inputs' routing mass the parent receives, Σ_i r_ij / N_in.
  assignments: [..., N_in, N_out] the routing weights the poses were computed with (the
    last iteration's; EM's `final_e_step` gives the posterior one E-step later), dtype of
    the votes; they sum to 1 over the parents (last axis) for every algorithm with its
    default normalisation.
  """

  poses: jax.Array
  activations: jax.Array
  assignments: jax.Array


def check_iterations(num_iterations) -> int:
  """Returns `num_iterations` as a Python int if it is a static integer >= 1.

  Any `numbers.Integral` (Python or NumPy ints) is accepted; bools, floats, arrays and traced
  values are not: the count sets the size of the traced program.

  Raises:
    TypeError: not an integer (the message names the value and its type).
    ValueError: an integer < 1.
  """
  if isinstance(num_iterations, bool) or not isinstance(num_iterations, numbers.Integral):
    raise TypeError(
      "num_iterations must be a static integer >= 1 (a Python or NumPy int, not a bool, "
      f"float, array or traced value), got {num_iterations!r} of type "
      f"{type(num_iterations).__name__}"
    )
  if num_iterations < 1:
    raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
  return int(num_iterations)


def _prepare(u_hat, name: str):
  """Validates votes; returns (votes in the compute dtype, output dtype)."""
  u_hat = jnp.asarray(u_hat)
  if not jnp.issubdtype(u_hat.dtype, jnp.floating):
    # The results are cast back to the votes' dtype, and |v| < 1 would truncate to 0.
    raise TypeError(f"{name} expects floating-point votes u_hat, got dtype {u_hat.dtype}")
  if u_hat.ndim < 3:
    raise ValueError(
      f"{name}: u_hat must have shape [..., N_in, N_out, D] (at least 3 dims), got "
      f"shape {u_hat.shape}"
    )
  return u_hat.astype(caps_ops.compute_dtype(u_hat.dtype)), u_hat.dtype


def _check_broadcast(name: str, x: jax.Array, target: tuple[int, ...], what: str):
  try:
    ok = jnp.broadcast_shapes(x.shape, target) == target
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(f"{name} of shape {x.shape} does not broadcast to {what} = {target}")


def _weighted_sum(c, ut):
  """c [..., N_out, N_in], ut [..., N_out, N_in, D] -> sum_n c ut: [..., N_out, D]."""
  return jnp.einsum("...mn,...mno->...mo", c, ut, precision=_HI)


def _agreement(ut, v):
  """ut [..., N_out, N_in, D], v [..., N_out, D] -> <ut, v>: [..., N_out, N_in]."""
  return jnp.einsum("...mno,...mo->...mn", ut, v, precision=_HI)


def _stopper(stop_gradient: bool) -> Callable[[jax.Array], jax.Array]:
  """What the routing weights' inputs go through: `lax.stop_gradient` or nothing."""
  return jax.lax.stop_gradient if stop_gradient else lambda x: x


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
  u, out_dtype = _prepare(u_hat, "dynamic routing")  # [..., N_in, N_out, D]
  n_out = u.shape[-2]
  add_bias = lambda s: s
  if bias is not None:
    bias = jnp.asarray(bias).astype(u.dtype)
    _check_broadcast("bias", bias, u.shape[:-3] + u.shape[-2:], "s = [..., N_out, D]")
    add_bias = lambda s: s + bias
  squash = functools.partial(caps_ops.squash, eps=eps)

  if num_iterations == 1:
    # b = 0, so c = softmax(0) = 1/N_out exactly: no softmax, no agreement.
    c = jnp.full_like(u[..., 0], 1.0 / n_out)  # [..., N_in, N_out]
    v = squash(add_bias(jnp.sum(u, axis=-3) / n_out))  # [..., N_out, D]
  else:
    ut = jnp.swapaxes(u, -3, -2)  # [..., N_out, N_in, D]
    ut_w = _stopper(stop_gradient)(ut)  # the votes the logits are computed from

    def route(b, votes):
      c = jax.nn.softmax(b, axis=-2)  # [..., N_out, N_in]
      return c, squash(add_bias(_weighted_sum(c, votes)))  # [..., N_out, D]

    def body(_, b):
      _, v = route(b, ut_w)
      return b + _agreement(ut_w, v)  # [..., N_out, N_in]

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


def _routing_grad_terms(ut, res, num_iterations, stop_gradient, squash, gv, gc):
  """d u_hat as a sum of outer products: [(P [k?, ..., N_out, N_in], Q [k?, ..., N_out, D])].

  d ut[..., m, n, o] = sum over terms of P[..., m, n] * Q[..., m, o] (summed over the
  leading k axis of stacked terms). gv, gc: cotangents of v and of the last c.
  """
  n_out = ut.shape[-3]
  squash_vjp = lambda s, g: jax.vjp(squash, s)[1](g)[0]  # [..., N_out, D]
  s0, bs, ss, c, s = res
  if num_iterations == 1:
    gs0 = squash_vjp(s0, gv)
    return [(jnp.full_like(ut[..., 0], 1.0 / n_out), gs0)], []
  gs = squash_vjp(s, gv)  # [..., N_out, D]
  terms, stacked = [(c, gs)], []
  if stop_gradient:  # c is a constant then.
    return terms, stacked
  gb = _softmax_vjp(c, _agreement(ut, gs) + gc)  # d b_{r-1}

  def back(gb, xs):
    # b_{t+1} = b_t + <ut, v_t>, v_t = squash(s_t), s_t = sum_n softmax(b_t) ut.
    b_t, s_t = xs
    c_t = jax.nn.softmax(b_t, axis=-2)
    v_t = squash(s_t)
    gs_t = squash_vjp(s_t, _weighted_sum(gb, ut))
    gb_t = gb + _softmax_vjp(c_t, _agreement(ut, gs_t))
    return gb_t, (gb, v_t, c_t, gs_t)

  if num_iterations > 2:
    gb, (gbs, vs, cs, gss) = jax.lax.scan(back, gb, (bs, ss), reverse=True)
    stacked = [(gbs, vs), (cs, gss)]
  # Iteration 0: b_1 = <ut, v_0>, c_0 = 1/N_out.
  gs0 = squash_vjp(s0, _weighted_sum(gb, ut))
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


# ----------------------------------------------------------------------------------------
# EM routing (Hinton, Sabour & Frosst 2018)
# ----------------------------------------------------------------------------------------


def em_inverse_temperatures(num_iterations: int, final_lambda: float = 0.01) -> tuple[float, ...]:
  """λ_t = final_lambda * (1 - 0.95^(t+1)) for t = 0 .. num_iterations-1.

  The formula the paper's authors gave on OpenReview, with final_lambda = 0.01, as quoted
  and used in IBM/matrix-capsules-with-em-routing, `em_routing.py`; the paper treats λ
  as a fixed schedule without stating it. λ grows from 5% of final_lambda towards it,
  so early iterations decide activations softly.
  """
  num_iterations = check_iterations(num_iterations)
  return tuple(final_lambda * (1.0 - 0.95 ** (t + 1)) for t in range(num_iterations))


def em(
  u_hat: jax.Array,
  num_iterations: int,
  *,
  a_in: jax.Array | None = None,
  beta_u: jax.Array | float = 0.0,
  beta_a: jax.Array | float = 0.0,
  final_lambda: float = 0.01,
  inverse_temperatures: Sequence[float] | None = None,
  cost_scale: float = 1.0,
  normalise: Callable[[jax.Array], jax.Array] | None = None,
  initial_assignments: jax.Array | None = None,
  final_e_step: bool = False,
  stop_gradient: bool = False,
  eps: float = 1e-8,
) -> Routed:
  """EM routing, Procedure 1 of Hinton, Sabour & Frosst, "Matrix capsules with EM
  routing", ICLR 2018.

  Votes V_ij are the 4x4 pose matrices flattened (D = 16 in the paper; any D works).
  The assignments start uniform, R_ij = 1/N_out; then for t = 0 .. num_iterations-1
  an M-step, followed by an E-step in all iterations but the last (whose R would be
  unused):

    M-step (for every parent j and pose dimension h):
      R'_ij = R_ij a_i                              (input activations a_i = a_in)
      μ_j^h = Σ_i R'_ij V_ij^h / (Σ_i R'_ij + eps)
      (σ_j^h)² = Σ_i R'_ij (V_ij^h - μ_j^h)² / (Σ_i R'_ij + eps) + eps
      cost_j^h = (β_u + log σ_j^h) Σ_i R'_ij
      a_j = sigmoid(λ_t (β_a - Σ_h cost_j^h))
    E-step (for every input i):
      log p_ij = Σ_h [ -(V_ij^h - μ_j^h)² / (2 (σ_j^h)²) - log σ_j^h - ½ log 2π ]
      R_ij = a_j p_ij / Σ_j' a_j' p_ij' = softmax_j(log a_j + log p_ij)

  The E-step runs in log space (log a_j as `log_sigmoid`, then a softmax over the
  parents), so a density that underflows in float32 still gets its share. `eps` keeps
  μ finite for a parent that receives no input mass (0/0) and log σ finite for a parent
  whose votes agree exactly (σ² = 0). Gradients flow through every iteration by default,
  as the authors answered on OpenReview ("We do not use stop gradient").

  `cost_scale` multiplies every cost_j^h. The paper has none (1.0, the default).
  IBM/matrix-capsules-with-em-routing rescales each layer's cost by
  `layer_norm_factor = 100 / (child_caps / parent_caps)` (em_routing.py L318-321 and
  L362 at commit 2da9cdf), i.e. cost_scale = 100 * N_out / N_in, so that the cost, a sum
  over N_in weighted inputs, has the same size in layers of different fan-in.

  `normalise` and `initial_assignments` serve layers whose inputs are shared between
  routing problems, as in a convolutional capsule layer, where the paper normalises a
  child's assignments over every parent that sees it (`capsjax.layers.MatrixConvCaps`).
  By default the E-step's R_ij = softmax_j(log a_j + log p_ij) and R starts at 1/N_out.

  λ schedule: `em_inverse_temperatures` (λ_t = final_lambda (1 - 0.95^(t+1)), the
  authors' formula quoted in IBM/matrix-capsules-with-em-routing `em_routing.py`), or an
  explicit `inverse_temperatures` sequence of length num_iterations.

  Args:
    u_hat: [..., N_in, N_out, D] votes.
    num_iterations: static integer >= 1, the number of M-steps (the paper uses 3).
    a_in: [..., N_in] input activations in [0, 1] (anything broadcastable to that);
      None: all ones.
    beta_u: scalar or [N_out], the learned per-dimension cost offset β_u (β_v in some
      implementations).
    beta_a: scalar or [N_out], the learned activation offset β_a.
    final_lambda: the schedule's limit (ignored if `inverse_temperatures` is given).
    inverse_temperatures: optional explicit λ_t for t = 0 .. num_iterations-1.
    cost_scale: a real number > 0 (not traced) that multiplies the cost (see above).
    normalise: optional E-step normaliser: log a_j + log p_ij [..., N_in, N_out] -> R
      [..., N_in, N_out]; None: a softmax over the parents.
    initial_assignments: optional R before the first M-step, broadcastable to
      [..., N_in, N_out]; None: 1/N_out.
    final_e_step: also run the E-step after the last M-step and return its posterior as
      the assignments: where each input belongs under the final parents (poses and
      activations are unchanged). False: the R the last M-step used, which for one
      iteration is the uniform starting R.
    stop_gradient: compute every E-step (and the M-steps before the last) from
      stop-gradiented votes (see the module docstring); a_in, beta_u and beta_a keep
      their gradients through them.
    eps: see above.

  Returns:
    Routed: poses μ [..., N_out, D]; activations a_j [..., N_out] in (0, 1);
    assignments R [..., N_in, N_out] (see `final_e_step`; before the multiplication by
    a_in), summing to 1 over the parents with the default `normalise`.
  """
  num_iterations = check_iterations(num_iterations)
  u, out_dtype = _prepare(u_hat, "EM routing")  # [..., N_in, N_out, D]
  dt = u.dtype
  n_out = u.shape[-2]
  if inverse_temperatures is None:
    lambdas = em_inverse_temperatures(num_iterations, final_lambda)
  else:
    lambdas = tuple(float(x) for x in inverse_temperatures)
    if len(lambdas) != num_iterations:
      raise ValueError(
        f"inverse_temperatures must have num_iterations = {num_iterations} entries, "
        f"got {len(lambdas)}"
      )
  lam = jnp.asarray(lambdas, dt)  # [T]
  if isinstance(cost_scale, bool) or not (isinstance(cost_scale, numbers.Real) and cost_scale > 0):
    raise ValueError(f"cost_scale must be a real number > 0, got {cost_scale!r}")
  if a_in is None:
    a = jnp.ones_like(u[..., 0, 0])  # [..., N_in]
  else:
    a = jnp.asarray(a_in).astype(dt)
    _check_broadcast("a_in", a, u.shape[:-2], "[..., N_in]")
  beta_u = jnp.asarray(beta_u).astype(dt)
  beta_a = jnp.asarray(beta_a).astype(dt)
  for arg, x in (("beta_u", beta_u), ("beta_a", beta_a)):
    if x.shape not in ((), (n_out,)):
      raise ValueError(
        f"{arg} must be a scalar or have shape [N_out] = ({n_out},), got shape {x.shape}"
      )
  ut = jnp.swapaxes(u, -3, -2)  # [..., N_out, N_in, D]
  ut_w = _stopper(stop_gradient)(ut)  # the votes the E-steps are computed from
  a_t = a[..., None, :]  # [..., 1, N_in]
  bu = beta_u[..., None] if beta_u.ndim else beta_u  # [N_out, 1] or []

  def m_step(r, lam_t, votes):
    rp = r * a_t  # [..., N_out, N_in]
    r_sum = jnp.sum(rp, axis=-1)  # [..., N_out]
    coeff = rp / (r_sum[..., None] + eps)  # [..., N_out, N_in]
    mu = _weighted_sum(coeff, votes)  # [..., N_out, D]
    var = _weighted_sum(coeff, jnp.square(votes - mu[..., None, :])) + eps  # [..., N_out, D]
    cost = (bu + 0.5 * jnp.log(var)) * (cost_scale * r_sum[..., None])  # [..., N_out, D]
    logit = lam_t * (beta_a - jnp.sum(cost, axis=-1))  # [..., N_out]
    return mu, var, logit

  def e_step(mu, var, logit, votes):
    log_p = -0.5 * jnp.sum(
      jnp.square(votes - mu[..., None, :]) / var[..., None, :]
      + jnp.log(2 * math.pi * var[..., None, :]),
      axis=-1,
    )  # [..., N_out, N_in]
    log_num = jax.nn.log_sigmoid(logit)[..., None] + log_p  # [..., N_out, N_in]
    if normalise is None:
      return jax.nn.softmax(log_num, axis=-2)
    return jnp.swapaxes(normalise(jnp.swapaxes(log_num, -1, -2)), -1, -2).astype(dt)

  def body(t, r):
    return e_step(*m_step(r, lam[t], ut_w), ut_w)

  if initial_assignments is None:
    r0 = jnp.full_like(ut[..., 0], 1.0 / n_out)  # [..., N_out, N_in]
  else:
    r0 = jnp.swapaxes(
      jnp.broadcast_to(jnp.asarray(initial_assignments, dt), u.shape[:-1]), -1, -2
    )  # [..., N_out, N_in]
  r = jax.lax.fori_loop(0, num_iterations - 1, body, r0)
  mu, var, logit = m_step(r, lam[num_iterations - 1], ut)
  if final_e_step:
    r = e_step(mu, var, logit, ut)  # [..., N_out, N_in]
  return Routed(
    poses=mu.astype(out_dtype),
    activations=jax.nn.sigmoid(logit).astype(out_dtype),
    assignments=jnp.swapaxes(r, -1, -2).astype(out_dtype),
  )


# ----------------------------------------------------------------------------------------
# Inverted dot-product attention routing (Tsai, Srivastava, Goh & Salakhutdinov 2020)
# ----------------------------------------------------------------------------------------


def layer_norm(
  x: jax.Array, *, scale: jax.Array | None = None, bias: jax.Array | None = None, eps: float = 1e-5
) -> jax.Array:
  """LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * scale + bias.

  The biased variance and eps = 1e-5 of PyTorch's `nn.LayerNorm`, which the authors of
  inverted dot-product routing use.

  Args:
    x: [..., D].
    scale, bias: optional [D] affine parameters; None: 1 and 0.

  Returns:
    [..., D], dtype of x.
  """
  mean = jnp.mean(x, axis=-1, keepdims=True)  # [..., 1]
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)  # [..., 1]
  y = (x - mean) * jax.lax.rsqrt(var + eps)  # [..., D]
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y


# `inverted_dot_product` has a `layer_norm` flag, which hides the function in its body.
_layer_norm = layer_norm


def inverted_dot_product(
  u_hat: jax.Array,
  num_iterations: int,
  *,
  agreement_scale: float | None = None,
  layer_norm: bool = True,
  ln_scale: jax.Array | None = None,
  ln_bias: jax.Array | None = None,
  parent_poses: jax.Array | None = None,
  stop_gradient: bool = False,
  eps: float = 1e-5,
) -> Routed:
  """Inverted dot-product attention routing, Procedure 1 of Tsai, Srivastava, Goh &
  Salakhutdinov, "Capsules with Inverted Dot-Product Attention Routing", ICLR 2020.

  The parents start at zero, so the first routing weights are uniform, r_ij = 1/N_out,
  and v_j = LayerNorm(Σ_i u_hat_j|i / N_out). Each further iteration (num_iterations - 1
  of them) computes the agreement a_ij = scale <v_j, u_hat_j|i>, the routing weights
  r_ij = softmax over the parents j of a_ij, and v_j = LayerNorm(Σ_i r_ij u_hat_j|i).
  This matches the authors' code (apple/ml-capsules-inverted-attention-routing,
  `src/layers.py` `CapsuleFC.forward` and `src/capsule_model.py`): the first call with
  `next_capsule_value=None` is the uniform pass, `num_routing - 1` calls follow, and
  the agreement is multiplied by 1/sqrt(D) (`self.scale`), which the paper's
  equation leaves out: `agreement_scale=1.0` gives the paper's formula.

  The authors' LayerNorm is `nn.LayerNorm(D)`, with learned elementwise scale and bias
  (initialised to 1 and 0): pass them as `ln_scale`/`ln_bias`; None means none.
  `layer_norm=False` leaves it out, v_j = Σ_i r_ij u_hat_j|i: the paper's ablation
  without Layer Normalization.

  One call routes one layer, as the authors' `sequential_routing=True`. The paper's
  concurrent routing updates all layers at once from the previous iteration's poses:
  after a first pass with num_iterations=1 per layer, call each layer with
  `parent_poses` = its parents' poses from the previous pass and num_iterations=1
  (the authors' `forward(capsule_values[i], n, capsule_values[i+1])`).

  Args:
    u_hat: [..., N_in, N_out, D] votes.
    num_iterations: static integer >= 1 (1: the uniform pass only).
    agreement_scale: multiplies the agreement; None: 1/sqrt(D) (the authors' code).
    layer_norm: normalise every pose (the paper); False: the ablation without it.
    ln_scale, ln_bias: optional [D] LayerNorm affine parameters (need layer_norm=True).
    parent_poses: optional [..., N_out, D] poses to start from instead of zero: the
      first pass then computes its routing weights from their agreement with u_hat, so
      `inverted_dot_product(u, r + 1)` equals
      `inverted_dot_product(u, 1, parent_poses=inverted_dot_product(u, r).poses)`.
    stop_gradient: compute the agreements that set the routing weights from
      stop-gradiented votes and poses (see the module docstring), so the weights are
      constants: ln_scale, ln_bias and parent_poses then get gradients only through the
      last pass. No effect for one pass from zero parents.
    eps: the LayerNorm's epsilon (PyTorch's default).

  Returns:
    Routed: poses v [..., N_out, D]; activations [..., N_out] the share of the inputs'
    routing mass each parent receives, Σ_i r_ij / N_in (in (0, 1), summing to 1 over the
    parents; the paper has no activation, and its authors classify with a linear layer
    on the poses); assignments r [..., N_in, N_out], softmax over the parents.
  """
  num_iterations = check_iterations(num_iterations)
  u, out_dtype = _prepare(u_hat, "inverted dot-product routing")  # [..., N_in, N_out, D]
  dt = u.dtype
  d = u.shape[-1]
  scale = 1.0 / math.sqrt(d) if agreement_scale is None else agreement_scale
  ln_scale = None if ln_scale is None else jnp.asarray(ln_scale).astype(dt)
  ln_bias = None if ln_bias is None else jnp.asarray(ln_bias).astype(dt)
  for arg, x in (("ln_scale", ln_scale), ("ln_bias", ln_bias)):
    if x is None:
      continue
    if not layer_norm:
      raise ValueError(f"{arg} is the LayerNorm's parameter: it needs layer_norm=True")
    _check_broadcast(arg, x, (d,), "[D]")
  if layer_norm:
    norm = lambda s: _layer_norm(s, scale=ln_scale, bias=ln_bias, eps=eps)
  else:
    norm = lambda s: s
  ut = jnp.swapaxes(u, -3, -2)  # [..., N_out, N_in, D]
  # With stop_gradient both inputs of the agreement are stopped, so the weights are
  # constants and every pose's gradient flows only through its own weighted sum.
  stop = _stopper(stop_gradient)
  weights = lambda v: jax.nn.softmax(scale * _agreement(stop(ut), stop(v)), axis=-2)

  def body(_, carry):
    v, _ = carry
    r = weights(v)  # [..., N_out, N_in]
    return norm(_weighted_sum(r, ut)), r

  if parent_poses is None:
    r0 = jnp.full_like(ut[..., 0], 1.0 / u.shape[-2])  # [..., N_out, N_in]
  else:
    p = jnp.asarray(parent_poses).astype(dt)
    _check_broadcast("parent_poses", p, u.shape[:-3] + u.shape[-2:], "[..., N_out, D]")
    r0 = weights(p)  # [..., N_out, N_in]
  v0 = norm(_weighted_sum(r0, ut))  # [..., N_out, D]
  v, r = jax.lax.fori_loop(0, num_iterations - 1, body, (v0, r0))
  return Routed(
    poses=v.astype(out_dtype),
    activations=jnp.mean(r, axis=-1).astype(out_dtype),
    assignments=jnp.swapaxes(r, -1, -2).astype(out_dtype),
  )


# ----------------------------------------------------------------------------------------
# Self-attention routing (Mazzia, Salvetti & Chiaberge 2021, Efficient-CapsNet)
# ----------------------------------------------------------------------------------------


def efficient_squash(s: jax.Array, *, axis: int = -1, eps: float = 1e-7) -> jax.Array:
  """Efficient-CapsNet's squash: v = (1 - 1/exp(|s|)) s/|s|.

  As `caps_ops.squash`, |s| is sqrt(|s|^2 + eps) (finite value and gradient at 0, where
  v ≈ s), computed on s divided by a stop-gradiented max(1, max_i |s_i|) so that |s|^2
  cannot overflow. (1 - 1/exp(|s|)) is written as -expm1(-|s|), exact for small |s|.

  Args:
    s: [..., D, ...] pre-activation capsules; `axis` is the pose axis.

  Returns:
    v: same shape and dtype as s, |v| < 1 along `axis`.
  """
  s = jnp.asarray(s)
  t, m, k2 = caps_ops.rescale_capsules(s, axis=axis, name="efficient_squash")  # t = s/m
  n_t = jnp.sqrt(jnp.sum(jnp.square(t), axis=axis, keepdims=True) + eps * k2)  # |s|/m
  v = -jnp.expm1(-(n_t * m)) * t / n_t  # [..., D, ...]
  return v.astype(s.dtype)


def self_attention(
  u_hat: jax.Array,
  num_iterations: int = 1,
  *,
  log_prior: jax.Array | None = None,
  stop_gradient: bool = False,
  eps: float = 1e-7,
) -> Routed:
  """Self-attention routing of Mazzia, Salvetti & Chiaberge, "Efficient-CapsNet: Capsule
  Network with Self-Attention Routing", Scientific Reports 2021.

  For every parent j, with U_j = [u_hat_j|1; ...; u_hat_j|N_in] ([N_in, D]):
    A_j = U_j U_j^T / sqrt(D)                       ([N_in, N_in] self-attention)
    C_ij = softmax over the parents j of Σ_k A_j[i, k]
    s_j = Σ_i u_hat_j|i (C_ij + B_ij)
    v_j = (1 - 1/exp(|s_j|)) s_j / |s_j|           (`efficient_squash`)
  with B the learned log prior (zeros at initialisation, added after the softmax). As in
  the authors' code (EscVM/Efficient-CapsNet, `utils/layers.py`, `FCCaps.call`:
  `c = einsum('...ij,...kj->...i', u, u) / sqrt(D)`, `softmax(c, axis=1)` over the
  parents, `c + self.b`, `Squash`). Σ_k A_j[i, k] = <u_hat_j|i, Σ_k u_hat_j|k> / sqrt(D)
  is computed without forming A (O(N_in D) per parent instead of O(N_in² D)).

  The routing is one pass: the weights come from the votes' agreement with each other,
  not with a parent estimate, so there is nothing to iterate. `num_iterations` is
  validated (a static integer >= 1, so that one config field can drive every routing) and
  otherwise ignored: every valid value gives the same result.

  Args:
    u_hat: [..., N_in, N_out, D] votes.
    num_iterations: static integer >= 1, ignored (see above).
    log_prior: optional B, broadcastable to [..., N_in, N_out]; None: zeros.
    stop_gradient: compute C from stop-gradiented votes (see the module docstring);
      log_prior, added after, keeps its gradient.
    eps: under the square root of the squash and of the lengths.

  Returns:
    Routed: poses v [..., N_out, D]; activations [..., N_out] the lengths
    sqrt(|v|^2 + eps) (what the paper classifies with); assignments C [..., N_in, N_out],
    softmax over the parents (without B).
  """
  check_iterations(num_iterations)
  u, out_dtype = _prepare(u_hat, "self-attention routing")  # [..., N_in, N_out, D]
  ut = jnp.swapaxes(u, -3, -2)  # [..., N_out, N_in, D]
  ut_w = _stopper(stop_gradient)(ut)  # the votes C is computed from
  logits = _agreement(ut_w, jnp.sum(ut_w, axis=-2)) / math.sqrt(u.shape[-1])  # [..., N_out, N_in]
  c = jax.nn.softmax(logits, axis=-2)  # [..., N_out, N_in]
  w = c
  if log_prior is not None:
    b = jnp.asarray(log_prior).astype(u.dtype)
    _check_broadcast("log_prior", b, u.shape[:-1], "[..., N_in, N_out]")
    w = c + jnp.swapaxes(jnp.broadcast_to(b, u.shape[:-1]), -1, -2)  # [..., N_out, N_in]
  v = efficient_squash(_weighted_sum(w, ut), eps=eps)  # [..., N_out, D]
  return Routed(
    poses=v.astype(out_dtype),
    activations=caps_ops.capsule_lengths(v, eps=eps).astype(out_dtype),
    assignments=jnp.swapaxes(c, -1, -2).astype(out_dtype),
  )


# ----------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------

RoutingFn = Callable[..., Routed]

# Read-only, so no caller can change what `get` returns for everyone else.
ROUTINGS: types.MappingProxyType[str, RoutingFn] = types.MappingProxyType(
  {
    "dynamic": dynamic,
    "em": em,
    "inverted_dot_product": inverted_dot_product,
    "self_attention": self_attention,
  }
)


def get(name: str) -> RoutingFn:
  """The routing function registered as `name` in `ROUTINGS`.

  Raises:
    ValueError: naming `name` and the valid names, if `name` is not registered.
  """
  try:
    return ROUTINGS[name]
  except (KeyError, TypeError):
    raise ValueError(
      f"unknown routing {name!r}; valid routings: {', '.join(map(repr, ROUTINGS))}"
    ) from None
