"""Pure capsule operations: `squash`, capsule lengths, and dynamic routing's public API.

No Flax, no config: arrays in, arrays out, keyword-only hyperparameters. Everything here
is shape-polymorphic over leading batch dimensions and safe under `jit`, `vmap` and
`grad`.

`dynamic_routing` and `predict_and_route` (Sabour et al. 2017) are the documented entry
points with their `v` / `RoutingResult(v, c)` results; the algorithm itself lives in
`capsjax.routing` (`routing.dynamic`, `routing.predict_and_route`) beside the other
routings, under their common `Routed` contract. `capsjax.routing` builds on this module's
squash, so the wrappers import it when called: neither module imports the other while it
loads.

Shape legend: N_in input capsules, N_out output capsules (parents),
D capsule pose size. `u_hat` predictions, `b` routing logits, `c` coupling
coefficients, `s` pre-squash sums, `v` output capsules.

Low-precision inputs (bfloat16, float16) are computed in float32 internally and the
result is cast back, because the squash ratio and the routing softmax lose most of their
bits in bfloat16; float64 stays float64.
"""

from __future__ import annotations

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
  would make v 0/0 = NaN; 1/sqrt(m) stays a normal number.

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
  """`routing.check_iterations`: `num_iterations` as a Python int if it is a static
  integer >= 1 (Python or NumPy int); TypeError or ValueError otherwise."""
  from capsjax import routing  # pylint: disable=g-import-not-at-top

  return routing.check_iterations(num_iterations)


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
  (reverse-mode only) gradient. `routing.dynamic` is the same routing returning
  `routing.Routed` (with the capsule lengths, and a squash `eps` keyword).

  Args:
    u_hat: [..., N_in, N_out, D] predictions of each input capsule for each parent;
      any number of leading batch dimensions.
    num_iterations: static integer >= 1 (changing it recompiles).
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
  from capsjax import routing  # pylint: disable=g-import-not-at-top

  r = routing.dynamic(u_hat, num_iterations, stop_gradient=stop_gradient, bias=bias)
  return RoutingResult(v=r.poses, c=r.assignments) if return_couplings else r.poses


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
  gradients, to float rounding), computed by `routing.predict_and_route`: the votes are
  never formed in that layout, and the gradient is hand-written (reverse mode only).

  Args:
    u: [B, N_in, D_in] input capsules (float32 or float64).
    w: [N_in, N_out, D_in, D_out] transformation matrices, same dtype as u.
    num_iterations, stop_gradient, return_couplings: as in `dynamic_routing`.

  Returns:
    v: [B, N_out, D_out]; or `RoutingResult(v, c)` with c: [B, N_in, N_out].
  """
  from capsjax import routing  # pylint: disable=g-import-not-at-top

  r = routing.predict_and_route(u, w, num_iterations, stop_gradient=stop_gradient)
  return RoutingResult(v=r.poses, c=r.assignments) if return_couplings else r.poses
