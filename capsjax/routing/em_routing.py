"""EM routing (Hinton, Sabour & Frosst 2018)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from capsjax.routing.common import (
  Routed,
  check_broadcast,
  check_iterations,
  prepare,
  stopper,
  weighted_sum,
)

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
  child's assignments over every parent that sees it (`capsjax.matrix_layers.MatrixConvCaps`).
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
  u, out_dtype = prepare(u_hat, "EM routing")  # [..., N_in, N_out, D]
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
    check_broadcast("a_in", a, u.shape[:-2], "[..., N_in]")
  beta_u = jnp.asarray(beta_u).astype(dt)
  beta_a = jnp.asarray(beta_a).astype(dt)
  for arg, x in (("beta_u", beta_u), ("beta_a", beta_a)):
    if x.shape not in ((), (n_out,)):
      raise ValueError(
        f"{arg} must be a scalar or have shape [N_out] = ({n_out},), got shape {x.shape}"
      )
  ut = jnp.swapaxes(u, -3, -2)  # [..., N_out, N_in, D]
  ut_w = stopper(stop_gradient)(ut)  # the votes the E-steps are computed from
  a_t = a[..., None, :]  # [..., 1, N_in]
  bu = beta_u[..., None] if beta_u.ndim else beta_u  # [N_out, 1] or []

  def m_step(r, lam_t, votes):
    rp = r * a_t  # [..., N_out, N_in]
    r_sum = jnp.sum(rp, axis=-1)  # [..., N_out]
    coeff = rp / (r_sum[..., None] + eps)  # [..., N_out, N_in]
    mu = weighted_sum(coeff, votes)  # [..., N_out, D]
    var = weighted_sum(coeff, jnp.square(votes - mu[..., None, :])) + eps  # [..., N_out, D]
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
