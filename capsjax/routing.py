"""A routing zoo with one contract: votes in, `Routed(poses, activations, assignments)` out.

Every algorithm here is a pure function

  fn(u_hat, num_iterations, **algorithm_kwargs) -> Routed

with u_hat [..., N_in, N_out, D] the votes (predictions) of every input capsule for every
parent, any number of leading batch dimensions, and `num_iterations` a static Python int
>= 1 (checked with `caps_ops.check_iterations`; changing it recompiles). The result is

  poses       [..., N_out, D]      the parents' pose vectors,
  activations [..., N_out]         one presence score per parent (see each function),
  assignments [..., N_in, N_out]   the last iteration's routing weights of each input.

`ROUTINGS` maps a name to each function and `get(name)` looks one up. Algorithm-specific
inputs (EM's input activations and betas, self-attention's log prior) are keyword
arguments with defaults, so `get(name)(u_hat, r)` works for every name.

Shape legend: N_in input capsules, N_out parents, D pose size. Einsum letters: n=N_in,
m=N_out, o=D. Internally the votes are transposed once to [..., N_out, N_in, D], where
both routing contractions are batched mat-vecs over leading axes (as in `caps_ops`).

dtypes: bfloat16/float16 votes are routed in float32 and the results cast back to the
input dtype (softmaxes, logs and normalisations lose most of their bits in bfloat16);
float32 and float64 stay as they are. Each function is safe under `jit`, `vmap` and
`grad` (forward and reverse mode); iterations run in a `lax.fori_loop`.

Why this long: four algorithms under one contract, each with its equations written out
in its docstring; one file keeps the contract and the registry next to what they cover.
"""

from __future__ import annotations

import math
import numbers
import types
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from capsjax import caps_ops

_HI = jax.lax.Precision.HIGHEST
# One rule for every routing in capsjax: bfloat16/float16 computed in float32.
_compute_dtype = caps_ops.compute_dtype


class Routed(NamedTuple):
  """The result of every routing algorithm in this module.

  poses: [..., N_out, D] parent poses, dtype of the votes.
  activations: [..., N_out] parent activations, dtype of the votes.
  assignments: [..., N_in, N_out] routing weights of the last iteration, dtype of the
    votes; for every algorithm here they sum to 1 over the parents (last axis).
  """

  poses: jax.Array
  activations: jax.Array
  assignments: jax.Array


def _prepare(u_hat, name: str):
  """Validates votes; returns (votes in the compute dtype, output dtype)."""
  u_hat = jnp.asarray(u_hat)
  if not jnp.issubdtype(u_hat.dtype, jnp.floating):
    raise TypeError(f"{name} expects floating-point votes u_hat, got dtype {u_hat.dtype}")
  if u_hat.ndim < 3:
    raise ValueError(
      f"{name}: u_hat must have shape [..., N_in, N_out, D] (at least 3 dims), got "
      f"shape {u_hat.shape}"
    )
  return u_hat.astype(_compute_dtype(u_hat.dtype)), u_hat.dtype


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


# ----------------------------------------------------------------------------------------
# Dynamic routing (Sabour, Frosst & Hinton 2017)
# ----------------------------------------------------------------------------------------


def dynamic(
  u_hat: jax.Array,
  num_iterations: int,
  *,
  stop_gradient: bool = False,
  bias: jax.Array | None = None,
) -> Routed:
  """Routing-by-agreement (Sabour et al. 2017, Procedure 1) under the common contract.

  A thin adapter over `caps_ops.dynamic_routing(..., return_couplings=True)`; see there
  for the equations, `stop_gradient` and `bias`.

  Args:
    u_hat: [..., N_in, N_out, D] votes.
    num_iterations: static Python int >= 1.
    stop_gradient: stop gradients through all iterations but the last.
    bias: optional s_j bias broadcastable to [..., N_out, D] (the authors' code).

  Returns:
    Routed: poses v [..., N_out, D] (squashed, |v| < 1); activations [..., N_out] the
    capsule lengths sqrt(|v|^2 + 1e-7) (`caps_ops.capsule_lengths`), in [0, 1) up to
    that epsilon; assignments c [..., N_in, N_out], softmax over the parents.
  """
  res = caps_ops.dynamic_routing(
    u_hat, num_iterations, stop_gradient=stop_gradient, bias=bias, return_couplings=True
  )
  lengths = caps_ops.capsule_lengths(res.v).astype(res.v.dtype)  # [..., N_out]
  return Routed(poses=res.v, activations=lengths, assignments=res.c)


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
  num_iterations = caps_ops.check_iterations(num_iterations)
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
  whose votes agree exactly (σ² = 0). Gradients flow through every iteration, as the
  authors answered on OpenReview ("We do not use stop gradient").

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
    num_iterations: static Python int >= 1, the number of M-steps (the paper uses 3).
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
    eps: see above.

  Returns:
    Routed: poses μ [..., N_out, D]; activations a_j [..., N_out] in (0, 1);
    assignments R [..., N_in, N_out] used by the last M-step (before the multiplication
    by a_in), summing to 1 over the parents (with the default `normalise`).
  """
  num_iterations = caps_ops.check_iterations(num_iterations)
  u, out_dtype = _prepare(u_hat, "em")  # [..., N_in, N_out, D]
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
  a_t = a[..., None, :]  # [..., 1, N_in]
  bu = beta_u[..., None] if beta_u.ndim else beta_u  # [N_out, 1] or []

  def m_step(r, lam_t):
    rp = r * a_t  # [..., N_out, N_in]
    r_sum = jnp.sum(rp, axis=-1)  # [..., N_out]
    coeff = rp / (r_sum[..., None] + eps)  # [..., N_out, N_in]
    mu = _weighted_sum(coeff, ut)  # [..., N_out, D]
    var = _weighted_sum(coeff, jnp.square(ut - mu[..., None, :])) + eps  # [..., N_out, D]
    cost = (bu + 0.5 * jnp.log(var)) * (cost_scale * r_sum[..., None])  # [..., N_out, D]
    logit = lam_t * (beta_a - jnp.sum(cost, axis=-1))  # [..., N_out]
    return mu, var, logit

  def e_step(mu, var, logit):
    log_p = -0.5 * jnp.sum(
      jnp.square(ut - mu[..., None, :]) / var[..., None, :]
      + jnp.log(2 * math.pi * var[..., None, :]),
      axis=-1,
    )  # [..., N_out, N_in]
    log_num = jax.nn.log_sigmoid(logit)[..., None] + log_p  # [..., N_out, N_in]
    if normalise is None:
      return jax.nn.softmax(log_num, axis=-2)
    return jnp.swapaxes(normalise(jnp.swapaxes(log_num, -1, -2)), -1, -2).astype(dt)

  def body(t, r):
    return e_step(*m_step(r, lam[t]))

  if initial_assignments is None:
    r0 = jnp.full_like(ut[..., 0], 1.0 / n_out)  # [..., N_out, N_in]
  else:
    r0 = jnp.swapaxes(
      jnp.broadcast_to(jnp.asarray(initial_assignments, dt), u.shape[:-1]), -1, -2
    )  # [..., N_out, N_in]
  r = jax.lax.fori_loop(0, num_iterations - 1, body, r0)
  mu, _, logit = m_step(r, lam[num_iterations - 1])
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


def inverted_dot_product(
  u_hat: jax.Array,
  num_iterations: int,
  *,
  agreement_scale: float | None = None,
  ln_scale: jax.Array | None = None,
  ln_bias: jax.Array | None = None,
  ln_eps: float = 1e-5,
  parent_poses: jax.Array | None = None,
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

  One call routes one layer, as the authors' `sequential_routing=True`. The paper's
  concurrent routing updates all layers at once from the previous iteration's poses:
  after a first pass with num_iterations=1 per layer, call each layer with
  `parent_poses` = its parents' poses from the previous pass and num_iterations=1
  (the authors' `forward(capsule_values[i], n, capsule_values[i+1])`).

  Args:
    u_hat: [..., N_in, N_out, D] votes.
    num_iterations: static Python int >= 1 (1: the uniform pass only).
    agreement_scale: multiplies the agreement; None: 1/sqrt(D) (the authors' code).
    ln_scale, ln_bias: optional [D] LayerNorm affine parameters.
    ln_eps: LayerNorm epsilon (PyTorch's default).
    parent_poses: optional [..., N_out, D] poses to start from instead of zero: the
      first pass then computes its routing weights from their agreement with u_hat, so
      `inverted_dot_product(u, r + 1)` equals
      `inverted_dot_product(u, 1, parent_poses=inverted_dot_product(u, r).poses)`.

  Returns:
    Routed: poses v [..., N_out, D]; activations [..., N_out] the mean routing weight
    each parent receives, Σ_i r_ij / N_in (in (0, 1), summing to 1 over the parents; the
    paper has no activation, and its authors classify with a linear layer on the
    poses); assignments r [..., N_in, N_out], softmax over the parents.
  """
  num_iterations = caps_ops.check_iterations(num_iterations)
  u, out_dtype = _prepare(u_hat, "inverted_dot_product")  # [..., N_in, N_out, D]
  dt = u.dtype
  d = u.shape[-1]
  scale = 1.0 / math.sqrt(d) if agreement_scale is None else agreement_scale
  ln_scale = None if ln_scale is None else jnp.asarray(ln_scale).astype(dt)
  ln_bias = None if ln_bias is None else jnp.asarray(ln_bias).astype(dt)
  for arg, x in (("ln_scale", ln_scale), ("ln_bias", ln_bias)):
    if x is not None:
      _check_broadcast(arg, x, (d,), "[D]")
  norm = lambda s: layer_norm(s, scale=ln_scale, bias=ln_bias, eps=ln_eps)
  ut = jnp.swapaxes(u, -3, -2)  # [..., N_out, N_in, D]

  def body(_, carry):
    v, _ = carry
    r = jax.nn.softmax(scale * _agreement(ut, v), axis=-2)  # [..., N_out, N_in]
    return norm(_weighted_sum(r, ut)), r

  if parent_poses is None:
    r0 = jnp.full_like(ut[..., 0], 1.0 / u.shape[-2])  # [..., N_out, N_in]
  else:
    p = jnp.asarray(parent_poses).astype(dt)
    _check_broadcast("parent_poses", p, u.shape[:-3] + u.shape[-2:], "[..., N_out, D]")
    r0 = jax.nn.softmax(scale * _agreement(ut, p), axis=-2)  # [..., N_out, N_in]
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

  Single pass: `num_iterations` is validated (a static int >= 1, so that one config
  field can drive every routing) and otherwise ignored; every valid value gives the
  same result.

  Args:
    u_hat: [..., N_in, N_out, D] votes.
    num_iterations: static Python int >= 1, ignored (see above).
    log_prior: optional B, broadcastable to [..., N_in, N_out]; None: zeros.
    eps: added to |s|^2 under the square root in the squash.

  Returns:
    Routed: poses v [..., N_out, D]; activations [..., N_out] the capsule lengths
    sqrt(|v|^2 + 1e-7), in [0, 1) up to that epsilon (what the paper classifies with);
    assignments C [..., N_in, N_out], softmax over the parents (without B).
  """
  caps_ops.check_iterations(num_iterations)
  u, out_dtype = _prepare(u_hat, "self_attention")  # [..., N_in, N_out, D]
  ut = jnp.swapaxes(u, -3, -2)  # [..., N_out, N_in, D]
  logits = _agreement(ut, jnp.sum(ut, axis=-2)) / math.sqrt(u.shape[-1])  # [..., N_out, N_in]
  c = jax.nn.softmax(logits, axis=-2)  # [..., N_out, N_in]
  w = c
  if log_prior is not None:
    b = jnp.asarray(log_prior).astype(u.dtype)
    _check_broadcast("log_prior", b, u.shape[:-1], "[..., N_in, N_out]")
    w = c + jnp.swapaxes(jnp.broadcast_to(b, u.shape[:-1]), -1, -2)  # [..., N_out, N_in]
  v = efficient_squash(_weighted_sum(w, ut), eps=eps)  # [..., N_out, D]
  return Routed(
    poses=v.astype(out_dtype),
    activations=caps_ops.capsule_lengths(v).astype(out_dtype),
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
