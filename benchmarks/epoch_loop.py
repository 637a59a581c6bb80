"""Epoch wall time and img/s of the per-step and the scanned training loop, side by side.

  python -m benchmarks.epoch_loop                          # 2560 train images, 3 epochs
  python -m benchmarks.epoch_loop --train_examples=0 --eval_examples=0   # full epochs
  python -m benchmarks.epoch_loop --peer                   # + the PyTorch peer's step rate

Each loop trains the same Fashion-MNIST run (`configs/fashion.py`: full model, the recipe's
augmentation, batch 128 unless --batch) through `train.train_and_evaluate`, the real driver
with its logging, NaN checks, evaluation and checkpoints, in a fresh temporary workdir.
The loops alternate (step, scan, step, scan with --repeats=2) so that load from other
processes hits both alike. Per loop it prints:
  - train s / img/s: the training part of each epoch after the first (the first compiles),
    from epochs.csv, as the median over those epochs;
  - epoch s: from one epoch's end to the next (training, evaluation of --eval_examples
    test images, checkpoint), from metrics.csv's wall clock;
  - whether the final parameters of every run equal the first run's bit for bit.
The last line is JSON. On a GPU with --peer, the PyTorch peer (`benchmarks/torch_peer.py`)
is timed on CUDA if that module takes a `device` argument; it has no CUDA path today, so the
peer is skipped there with a note. On CPU the peer's train-step rate is printed beside.
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import statistics
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

_TRAIN = flags.DEFINE_integer(
  "train_examples",
  2560,
  "Training images per epoch (0 = all 60,000; no validation split is held out).",
)
_EVAL = flags.DEFINE_integer("eval_examples", 512, "Test images evaluated per epoch (0 = all).")
_EPOCHS = flags.DEFINE_integer(
  "epochs", 3, "Epochs per run; the first compiles and is not counted."
)
_BATCH = flags.DEFINE_integer("batch", 128, "Global batch size.")
_LOOPS = flags.DEFINE_list("loops", ["step", "scan"], "Loops to time (config.loop values).")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Runs per loop, alternating between loops.")
_LOG_EVERY = flags.DEFINE_integer(
  "log_every_steps", 50, "config.log_every_steps (scanned chunks end at log steps)."
)
_CHUNK = flags.DEFINE_integer("scan_chunk_steps", 0, "config.scan_chunk_steps (0 = no limit).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "config.model.dtype.")
_PEER = flags.DEFINE_bool("peer", False, "Also time the PyTorch peer's train step.")


def _rows(path: str) -> list[dict[str, str]]:
  with open(path) as f:
    return list(csv.DictReader(f))


def _config(loop: str, data_dir: str | None):
  from configs import fashion  # pylint: disable=g-import-not-at-top

  config = fashion.get_config()
  config.loop = loop
  config.num_epochs = _EPOCHS.value
  config.train_examples = _TRAIN.value
  config.eval_examples = _EVAL.value
  config.val_examples = 0
  config.batch_size = _BATCH.value
  config.log_every_steps = _LOG_EVERY.value
  config.scan_chunk_steps = _CHUNK.value
  config.model.dtype = _DTYPE.value
  config.progress_bar = False
  config.keep_checkpoints = 1
  config.data_dir = data_dir
  return config


def time_run(loop: str, root: str, name: str, data_dir: str | None) -> dict:
  """Trains one run with `loop`; its per-epoch timings and final parameters."""
  import jax  # pylint: disable=g-import-not-at-top
  from capsjax.run import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from capsjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from capsjax import steps as steps_lib  # pylint: disable=g-import-not-at-top
  from capsjax import train  # pylint: disable=g-import-not-at-top

  workdir = os.path.join(root, name)
  t0 = time.perf_counter()
  summary = train.train_and_evaluate(_config(loop, data_dir), workdir)
  wall = time.perf_counter() - t0
  epochs = _rows(os.path.join(workdir, "epochs.csv"))
  tests = [r for r in _rows(os.path.join(workdir, "metrics.csv")) if r["split"] == "test"]
  walls = [float(r["wall_s"]) for r in tests]
  config = _config(loop, data_dir)
  info = input_pipeline.dataset_info(config.dataset)
  spe = int(epochs[0]["train_steps"])
  _, target = steps_lib.create_model_and_optimizer(config, info, spe, jax.random.key(0))
  restored = ckpt_lib.Checkpointer(workdir, read_only=True).restore_latest(target)
  params = jax.device_get(restored[0][0])  # the model's parameters.
  train_s = [float(r["seconds"]) for r in epochs]
  return {
    "loop": loop,
    "run": name,
    "steps_per_epoch": int(epochs[0]["train_steps"]),
    "train_s": train_s,
    "epoch_s": [b - a for a, b in zip(walls, walls[1:], strict=False)],
    "first_epoch_s": walls[0] if walls else None,
    "run_wall_s": wall,
    "test_accuracy": summary["accuracy"],
    "params": params,
  }


def _median(xs):
  return statistics.median(xs) if xs else float("nan")


def _peer(backend: str, batch: int) -> dict:
  """The PyTorch peer's train/eval img/s on this backend, or a note why it was skipped."""
  try:
    from benchmarks import torch_peer  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return {"peer_note": f"PyTorch peer unavailable ({e})"}
  threads = os.cpu_count()
  if backend == "cpu":
    return {
      "peer_train_img_s": torch_peer.train_images_per_s(batch, 5, threads),
      "peer_eval_img_s": torch_peer.eval_images_per_s(batch, 5, threads),
      "peer_device": f"cpu, {threads} threads",
    }
  if "device" not in inspect.signature(torch_peer.train_images_per_s).parameters:
    return {
      "peer_note": "benchmarks/torch_peer.py has no CUDA path (no `device` argument); "
      "peer not timed on this backend"
    }
  out = {"peer_device": "cuda"}
  for compiled in (False, True):
    tag = "compile_" if compiled else ""
    out[f"peer_{tag}train_img_s"] = torch_peer.train_images_per_s(
      batch, 20, threads, compile=compiled, device="cuda"
    )
    out[f"peer_{tag}eval_img_s"] = torch_peer.eval_images_per_s(
      batch, 20, threads, compile=compiled, device="cuda"
    )
  return out


def main(argv):
  del argv
  from capsjax.run import cpu_runtime  # pylint: disable=g-import-not-at-top

  cpu_runtime.configure_cpu_runtime()  # as capsjax.main, before JAX starts its backends.
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.WARNING)
  backend = jax.default_backend()
  root = tempfile.mkdtemp(prefix="capsjax_epoch_loop_")
  data_dir = None  # TFDS's default; Fashion-MNIST's original files are found offline.
  print(
    f"backend {backend}, {jax.device_count()} x {jax.devices()[0].device_kind}, jax "
    f"{jax.__version__}, {os.cpu_count()} CPU cores; batch {_BATCH.value}, "
    f"{_TRAIN.value or 60000} train / {_EVAL.value or 10000} test images per epoch, "
    f"{_EPOCHS.value} epochs, dtype {_DTYPE.value}; workdirs in {root}",
    flush=True,
  )
  runs = []
  for r in range(_REPEATS.value):
    for loop in _LOOPS.value:
      runs.append(time_run(loop, root, f"{loop}{r}", data_dir))
      last = runs[-1]
      print(
        f"  {last['run']}: train s per epoch {[round(t, 2) for t in last['train_s']]}, "
        f"run {last['run_wall_s']:.1f} s",
        flush=True,
      )
  ref = runs[0]["params"]

  def identical(params):
    if params is None or ref is None:
      return None
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, ref)
    return all(jax.tree.leaves(same))

  batch = _BATCH.value
  print(
    f"\n{'loop':>5} {'run':>6} {'steps/ep':>8} {'train s':>8} {'train img/s':>11} "
    f"{'epoch s':>8} {'1st epoch s':>11} {'test acc':>8} {'same params':>11}"
  )
  rows = []
  for run in runs:
    steady = run["train_s"][1:] or run["train_s"]
    train_s = _median(steady)
    row = {
      "loop": run["loop"],
      "run": run["run"],
      "steps_per_epoch": run["steps_per_epoch"],
      "train_s": train_s,
      "train_img_s": run["steps_per_epoch"] * batch / train_s,
      "epoch_s": _median(run["epoch_s"]),
      "first_epoch_s": run["first_epoch_s"],
      "test_accuracy": run["test_accuracy"],
      "params_identical": identical(run["params"]),
    }
    rows.append(row)
    print(
      f"{row['loop']:>5} {row['run']:>6} {row['steps_per_epoch']:>8} {train_s:>8.2f} "
      f"{row['train_img_s']:>11.1f} {row['epoch_s']:>8.2f} {row['first_epoch_s']:>11.2f} "
      f"{row['test_accuracy']:>8.4f} {str(row['params_identical']):>11}"
    )
  summary = {
    "backend": backend,
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "batch": batch,
    "dtype": _DTYPE.value,
    "train_examples": _TRAIN.value,
    "eval_examples": _EVAL.value,
    "runs": rows,
  }
  by_loop = {}
  for row in rows:
    by_loop.setdefault(row["loop"], []).append(row["train_img_s"])
  if "step" in by_loop and "scan" in by_loop:
    ratio = _median(by_loop["scan"]) / _median(by_loop["step"])
    summary["scan_over_step"] = ratio
    print(f"\nscan / step train img/s (medians over runs): x{ratio:.3f}")
  if _PEER.value:
    summary.update(_peer(backend, batch))
    if "peer_note" in summary:
      print(f"PyTorch peer: {summary['peer_note']}")
    else:
      print(
        f"PyTorch peer ({summary['peer_device']}, batch {batch}, train step only): "
        f"train {summary['peer_train_img_s']:.1f} img/s, eval "
        f"{summary['peer_eval_img_s']:.1f} img/s"
        + (
          f"; torch.compile train {summary['peer_compile_train_img_s']:.1f}"
          if "peer_compile_train_img_s" in summary
          else ""
        )
      )
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
