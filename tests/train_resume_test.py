"""Exact resume after SIGKILL (after a checkpoint, and mid async save) and after SIGTERM
(between steps, and in the middle of a scanned chunk of steps).

Each run is a real `capsjax.main` process (via `experiments.fault_injection child`, which
adds test-only hooks that pause the child at a chosen point so the kill lands there) on
TFDS mock MNIST data with the `:smoke` config: 32 examples / batch 8 = 4 steps per epoch,
3 epochs. The final parameters, read back from the final checkpoint, must be
bit-identical to an uninterrupted run. Child processes share a JAX compilation cache.
"""

import csv
import os
import signal

import jax
import numpy as np
import pytest

from capsjax.run import checkpoint as ckpt_lib
from capsjax.data import input_pipeline
from capsjax.run import processes
from capsjax import steps as steps_lib
from experiments import fault_injection as fi
from tests import helpers

CONFIG = "configs/fashion.py:smoke"
OVERRIDES = ("--config.dataset=mnist", "--config.train_examples=32", "--config.num_epochs=3")
TIMEOUT = 240


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


def _env(cache, **hooks):
  return fi.child_env(devices=1, cache_dir=cache, mock_examples=48, **hooks)


def _start(workdir, cache, **hooks):
  os.makedirs(workdir, exist_ok=True)
  return fi.start(
    fi.child_cmd(CONFIG, workdir, *OVERRIDES),
    _env(cache, **hooks),
    os.path.join(workdir, "..", os.path.basename(workdir) + ".log"),
  )


def _log(workdir):
  with open(os.path.join(workdir, "..", os.path.basename(workdir) + ".log")) as f:
    return f.read()


def _finish(workdir, cache, **hooks):
  proc = _start(workdir, cache, **hooks)
  rc = proc.wait(timeout=TIMEOUT)
  assert rc == 0, _log(workdir)[-3000:]


def _final_params(workdir):
  """The model parameters of the latest checkpoint in `workdir`, as NumPy arrays."""
  config = helpers.smoke_config(dataset="mnist")
  info = input_pipeline.dataset_info("mnist")
  _, state = steps_lib.create_model_and_optimizer(config, info, 4, jax.random.key(0))
  restored, meta, step = ckpt_lib.Checkpointer(workdir, read_only=True).restore_latest(state)
  return jax.device_get(restored), step


# epochs.csv columns that time the run; every other column must match.
_TIMING = {"images_per_s", "wall_s", "seconds"}


def _epoch_rows(workdir):
  with open(os.path.join(workdir, "epochs.csv")) as f:
    return [{k: v for k, v in r.items() if k not in _TIMING} for r in csv.DictReader(f)]


def _assert_identical(workdir, reference):
  """The final parameters bit for bit, and every epochs.csv row but its timings."""
  (ref_state, ref_step, ref_dir), (state, step) = reference, _final_params(workdir)
  assert step == ref_step == 12
  jax.tree.map(np.testing.assert_array_equal, state, ref_state)
  assert _epoch_rows(workdir) == _epoch_rows(ref_dir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, jax_cache):
  workdir = str(tmp_path_factory.mktemp("ref") / "run")
  _finish(workdir, jax_cache)
  return (*_final_params(workdir), workdir)


def _checkpoints(workdir):
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def test_sigterm_then_sigkill_then_resume_is_bit_identical(tmp_path, jax_cache, reference):
  workdir = str(tmp_path / "run")
  marker = str(tmp_path / "marker")
  # 1. SIGTERM in the middle of epoch 2 (after step 6): checkpoint at the step boundary,
  #    exit code 75.
  proc = _start(workdir, jax_cache, hold_at_step=6, marker=marker)
  assert fi.wait_for(marker, proc, TIMEOUT), _log(workdir)[-3000:]
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=TIMEOUT) == processes.PREEMPTED_EXIT_CODE == 75, _log(workdir)[-3000:]
  assert "capsjax: stopped by signal 15 at step 6 (epoch 1.50)" in _log(workdir)
  assert _checkpoints(workdir) == ["4", "6"]
  os.remove(marker)
  # 2. Resume mid-epoch; SIGKILL once the next (epoch-end) checkpoint is complete.
  proc = _start(workdir, jax_cache, hold_after_save=8, marker=marker)
  assert fi.wait_for(marker, proc, TIMEOUT), _log(workdir)[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=TIMEOUT)
  assert _checkpoints(workdir)[-1] == "8"
  # 3. Resume to the end.
  _finish(workdir, jax_cache)
  _assert_identical(workdir, reference)
  # Every step was logged once, and each epoch's evaluation too.
  rows = [line.split(",")[:3] for line in open(os.path.join(workdir, "metrics.csv"))][1:]
  assert [int(s) for s, _, split in rows if split == "test"] == [4, 8, 12]
  train_steps = [int(s) for s, _, split in rows if split == "train"]
  assert train_steps == sorted(set(train_steps)), train_steps


def test_sigterm_in_the_middle_of_a_scanned_chunk_saves_exits_75_and_resumes(
  tmp_path, jax_cache, reference
):
  workdir = str(tmp_path / "run")
  marker = str(tmp_path / "marker")
  # Chunks of up to 3 steps, ending at log steps and epoch ends (4, 8, 12): 0-3, 3-4,
  # 4-7, ... The SIGTERM lands while the chunk 4-7 runs (holding step 6); the loop
  # finishes the chunk, saves at its end and exits 75.
  # (A time bound far above any step keeps the chunks where they are on a loaded machine.)
  scan = (
    "--config.loop=scan",
    "--config.scan_chunk_steps=3",
    "--config.log_every_steps=4",
    "--config.scan_chunk_seconds=3600",
  )
  os.makedirs(workdir, exist_ok=True)
  proc = fi.start(
    fi.child_cmd(CONFIG, workdir, *OVERRIDES, *scan),
    _env(jax_cache, hold_at_step=6, marker=marker),
    os.path.join(workdir, "..", "run.log"),
  )
  assert fi.wait_for(marker, proc, TIMEOUT), _log(workdir)[-3000:]
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=TIMEOUT) == processes.PREEMPTED_EXIT_CODE == 75, _log(workdir)[-3000:]
  assert "capsjax: stopped by signal 15 at step 7 (epoch 1.75)" in _log(workdir)
  assert _checkpoints(workdir) == ["4", "7"]
  # Resumed from step 7 with the default chunks (the smoke config logs every 2 steps), the
  # run ends with the per-step reference's parameters.
  proc = fi.start(
    fi.child_cmd(CONFIG, workdir, *OVERRIDES, "--config.loop=scan"),
    _env(jax_cache),
    os.path.join(workdir, "..", "run.log"),
  )
  assert proc.wait(timeout=TIMEOUT) == 0, _log(workdir)[-3000:]
  assert "resumed from" in _log(workdir) and "at step 7" in _log(workdir)
  _assert_identical(workdir, reference)


def test_sigkill_during_async_save_then_resume_is_bit_identical(tmp_path, jax_cache, reference):
  workdir = str(tmp_path / "run")
  marker = str(tmp_path / "marker")
  # Hang inside the save of step 8, before Orbax renames its temporary directory.
  proc = _start(workdir, jax_cache, hold_in_save=8, marker=marker)
  assert fi.wait_for(marker, proc, TIMEOUT), _log(workdir)[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=TIMEOUT)
  names = _checkpoints(workdir)
  assert "4" in names and "8" not in names, names
  assert any(n.startswith("8.orbax-checkpoint-tmp") for n in names), names
  _finish(workdir, jax_cache)
  log = _log(workdir)
  assert "ignoring incomplete checkpoint" in log and "8.orbax-checkpoint-tmp" in log
  assert "resumed from" in log and "at step 4" in log
  assert not [n for n in _checkpoints(workdir) if "tmp" in n]
  _assert_identical(workdir, reference)


@pytest.mark.slow
def test_fault_injection_script_reports_no_divergence(tmp_path, capfd):
  bad = fi.run(
    2,
    seed=1,
    config=CONFIG,
    overrides=OVERRIDES,
    mock_examples=48,
    root=str(tmp_path),
    verbose=True,
  )
  assert bad == 0
  assert "2 resumes, 0 divergences" in capfd.readouterr().out


def test_preempted_exit_code_is_documented():
  from capsjax import main as main_lib  # pylint: disable=g-import-not-at-top

  assert "75  preempted" in main_lib.__doc__


@pytest.mark.slow
def test_corruption_script_reports_no_silent_resume(tmp_path, capfd):
  # The command line of `--corrupt`: trains its own reference run, then the trials.
  counts = fi.run_corrupt(
    5,
    seed=2,
    config=CONFIG,
    overrides=OVERRIDES[:2],
    mock_examples=48,
    root=str(tmp_path),
    verbose=True,
  )
  assert counts["silent"] == 0, counts
  assert "5 trials, 0 silent resumes from corrupt data" in capfd.readouterr().out


@pytest.mark.slow
def test_guard_trials_find_every_guard_holding(tmp_path, capfd):
  # One trial of each kind: a SIGTERM mid-epoch, a refused change, another run's checkpoints.
  results = fi.guard_trials(
    3, seed=1, config=CONFIG, overrides=OVERRIDES, mock_examples=48, root=str(tmp_path)
  )
  assert results == {"sigterm": [1, 1], "refused": [1, 1], "foreign": [1, 1]}, (
    capfd.readouterr().out
  )
  assert "3 trials: sigterm 1/1, refused 1/1, foreign 1/1 as expected" in capfd.readouterr().out
