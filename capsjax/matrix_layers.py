"""Flax NNX layers of matrix capsules with EM routing (Hinton, Sabour & Frosst 2018).

A capsule is a 4x4 pose matrix M (flattened to 16 numbers) and an activation a. A layer
votes V_ij = M_i W_ij and routes the votes with `routing.em`. `MatrixConvCaps` shares W
over positions as a convolution shares its kernel (ConvCaps1/2); `MatrixClassCaps` shares
it over the whole grid (the class capsules, with coordinate addition).

Both layers draw W ~ N(0, 1), as yl-1993/Matrix-Capsules-EM-PyTorch (`torch.randn`,
model/capsules.py L93) and IBM/matrix-capsules-with-em-routing
(`truncated_normal(stddev=1.0)`, utils.py L143-147) do, and start beta_u, beta_a [T_out]
at 0 (yl-1993 capsules.py L87-88).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from capsjax import conv as conv_lib
from capsjax import routing as routing_lib


def capsule_patches(x: jax.Array, kernel: int, stride: int) -> jax.Array:
  """x [B, H, W, T, ...] -> [B, H', W', kernel * kernel * T, ...], the K x K receptive
  field of every output cell (VALID, H' = (H - K) // stride + 1), ordered (ky, kx, type)."""
  b, h, w = x.shape[:3]
  ho, wo = conv_lib.out_size(h, kernel, stride), conv_lib.out_size(w, kernel, stride)
  if min(ho, wo) < 1:
    raise ValueError(f"a {kernel}x{kernel} kernel does not fit the {h}x{w} capsule grid")
  taps = [
    x[:, ky : ky + stride * (ho - 1) + 1 : stride, kx : kx + stride * (wo - 1) + 1 : stride]
    for ky in range(kernel)
    for kx in range(kernel)
  ]  # each [B, H', W', T, ...]
  p = jnp.stack(taps, axis=3)  # [B, H', W', K*K, T, ...]
  return p.reshape(b, ho, wo, kernel * kernel * x.shape[3], *x.shape[4:])


def _child_ids(grid: tuple[int, int, int], kernel: int, stride: int) -> np.ndarray:
  """int [H' * W' * K*K*T]: the flat child index (y * W + x) * T + t of every patch entry."""
  h, w, t = grid
  ids = np.arange(h * w * t).reshape(h, w, t)
  ho, wo = conv_lib.out_size(h, kernel, stride), conv_lib.out_size(w, kernel, stride)
  # NumPy, not `capsule_patches`: these are constants even when the layer is traced.
  cells = [
    ids[y * stride + ky, x * stride + kx]  # [T]
    for y in range(ho)
    for x in range(wo)
    for ky in range(kernel)
    for kx in range(kernel)
  ]
  return np.concatenate(cells)


class _EMCaps(nnx.Module):
  """What both matrix-capsule layers hold: W [N_w, T_out, 4, 4] ~ N(0, 1), beta_u and
  beta_a [T_out] (zeros), and EM's iteration count and λ limit."""

  def __init__(
    self,
    num_w: int,
    out_types: int,
    *,
    routing_iterations: int,
    final_lambda: float,
    dtype,
    rngs: nnx.Rngs,
  ):
    routing_lib.check_iterations(routing_iterations)
    self.routing_iterations = routing_iterations
    self.final_lambda = float(final_lambda)
    self.dtype = jnp.dtype(dtype)
    self.w = nnx.Param(jax.random.normal(rngs.params(), (num_w, out_types, 4, 4), jnp.float32))
    self.beta_u = nnx.Param(jnp.zeros((out_types,)))
    self.beta_a = nnx.Param(jnp.zeros((out_types,)))

  def _transform(self, poses: jax.Array, spec: str) -> jax.Array:
    """poses [..., 16] -> votes [..., T_out, 16]: M W by the einsum `spec` over 4x4 matrices."""
    m = poses.reshape(*poses.shape[:-1], 4, 4).astype(self.dtype)  # [..., 4, 4]
    v = jnp.einsum(
      spec, m, self.w[...].astype(self.dtype), preferred_element_type=jnp.float32
    )  # [..., T_out, 4, 4]
    return v.reshape(*v.shape[:-2], 16)  # [..., T_out, 16]

  def _route(self, votes: jax.Array, a_in: jax.Array, **em_kwargs) -> routing_lib.Routed:
    """EM on votes [..., N, T_out, 16] with input activations a_in [..., N]."""
    return routing_lib.em(
      votes,
      self.routing_iterations,
      a_in=a_in,
      beta_u=self.beta_u[...],
      beta_a=self.beta_a[...],
      final_lambda=self.final_lambda,
      **em_kwargs,
    )


class MatrixConvCaps(_EMCaps):
  """A convolutional capsule layer of a matrix-capsule network (ConvCaps1/2 of Hinton et
  al. 2018), routed by EM.

  Every output cell sees the K x K x T_in capsules of its receptive field; capsule i at
  kernel offset (ky, kx) and type t votes V_ij = M_i W_(ky,kx,t),j for each output type
  j, with W [K*K*T_in, T_out, 4, 4] shared over positions. EM then routes the votes of
  every cell to its T_out parents. A child in the receptive fields of several cells has
  one vote per cell, and its assignments are normalised:
  - `per_cell=False` (the paper's): over every parent that sees it, in every cell: R_ij =
    a_j p_ij / sum over the cells c seeing i and their parents j' of a_j' p_ij', starting
    from 1 / (cells seeing i x T_out), as IBM/matrix-capsules-with-em-routing does
    (utils.py L516-523 and L236-237 at commit 2da9cdf);
  - `per_cell=True`: within each cell alone, as a separate routing problem, as
    yl-1993/Matrix-Capsules-EM-PyTorch (model/capsules.py L250-260, patches routed with
    the batch as B * H' * W') and www0wwwjs1/Matrix-Capsules-EM-Tensorflow
    (capsnet_em.py L201-213) do.
  """

  def __init__(
    self,
    in_types: int,
    out_types: int,
    *,
    kernel: int,
    stride: int,
    routing_iterations: int,
    final_lambda: float = 0.01,
    per_cell: bool = False,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    super().__init__(
      kernel * kernel * in_types,
      out_types,
      routing_iterations=routing_iterations,
      final_lambda=final_lambda,
      dtype=dtype,
      rngs=rngs,
    )
    self.kernel, self.stride = int(kernel), int(stride)
    self.per_cell = bool(per_cell)

  def votes(self, poses: jax.Array) -> jax.Array:
    """poses [B, H, W, T_in, 16] -> votes [B, H', W', K*K*T_in, T_out, 16]."""
    p = capsule_patches(poses, self.kernel, self.stride)  # [B, H', W', N, 16]
    return self._transform(p, "byxnik,nmko->byxnmio")  # [B, H', W', N, T_out, 16]

  def _shared_children(self, grid: tuple[int, int, int], out_types: int):
    """(normalise, initial R) of the paper's E-step over every parent of a child."""
    ids = _child_ids(grid, self.kernel, self.stride)  # [P]
    num_children = math.prod(grid)
    parents = np.bincount(ids, minlength=num_children)  # cells seeing each child
    seg = jnp.asarray(ids)

    def normalise(log_num):  # [B, H', W', N, T_out] -> R, same shape
      z = log_num.reshape(log_num.shape[0], -1, out_types)  # [B, P, T_out]
      # A per-child shift keeps exp() in range; it cancels in the ratio.
      top = jax.ops.segment_max(jnp.max(z, -1).T, seg, num_children)  # [children, B]
      e = jnp.exp(z - jax.lax.stop_gradient(top[seg].T)[..., None])  # [B, P, T_out]
      total = jax.ops.segment_sum(jnp.sum(e, -1).T, seg, num_children)  # [children, B]
      return (e / total[seg].T[..., None]).reshape(log_num.shape)

    ho, wo = (conv_lib.out_size(n, self.kernel, self.stride) for n in grid[:2])
    r0 = (1.0 / (parents[ids] * out_types)).reshape(ho, wo, -1, 1)
    return normalise, jnp.asarray(r0, jnp.float32)  # r0 [H', W', N, 1]

  def __call__(self, poses: jax.Array, a_in: jax.Array) -> tuple[jax.Array, jax.Array]:
    """poses [B, H, W, T_in, 16], a_in [B, H, W, T_in] -> (poses [B, H', W', T_out, 16],
    activations [B, H', W', T_out])."""
    v = self.votes(poses)
    normalise, r0 = (
      (None, None) if self.per_cell else self._shared_children(poses.shape[1:4], v.shape[-2])
    )
    r = self._route(
      v,
      capsule_patches(a_in, self.kernel, self.stride),
      normalise=normalise,
      initial_assignments=r0,
    )
    return r.poses, r.activations


class MatrixClassCaps(_EMCaps):
  """Class capsules of a matrix-capsule network, routed by EM (Hinton et al. 2018).

  Every input capsule i of type t at grid cell (y, x) holds a 4x4 pose matrix M_i; its
  vote for class j is V_ij = M_i W_tj, with one W_tj [4, 4] per (type, class) shared over
  the grid, as the paper's class-capsule layer shares transformation matrices between
  positions. With `coordinate_addition`, the cell's centre ((y + 0.5) / H, (x + 0.5) / W)
  is added to the first two elements of the vote's right-hand column (Sec. 3.1,
  "Coordinate Addition"): flattened indices 3 and 7. Then `routing.em` with learned
  beta_u, beta_a [N_out].
  """

  def __init__(
    self,
    types: int,
    num_out: int,
    *,
    routing_iterations: int,
    final_lambda: float = 0.01,
    coordinate_addition: bool = True,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    super().__init__(
      types,
      num_out,
      routing_iterations=routing_iterations,
      final_lambda=final_lambda,
      dtype=dtype,
      rngs=rngs,
    )
    self.coordinate_addition = coordinate_addition

  def votes(self, poses: jax.Array) -> jax.Array:
    """poses: [B, H, W, types, 16] -> votes [B, N_in, N_out, 16], N_in = H * W * types."""
    b, h, w, t, _ = poses.shape
    v = self._transform(poses, "byxtik,tmko->byxtmio")  # [B, H, W, T, N_out, 16]
    if self.coordinate_addition:
      rows = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h  # [H]
      cols = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w  # [W]
      coord = jnp.zeros((h, w, 16), jnp.float32)
      coord = coord.at[:, :, 3].set(rows[:, None]).at[:, :, 7].set(cols[None, :])
      v = v + coord[:, :, None, None, :]
    return v.reshape(b, h * w * t, v.shape[-2], 16)  # [B, N_in, N_out, 16]

  def __call__(self, poses: jax.Array, a_in: jax.Array) -> routing_lib.Routed:
    """poses [B, H, W, types, 16], a_in [B, H * W * types] -> routing.Routed of EM."""
    return self._route(self.votes(poses), a_in)
