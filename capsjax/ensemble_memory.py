"""How much device memory an ensemble's train step needs, and how many members fit.

`estimate_memory` compiles the K-member step of `capsjax.ensemble` on abstract inputs and
reads XLA's `memory_analysis()`; `memory_fit` extrapolates linearly in K; `check_fits`
refuses, in one line, a K that does not fit and names the largest that would.
"""

from __future__ import annotations

import dataclasses
import os

from absl import logging
import jax
import jax.numpy as jnp

from capsjax import ensemble
from capsjax import errors
from capsjax import parallel

# The share of the device's memory an ensemble's train step may plan for: the evaluation
# program, the device-resident training set and allocator fragmentation need the rest.
MEMORY_FRACTION = 0.9


def estimate_memory(
  graphdef, config, state_single, batch_shape, num: int, mesh, *, vmap_size: int | None = None
) -> int:
  """Bytes per device the jitted K-member train step needs (arguments, outputs, buffers).

  Compiles `ensemble.make_ensemble_steps`' train step for `num` members on abstract inputs
  (nothing is allocated) and reads XLA's `memory_analysis()`; donated inputs count once.

  Args:
    config: every member's config (the values of per-member fields do not matter).
    state_single: one member's state (arrays or `jax.ShapeDtypeStruct`s).
    batch_shape: (B, H, W, C), the global batch of one member.
    num: K.
    vmap_size: as for training (`ensemble.resolve_vmap_size`): it sets how many members'
      activations are alive at once.
  """
  replicated = parallel.replicated(mesh)
  rows = parallel.member_batch_sharding(mesh)
  state = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct((num, *x.shape), x.dtype, sharding=replicated), state_single
  )
  b = tuple(batch_shape)
  batch = {
    "image": jax.ShapeDtypeStruct((num, *b), jnp.float32, sharding=rows),
    "label": jax.ShapeDtypeStruct((num, b[0]), jnp.int32, sharding=rows),
  }
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), num))
  keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=replicated)
  active = jax.ShapeDtypeStruct((num,), jnp.bool_, sharding=replicated)
  train_fn, _ = ensemble.make_ensemble_steps(graphdef, [config] * num, 1, mesh, vmap_size=vmap_size)
  stats = train_fn.lower(state, batch, keys, active).compile().memory_analysis()
  return int(
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    - stats.alias_size_in_bytes
    + stats.temp_size_in_bytes
  )


def device_memory_bytes() -> tuple[int, str]:
  """(bytes one device offers, what they are): the allocator's limit, or a share of host RAM.

  CPU devices report no memory (`memory_stats()` is None); they share the host's RAM.
  """
  device = jax.local_devices()[0]
  stats = device.memory_stats()
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.device_kind} memory"
  n = len(jax.local_devices())
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return ram // n, "host RAM" if n == 1 else f"host RAM / {n} devices"


@dataclasses.dataclass(frozen=True)
class MemoryFit:
  """Linear model of the train step's memory: `first` bytes for K=1, `per_member` more each."""

  first: int
  per_member: int
  available: int  # bytes of the device the step may plan for.
  where: str  # what `available` is (device kind memory, host RAM).

  def bytes_for(self, num: int) -> int:
    return self.first + (num - 1) * self.per_member

  @property
  def max_members(self) -> int:
    """The largest K whose estimate fits `available` (0 if not even one member does)."""
    if self.first > self.available:
      return 0
    return 1 + (self.available - self.first) // max(self.per_member, 1)


def memory_fit(
  graphdef,
  config,
  state_single,
  batch_shape,
  mesh,
  *,
  vmap_size: int | None = None,
  available: int | None = None,
) -> MemoryFit:
  """Estimates K=1 and K=2 (`estimate_memory`) and extrapolates linearly in K.

  vmap_size: as for training. The K=2 program vectorises min(vmap_size, 2) members, so
    for 1 < vmap_size < K the extrapolation over-counts (it assumes all K at once).
  available: bytes to plan for; default `MEMORY_FRACTION` of `device_memory_bytes()`.
  """
  one = estimate_memory(graphdef, config, state_single, batch_shape, 1, mesh, vmap_size=vmap_size)
  two = estimate_memory(graphdef, config, state_single, batch_shape, 2, mesh, vmap_size=vmap_size)
  if available is None:
    total, where = device_memory_bytes()
    available, where = int(total * MEMORY_FRACTION), f"{MEMORY_FRACTION:.0%} of {where}"
  else:
    where = "the given limit"
  return MemoryFit(one, max(two - one, 0), int(available), where)


def max_members(graphdef, config, state_single, batch_shape, mesh, **kwargs) -> int:
  """The largest number of members whose train step fits one device (`memory_fit`)."""
  return memory_fit(graphdef, config, state_single, batch_shape, mesh, **kwargs).max_members


def check_fits(fit: MemoryFit, num: int) -> None:
  """Raises `errors.ConfigError` (one line) if `num` members do not fit `fit.available`."""
  need = fit.bytes_for(num)
  if need <= fit.available:
    return
  gib = 2.0**30
  raise errors.ConfigError(
    f"{num} ensemble members need about {need / gib:.2f} GiB per device for the train step, "
    f"more than {fit.available / gib:.2f} GiB ({fit.where}); at most {fit.max_members} "
    f"members fit: train fewer seeds per run (config.seeds) or a smaller batch_size"
  )


def check_members_fit(graphdef, config, state_single, image_shape, num: int, mesh) -> None:
  """Refuses, in one line, `num` members whose train step would not fit a device's memory.

  Only where the device reports its memory (GPU, TPU): on a CPU the step uses host RAM.
  One compile, of a one-member step: K members are planned at K times its memory (the
  parameters, optimizer state, batch and activations all grow with K), an upper bound
  that costs one compile where `memory_fit` costs two.

  Args:
    state_single: one member's state; image_shape: (H, W, C).
  """
  device = jax.devices()[0]
  total = (device.memory_stats() or {}).get("bytes_limit")
  if not total:
    return
  one = estimate_memory(graphdef, config, state_single, (config.batch_size, *image_shape), 1, mesh)
  fit = MemoryFit(
    one, one, int(total * MEMORY_FRACTION), f"{MEMORY_FRACTION:.0%} of {device.device_kind} memory"
  )
  logging.info(
    "ensemble memory: %.2f GiB per member, %.2f GiB available", one / 2**30, fit.available / 2**30
  )
  check_fits(fit, num)
