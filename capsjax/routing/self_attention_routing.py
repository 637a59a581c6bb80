"""Self-attention routing (Mazzia, Salvetti & Chiaberge 2021, Efficient-CapsNet)."""

from __future__ import annotations

import math

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
  u, out_dtype = prepare(u_hat, "self-attention routing")  # [..., N_in, N_out, D]
  ut = jnp.swapaxes(u, -3, -2)  # [..., N_out, N_in, D]
  ut_w = stopper(stop_gradient)(ut)  # the votes C is computed from
  logits = agreement(ut_w, jnp.sum(ut_w, axis=-2)) / math.sqrt(u.shape[-1])  # [..., N_out, N_in]
  c = jax.nn.softmax(logits, axis=-2)  # [..., N_out, N_in]
  w = c
  if log_prior is not None:
    b = jnp.asarray(log_prior).astype(u.dtype)
    check_broadcast("log_prior", b, u.shape[:-1], "[..., N_in, N_out]")
    w = c + jnp.swapaxes(jnp.broadcast_to(b, u.shape[:-1]), -1, -2)  # [..., N_out, N_in]
  v = efficient_squash(weighted_sum(w, ut), eps=eps)  # [..., N_out, D]
  return Routed(
    poses=v.astype(out_dtype),
    activations=caps_ops.capsule_lengths(v, eps=eps).astype(out_dtype),
    assignments=jnp.swapaxes(c, -1, -2).astype(out_dtype),
  )
