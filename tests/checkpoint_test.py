"""Checkpoint safety: resume, fallback, disk full, non-finite losses, the kept best.

Runs in-process on TFDS mock MNIST with the `:smoke` config (4 steps per epoch).
"""

import errno
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capsjax import checkpoint as ckpt_lib
from capsjax import losses
from capsjax import metrics as metrics_lib
from capsjax import steps as steps_lib
from capsjax import train
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


mock = helpers.mock_mnist_fixture()
src = helpers.finished_run_fixture()
_config = helpers.mnist_smoke_config
_copy = helpers.copy_run


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, src, monkeypatch):
  workdir = _copy(src, tmp_path)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))  # resume from step 4.
  good = ckpt_lib.Checkpointer(workdir, read_only=True).all_steps()
  orig = losses.margin_loss
  monkeypatch.setattr(losses, "margin_loss", lambda *a, **k: orig(*a, **k) * jnp.nan)
  with pytest.raises(FloatingPointError,
                     match=r"non-finite margin_loss=nan at step 5 \(epoch 1.25\); training "
                           r"stopped without saving. The last good checkpoint is .*/4"):
    train.train_and_evaluate(_config(), workdir)
  assert ckpt_lib.Checkpointer(workdir, read_only=True).all_steps() == good == [4]


def test_disk_full_while_saving_keeps_previous_checkpoints(tmp_path, src, monkeypatch):
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  workdir = _copy(src, tmp_path)
  orig = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    if self._final_path.name == "12":  # pylint: disable=protected-access
      raise OSError(errno.ENOSPC, "No space left on device")
    return await orig(self)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
  with pytest.raises(ckpt_lib.CheckpointSaveError,
                     match=r"could not write checkpoint \(step 12\) in .*: the disk is full. "
                           r"Earlier checkpoints are kept \(steps \[4, 8\]\)"):
    train.train_and_evaluate(_config(keep_checkpoints=1, num_epochs=3), workdir)
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", orig)
  assert ckpt_lib.Checkpointer(workdir, read_only=True).all_steps() == [4, 8]
  # With space again, the same command resumes at step 8 and finishes.
  summary = train.train_and_evaluate(_config(keep_checkpoints=1, num_epochs=3), workdir)
  assert summary["step"] == 12


def test_incomplete_checkpoint_ignored_and_best_never_deleted(tmp_path, src, caplog):
  workdir = _copy(src, tmp_path)
  tmp_dir = os.path.join(workdir, "checkpoints", "9.orbax-checkpoint-tmp-123")
  os.makedirs(os.path.join(tmp_dir, "state"))  # a save killed half-way.
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  assert ckpt.latest_step() == 8
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(_config(keep_checkpoints=1, num_epochs=4), workdir)
  assert "ignoring incomplete checkpoint" in caplog.text and "9.orbax-checkpoint-tmp" in caplog.text
  assert not os.path.exists(tmp_dir)
  rows = metrics_lib.read_csv(os.path.join(workdir, "metrics.csv"))
  vals = [(float(r["accuracy"]), int(r["step"])) for r in rows if r["split"] == "val"]
  best = max(acc for acc, _ in vals)
  selected = min(s for acc, s in vals if acc == best)   # ties: the earliest epoch.
  steps = ckpt_lib.Checkpointer(workdir, read_only=True).all_steps()
  # keep_checkpoints=1: the latest, plus the one selected on validation accuracy.
  assert steps[-1] == 16 and selected in steps and len(steps) <= 2, (vals, steps)


def test_restore_falls_back_to_previous_readable_checkpoint(tmp_path, src, caplog):
  workdir = _copy(src, tmp_path)
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "8", "state")):
    for name in files:
      os.remove(os.path.join(root, name))  # damaged (e.g. by a full disk in a copy).
  from capsjax import input_pipeline  # pylint: disable=g-import-not-at-top
  _, state = steps_lib.create_model_and_optimizer(
      _config(), input_pipeline.dataset_info("mnist"), 4, jax.random.key(0))
  with caplog.at_level("WARNING"):
    _, meta, step = ckpt_lib.Checkpointer(workdir, read_only=True).restore_latest(state)
  assert step == 4 and meta["step"] == 4
  assert "cannot read checkpoint" in caplog.text
  # A writable manager (a resumed run) moves the unreadable step aside, keeping it, so
  # that the run can save that step again when it gets there.
  ckpt = ckpt_lib.Checkpointer(workdir)
  state, _, step = ckpt.restore_latest(state)
  assert step == 4 and ckpt.all_steps() == [4]
  assert os.path.isdir(os.path.join(workdir, "checkpoints-unreadable", "8"))
  ckpt.save(8, state, {"epoch": 2})
  ckpt.close()
  assert ckpt_lib.Checkpointer(workdir, read_only=True).all_steps() == [4, 8]


def test_best_checkpoint_survives_reopening(tmp_path):
  # keep=1: only the latest and the best by test accuracy stay, also after the manager is
  # reopened (a resumed run), which must still see the saved metrics.
  state = {"w": np.arange(3.0)}
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=1)
  ckpt.save(1, state, {}, metrics={"test_accuracy": 0.9})
  ckpt.save(2, state, {}, metrics={"test_accuracy": 0.5})
  ckpt.close()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=1)
  ckpt.save(3, state, {}, metrics={"test_accuracy": 0.4})
  ckpt.save(4, state, {})  # a preemption save has no metrics.
  ckpt.close()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=1)
  assert ckpt.all_steps() == [1, 4]
  assert ckpt.best_step() == 1
  ckpt.close()
