"""Checkpoint safety, the model-only restore and the user-error guards (one line, exit
code 2, no traceback).

Runs in-process on TFDS mock MNIST with the `:smoke` config (4 steps per epoch); the
CLI checks call `capsjax.main.main` with parsed flags, or a real process where flag
parsing itself is under test.
"""

import errno
import fcntl
import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import logging as absl_logging
from flax import nnx

from capsjax import checkpoint as ckpt_lib
from capsjax import errors
from capsjax import losses
from capsjax import metrics as metrics_lib
from capsjax import train
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mock():
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def _config(**overrides):
  return helpers.smoke_config(**{"dataset": "mnist", "train_examples": 32, **overrides})


@pytest.fixture(scope="module")
def src(tmp_path_factory, mock):
  """A finished 2-epoch run: checkpoints 4 and 8."""
  workdir = str(tmp_path_factory.mktemp("src") / "run")
  train.train_and_evaluate(_config(), workdir)
  return workdir


def _copy(src, tmp_path):
  dst = str(tmp_path / "run")
  shutil.copytree(src, dst)
  return dst


def _cli(capsys, *argv):
  """Runs capsjax.main.main in-process with `--workdir=...` and `--config.k=v` flags.

  The flags are applied to the `:smoke` config here (flag parsing itself is tested in
  a real process below); returns (exit code, 'capsjax' lines of stderr, stderr).
  """
  from capsjax import main as main_lib  # pylint: disable=g-import-not-at-top
  values = dict(a[2:].split("=", 1) for a in argv)
  config = _config(**{k[len("config."):]: _parse(v) for k, v in values.items()
                      if k.startswith("config.")})
  holder = lambda v: types.SimpleNamespace(value=v)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(main_lib, "flags", types.SimpleNamespace(
        FLAGS=types.SimpleNamespace(config=config, verbosity=0)))
    mp.setattr(main_lib, "_WORKDIR", holder(values["workdir"]))
    for name in ("_COORDINATOR", "_NUM_PROCESSES", "_PROCESS_ID"):
      mp.setattr(main_lib, name, holder(None))
    mp.setattr(main_lib, "_DISTRIBUTED", holder("off"))
    handler = absl_logging.get_absl_handler()
    filters = list(handler.filters)
    try:
      with pytest.raises(SystemExit) as e:
        main_lib.main(["capsjax"])
    finally:
      handler.filters[:] = filters
  err = capsys.readouterr().err
  return e.value.code, [l for l in err.splitlines() if l.startswith("capsjax")], err


def _parse(v):
  for cast in (int, float):
    try:
      return cast(v)
    except ValueError:
      pass
  return v


def _one_line_error(capsys, expected, *argv):
  code, lines, err = _cli(capsys, *argv)
  assert code == 2, err
  assert len(lines) == 1 and lines[0].startswith("capsjax: error: "), err
  assert "Traceback" not in err
  for part in expected:
    assert part in lines[0], lines[0]


def _cli_process_error(tmp_path, override: str) -> str:
  """Runs the smoke CLI in a real process with one override; returns its stderr.

  In-process tests cannot see absl's stderr handler; a real process shows what users see.
  Asserts the user-error exit code and that no traceback reached the console.
  """
  r = subprocess.run(
      [sys.executable, "-m", "capsjax.main", "--config=configs/fashion.py:smoke",
       f"--workdir={tmp_path}", override],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr
  assert "Traceback" not in r.stderr, r.stderr
  return r.stderr


def test_cli_user_error_in_a_real_process_has_no_traceback(tmp_path):
  err = _cli_process_error(tmp_path, "--config.model.routing_iterations=0")
  errors = [l for l in err.splitlines() if l.startswith("capsjax: error: ")]
  assert errors == ["capsjax: error: config.model.routing_iterations must be an int >= 1, "
                    "got 0"], err


def test_cli_unknown_config_field_fails_at_flag_parsing(tmp_path):
  err = _cli_process_error(tmp_path, "--config.model.routing_iteration=1")
  assert err.strip() == (
      'capsjax: error: unknown config field "routing_iteration" (did you mean '
      '"routing_iterations"?) in: --config.model.routing_iteration=1'), err


@pytest.mark.parametrize("argv,expected", [
    (("--config.dataset=mnist_typo",), ("mnist_typo",)),
    (("--config.model.routing_iterations=0",),
     ("config.model.routing_iterations must be an int >= 1, got 0",)),
    (("--config.batch_size=6",),
     ("config.batch_size=6 must be a positive multiple of the number of devices (4)",)),
])
def test_cli_config_guards(capsys, tmp_path, mock, argv, expected):
  _one_line_error(capsys, expected, f"--workdir={tmp_path}", *argv)


def test_cli_init_from_missing_and_other_architecture(capsys, tmp_path, src):
  _one_line_error(capsys, ("does not exist", str(tmp_path / "nothing")),
                  f"--workdir={tmp_path / 'a'}", f"--config.init_from={tmp_path / 'nothing'}")
  _one_line_error(capsys, ("parameter 0/decoder/layers/0/kernel has shape (80, 32) in the "
                           "checkpoint but (40, 32) in the model",),
                  f"--workdir={tmp_path / 'b'}", f"--config.init_from={src}",
                  "--config.model.digit_dim=4")


def test_cli_workdir_with_other_config_and_locked_workdir(capsys, tmp_path, src):
  workdir = _copy(src, tmp_path)
  _one_line_error(capsys, ("was used by a run with a different config",
                           "seed: 0 (saved) vs 1 (now)", "--config.overwrite=True"),
                  f"--workdir={workdir}", "--config.seed=1", "--config.keep_checkpoints=1")
  with open(os.path.join(workdir, ".lock.0"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process trains here.
    _one_line_error(capsys, ("is in use by another capsjax process",),
                    f"--workdir={workdir}", "--config.keep_checkpoints=1")


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
  _, state = train.create_model_and_optimizer(
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


# ----------------------------------------------------------------------------------------
# Model-only restore (Checkpointer.restore_params / restore_params).
# ----------------------------------------------------------------------------------------
def _smoke_model(key: int, **overrides):
  from capsjax import input_pipeline  # pylint: disable=g-import-not-at-top
  from capsjax import models  # pylint: disable=g-import-not-at-top
  info = input_pipeline.dataset_info("mnist")
  return models.create_model(_config(**overrides).model, image_shape=info.image_shape,
                             num_classes=info.num_classes, rngs=nnx.Rngs(params=key))


def _trained_state(tx):
  """(model, optimizer) after one real update: a state as train.py saves it."""
  model = _smoke_model(jax.random.key(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  batch = helpers.synthetic_batch(4)
  loss = lambda m: jnp.sum(m(batch["image"], batch["label"])["lengths"])
  optimizer.update(model, nnx.grad(loss)(model))
  return nnx.split((model, optimizer))[1]


def test_restore_params_returns_the_saved_model_arrays(tmp_path):
  import optax  # pylint: disable=g-import-not-at-top
  for name, tx in (("adam", optax.adam(1e-3)), ("sgd", optax.sgd(0.1, momentum=0.9))):
    state = _trained_state(tx)
    saved = jax.tree.map(np.array, state[0])   # host copies, taken before the save
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / name))
    ckpt.save(3, state, {"epoch": 1})
    ckpt.close()
    # The target starts from other weights, so a restore that did nothing would fail.
    _, target = nnx.split(_smoke_model(jax.random.key(7)))
    assert not np.array_equal(target["digit_caps"]["w"][...], saved["digit_caps"]["w"][...])
    params, step = ckpt_lib.restore_params(str(tmp_path / name), None, target)
    assert step == 3
    jax.tree.map(np.testing.assert_array_equal, params, saved)
    # Shapes alone (no initialisation) are a target too; the arrays land on a device.
    abstract = nnx.split(nnx.eval_shape(lambda: _smoke_model(jax.random.key(7))))[1]
    params = ckpt_lib.Checkpointer(str(tmp_path / name), read_only=True).restore_params(
        3, abstract)
    jax.tree.map(np.testing.assert_array_equal, params, saved)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))


def test_restore_params_of_a_training_run_and_mismatch(src):
  from capsjax import input_pipeline  # pylint: disable=g-import-not-at-top
  _, state = train.create_model_and_optimizer(
      _config(), input_pipeline.dataset_info("mnist"), 4, jax.random.key(0))
  full, _ = ckpt_lib.Checkpointer(src, read_only=True).restore(4, state)
  _, target = nnx.split(_smoke_model(jax.random.key(0)))
  params, step = ckpt_lib.restore_params(src, 4, target)
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, params, full[0])
  with pytest.raises(errors.CheckpointNotFoundError,
                     match=r"holds no checkpoint of step 5; its steps are \[4, 8\]"):
    ckpt_lib.restore_params(src, 5, target)
  _, other = nnx.split(_smoke_model(jax.random.key(0), **{"model.digit_dim": 4}))
  with pytest.raises(errors.CheckpointMismatchError,
                     match=r"checkpoint .*/checkpoints/8 does not fit this model: parameter "
                           r"decoder/layers/0/kernel has shape \(80, 32\) in the checkpoint "
                           r"but \(40, 32\) in the model"):
    ckpt_lib.restore_params(src, None, other)
  _, no_decoder = nnx.split(_smoke_model(jax.random.key(0), **{"model.use_decoder": False}))
  with pytest.raises(errors.CheckpointMismatchError,
                     match="has parameters this model lacks, e.g. decoder/layers/0/bias"):
    ckpt_lib.restore_params(src, None, no_decoder)
