"""The only Orbax module: save, find and restore training state.

A checkpoint is a directory `WORKDIR/checkpoints/<step>/` with two items:
  state   the NNX state of (model, optimizer) as an Orbax StandardSave pytree: entry
          MODEL_ITEM (0) is the model, entry 1 the optimizer
  meta    JSON: step, epoch, dataset, model config, parameter shapes, metrics
`Checkpointer.restore` reads the whole state (resuming training);
`restore_params` reads only the model entry, for analysis and figures, which need no
optimizer. Saves are asynchronous; `Checkpointer.close()` waits for them. The latest
`keep` checkpoints and the best by the run's selection metric (validation accuracy, or
test accuracy in a run without a validation split) are kept.

Crash safety: Orbax writes a step into `<step>.orbax-checkpoint-tmp-<time>/` and renames
it to `<step>/` only when every item is on disk, so a run killed mid-save leaves a
temporary directory, never a half-written `<step>/`. Such leftovers are ignored with a
warning (and removed when the workdir is opened for training); the previous complete
checkpoints stay untouched, as they do when a save fails (e.g. disk full), which raises
`CheckpointSaveError` naming the directory and the steps still available.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from capsjax import errors

CKPT_DIR = "checkpoints"
# The saved state is `nnx.split((model, optimizer))[1]` (`steps.create_model_and_optimizer`),
# keyed by position: the model's variables are entry 0.
MODEL_ITEM = 0


CheckpointMismatchError = errors.CheckpointMismatchError
CheckpointReadError = errors.CheckpointReadError
CheckpointSaveError = errors.CheckpointSaveError


_TMP_RE = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


def incomplete_checkpoints(directory: str) -> list[str]:
  """Temporary directories of saves that never finished (a crash or kill mid-save)."""
  if not os.path.isdir(directory):
    return []
  return sorted(os.path.join(directory, n) for n in os.listdir(directory) if _TMP_RE.match(n))


def _key_name(entry) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _param_shapes(tree: Any) -> dict[str, list[int]]:
  """{'0/digit_caps/w': [1152, 10, 8, 16], ...} for every array leaf of `tree`."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(n for n in map(_key_name, path) if n != "value"): list(np.shape(x))
          for path, x in flat}


def check_compatible(saved_shapes: dict[str, list[int]], target: Any, *, source: str) -> None:
  """Raises CheckpointMismatchError naming the first parameter whose shape differs.

  Args:
    saved_shapes: {'name/of/param': shape} as saved in a checkpoint's meta.
    target: a pytree of arrays or `jax.ShapeDtypeStruct`s, named the same way.
    source: the checkpoint's path, for the message.
  """
  want = _param_shapes(target)
  for name, shape in want.items():
    if name not in saved_shapes:
      raise errors.CheckpointMismatchError(
          f"checkpoint {source} has no parameter {name} (expected shape {tuple(shape)}): it "
          "was saved from a different architecture")
    if list(saved_shapes[name]) != list(shape):
      raise errors.CheckpointMismatchError(
          f"checkpoint {source} does not fit this model: parameter {name} has shape "
          f"{tuple(saved_shapes[name])} in the checkpoint but {tuple(shape)} in the model")
  extra = sorted(set(saved_shapes) - set(want))
  if extra:
    raise errors.CheckpointMismatchError(
        f"checkpoint {source} has parameters this model lacks, e.g. {extra[0]}: it was "
        "saved from a different architecture")


class Checkpointer:
  """Orbax CheckpointManager for (model, optimizer) state plus JSON metadata."""

  def __init__(self, workdir: str, *, keep: int = 3, keep_best: bool = True,
               async_save: bool = True, read_only: bool = False,
               best_metric: str = "test_accuracy"):
    self.directory = os.path.abspath(os.path.join(workdir, CKPT_DIR))
    self._read_only = read_only
    for path in incomplete_checkpoints(self.directory):
      logging.warning("ignoring incomplete checkpoint %s (a save that was interrupted)%s",
                      path, "" if read_only else "; removing it")
    policies = [ocp.checkpoint_managers.LatestN(n=max(1, keep))]
    # The metric that picks the kept "best" checkpoint: 'val_accuracy' when the run holds
    # out a validation split. Steps saved without it (mid-epoch stops) are never best.
    # Ties go to the earliest epoch, as `metrics.select` picks them (accuracies differ by
    # at least 1/num_examples, far more than 1e-9 x epoch).
    best = lambda m: m.get(best_metric, float("-inf")) - 1e-9 * m.get("epoch", 0)
    if keep_best:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=best, reverse=False, n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        # best_fn is what makes Orbax write each step's metrics to disk: without it a
        # reopened manager (a resumed run) sees no metrics, and BestN protects nothing.
        best_fn=best, best_mode="max",
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("state", "meta"))
    self._closed = False

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def best_step(self) -> int | None:
    return self._mngr.best_step()

  def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> bool:
    """Starts an asynchronous save of `state` (any pytree of arrays) with JSON `meta`."""
    meta = dict(meta, step=int(step), param_shapes=_param_shapes(state))
    with self._save_errors(step):
      return self._mngr.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave(meta)),
          metrics=metrics)

  @contextlib.contextmanager
  def _save_errors(self, step):
    """Turns an OSError of a (possibly earlier, asynchronous) save into one clear error."""
    try:
      yield
    except OSError as e:
      reason = ("the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT)
                else f"{type(e).__name__}: {e}")
      kept = sorted(int(n) for n in os.listdir(self.directory) if n.isdigit()) if (
          os.path.isdir(self.directory)) else []
      raise errors.CheckpointSaveError(
          f"could not write checkpoint (step {step}) in {self.directory}: {reason}. "
          f"Earlier checkpoints are kept (steps {kept}); free space and rerun the same "
          "command to resume from the latest") from e

  def read_meta(self, step: int) -> dict:
    """The JSON metadata saved with `step`; CheckpointNotFoundError if there is none."""
    steps = self.all_steps()
    if step not in steps:
      raise errors.CheckpointNotFoundError(
          f"{self.directory} holds no checkpoint of step {step}; its steps are {steps}")
    return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, target: Any) -> tuple[Any, dict]:
    """Restores the state saved at `step` into the structure/shardings of `target`.

    `target` may hold arrays or `jax.ShapeDtypeStruct`s; shapes are checked first so a
    checkpoint of another architecture fails with the parameter's name.
    """
    meta = self.read_meta(step)
    check_compatible(meta.get("param_shapes", {}), target,
                     source=os.path.join(self.directory, str(step)))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = self._mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return restored["state"], meta

  def restore_params(self, step: int, target_params: Any) -> Any:
    """Restores only the model entry of the state saved at `step`, not the optimizer.

    Orbax reads just the arrays under state entry MODEL_ITEM (a partial restore), so a
    model can be loaded without rebuilding the optimizer that trained it.

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
    """
    saved = self.read_meta(step).get("param_shapes", {})
    source = os.path.join(self.directory, str(step))
    prefix = f"{MODEL_ITEM}/"
    check_compatible({k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)},
                     target_params, source=source)
    # Only the keys present in `item` are read; the optimizer's arrays stay on disk.
    item = {MODEL_ITEM: jax.tree.map(_abstract_on_device, target_params)}
    # A checkpointer of its own: the manager has registered StandardRestore for 'state'
    # and refuses other restore arguments for that item.
    with ocp.PyTreeCheckpointer() as reader:
      restored = reader.restore(
          os.path.join(source, "state"),
          args=ocp.args.PyTreeRestore(
              item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
              partial_restore=True))
    return restored[MODEL_ITEM]

  def restore_latest(self, target: Any) -> tuple[Any, dict, int] | None:
    """Restores the newest checkpoint that can be read: (state, meta, step), or None.

    A checkpoint that cannot be read (e.g. damaged by a full disk) is skipped with a
    warning in favour of the one before; one of another architecture raises.
    """
    steps = sorted(self.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      try:
        state, meta = self.restore(step, target)
        if i and not self._read_only:
          self._set_aside(steps[:i])
        return state, meta, step
      except errors.CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("cannot read checkpoint %s/%d (%s: %s); trying the previous one",
                        self.directory, step, type(e).__name__, e)
    if steps:  # Never silently start over next to checkpoints that exist.
      raise errors.CheckpointReadError(
          f"none of the checkpoints {sorted(steps)} in {self.directory} can be read (see the "
          "warnings above); move the directory aside to start over")
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unreadable checkpoints to `checkpoints-unreadable/` (kept, never deleted).

    The resumed run will reach those steps again and must be able to save them.
    """
    aside = self.directory + "-unreadable"
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        dst = os.path.join(aside, str(step))
        if os.path.exists(dst):
          dst += time.strftime("-%Y%m%d-%H%M%S")
        shutil.move(os.path.join(self.directory, str(step)), dst)
        logging.warning("moved unreadable checkpoint %s/%d to %s", self.directory, step, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("capsjax_checkpoints_set_aside")
    self._mngr.reload()

  def wait(self) -> None:
    with self._save_errors(self.latest_step()):
      self._mngr.wait_until_finished()

  def close(self) -> None:
    """Waits for saves in flight, then releases the manager (idempotent)."""
    if self._closed:
      return
    self._closed = True
    with self._save_errors(self.latest_step()):
      self._mngr.wait_until_finished()
    self._mngr.close()


def _abstract_on_device(x) -> jax.ShapeDtypeStruct:
  x = ocp.utils.to_shape_dtype_struct(x)
  if getattr(x, "sharding", None) is None:
    # Without a sharding Orbax restores NumPy arrays; a model wants device arrays.
    x = jax.ShapeDtypeStruct(x.shape, x.dtype,
                             sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
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
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    return ckpt.restore_params(step, target_params), step
  finally:
    ckpt.close()


def find_checkpoint(path: str) -> tuple[str, int]:
  """Resolves `path` to (run workdir, step) for `init_from` and `visualize --checkpoint`.

  Accepts a run workdir (latest checkpoint), its `checkpoints/` directory, or one
  `checkpoints/<step>` directory.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise errors.CheckpointNotFoundError(
        f"checkpoint path {path} does not exist; expected a run workdir, its "
        f"'{CKPT_DIR}/' directory or a '{CKPT_DIR}/<step>' directory")
  base = os.path.basename(path.rstrip("/"))
  parent = os.path.dirname(path.rstrip("/"))
  if base.isdigit() and os.path.basename(parent) == CKPT_DIR:
    return os.path.dirname(parent), int(base)
  workdir = os.path.dirname(path) if base == CKPT_DIR else path
  if not os.path.isdir(os.path.join(workdir, CKPT_DIR)):
    raise errors.CheckpointNotFoundError(
        f"no checkpoints under {path}: expected a '{CKPT_DIR}/' directory written by "
        "`python -m capsjax.main`")
  step = Checkpointer(workdir, read_only=True).latest_step()
  if step is None:
    raise errors.CheckpointNotFoundError(f"{os.path.join(workdir, CKPT_DIR)} holds no complete checkpoint")
  return workdir, step
