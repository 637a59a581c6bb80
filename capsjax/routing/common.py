"""What every routing algorithm shares: the `Routed` result, checks of the inputs and the
two contractions (weighted sum of votes, agreement of votes with parents)."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from capsjax import caps_ops

HI = jax.lax.Precision.HIGHEST


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


def prepare(u_hat, name: str):
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


def check_broadcast(name: str, x: jax.Array, target: tuple[int, ...], what: str):
  try:
    ok = jnp.broadcast_shapes(x.shape, target) == target
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(f"{name} of shape {x.shape} does not broadcast to {what} = {target}")


def weighted_sum(c, ut):
  """c [..., N_out, N_in], ut [..., N_out, N_in, D] -> sum_n c ut: [..., N_out, D]."""
  return jnp.einsum("...mn,...mno->...mo", c, ut, precision=HI)


def agreement(ut, v):
  """ut [..., N_out, N_in, D], v [..., N_out, D] -> <ut, v>: [..., N_out, N_in]."""
  return jnp.einsum("...mno,...mo->...mn", ut, v, precision=HI)


def stopper(stop_gradient: bool) -> Callable[[jax.Array], jax.Array]:
  """What the routing weights' inputs go through: `lax.stop_gradient` or nothing."""
  return jax.lax.stop_gradient if stop_gradient else lambda x: x
