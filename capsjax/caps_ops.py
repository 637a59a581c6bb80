"""Pure capsule operations: `squash` and dynamic routing (Sabour et al. 2017).

No Flax, no config: arrays in, arrays out, keyword-only hyperparameters. Everything here
is shape-polymorphic over leading batch dimensions and safe under `jit`, `vmap` and
`grad`.

Shape legend (STYLE.md): N_in input capsules, N_out output capsules (parents),
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


def _compute_dtype(dtype) -> jnp.dtype:
  """float32 for narrower floats, the dtype itself for float32/float64."""
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
  if not jnp.issubdtype(s.dtype, jnp.floating):
    raise TypeError(f"squash expects a floating-point array, got dtype {s.dtype}")
  x = s.astype(_compute_dtype(s.dtype))
  # The rescale only guards against overflow of |s|^2; treating it as a constant gives
  # the exact gradient because v(s) does not depend on it.
  scale = jax.lax.stop_gradient(
      jnp.maximum(jnp.max(jnp.abs(x), axis=axis, keepdims=True), 1.0))   # [..., 1, ...]
  # Divide by `scale` as two multiplications by 1/sqrt(scale). XLA rewrites `x / scale`
  # into `x * (1 / scale)`, and 1/scale is subnormal (flushed to 0) for |s| >= ~1e38 in
  # float32, which turned v into 0/0 = NaN; 1/sqrt(scale) stays a normal number.
  r = jax.lax.rsqrt(scale)                                             # [..., 1, ...]
  k = r * r                                                            # [..., 1, ...], ~1/scale
  inv_sq = jnp.square(k)                                               # [..., 1, ...]
  t = (x * r) * r                                                      # [..., D, ...]
  sq = jnp.sum(jnp.square(t), axis=axis, keepdims=True)                # [..., 1, ...]
  # |s|^2/(1+|s|^2) / |s| written in the rescaled t = s*k (exactly invariant to k).
  v = t * sq / ((inv_sq + sq) * jnp.sqrt(sq + eps * inv_sq))           # [..., D, ...]
  return v.astype(s.dtype)


def capsule_lengths(v: jax.Array, *, axis: int = -1, eps: float = 1e-7) -> jax.Array:
  """Capsule lengths sqrt(|v|^2 + eps) with a finite gradient at v = 0.

  Args:
    v: [..., D] capsules (pose along `axis`).

  Returns:
    [...] lengths, in float32 (or float64 for float64 input).
  """
  x = jnp.asarray(v)
  x = x.astype(_compute_dtype(x.dtype))
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=axis) + eps)


class RoutingResult(NamedTuple):
  """Output of `dynamic_routing(..., return_couplings=True)`.

  v: [..., N_out, D] output capsules.
  c: [..., N_in, N_out] coupling coefficients of the last iteration (sum to 1 over N_out).
  """
  v: jax.Array
  c: jax.Array


def _check_iterations(num_iterations) -> int:
  if isinstance(num_iterations, bool) or not isinstance(num_iterations, int):
    # A traced or float value would silently recompile or fail deep inside fori_loop.
    raise TypeError(
        "num_iterations must be a static Python int >= 1, got "
        f"{num_iterations!r} of type {type(num_iterations).__name__}")
  if num_iterations < 1:
    raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
  return num_iterations


def dynamic_routing(u_hat: jax.Array, num_iterations: int, *,
                    stop_gradient: bool = False,
                    return_couplings: bool = False):
  """Routing-by-agreement, Procedure 1 of Sabour, Frosst & Hinton (2017).

  For every example the logits start at b = 0, then for each iteration:
  c = softmax(b) over the parents (N_out axis), s_j = sum_i c_ij u_hat_j|i,
  v_j = squash(s_j), and (except after the last iteration) b_ij += <u_hat_j|i, v_j>.
  Iterations run in a `lax.fori_loop`, so the traced program has the same size for any
  iteration count.

  Args:
    u_hat: [..., N_in, N_out, D] predictions of each input capsule for each parent;
      any number of leading batch dimensions.
    num_iterations: static Python int >= 1 (changing it recompiles).
    stop_gradient: if False (the authors' code), gradients flow through every
      iteration. If True, `u_hat` is stop-gradiented in all iterations but the last,
      the variant most re-implementations use.
    return_couplings: also return the last iteration's coupling coefficients.

  Returns:
    v: [..., N_out, D] output capsules, dtype of `u_hat`; or, with
    `return_couplings=True`, a `RoutingResult(v, c)` with c: [..., N_in, N_out].
  """
  num_iterations = _check_iterations(num_iterations)
  u_hat = jnp.asarray(u_hat)
  if not jnp.issubdtype(u_hat.dtype, jnp.floating):
    # The output is cast back to the input dtype, and |v| < 1 would truncate to 0.
    raise TypeError(
        f"dynamic_routing expects a floating-point u_hat, got dtype {u_hat.dtype}")
  if u_hat.ndim < 3:
    raise ValueError(
        "u_hat must have shape [..., N_in, N_out, D] (at least 3 dims), got shape "
        f"{u_hat.shape}")
  out_dtype = u_hat.dtype
  u = u_hat.astype(_compute_dtype(out_dtype))                          # [..., N_in, N_out, D]
  n_out = u.shape[-2]

  if num_iterations == 1:
    # b = 0, so c = softmax(0) = 1/N_out exactly: no softmax, no agreement.
    c = jnp.full_like(u[..., 0], 1.0 / n_out)                          # [..., N_in, N_out]
    v = squash(jnp.sum(u, axis=-3) / n_out)                            # [..., N_out, D]
  else:
    # Route in the [..., N_out, N_in, D] layout, transposed once outside the loop: both
    # contractions are then batched mat-vecs with leading batch axes, which XLA runs
    # ~10x faster on CPU than the same einsums on [..., N_in, N_out, D] (those transpose
    # or reduce over strided axes in every iteration). HIGHEST precision keeps float32
    # routing exact on GPU/TPU (no TF32/bf16 passes).
    ut = jnp.swapaxes(u, -3, -2)                                       # [..., N_out, N_in, D]
    ut_inner = jax.lax.stop_gradient(ut) if stop_gradient else ut
    hi = jax.lax.Precision.HIGHEST

    def route(b, preds):
      c = jax.nn.softmax(b, axis=-2)                                   # [..., N_out, N_in]
      s = jnp.einsum('...mn,...mno->...mo', c, preds, precision=hi)    # [..., N_out, D]
      return c, squash(s)                                              # [..., N_out, D]

    def body(_, b):
      _, v = route(b, ut_inner)
      return b + jnp.einsum('...mno,...mo->...mn', ut_inner, v,
                            precision=hi)                              # [..., N_out, N_in]

    # zeros_like keeps the batch sharding of u_hat under an Explicit mesh (STYLE.md 4.3).
    b0 = jnp.zeros_like(ut[..., 0])                                    # [..., N_out, N_in]
    b = jax.lax.fori_loop(0, num_iterations - 1, body, b0)
    c_t, v = route(b, ut)
    c = jnp.swapaxes(c_t, -1, -2)                                      # [..., N_in, N_out]
  v = v.astype(out_dtype)
  if return_couplings:
    return RoutingResult(v=v, c=c.astype(out_dtype))
  return v
