"""The only mesh- and sharding-aware module: the data-parallel mesh, state replication,
batch sharding. (Host runtime settings, XLA flags and malloc, are `capsjax.run.cpu_runtime`'s.)

capsjax writes the pmap model (batch split over devices, parameters replicated,
gradients averaged) as a plain `jax.jit` over a 1-D ('data',) mesh: the state is placed
with `NamedSharding(mesh, P())`, batches with `P('data')`, the jitted step's outputs are
pinned to `P()` (`jit_data_parallel`), and the compiler inserts the gradient all-reduce.
There are no hand-written collectives, so the `shard_map` + `pmean(grads)` trap (with
shard_map's default check_vma, gradients of replicated parameters already come back
summed, so a pmean of them gives N x the gradient) cannot occur.

The mesh axis is `AxisType.Auto`, not the Explicit axes `jax.make_mesh` defaults to: the
compiler propagates the batch sharding through every reshape of a batch-sharded array
(PrimaryCaps' [B, H, W, C] -> [B, N_in, D_in], the conv lowerings' patches and tiles, the
decoder's flatten), so the model, `capsjax.conv`, `capsjax.caps_ops` and research code
built on them carry no shardings. (Under Explicit axes each such reshape, and each
contraction over the batch axis, would need an `out_sharding`.)
"""

from __future__ import annotations

import collections
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


LOOPS = ("auto", "step", "scan")


def resolve_loop(loop: str) -> str:
  """Maps `config.loop` to the training loop this backend runs: 'step' or 'scan'.

  'auto' is 'scan' on accelerators, whose steps are short enough for the host's work
  per step (dispatch, cutting batches) to matter, and 'step' on CPU, where a step takes
  about a second and `benchmarks/epoch_loop.py` measured the two loops equal within noise.
  Starts the backends (asks for the default one).
  """
  if loop not in LOOPS:
    raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
  if loop != "auto":
    return loop
  return "step" if jax.default_backend() == "cpu" else "scan"


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over the first `num_devices` devices (default: all).

  Covers the devices of every process when running under `jax.distributed`.
  """
  devices = jax.devices()
  n = len(devices) if num_devices is None else int(num_devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f"num_devices must be in [1, {len(devices)}], got {num_devices}")
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def num_devices(mesh: jax.sharding.Mesh) -> int:
  """The number of devices of `mesh` (over every process)."""
  return int(mesh.devices.size)


def check_batch_size(
  batch_size: int, devices: jax.sharding.Mesh | int, *, name: str = "batch_size"
) -> None:
  """Raises ValueError unless `batch_size` splits evenly over `devices` (a mesh or a count)."""
  n = devices if isinstance(devices, int) else num_devices(devices)
  if batch_size <= 0 or batch_size % n:
    raise ValueError(
      f"{name}={batch_size} must be a positive multiple of the number of devices ({n}); "
      f"try {name}={max(n, batch_size // n * n)}"
    )


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """`P()`: every device of `mesh` holds the whole array (parameters, optimizer state)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """`P('data')`: an array [B, ...] split along B over the devices of `mesh`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places every array of `tree` on every device of `mesh` (parameters, optimizer state)."""
  return jax.device_put(tree, replicated(mesh))


def process_rows(global_rows: int, mesh: jax.sharding.Mesh) -> slice:
  """The rows of a global batch that this process's devices hold under `P('data')`.

  Every process builds the same global batch on the host (same seed, epoch and step)
  and feeds only these rows. With one process this is every row.
  """
  check_batch_size(global_rows, mesh, name="global batch size")
  if jax.process_count() == 1:
    return slice(0, global_rows)
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_rows,))
  rows = sorted({(idx[0].start or 0, idx[0].stop) for idx in index_map.values()})
  lo, hi = rows[0][0], rows[-1][1]
  if sum(b - a for a, b in rows) != hi - lo:
    raise ValueError(
      f"this process's devices hold non-contiguous rows {rows} of the batch; "
      "order the mesh devices by process"
    )
  return slice(lo, hi)


def shard_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Places a global host batch on the mesh, split along its leading axis.

  Every process passes the same global batch; under `jax.distributed` each one
  transfers only its own rows (`process_rows`) to its own devices and
  `jax.make_array_from_process_local_data` assembles the global array.
  """
  sharding = batch_sharding(mesh)
  for k, x in batch.items():
    check_batch_size(x.shape[0], mesh, name=f"batch['{k}'] leading size")
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  out = {}
  for k, x in batch.items():
    rows = process_rows(x.shape[0], mesh)
    out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(x[rows]), x.shape)
  return out


def to_mesh(x: np.ndarray, mesh: jax.sharding.Mesh, spec: P | None = None) -> jax.Array:
  """A host array that every process holds whole, placed on `mesh` as `spec` says
  (default `P()`: replicated).

  Each process copies only the slices its own devices hold, so this also serves
  `jax.distributed` runs (where `jax.device_put` of a host array to other processes'
  devices is not possible).
  """
  x = np.asarray(x)
  spec = P() if spec is None else spec
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])


def put_dataset(
  images: np.ndarray, labels: np.ndarray, mesh: jax.sharding.Mesh
) -> dict[str, jax.Array]:
  """The uint8 training set on every device of `mesh`, for the scanned loop.

  Replicated, not split: a batch is a random draw from the whole set, so with the set
  split over devices every step would need a collective to fetch its rows, while a copy
  per device keeps the gather local. Fashion-MNIST's 60k images are 47 MB of uint8.

  Args:
    images: uint8 [N, H, W, C].
    labels: int [N].

  Returns:
    {'image': uint8 [N, H, W, C], 'label': int32 [N]}, replicated.
  """
  return {"image": to_mesh(images, mesh), "label": to_mesh(labels.astype(np.int32), mesh)}


def put_batch_indices(indices: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
  """int [S, B] example indices of an epoch's batches, split along B like the batches.

  Each device then holds the indices of exactly the rows it trains on.
  """
  return to_mesh(indices, mesh, P(None, DATA_AXIS))


def constrain_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """Inside `jit`: pins every [B, ...] array of `batch` to `P('data')`.

  A batch gathered on the device (the scanned loop) is then split exactly as one placed
  by `shard_batch`, and the step compiled the same way.
  """
  return jax.lax.with_sharding_constraint(batch, batch_sharding(mesh))


def jit_data_parallel(fn, mesh: jax.sharding.Mesh, *, donate_argnums=()):
  """`jax.jit(fn)` whose outputs (new state, metrics) are replicated over `mesh`.

  Inputs keep the shardings they were placed with (state by `replicate`, batches by
  `shard_batch`).
  """
  return jax.jit(fn, out_shardings=replicated(mesh), donate_argnums=donate_argnums)


def prefetch(batches, mesh: jax.sharding.Mesh, size: int = 2, *, shard=None):
  """Yields device batches, keeping `size` transfers in flight (double buffering).

  `jax.device_put` is asynchronous, so the next batch is copied while the current
  step runs. `shard(batch, mesh)` places each batch (default `shard_batch`).
  """
  shard = shard or shard_batch
  queue = collections.deque()
  for batch in batches:
    queue.append(shard(batch, mesh))
    if len(queue) >= size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


# ----------------------------------------------------------------------------------------
# Ensembles (`capsjax.ensemble`): arrays [K, B, ...] with a leading member axis.
# ----------------------------------------------------------------------------------------
def member_batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """`P(None, 'data')`: an array [K, B, ...] whole along the members K, split along B."""
  return NamedSharding(mesh, P(None, DATA_AXIS))


def shard_member_batch(
  batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh
) -> dict[str, jax.Array]:
  """Places a host batch [K, B, ...] of every member on the mesh, split along B.

  Every process passes the same global batch (as for `shard_batch`).
  """
  for k, x in batch.items():
    check_batch_size(x.shape[1], mesh, name=f"batch['{k}'] batch axis (axis 1) size")
  if jax.process_count() == 1:
    return jax.device_put(batch, member_batch_sharding(mesh))
  return {k: to_mesh(x, mesh, P(None, DATA_AXIS)) for k, x in batch.items()}


def put_member_batch_indices(indices: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
  """int [K, S, B] example indices of every member's epoch, split along B like the batches."""
  return to_mesh(indices, mesh, P(None, None, DATA_AXIS))


def constrain_member_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """Inside `jit`: pins every [K, B, ...] array of `batch` to `P(None, 'data')`."""
  return jax.lax.with_sharding_constraint(batch, member_batch_sharding(mesh))
