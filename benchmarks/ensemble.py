"""Train throughput of K ensemble members in one program (`capsjax.ensemble`) against one run.

  python -m benchmarks.ensemble                                  # K = 1, 2, 4, 8
  python -m benchmarks.ensemble --members=1,2 --steps=3          # a short CPU check
  python -m benchmarks.ensemble --config=configs/fashion.py --batch=128

The recipe's full model and augmentation at its batch size (--batch overrides it), on one
device, on synthetic data (a fixed random batch per member, placed once). The first row,
'single', is the plain single-run step (`steps.make_steps`); each K row is the ensemble's
train step with K members, `--vmap_size` of them per vectorised pass (by default one after
another on CPU, all at once on accelerators: `ensemble.resolve_vmap_size`). Per row:
aggregate images/s (K x B per step), images/s per member, the aggregate's ratio to the
single run's, and the first call's seconds (mostly compilation). The rows are timed in
rounds, one row after another, each keeping its fastest round, so that load from other
processes on a shared machine hits every row alike. The goal the ensemble is built for: K
members train faster together than one after another, i.e. a ratio above 1 on an
accelerator, and near 1 on CPU (at least 0.85 at K=2). The last line is JSON.
"""

from __future__ import annotations

import json
import platform
import statistics
import time

from absl import app
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file(
  "config", "configs/capsnet_fashion_mnist.py", "The recipe whose model and batch size to time."
)
_MEMBERS = flags.DEFINE_list("members", ["1", "2", "4", "8"], "Ensemble sizes K to time.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per row and round (after a compiling one).")
_ROUNDS = flags.DEFINE_integer(
  "rounds", 2, "Rounds over all rows; each row keeps its fastest round's median step."
)
_BATCH = flags.DEFINE_integer("batch", 0, "Batch size per member; 0 = the config's.")
_VMAP_SIZE = flags.DEFINE_integer(
  "vmap_size", 0, "Members per vectorised pass; 0 = the backend's default (resolve_vmap_size)."
)


class _Row:
  """One timed program: `train_fn(state, *args)` with the state threaded through."""

  def __init__(self, name: str, members: int, vmap_size: int, train_fn, state, args):
    self.name, self.members, self.vmap_size = name, members, vmap_size
    self._train_fn, self._state, self._args = train_fn, state, args
    self.compile_s = self._timed_call()  # the first call compiles.
    self.step_s = float("inf")

  def _timed_call(self) -> float:
    import jax  # pylint: disable=g-import-not-at-top

    t = time.perf_counter()
    self._state, aux = self._train_fn(self._state, *self._args)
    jax.block_until_ready(aux)
    return time.perf_counter() - t

  def measure(self, steps: int) -> None:
    """Keeps the lowest median over `steps` calls seen so far."""
    median = statistics.median(self._timed_call() for _ in range(steps))
    self.step_s = min(self.step_s, median)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      lines = f.read().splitlines()
  except OSError:
    return platform.processor() or platform.machine()
  name = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), "?")
  flag_line = next((x for x in lines if x.startswith("flags")), "")
  return f"{name} ({'avx512f' if ' avx512f' in flag_line else 'no avx512'})"


def main(argv):
  del argv
  from capsjax.run import cpu_runtime  # pylint: disable=g-import-not-at-top

  cpu_runtime.configure_cpu_runtime()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from capsjax import ensemble  # pylint: disable=g-import-not-at-top
  from capsjax import parallel  # pylint: disable=g-import-not-at-top
  from capsjax import steps as steps_lib  # pylint: disable=g-import-not-at-top
  from capsjax.data import input_pipeline  # pylint: disable=g-import-not-at-top

  config = flags.FLAGS.config
  batch = _BATCH.value or config.batch_size
  info = input_pipeline.dataset_info(config.dataset)
  mesh = parallel.make_mesh(1)
  spe = 100
  graphdef, state = steps_lib.create_model_and_optimizer(config, info, spe, jax.random.key(0))
  rng = np.random.default_rng(0)

  def host_batch(*lead):
    return {
      "image": rng.random((*lead, batch, *info.image_shape), np.float32),
      "label": rng.integers(0, info.num_classes, (*lead, batch)).astype(np.int32),
    }

  device = jax.devices()[0]
  print(
    f"backend {jax.default_backend()}, device {device.device_kind}, CPU {_cpu_model()}; "
    f"batch {batch} per member; {_ROUNDS.value} rounds of {_STEPS.value} timed steps"
  )
  train_fn, _ = steps_lib.make_steps(graphdef, config, spe, mesh)
  rows = [
    _Row(
      "single",
      1,
      1,
      train_fn,
      parallel.replicate(jax.tree.map(jnp.copy, state), mesh),  # the step donates it.
      (parallel.shard_batch(host_batch(), mesh), jax.random.key(1)),
    )
  ]
  for k in (int(m) for m in _MEMBERS.value):
    configs = []
    for m in range(k):
      c = config.copy_and_resolve_references()
      c.seed = m
      configs.append(c)
    train_fn, _ = ensemble.make_ensemble_steps(
      graphdef, configs, spe, mesh, vmap_size=_VMAP_SIZE.value or None
    )
    args = (
      parallel.shard_member_batch(host_batch(k), mesh),
      jax.random.split(jax.random.key(1), k),
      jnp.ones((k,), bool),
    )
    vmap_size = ensemble.resolve_vmap_size(_VMAP_SIZE.value or None, k)
    stacked = parallel.replicate(ensemble.stack_states([state] * k), mesh)
    rows.append(_Row(f"K={k}", k, vmap_size, train_fn, stacked, args))
  # Rounds over every row, so that load from other processes hits all rows alike.
  for _ in range(_ROUNDS.value):
    for row in rows:
      row.measure(_STEPS.value)
  base = batch / rows[0].step_s
  print(
    f"\n{'run':>7} {'vmap':>5} {'aggregate img/s':>16} {'per-member img/s':>17} "
    f"{'vs single':>10} {'compile s':>10}"
  )
  results = []
  for row in rows:
    agg = row.members * batch / row.step_s
    print(
      f"{row.name:>7} {row.vmap_size:>5} {agg:>16.1f} {agg / row.members:>17.1f} "
      f"{agg / base:>10.2f} {row.compile_s:>10.1f}"
    )
    results.append(
      {
        "run": row.name,
        "members": row.members,
        "vmap_size": row.vmap_size,
        "aggregate_img_s": agg,
        "step_s": row.step_s,
        "compile_s": row.compile_s,
      }
    )
  print(
    json.dumps(
      {
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "cpu": _cpu_model(),
        "batch": batch,
        "results": results,
      }
    )
  )


if __name__ == "__main__":
  app.run(main)
