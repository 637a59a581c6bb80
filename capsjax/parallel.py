"""The only device-aware module: the data-parallel mesh, state replication, batch sharding.

capsjax writes the pmap model (batch split over devices, parameters replicated,
gradients averaged) as a plain `jax.jit` over a 1-D ('data',) mesh: the state is placed
with `NamedSharding(mesh, P())`, batches with `P('data')`, the jitted step's outputs are
pinned to `P()`, and the compiler inserts the gradient all-reduce. There are no
hand-written collectives, so the `shard_map` + `pmean(grads)` trap (with shard_map's
default check_vma, gradients of replicated parameters already come back summed, so a
pmean of them gives N x the gradient) cannot occur.

The mesh axis is `AxisType.Auto`, not the Explicit axes `jax.make_mesh` defaults to.
Under Explicit axes every reshape of a batch-sharded array (PrimaryCaps' [B, H, W, C] ->
[B, N_in, D_in], im2col patches, the decoder's flatten) must be given an `out_sharding`,
which would make the model, the conv lowerings and users' research code device-aware.
With Auto the compiler propagates the batch sharding through them unchanged.
"""

from __future__ import annotations

import collections
import os
import re
from typing import Any

from absl import logging

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# jaxlib 0.10's XLA:CPU hands convolutions to the YNNPACK library by default, whose kernel
# for CapsNet's strided 9x9 PrimaryCaps conv is ~4x slower than XLA's own conv (0.95 s
# against 0.22 s forward, 0.33 s against 0.24 s weight gradient at batch 100 on 2 cores;
# benchmarks/conv.py). This flag removes convolutions from XLA's list of YNNPACK fusion
# types and keeps the rest (dots) as they are.
XLA_CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
_YNN_FLAG_RE = re.compile(r"--xla_cpu_experimental_ynn_fusion_type=(\S*)")
# XLA's default list of YNNPACK fusion types in jaxlib 0.10 (a convolution and a dot
# compile to YNNPACK calls without the flag; tests/parallel_test.py checks the HLO).
_YNN_DEFAULT_TYPES = frozenset({"individual_dot", "individual_convolution"})


def ynn_fusion_types(xla_flags: str | None = None) -> frozenset[str]:
  """The YNNPACK fusion types XLA:CPU uses under `xla_flags` (default: $XLA_FLAGS).

  XLA's rules: each occurrence of --xla_cpu_experimental_ynn_fusion_type either replaces
  the list (plain names, '' for none) or edits it ('+name' / '-name'); names are
  lower-case here.
  """
  flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
  types = set(_YNN_DEFAULT_TYPES)
  for value in _YNN_FLAG_RE.findall(flags):
    items = [t.strip().lower() for t in value.split(",") if t.strip()]
    if items and all(t[0] in "+-" for t in items):
      for t in items:
        (types.add if t[0] == "+" else types.discard)(t[1:])
    else:
      types = set(items)
  return frozenset(types)


def cpu_convs_on_ynnpack() -> bool:
  """Whether XLA:CPU sends convolutions to YNNPACK (the slow path for CapsNet's convs).

  Reads XLA_FLAGS as it is now; XLA read it when its backend started, so change it only
  before that (as `use_xla_cpu_convs` does).
  """
  return "individual_convolution" in ynn_fusion_types()


def _accelerator_plugin_installed() -> bool:
  """Whether a GPU/TPU PJRT plugin is installed (it carries its own XLA, own flags)."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  return (bool(importlib.metadata.entry_points(group="jax_plugins"))
          or importlib.util.find_spec("libtpu") is not None)


def use_xla_cpu_convs() -> bool:
  """Adds XLA_CPU_CONV_FLAG to XLA_FLAGS so XLA:CPU runs convolutions itself.

  Must run before JAX starts its backends (the first `jax.devices()` or computation):
  XLA reads XLA_FLAGS once. `capsjax.main`, the benchmarks, the experiments and the
  tests call it at start-up; research code can call it first thing, or export the flag.
  Leaves XLA_FLAGS alone when the user set --xla_cpu_experimental_ynn_fusion_type
  already (their choice wins), when the backends already run, when the jaxlib is not
  0.10.x, and when a GPU/TPU plugin is installed: XLA aborts the process on a flag it
  does not know, and plugins carry their own XLA version. Returns whether XLA:CPU runs
  convolutions itself (then `conv.resolve_impl('auto')` picks 'winograd' on CPU).
  """
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  flags = os.environ.get("XLA_FLAGS", "")
  if _YNN_FLAG_RE.search(flags):                 # the user's own choice wins.
    return not cpu_convs_on_ynnpack()
  if not jaxlib.__version__.startswith("0.10."):
    logging.warning("capsjax: not setting %s: only known to exist in jaxlib 0.10.x, "
                    "found %s", XLA_CPU_CONV_FLAG, jaxlib.__version__)
    return False
  if _accelerator_plugin_installed():
    return False
  if xla_bridge.backends_are_initialized():
    logging.warning("capsjax: JAX backends already started; call "
                    "parallel.use_xla_cpu_convs() before any JAX computation")
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {XLA_CPU_CONV_FLAG}".strip()
  return True


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8


def keep_host_memory() -> bool:
  """Makes glibc's malloc keep freed memory in the process instead of unmapping it.

  XLA:CPU allocates every buffer of a step (Winograd tiles, u_hat, gradients: tens to
  hundreds of MB each) with malloc. By default glibc serves such sizes with a fresh mmap
  and unmaps them on free, so every step page-faults all of its memory again: a 300 MB
  elementwise op took 0.085 s that way against 0.024 s with the memory kept. This sets
  one malloc arena (other threads' arenas would mmap large blocks anyway), no mmap for
  large blocks and a 2 GiB trim threshold, so freed buffers are reused.

  Costs: resident memory stays near the run's peak (it is not given back to the OS while
  the process runs), and all threads allocate from one arena. Call it at start-up, before
  JAX starts its thread pools (`capsjax.main` does, through `configure_cpu_runtime`;
  CAPSJAX_KEEP_HOST_MEMORY=0 turns it off).
  A no-op returning False where the C library is not glibc, with a GPU/TPU plugin
  installed (device memory is not malloc's), or when a setting is refused (logged).
  """
  import ctypes  # pylint: disable=g-import-not-at-top
  import platform  # pylint: disable=g-import-not-at-top
  if os.environ.get("CAPSJAX_KEEP_HOST_MEMORY", "1") == "0":
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  if _accelerator_plugin_installed():
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  settings = {"M_ARENA_MAX": (_M_ARENA_MAX, 1), "M_MMAP_MAX": (_M_MMAP_MAX, 0),
              "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, 2 ** 31 - 1),
              "M_TOP_PAD": (_M_TOP_PAD, 64 << 20)}
  refused = [name for name, (param, value) in settings.items()
             if libc.mallopt(param, value) != 1]
  if refused:
    logging.warning("capsjax: glibc refused mallopt %s", ", ".join(refused))
  return not refused


def configure_cpu_runtime() -> None:
  """What capsjax's entry points do first: `use_xla_cpu_convs()` and `keep_host_memory()`.

  Call it before any JAX computation (XLA reads XLA_FLAGS when its backend starts, and
  malloc's settings should be in place before XLA's threads allocate).
  """
  use_xla_cpu_convs()
  keep_host_memory()


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over the first `num_devices` devices (default: all).

  Covers the devices of every process when running under `jax.distributed`.
  """
  devices = jax.devices()
  n = len(devices) if num_devices is None else int(num_devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f"num_devices must be in [1, {len(devices)}], got {num_devices}")
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                       devices=devices[:n])


def num_devices(mesh: jax.sharding.Mesh) -> int:
  return int(mesh.devices.size)


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, *, name: str = "batch_size"):
  """Raises ValueError unless `batch_size` splits evenly over the mesh's devices."""
  n = num_devices(mesh)
  if batch_size <= 0 or batch_size % n:
    raise ValueError(
        f"{name}={batch_size} must be a positive multiple of the number of devices ({n}); "
        f"try {name}={max(n, batch_size // n * n)}")


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
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
    raise ValueError(f"this process's devices hold non-contiguous rows {rows} of the batch; "
                     "order the mesh devices by process")
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


def jit_data_parallel(fn, mesh: jax.sharding.Mesh, *, donate_argnums=()):
  """`jax.jit(fn)` whose outputs (new state, metrics) are replicated over `mesh`.

  Inputs keep the shardings they were placed with (state by `replicate`, batches by
  `shard_batch`).
  """
  return jax.jit(fn, out_shardings=replicated(mesh), donate_argnums=donate_argnums)


def prefetch(batches, mesh: jax.sharding.Mesh, size: int = 2):
  """Yields device batches, keeping `size` transfers in flight (double buffering).

  `jax.device_put` is asynchronous, so the next batch is copied while the current
  step runs.
  """
  queue = collections.deque()
  for batch in batches:
    queue.append(shard_batch(batch, mesh))
    if len(queue) >= size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
