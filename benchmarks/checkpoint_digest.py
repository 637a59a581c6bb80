"""Cost of the checkpoint content digests: hashing, and saves and restores with/without.

  python -m benchmarks.checkpoint_digest                 # the :smoke and the full model
  python -m benchmarks.checkpoint_digest --configs=full --repeats=3

For each model, the (model, Adam) state as training saves it, on one device: the time of
`content_digests` alone, of `Checkpointer.save` + `wait` (the time a training loop is
held up by an epoch-end save, plus the background write) with digests and with them
stubbed out, and of `Checkpointer.restore` with and without verification. Medians over
--repeats runs, after one warm-up. Prints a table, then one JSON line.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time

from absl import app
from absl import flags

_CONFIGS = flags.DEFINE_list("configs", ["smoke", "full"], "'smoke' and/or 'full'.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions (after one warm-up).")


def measure(name: str, repeats: int) -> dict:
  """Median seconds of digest / save / restore for the `name` model's training state.

  Runs with and without digests alternate, so that load from other processes on a
  shared machine falls on both alike.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from capsjax.run import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from capsjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from capsjax import steps as steps_lib  # pylint: disable=g-import-not-at-top
  from configs import fashion  # pylint: disable=g-import-not-at-top

  config = fashion.get_config("smoke" if name == "smoke" else None)
  info = input_pipeline.dataset_info("fashion_mnist")
  _, state = steps_lib.create_model_and_optimizer(config, info, 100, jax.random.key(0))
  state = jax.device_put(state, jax.devices()[0])
  real_digests = ckpt_lib.content_digests
  real_verify = ckpt_lib.Checkpointer._verify  # pylint: disable=protected-access
  times = {
    k: []
    for k in ("digest_s", "save_s_with", "save_s_without", "restore_s_with", "restore_s_without")
  }
  with tempfile.TemporaryDirectory() as d:
    ckpt = ckpt_lib.Checkpointer(d, keep=2, keep_best=False)
    for i in range(repeats + 1):  # the first round warms up and is not counted
      for digests in (True, False):
        mode = "with" if digests else "without"
        # Stubbed out: what a save and a restore cost before digests.
        ckpt_lib.content_digests = real_digests if digests else (lambda tree: {})
        # pylint: disable-next=protected-access
        ckpt._verify = (lambda *a: real_verify(ckpt, *a)) if digests else (lambda *a: None)
        step = 2 * i + (1 if digests else 2)
        t0 = time.perf_counter()
        ckpt.save(step, state, {"epoch": step})
        ckpt.wait()
        t1 = time.perf_counter()
        jax.block_until_ready(ckpt.restore(step, state)[0])
        t2 = time.perf_counter()
        if i:
          times[f"save_s_{mode}"].append(t1 - t0)
          times[f"restore_s_{mode}"].append(t2 - t1)
      t0 = time.perf_counter()
      real_digests(state)
      if i:
        times["digest_s"].append(time.perf_counter() - t0)
    ckpt_lib.content_digests = real_digests
    ckpt.close()
  out = {k: statistics.median(v) for k, v in times.items()}
  out.update(model=name, state_mb=sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20)
  return out


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top

  rows = [measure(name, _REPEATS.value) for name in _CONFIGS.value]
  print(
    f"{platform.processor() or platform.machine()}, JAX {jax.__version__}, {jax.default_backend()}"
  )
  print(
    f"{'model':6} {'state MB':>9} {'digest ms':>10} {'save ms (w/ / w/o)':>20} "
    f"{'restore ms (w/ / w/o)':>22}"
  )
  for r in rows:
    print(
      f"{r['model']:6} {r['state_mb']:9.1f} {1e3 * r['digest_s']:10.1f} "
      f"{1e3 * r['save_s_with']:9.1f} / {1e3 * r['save_s_without']:7.1f}  "
      f"{1e3 * r['restore_s_with']:10.1f} / {1e3 * r['restore_s_without']:7.1f}"
    )
  print(json.dumps(rows))


if __name__ == "__main__":
  app.run(main)
