"""The only Orbax module: save, find and restore training state.

A checkpoint is a directory `WORKDIR/checkpoints/<step>/` with two items:
  state   the NNX state of (model, optimizer) as an Orbax StandardSave pytree: entry
          MODEL_ITEM (0) is the model, entry 1 the optimizer
  meta    JSON: step, epoch, dataset, model config, parameter shapes, metrics, and the
          content digests (`DIGESTS`)
`Checkpointer.restore` reads the whole state (resuming training);
`restore_params` reads only the model entry, for analysis and figures, which need no
optimizer. Saves are asynchronous; `Checkpointer.close()` waits for them. The latest
`keep` checkpoints and the best by the run's selection metric (validation accuracy, or
test accuracy in a run without a validation split) are kept.

Crash safety: Orbax writes a step into `<step>.orbax-checkpoint-tmp-<time>/` and renames
it to `<step>/` only when every item is on disk, so a run killed mid-save leaves a
temporary directory, never a half-written `<step>/`. Such leftovers are ignored with a
warning (and removed when the workdir is opened for training); the previous complete
checkpoints stay untouched, as they do when a save fails.

Integrity (digests and shape checks: `checkpoint_compat`): a step that cannot be read or
fails its digest is treated alike (`first_readable`, shared by training and `mode=eval`):
a warning, the previous step instead, and, in a run that will save again, the damaged
step moved to `checkpoints-unreadable/` (kept, never deleted). A model-only restore
checks the model entry's digest; a checkpoint without digests restores unchecked. A
damaged Orbax metrics file, which only decides the kept "best" step, is ignored with a
warning (`_Manager`). `python -m experiments.fault_injection --corrupt` tests all this.

Storage failures (messages and quieting Orbax's threads: `storage`): every wait on a
background save is bounded (`SAVE_TIMEOUT_S`), and every Checkpointer is closed on the
paths that open one, so no Orbax thread outlives a run to hang it or print a traceback
after its error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging

from capsjax import errors
from capsjax.run import checkpoint_compat as compat
from capsjax.run import storage

CKPT_DIR = "checkpoints"
# Re-exported: the driver, tests and benchmarks reach these through the checkpointer.
MODEL_ITEM = compat.MODEL_ITEM
DIGESTS = compat.DIGESTS
content_digests = compat.content_digests
check_compatible = compat.check_compatible
incomplete_checkpoints = compat.incomplete_checkpoints

CheckpointMismatchError = errors.CheckpointMismatchError
CheckpointReadError = errors.CheckpointReadError
CheckpointSaveError = errors.CheckpointSaveError

# The longest wait on a background save (`save`, `wait`, `close`) before giving up with an
# error. A save of the full model takes about a second; two minutes mean the storage hangs.
SAVE_TIMEOUT_S = 120


class _Manager(ocp.CheckpointManager):
  """Orbax's CheckpointManager, reading a damaged metrics file as no metrics.

  Orbax parses every step's `metrics/metrics` when it opens the directory, and a file
  that is not JSON would stop it with a traceback. The metrics only decide which step is
  kept as the best, so that step just loses its "best" candidacy; its state and meta
  are checked by their digests when restored. The file stays where it is.
  """

  def _get_metrics(self, step: int):
    try:
      return super()._get_metrics(step)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
      logging.warning(
        "ignoring the damaged metrics file of checkpoint %s/%d (%s): it only "
        "decides which checkpoint is kept as the best",
        self.directory,
        step,
        storage.first_line(e),
      )
      return None


class _DigestMismatch(Exception):
  pass


class Checkpointer:
  """Orbax CheckpointManager for (model, optimizer) state plus JSON metadata.

  Every save records a sha256 content digest of each state entry in the meta JSON
  (`DIGESTS`); every restore recomputes and compares it, so flipped bits in a checkpoint
  file surface as `CheckpointReadError` instead of silently wrong parameters.
  """

  def __init__(
    self,
    workdir: str,
    *,
    keep: int = 3,
    keep_best: bool = True,
    async_save: bool = True,
    read_only: bool = False,
    best_metric: str = "test_accuracy",
  ):
    self.directory = os.path.abspath(os.path.join(workdir, CKPT_DIR))
    self._read_only = read_only
    storage.quiet_orbax_failures()
    self._closed = True  # until the manager exists: close() then has nothing to release.
    self._hung = False  # a wait timed out: Orbax's own (unbounded) waits are skipped.
    self._failed = False  # a save failure was raised: close() does not raise it again.
    self._in_flight = None  # the step of the latest save started, for messages.
    if not read_only:
      with self._save_errors(None):
        storage.check_writable(self.directory)
    for path in incomplete_checkpoints(self.directory):
      logging.warning(
        "ignoring incomplete checkpoint %s (a save that was interrupted)%s",
        path,
        "" if read_only else "; removing it",
      )
      if not read_only and jax.process_index() == 0:
        # Removed here rather than by Orbax's cleanup_tmp_directories, which runs in a
        # thread that nothing waits for: a run that fails right after opening its
        # checkpoints (a bad init_from) then dies with that thread's traceback at exit.
        shutil.rmtree(path, ignore_errors=True)
    policies = [ocp.checkpoint_managers.LatestN(n=max(1, keep))]

    # The metric that picks the kept "best" checkpoint: 'val_accuracy' when the run holds
    # out a validation split. Steps saved without it (mid-epoch stops) are never best.
    # Ties go to the earliest epoch, as `metrics.select` picks them (accuracies differ by
    # at least 1/num_examples, far more than 1e-9 x epoch).
    def best(m):
      return m.get(best_metric, float("-inf")) - 1e-9 * m.get("epoch", 0)

    if keep_best:
      policies.append(
        ocp.checkpoint_managers.BestN(
          get_metric_fn=best, reverse=False, n=1, keep_checkpoints_without_metrics=False
        )
      )
    options = ocp.CheckpointManagerOptions(
      # best_fn is what makes Orbax write each step's metrics to disk: without it a
      # reopened manager (a resumed run) sees no metrics, and BestN protects nothing.
      best_fn=best,
      best_mode="max",
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=async_save,
      create=not read_only,
      read_only=read_only,
      cleanup_tmp_directories=False,
      # Creating the step's directories in `save` itself makes an unwritable directory
      # fail there, at once. Created in the background, a failure leaves Orbax threads
      # waiting for a "directory created" signal that never comes: the process then
      # hangs for minutes at exit.
      async_options=ocp.AsyncOptions(
        timeout_secs=SAVE_TIMEOUT_S, create_directories_asynchronously=False
      ),
    )
    with self._save_errors(None):
      self._mngr = _Manager(self.directory, options=options, item_names=("state", "meta"))
    self._closed = False

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def best_step(self) -> int | None:
    return self._mngr.best_step()

  def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> bool:
    """Starts an asynchronous save of `state` (any pytree of arrays) with JSON `meta`.

    The content digests are computed here, from the arrays as they are now: the save
    itself finishes in the background, after the training loop has moved on.

    Raises:
      CheckpointSaveError: the directory cannot be written (read-only, permissions, disk
        full), also for an earlier asynchronous save that failed since.
    """
    meta = dict(meta, step=int(step), param_shapes=compat.param_shapes(state))
    meta[DIGESTS] = dict(content_digests(state), meta=compat.meta_digest(meta))
    # Orbax's save first waits for the previous one; doing that here (bounded) names the
    # step that failed if it was the previous save.
    with self._save_errors(self._in_flight):
      self._wait_bounded()
    with self._save_errors(step):
      saved = self._mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics=metrics,
      )
    self._in_flight = step
    return saved

  @contextlib.contextmanager
  def _save_errors(self, step):
    """Turns a storage failure of a (possibly earlier, asynchronous) save into one error."""
    try:
      yield
    except errors.CapsjaxError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      if storage.save_failure(e) is None:
        raise
      self._failed = True
      raise storage.save_error(e, self.directory, step) from e

  def read_meta(self, step: int) -> dict:
    """The JSON metadata saved with `step`.

    Raises:
      CheckpointNotFoundError: there is no checkpoint of `step`.
      CheckpointReadError: its metadata cannot be read.
    """
    steps = self.all_steps()
    if step not in steps:
      raise errors.CheckpointNotFoundError(
        f"{self.directory} holds no checkpoint of step {step}; its steps are {steps}"
      )
    with self._read_errors(step):
      meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = meta["meta"]
      mismatch = compat.meta_mismatch(meta)
      if mismatch:
        raise _DigestMismatch(mismatch)
      return meta

  @contextlib.contextmanager
  def _read_errors(self, step: int):
    """Turns a failure to read checkpoint `step`'s files into CheckpointReadError."""
    try:
      yield
    except errors.CapsjaxError:
      raise
    except _DigestMismatch as e:
      raise errors.CheckpointReadError(f"checkpoint {self.directory}/{step} is corrupt: {e}") from e
    except Exception as e:  # pylint: disable=broad-except
      # Orbax and TensorStore report damaged files as ValueError, KeyError, OSError, ...
      raise errors.CheckpointReadError(
        f"cannot read checkpoint {self.directory}/{step} ({storage.first_line(e)})"
      ) from e

  def _verify(self, step: int, meta: dict, tree: Any) -> None:
    """Compares the digests of the restored `tree` with those saved in `meta`.

    Only the entries in `tree` are checked (a model-only restore has just entry 0). A
    checkpoint whose meta holds no digests passes unchecked.
    """
    saved = meta.get(DIGESTS)
    if not saved:
      logging.info(
        "checkpoint %s/%d has no content digest (saved by an older capsjax); not verified",
        self.directory,
        step,
      )
      return
    mismatch = compat.state_mismatch(saved, tree)
    if mismatch:
      raise _DigestMismatch(mismatch)

  def restore(self, step: int, target: Any) -> tuple[Any, dict]:
    """Restores the state saved at `step` into the structure/shardings of `target`.

    Args:
      step: a step in `all_steps()`.
      target: a pytree of arrays or `jax.ShapeDtypeStruct`s; shapes are checked first so
        a checkpoint of another architecture fails with the parameter's name.

    Returns:
      (state shaped like `target`, the checkpoint's meta).

    Raises:
      CheckpointNotFoundError: no checkpoint at `step`.
      CheckpointMismatchError: another architecture.
      CheckpointReadError: its files cannot be read, or its content digest does not match.
    """
    meta = self.read_meta(step)
    check_compatible(
      meta.get("param_shapes", {}), target, source=os.path.join(self.directory, str(step))
    )
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with self._read_errors(step):
      restored = self._mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
      )
      self._verify(step, meta, restored["state"])
    return restored["state"], meta

  def restore_params(self, step: int, target_params: Any) -> Any:
    """Restores only the model entry of the state saved at `step`, not the optimizer.

    Orbax reads just the arrays under state entry MODEL_ITEM (a partial restore), so a
    model can be loaded without rebuilding the optimizer that trained it. The model
    entry's content digest is verified.

    Args:
      step: a step in `all_steps()`.
      target_params: the model's state (`nnx.split(model)[1]`), holding arrays or
        `jax.ShapeDtypeStruct`s (e.g. from `nnx.eval_shape`); leaves without a sharding
        are restored onto the default device.

    Returns:
      The saved model state, with the structure of `target_params` and arrays as leaves.

    Raises:
      CheckpointNotFoundError: no checkpoint at `step`.
      CheckpointMismatchError: the checkpoint's model has other parameters or shapes; the
        message names the first one that differs.
      CheckpointReadError: its files cannot be read, or the model's digest does not match.
    """
    meta = self.read_meta(step)
    saved = meta.get("param_shapes", {})
    source = os.path.join(self.directory, str(step))
    prefix = f"{MODEL_ITEM}/"
    check_compatible(
      {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)},
      target_params,
      source=source,
    )
    # Only the keys present in `item` are read; the optimizer's arrays stay on disk.
    item = {MODEL_ITEM: jax.tree.map(_abstract_on_device, target_params)}
    # A checkpointer of its own: the manager has registered StandardRestore for 'state'
    # and refuses other restore arguments for that item.
    with self._read_errors(step), ocp.PyTreeCheckpointer() as reader:
      restored = reader.restore(
        os.path.join(source, "state"),
        args=ocp.args.PyTreeRestore(
          item=item,
          restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True,
        ),
      )
      self._verify(step, meta, {MODEL_ITEM: restored[MODEL_ITEM]})
    return restored[MODEL_ITEM]

  def restore_latest(self, target: Any) -> tuple[Any, dict, int] | None:
    """Restores the newest checkpoint that can be read: (state, meta, step), or None.

    A checkpoint that cannot be read or fails its content digest is skipped with a
    warning in favour of the one before (see `first_readable`); one of another
    architecture raises.
    """
    found = self.first_readable(self.all_steps(), lambda step: self.restore(step, target))
    if found is None:
      return None
    step, (state, meta) = found
    return state, meta, step

  def first_readable(
    self,
    steps: list[int],
    restore: Callable[[int], Any],
    *,
    advice: str = "; move the directory aside to start over",
  ) -> tuple[int, Any] | None:
    """(step, restore(step)) for the newest of `steps` that restores, or None if no steps.

    Training and `mode=eval` share this fallback. A step whose restore raises
    CheckpointReadError (unreadable files, a content digest that does not match) is
    skipped with a warning; a writable checkpointer then moves the skipped steps to
    `checkpoints-unreadable/` (kept, never deleted). Other errors (another architecture,
    a bad config) raise.

    Args:
      steps: candidate steps, in any order.
      restore: reads one step; raises CheckpointReadError if it cannot.
      advice: the end of the error when no step can be read.

    Raises:
      CheckpointReadError: none of `steps` can be read (a single step: its own error).
    """
    steps = sorted(steps, reverse=True)
    for i, step in enumerate(steps):
      try:
        result = restore(step)
      except errors.CheckpointReadError as e:
        if len(steps) == 1:
          raise
        logging.warning("%s; trying the previous checkpoint", e)
        continue
      if i:
        logging.warning(
          "%s/%d is the newest readable checkpoint; unreadable: steps %s",
          self.directory,
          step,
          steps[:i],
        )
        if not self._read_only:
          self._set_aside(steps[:i])
      return step, result
    if steps:  # Never silently start over next to checkpoints that exist.
      raise errors.CheckpointReadError(
        f"none of the checkpoints {sorted(steps)} in {self.directory} can be read (see the "
        f"warnings above){advice}"
      )
    return None

  def set_aside_after(self, step: int) -> list[int]:
    """Moves the checkpoints after `step` to `checkpoints-superseded/` (kept, never deleted).

    For a run resumed from an older step than its latest (an ensemble member rolled back
    to the step its peers have): it will reach those steps again and must be able to save
    them, and Orbax refuses a step at or below its latest. Returns the steps moved.
    """
    later = [s for s in self.all_steps() if s > step]
    if later:
      self._set_aside(later, kind="superseded")
    return later

  def _set_aside(self, steps: list[int], kind: str = "unreadable") -> None:
    """Moves checkpoints to `checkpoints-<kind>/` (kept, never deleted).

    The resumed run will reach those steps again and must be able to save them.
    """
    aside = f"{self.directory}-{kind}"
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        dst = os.path.join(aside, str(step))
        if os.path.exists(dst):
          dst += time.strftime("-%Y%m%d-%H%M%S")
        shutil.move(os.path.join(self.directory, str(step)), dst)
        logging.warning("moved %s checkpoint %s/%d to %s", kind, self.directory, step, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      multihost_utils.sync_global_devices("capsjax_checkpoints_set_aside")
    self._mngr.reload()

  def _wait_bounded(self) -> None:
    """`wait_until_finished`, but giving up after SAVE_TIMEOUT_S with CheckpointSaveError.

    Orbax joins its save thread without a timeout; storage that stops answering would
    hang the process, so the join runs in a daemon thread that this one waits for.
    """
    failure: list[BaseException] = []

    def wait():
      try:
        self._mngr.wait_until_finished()
      except BaseException as e:  # pylint: disable=broad-except
        failure.append(e)

    waiter = threading.Thread(target=wait, name="capsjax_wait_for_save", daemon=True)
    waiter.start()
    waiter.join(SAVE_TIMEOUT_S)
    if waiter.is_alive():
      self._hung = True
      raise errors.CheckpointSaveError(
        f"a checkpoint save in {self.directory} did not finish within {SAVE_TIMEOUT_S} s: "
        "the storage is not responding. Earlier checkpoints are kept; rerun the same "
        "command to resume from the latest"
      )
    if failure:
      raise failure[0]

  def wait(self) -> None:
    """Waits (bounded) for saves in flight; CheckpointSaveError if one failed."""
    with self._save_errors(self._in_flight):
      self._wait_bounded()

  def check_saves(self, *, block: bool = False) -> None:
    """Raises CheckpointSaveError now for a background save that has failed since.

    Without `block`, only a save that has already finished is looked at: the training
    loop calls this at log steps, so a full disk stops the run within steps of the
    failed save instead of at the next save. With `block` (epoch ends, where every
    process calls it alike), waits for the save in flight.
    """
    if self._in_flight is None or self._closed or self._failed:
      return
    if not block and self._mngr.is_saving_in_progress():
      return
    self.wait()

  def close(self) -> None:
    """Waits (bounded) for saves in flight, then releases the manager (idempotent).

    The manager is released even when a save failed, so that no Orbax thread outlives
    the run; the failure is then raised as CheckpointSaveError.
    """
    if self._closed:
      return
    self._closed = True
    self._failed_before_close = self._failed
    try:
      with self._save_errors(self._in_flight):
        self._wait_bounded()
    except errors.CheckpointSaveError as e:
      if not self._failed_before_close:
        raise
      # The failure was raised already (by `save`); an exit path closing the manager
      # must not report it a second time.
      logging.info("checkpoint save failure, already reported: %s", e)
    finally:
      if not self._hung:  # Orbax's close() waits again, without a bound.
        try:
          self._mngr.close()
        except Exception as e:  # pylint: disable=broad-except
          # A failed save raises again here; it was reported above.
          logging.info("while closing the checkpoint manager: %s", storage.first_line(e))

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _abstract_on_device(x) -> jax.ShapeDtypeStruct:
  x = ocp.utils.to_shape_dtype_struct(x)
  if getattr(x, "sharding", None) is None:
    # Without a sharding Orbax restores NumPy arrays; a model wants device arrays.
    x = jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    )
  return x


def restore_params(path: str, step: int | None, target_params: Any) -> tuple[Any, int]:
  """Restores the model state of a checkpoint without its optimizer state.

  Args:
    path: a run workdir, its `checkpoints/` directory or `checkpoints/<step>` (see
      `find_checkpoint`).
    step: the step to restore; None takes the one `path` resolves to (the latest).
    target_params: the model's state, as for `Checkpointer.restore_params`.

  Returns:
    (model state shaped like `target_params`, the restored step).
  """
  workdir, found = find_checkpoint(path)
  step = found if step is None else int(step)
  with Checkpointer(workdir, read_only=True) as ckpt:
    return ckpt.restore_params(step, target_params), step


def names_a_step(path: str) -> bool:
  """Whether `path` is one `checkpoints/<step>` directory (not a workdir)."""
  path = os.path.abspath(os.path.expanduser(path)).rstrip("/")
  return os.path.basename(path).isdigit() and os.path.basename(os.path.dirname(path)) == CKPT_DIR


def find_checkpoint(path: str) -> tuple[str, int]:
  """Resolves `path` to (run workdir, step) for `init_from` and `visualize --checkpoint`.

  Accepts a run workdir (latest checkpoint), its `checkpoints/` directory, or one
  `checkpoints/<step>` directory.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise errors.CheckpointNotFoundError(
      f"checkpoint path {path} does not exist; expected a run workdir, its "
      f"'{CKPT_DIR}/' directory or a '{CKPT_DIR}/<step>' directory"
    )
  base = os.path.basename(path.rstrip("/"))
  parent = os.path.dirname(path.rstrip("/"))
  if base.isdigit() and os.path.basename(parent) == CKPT_DIR:
    return os.path.dirname(parent), int(base)
  workdir = os.path.dirname(path) if base == CKPT_DIR else path
  if not os.path.isdir(os.path.join(workdir, CKPT_DIR)):
    raise errors.CheckpointNotFoundError(
      f"no checkpoints under {path}: expected a '{CKPT_DIR}/' directory written by "
      "`python -m capsjax.main`"
    )
  # Closed at once: an Orbax manager left open can still be running a thread at
  # interpreter exit, which then prints a traceback after the run's own error.
  with Checkpointer(workdir, read_only=True) as ckpt:
    step = ckpt.latest_step()
  if step is None:
    raise errors.CheckpointNotFoundError(
      f"{os.path.join(workdir, CKPT_DIR)} holds no complete checkpoint"
    )
  return workdir, step
