"""Checkpoint safety: resume, fallback, disk full, non-finite losses, the kept best, the
model-only restore, and integrity: content digests that catch flipped bytes, the fallback
training and `mode=eval` share, read-only or full checkpoint storage.

Runs in-process on TFDS mock MNIST with the `:smoke` config (4 steps per epoch).
"""

import errno
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capsjax.run import checkpoint as ckpt_lib
from capsjax.run import checkpoint_compat
from capsjax import errors
from capsjax import losses
from capsjax import main
from capsjax import metrics as metrics_lib
from capsjax import steps as steps_lib
from capsjax import train
from tests import helpers


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
  with pytest.raises(
    FloatingPointError,
    match=r"non-finite class_loss=nan at step 5 \(epoch 1.25\); training "
    r"stopped without saving. The last good checkpoint is .*/4",
  ):
    train.train_and_evaluate(_config(), workdir)
  assert ckpt_lib.Checkpointer(workdir, read_only=True).all_steps() == good == [4]


def _fail_save_of_step(monkeypatch, step: int, error: Exception):
  """Makes Orbax's background save of `step` fail with `error` (as a full disk does);
  returns a function that undoes it."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top

  orig = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    if self._final_path.name == str(step):  # pylint: disable=protected-access
      raise error
    return await orig(self)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
  return lambda: monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", orig)


def test_disk_full_while_saving_keeps_previous_checkpoints(tmp_path, src, monkeypatch):
  workdir = _copy(src, tmp_path)
  undo = _fail_save_of_step(monkeypatch, 12, OSError(errno.ENOSPC, "No space left on device"))
  with pytest.raises(
    ckpt_lib.CheckpointSaveError,
    match=r"could not write checkpoint \(step 12\) in .*: the disk is full. "
    r"Earlier checkpoints are kept \(steps \[4, 8\]\)",
  ):
    train.train_and_evaluate(_config(keep_checkpoints=1, num_epochs=3), workdir)
  undo()
  assert ckpt_lib.Checkpointer(workdir, read_only=True).all_steps() == [4, 8]
  # With space again, the same command resumes at step 8 and finishes.
  summary = train.train_and_evaluate(_config(keep_checkpoints=1, num_epochs=3), workdir)
  assert summary["step"] == 12


def test_a_failed_background_save_stops_the_run_before_the_next_epoch(tmp_path, src, monkeypatch):
  workdir = _copy(src, tmp_path)
  _fail_save_of_step(monkeypatch, 12, OSError(errno.ENOSPC, "No space left on device"))
  with pytest.raises(ckpt_lib.CheckpointSaveError, match=r"\(step 12\) .*the disk is full"):
    train.train_and_evaluate(_config(num_epochs=5), workdir)
  # Reported within epoch 4, not at the next save (step 16): epoch 4 was never recorded.
  rows = metrics_lib.read_csv(os.path.join(workdir, "epochs.csv"))
  assert [int(r["epoch"]) for r in rows] == [1, 2, 3]


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
  selected = min(s for acc, s in vals if acc == best)  # ties: the earliest epoch.
  steps = ckpt_lib.Checkpointer(workdir, read_only=True).all_steps()
  # keep_checkpoints=1: the latest, plus the one selected on validation accuracy.
  assert steps[-1] == 16 and selected in steps and len(steps) <= 2, (vals, steps)


def test_restore_falls_back_to_previous_readable_checkpoint(tmp_path, src, caplog):
  workdir = _copy(src, tmp_path)
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "8", "state")):
    for name in files:
      os.remove(os.path.join(root, name))  # damaged (e.g. by a full disk in a copy).
  from capsjax.data import input_pipeline  # pylint: disable=g-import-not-at-top

  _, state = steps_lib.create_model_and_optimizer(
    _config(), input_pipeline.dataset_info("mnist"), 4, jax.random.key(0)
  )
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
  from capsjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from capsjax import models  # pylint: disable=g-import-not-at-top

  info = input_pipeline.dataset_info("mnist")
  return models.create_model(
    _config(**overrides).model,
    image_shape=info.image_shape,
    num_classes=info.num_classes,
    rngs=nnx.Rngs(params=key),
    conv_impl="xla",
  )


def _trained_state(tx):
  """(model, optimizer) after one real update: a state as train.py saves it."""
  model = _smoke_model(jax.random.key(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  batch = helpers.synthetic_batch(4)

  def loss(m):
    return jnp.sum(m(batch["image"], batch["label"])["class_scores"])

  optimizer.update(model, nnx.grad(loss)(model))
  return nnx.split((model, optimizer))[1]


def test_restore_params_returns_the_saved_model_arrays(tmp_path):
  import optax  # pylint: disable=g-import-not-at-top

  for name, tx in (("adam", optax.adam(1e-3)), ("sgd", optax.sgd(0.1, momentum=0.9))):
    state = _trained_state(tx)
    saved = jax.tree.map(np.array, state[0])  # host copies, taken before the save
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
    params = ckpt_lib.Checkpointer(str(tmp_path / name), read_only=True).restore_params(3, abstract)
    jax.tree.map(np.testing.assert_array_equal, params, saved)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))


def test_restore_params_of_a_training_run_and_mismatch(src):
  from capsjax.data import input_pipeline  # pylint: disable=g-import-not-at-top

  _, state = steps_lib.create_model_and_optimizer(
    _config(), input_pipeline.dataset_info("mnist"), 4, jax.random.key(0)
  )
  full, _ = ckpt_lib.Checkpointer(src, read_only=True).restore(4, state)
  _, target = nnx.split(_smoke_model(jax.random.key(0)))
  params, step = ckpt_lib.restore_params(src, 4, target)
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, params, full[0])
  with pytest.raises(
    errors.CheckpointNotFoundError, match=r"holds no checkpoint of step 5; its steps are \[4, 8\]"
  ):
    ckpt_lib.restore_params(src, 5, target)
  _, other = nnx.split(_smoke_model(jax.random.key(0), **{"model.digit_dim": 4}))
  with pytest.raises(
    errors.CheckpointMismatchError,
    match=r"checkpoint .*/checkpoints/8 does not fit this model: parameter "
    r"decoder/layers/0/kernel has shape \(80, 32\) in the checkpoint "
    r"but \(40, 32\) in the model",
  ):
    ckpt_lib.restore_params(src, None, other)
  _, no_decoder = nnx.split(_smoke_model(jax.random.key(0), **{"model.use_decoder": False}))
  with pytest.raises(
    errors.CheckpointMismatchError,
    match="has parameters this model lacks, e.g. decoder/layers/0/bias",
  ):
    ckpt_lib.restore_params(src, None, no_decoder)


# ----------------------------------------------------------------------------------------
# Integrity: content digests, the shared fallback, storage failures.
# ----------------------------------------------------------------------------------------
def _largest_array_file(workdir, step):
  d = os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_0", "d")
  return max((os.path.join(d, n) for n in os.listdir(d)), key=os.path.getsize)


def _flip(path, offsets):
  """Inverts the bytes at `offsets`: damage that no file-format check notices."""
  with open(path, "r+b") as f:
    for offset in offsets:
      f.seek(offset)
      byte = f.read(1)
      f.seek(offset)
      f.write(bytes([byte[0] ^ 0xFF]))


def _corrupt_copy(src, tmp_path, name="corrupt"):
  workdir = _copy(src, tmp_path / name)
  # Offsets at fixed fractions of the largest array file: how OCDBT packs the arrays into
  # files varies from save to save, and so does that file's size.
  path = _largest_array_file(workdir, 8)
  size = os.path.getsize(path)
  assert size > 50_000, f"{path}: {size} bytes, too small to be the array data"
  _flip(path, [size * k // 10 for k in (5, 6, 7)])
  return workdir


def _full_state():
  from capsjax.data import input_pipeline  # pylint: disable=g-import-not-at-top

  return steps_lib.create_model_and_optimizer(
    _config(), input_pipeline.dataset_info("mnist"), 4, jax.random.key(0)
  )[1]


def _latest(workdir):
  with ckpt_lib.Checkpointer(workdir, read_only=True) as ckpt:
    state, _, step = ckpt.restore_latest(_full_state())
  return jax.device_get(state), step


def test_load_run_falls_back_from_a_corrupt_latest_checkpoint(tmp_path, src, caplog):
  """`capsjax.visualize` reads runs through `analysis.load_run`: a damaged latest step
  falls back to the newest readable one, as training and mode=eval do."""
  from capsjax import analysis  # pylint: disable=g-import-not-at-top

  corrupt = _copy(src, tmp_path / "corrupt")
  for root, _, files in os.walk(os.path.join(corrupt, "checkpoints", "8", "state")):
    for name in files:
      os.remove(os.path.join(root, name))  # its arrays lost (e.g. by a full disk in a copy).
  with caplog.at_level("WARNING"):
    run = analysis.load_run(corrupt)
  assert run.step == 4
  assert re.search(r"checkpoints/8.*trying the previous checkpoint", caplog.text), caplog.text
  clean = analysis.load_run(_copy(src, tmp_path / "clean"), step=4)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(run.model), nnx.state(clean.model))
  # A step asked for by name is read as it is, or refused.
  with pytest.raises(errors.CheckpointReadError, match=r"checkpoints/8"):
    analysis.load_run(corrupt, step=8)
  with pytest.raises(errors.CheckpointReadError, match=r"checkpoints/8"):
    analysis.load_run(os.path.join(corrupt, "checkpoints", "8"))
  # Read-only: the damaged step is left where it is.
  assert os.path.isdir(os.path.join(corrupt, "checkpoints", "8"))


def test_flipped_bytes_are_detected_and_training_resumes_from_the_previous_step(
  tmp_path, src, caplog
):
  # 3 bytes of the largest array file of step 8 inverted, then one more epoch. Orbax
  # alone restores such a file without complaint (e.g. a decoder entry off by 1e28).
  corrupt = _corrupt_copy(src, tmp_path)
  with caplog.at_level("INFO"):
    train.train_and_evaluate(_config(num_epochs=3), corrupt)
  assert re.search(
    r"checkpoint .*/checkpoints/8 is corrupt: the content digest of state "
    r"entry \d is [0-9a-f]{12}\.\.\. but [0-9a-f]{12}\.\.\. was saved",
    caplog.text,
  ), caplog.text
  assert re.search(r"resumed from .*/checkpoints at step 4\b", caplog.text)
  # Set aside, not deleted: the damaged step stays for inspection.
  assert os.path.isdir(os.path.join(corrupt, "checkpoints-unreadable", "8"))
  # The result is that of a clean run resumed from step 4.
  clean = _copy(src, tmp_path / "clean")
  shutil.rmtree(os.path.join(clean, "checkpoints", "8"))
  train.train_and_evaluate(_config(num_epochs=3), clean)
  (got, got_step), (want, want_step) = _latest(corrupt), _latest(clean)
  assert got_step == want_step == 12
  jax.tree.map(np.testing.assert_array_equal, got, want)


def _model_corrupt_copy(src, tmp_path):
  """A copy of `src` whose step 8 has one flipped byte inside the model's arrays.

  Orbax's file layout varies from save to save (arrays are written concurrently), so
  the byte is searched for: the first of a few evenly spaced offsets of the array files
  that a full restore reports as a digest mismatch of entry 0.
  """
  d = os.path.dirname(_largest_array_file(src, 8))
  names = sorted(os.listdir(d), key=lambda n: -os.path.getsize(os.path.join(d, n)))
  for name in names[:2]:
    size = os.path.getsize(os.path.join(d, name))
    for k in range(1, 20):
      workdir = _copy(src, tmp_path / f"{name[:8]}_{k}")
      _flip(os.path.join(os.path.dirname(_largest_array_file(workdir, 8)), name), [size * k // 20])
      try:
        with ckpt_lib.Checkpointer(workdir, read_only=True) as ckpt:
          ckpt.restore(8, _full_state())
      except errors.CheckpointReadError as e:
        if "content digest of state entry 0 " in str(e):
          return workdir
      shutil.rmtree(workdir)
  pytest.fail("no flipped byte of the array files was reported as damage to the model")


def test_restore_params_verifies_the_model_digest(tmp_path, src):
  corrupt = _model_corrupt_copy(src, tmp_path)
  _, target = nnx.split(_smoke_model(jax.random.key(0)))
  with pytest.raises(
    errors.CheckpointReadError,
    match=r"checkpoints/8 is corrupt: the content digest of state entry 0 ",
  ):
    ckpt_lib.restore_params(corrupt, 8, target)
  _, step = ckpt_lib.restore_params(corrupt, 4, target)  # an intact step still loads.
  assert step == 4


def test_a_damaged_meta_json_is_detected(tmp_path, src):
  workdir = _copy(src, tmp_path)
  path = os.path.join(workdir, "checkpoints", "8", "meta", "metadata")
  with open(path) as f:
    text = f.read()
  # Still valid JSON, different content: only the digest can tell.
  with open(path, "w") as f:
    f.write(text.replace('"steps_per_epoch": 4', '"steps_per_epoch": 5'))
  with pytest.raises(
    errors.CheckpointReadError,
    match=r"checkpoints/8 is corrupt: its metadata \(meta/\) does not match",
  ):
    ckpt_lib.Checkpointer(workdir, read_only=True).read_meta(8)
  assert _latest(workdir)[1] == 4


@pytest.mark.parametrize("damage", ["flipped", "removed"])
def test_eval_falls_back_to_the_previous_readable_checkpoint(tmp_path, src, caplog, damage):
  # mode=eval shares training's fallback; being read-only, it moves nothing aside.
  if damage == "flipped":
    workdir = _corrupt_copy(src, tmp_path)
    reason = "is corrupt: the content digest"
  else:  # unreadable: TensorStore's error, a traceback before
    workdir = _copy(src, tmp_path)
    for name in os.listdir(d := os.path.dirname(_largest_array_file(workdir, 8))):
      os.remove(os.path.join(d, name))
    reason = "cannot read checkpoint"
  with caplog.at_level("WARNING"):
    result = main.run(_config(mode="eval"), workdir)
  assert result["step"] == 4
  assert reason in caplog.text and "checkpoints/4 is the newest readable" in caplog.text
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "8"))
  assert not os.path.exists(os.path.join(workdir, "checkpoints-unreadable"))
  # A checkpoint named by its step is evaluated as it is, or refused: no fallback.
  with pytest.raises(errors.CheckpointReadError, match=r"checkpoints/8"):
    main.run(
      _config(mode="eval", init_from=os.path.join(workdir, "checkpoints", "8")),
      str(tmp_path / "other"),
    )


def test_tensorstore_disk_full_says_the_disk_is_full(tmp_path, src, monkeypatch):
  # TensorStore reports ENOSPC as ValueError('RESOURCE_EXHAUSTED: ...'), not OSError.
  workdir = _copy(src, tmp_path)
  _fail_save_of_step(
    monkeypatch,
    12,
    ValueError(
      'RESOURCE_EXHAUSTED: Error writing "0.conv1.bias.value/0" in OCDBT database at '
      'local file "12.orbax-checkpoint-tmp/state/": Failed to write 287463 bytes to '
      "file 11: No space left on device [os_error_code='28']"
    ),
  )
  with pytest.raises(
    errors.CheckpointSaveError,
    match=r"could not write checkpoint \(step 12\) in .*: the disk is full. "
    r"Earlier checkpoints are kept \(steps \[4, 8\]\); free space",
  ):
    train.train_and_evaluate(_config(num_epochs=3), workdir)


@pytest.mark.parametrize(
  "code,reason,advice",
  [
    (errno.EROFS, "the file system is read-only", "make it writable"),
    (errno.EACCES, "permission denied", "give this user write permission"),
  ],
)
def test_unwritable_checkpoints_fail_before_training_with_the_right_advice(
  tmp_path, mock, monkeypatch, code, reason, advice
):
  # Root ignores file permissions, so the refusal is simulated at the system calls that
  # create files and directories under checkpoints/ (as a read-only mount refuses them).
  del mock
  workdir = str(tmp_path / "run")
  guarded = os.path.join(workdir, "checkpoints")
  orig_mkdir, orig_open = os.mkdir, os.open

  def refused(path):
    return os.path.abspath(os.fspath(path)).startswith(guarded) and not os.path.exists(path)

  def mkdir(path, *args, **kwargs):
    if refused(path) and os.path.exists(os.path.dirname(os.path.abspath(path))):
      raise OSError(code, os.strerror(code), path)
    return orig_mkdir(path, *args, **kwargs)

  def open_(path, flags, *args, **kwargs):
    if flags & os.O_CREAT and refused(path):
      raise OSError(code, os.strerror(code), path)
    return orig_open(path, flags, *args, **kwargs)

  os.makedirs(guarded)
  monkeypatch.setattr(os, "mkdir", mkdir)
  monkeypatch.setattr(os, "open", open_)
  with pytest.raises(errors.CheckpointSaveError) as e:
    train.train_and_evaluate(_config(num_epochs=1), workdir)
  message = str(e.value)
  assert f"could not write checkpoint in {guarded}: {reason}. " in message, message
  assert advice in message and "free space" not in message, message
  # It failed on opening the directory, before an epoch was spent training.
  assert not os.path.exists(os.path.join(workdir, "metrics.csv"))


def test_corruption_trials_find_no_silent_resume(tmp_path, src, capsys):
  # experiments/fault_injection.py --corrupt, on this module's finished run: random bytes
  # of random checkpoint files, each trial restored as a resume does.
  from experiments import fault_injection as fi  # pylint: disable=g-import-not-at-top

  counts = fi.corrupt_trials(src, 8, seed=3, root=str(tmp_path), verbose=False)
  assert counts["silent"] == counts["deleted"] == 0, counts
  assert sum(counts.values()) == 8
  assert "8 trials, 0 silent resumes from corrupt data" in capsys.readouterr().out


def test_corruption_trials_see_silent_resumes_when_digests_are_not_checked(
  tmp_path, src, monkeypatch
):
  # The script's own check: with verification off, damaged array bytes are restored
  # silently, and the trials count them.
  from experiments import fault_injection as fi  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(ckpt_lib.Checkpointer, "_verify", lambda *args: None)
  largest = os.path.relpath(_largest_array_file(src, 8), src)
  counts = fi.corrupt_trials(src, 3, seed=0, root=str(tmp_path), files=largest, verbose=False)
  assert counts["silent"] >= 1, counts


def test_a_damaged_metrics_file_is_ignored_and_the_checkpoint_still_restores(tmp_path, src, caplog):
  # Orbax parses every step's metrics/metrics when it opens the directory, so one bad
  # byte there would be a JSONDecodeError traceback.
  workdir = _copy(src, tmp_path)
  path = os.path.join(workdir, "checkpoints", "8", "metrics", "metrics")
  with open(path, "r+b") as f:
    f.seek(1)
    f.write(b"\xff")
  with caplog.at_level("WARNING"):
    assert _latest(workdir)[1] == 8  # read-only: eval, figures
    with ckpt_lib.Checkpointer(workdir) as ckpt:  # writable: a resuming run
      _, _, step = ckpt.restore_latest(_full_state())
  assert step == 8
  assert re.search(
    r"ignoring the damaged metrics file of checkpoint .*/checkpoints/8 "
    r"\(UnicodeDecodeError",
    caplog.text,
  ), caplog.text
  assert os.path.exists(path)  # left where it is
  # Training goes on from it.
  summary = train.train_and_evaluate(_config(num_epochs=3), workdir)
  assert summary["step"] == 12


def test_a_checkpoint_without_batchnorm_running_stats_is_named_as_such():
  """Efficient-CapsNet checkpoints saved before BatchNorm kept running statistics."""
  from capsjax import models  # pylint: disable=g-import-not-at-top
  from configs import efficient_capsnet  # pylint: disable=g-import-not-at-top

  config = efficient_capsnet.get_config("smoke")
  target = nnx.split(
    nnx.eval_shape(
      lambda: models.create_model(
        config.model, image_shape=(28, 28, 1), num_classes=10, rngs=nnx.Rngs(0), conv_impl="xla"
      )
    )
  )[1]
  shapes = checkpoint_compat.param_shapes(target)
  old = {k: v for k, v in shapes.items() if not re.search(r"norms/\d+/(mean|var)$", k)}
  assert len(shapes) - len(old) == 2 * len(config.model.conv_channels)
  with pytest.raises(errors.CheckpointMismatchError, match=r"no BatchNorm running statistics"):
    ckpt_lib.check_compatible(old, target, source="/x/4")
  # Any other missing entry is a different architecture.
  del old[next(k for k in old if k.endswith("scale"))]
  with pytest.raises(errors.CheckpointMismatchError, match=r"saved from a different architecture"):
    ckpt_lib.check_compatible(old, target, source="/x/4")
  ckpt_lib.check_compatible(shapes, target, source="/x/4")  # the current layout fits
