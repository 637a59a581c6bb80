"""The only Orbax module: save, find and restore training state.

A checkpoint is a directory `WORKDIR/checkpoints/<step>/` with two items:
  state   the NNX state of (model, optimizer) as an Orbax StandardSave pytree
  meta    JSON: step, epoch, dataset, model config, parameter shapes, metrics
Saves are asynchronous; `Checkpointer.close()` waits for them. The latest
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
  """Raises CheckpointMismatchError naming the first parameter whose shape differs."""
  want = _param_shapes(target)
  for name, shape in want.items():
    if name not in saved_shapes:
      raise CheckpointMismatchError(
          f"checkpoint {source} has no parameter {name} (expected shape {tuple(shape)}): it "
          "was saved from a different architecture")
    if list(saved_shapes[name]) != list(shape):
      raise CheckpointMismatchError(
          f"checkpoint {source} does not fit this model: parameter {name} has shape "
          f"{tuple(saved_shapes[name])} in the checkpoint but {tuple(shape)} in the model")
  extra = sorted(set(saved_shapes) - set(want))
  if extra:
    raise CheckpointMismatchError(
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
      raise CheckpointSaveError(
          f"could not write checkpoint (step {step}) in {self.directory}: {reason}. "
          f"Earlier checkpoints are kept (steps {kept}); free space and rerun the same "
          "command to resume from the latest") from e

  def read_meta(self, step: int) -> dict:
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
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("cannot read checkpoint %s/%d (%s: %s); trying the previous one",
                        self.directory, step, type(e).__name__, e)
    if steps:  # Never silently start over next to checkpoints that exist.
      raise CheckpointReadError(
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
