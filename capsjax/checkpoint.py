"""The only Orbax module: save, find and restore training state.

A checkpoint is a directory `WORKDIR/checkpoints/<step>/` with two items:
  state   the NNX state of (model, optimizer) as an Orbax StandardSave pytree
  meta    JSON: step, epoch, dataset, model config, parameter shapes, metrics
Saves are asynchronous; `Checkpointer.close()` waits for them. The latest
`keep` checkpoints and the best by test accuracy are kept.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

CKPT_DIR = "checkpoints"


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model it is being loaded into."""


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
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, CKPT_DIR))
    policies = [ocp.checkpoint_managers.LatestN(n=max(1, keep))]
    if keep_best:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: m["test_accuracy"], reverse=False, n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=not read_only, read_only=read_only)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def best_step(self) -> int | None:
    return self._mngr.best_step()

  def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> bool:
    """Starts an asynchronous save of `state` (any pytree of arrays) with JSON `meta`."""
    meta = dict(meta, step=int(step), param_shapes=_param_shapes(state))
    return self._mngr.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)),
        metrics=metrics)

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

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def find_checkpoint(path: str) -> tuple[str, int]:
  """Resolves `path` to (run workdir, step) for `init_from` and `visualize --checkpoint`.

  Accepts a run workdir (latest checkpoint), its `checkpoints/` directory, or one
  `checkpoints/<step>` directory.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"checkpoint path {path} does not exist; expected a run workdir, its "
        f"'{CKPT_DIR}/' directory or a '{CKPT_DIR}/<step>' directory")
  base = os.path.basename(path.rstrip("/"))
  parent = os.path.dirname(path.rstrip("/"))
  if base.isdigit() and os.path.basename(parent) == CKPT_DIR:
    return os.path.dirname(parent), int(base)
  workdir = os.path.dirname(path) if base == CKPT_DIR else path
  if not os.path.isdir(os.path.join(workdir, CKPT_DIR)):
    raise FileNotFoundError(
        f"no checkpoints under {path}: expected a '{CKPT_DIR}/' directory written by "
        "`python -m capsjax.main`")
  step = Checkpointer(workdir, read_only=True).latest_step()
  if step is None:
    raise FileNotFoundError(f"{os.path.join(workdir, CKPT_DIR)} holds no complete checkpoint")
  return workdir, step
