"""Inverted dot-product attention routing (Tsai, Srivastava, Goh & Salakhutdinov 2020)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

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
  u, out_dtype = prepare(u_hat, "inverted dot-product routing")  # [..., N_in, N_out, D]
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
    check_broadcast(arg, x, (d,), "[D]")
  if layer_norm:

    def norm(s):
      return _layer_norm(s, scale=ln_scale, bias=ln_bias, eps=eps)
  else:

    def norm(s):
      return s

  ut = jnp.swapaxes(u, -3, -2)  # [..., N_out, N_in, D]
  # With stop_gradient both inputs of the agreement are stopped, so the weights are
  # constants and every pose's gradient flows only through its own weighted sum.
  stop = stopper(stop_gradient)

  def weights(v):
    return jax.nn.softmax(scale * agreement(stop(ut), stop(v)), axis=-2)

  def body(_, carry):
    v, _ = carry
    r = weights(v)  # [..., N_out, N_in]
    return norm(weighted_sum(r, ut)), r

  if parent_poses is None:
    r0 = jnp.full_like(ut[..., 0], 1.0 / u.shape[-2])  # [..., N_out, N_in]
  else:
    p = jnp.asarray(parent_poses).astype(dt)
    check_broadcast("parent_poses", p, u.shape[:-3] + u.shape[-2:], "[..., N_out, D]")
    r0 = weights(p)  # [..., N_out, N_in]
  v0 = norm(weighted_sum(r0, ut))  # [..., N_out, D]
  v, r = jax.lax.fori_loop(0, num_iterations - 1, body, (v0, r0))
  return Routed(
    poses=v.astype(out_dtype),
    activations=jnp.mean(r, axis=-1).astype(out_dtype),
    assignments=jnp.swapaxes(r, -1, -2).astype(out_dtype),
  )
