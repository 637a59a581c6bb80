"""The workdir guard: one process per workdir, one config per workdir.

Workdir layout (everything a run writes; only process 0 writes files):
  config.json            the resolved config of the run (a rerun that changes a run-defining
                         field, e.g. the model or dataset, is refused)
  checkpoints/<step>/    Orbax checkpoints (latest N + the selected one), see checkpoint.py
  metrics.csv, epochs.csv, tensorboard/, plots/curves.png   see metrics.py
  summary.json           test metrics of the final checkpoint, of the epoch selected on
                         validation, and the best test accuracy over epochs
  .lock.<process>        held while a process trains here
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time

from absl import logging
import jax

from capsjax import errors
from capsjax import processes
from capsjax import run_config

CONFIG_NAME = "config.json"


def resolve(workdir: str | None) -> str:
  """The absolute path of `workdir`; it must be a directory or not exist yet.

  An empty value is refused rather than taken as the current directory (a shell's
  `--workdir=$UNSET` would otherwise train, and with `overwrite` move files, in the cwd).
  """
  if workdir is None or not str(workdir).strip():
    raise errors.WorkdirError(
        f"--workdir={workdir!r}: expected the path of a directory (existing or to be made)")
  path = os.path.abspath(os.path.expanduser(str(workdir)))
  if os.path.lexists(path) and not os.path.isdir(path):
    what = "a dangling symlink" if os.path.islink(path) else "a file"
    raise errors.WorkdirError(f"--workdir={workdir}: {path} is {what}, expected a directory")
  return path


def _read_saved_config(path: str) -> dict:
  if not os.path.isfile(path):
    raise errors.WorkdirError(f"{path} is not a file; expected the run's saved config")
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.WorkdirError(
        f"{path}: cannot read the run's saved config ({e}); move it aside to start afresh"
    ) from e
  if not isinstance(saved, dict):
    raise errors.WorkdirError(f"{path}: expected a JSON object, got {type(saved).__name__}")
  return run_config.with_legacy_defaults(saved)


def check_config(config, workdir: str) -> None:
  """Refuses to reuse a workdir trained with a different run-defining config.

  With `config.overwrite`, the earlier run's files are moved to
  `WORKDIR/previous-<time>/` (never deleted) and training starts fresh. Then writes the
  whole resolved config to `WORKDIR/config.json`.
  """
  path = os.path.join(workdir, CONFIG_NAME)
  now = run_config.run_defining_view(config)
  if os.path.lexists(path):
    saved = _read_saved_config(path)
    diffs = run_config.diff(
        {k: saved[k] for k in run_config.RUN_DEFINING_FIELDS if k in saved}, now)
    if diffs and not config.overwrite:
      raise errors.WorkdirError(
          f"workdir {workdir} was used by a run with a different config ("
          + "; ".join(diffs[:5]) + "). Use another --workdir, or "
          "--config.overwrite=True to move the earlier run aside and start fresh")
    if diffs and jax.process_index() == 0:
      backup = os.path.join(workdir, time.strftime("previous-%Y%m%d-%H%M%S"))
      os.makedirs(backup)
      for name in os.listdir(workdir):
        if not name.startswith(("previous-", ".lock")):
          shutil.move(os.path.join(workdir, name), os.path.join(backup, name))
      logging.warning("config differs from the earlier run; moved its files to %s", backup)
  # Every process has read the saved config (and raised alike) before process 0 rewrites it.
  processes.sync("capsjax_config_checked")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    # The whole resolved config; only the run-defining fields are compared on reruns.
    with open(path, "w") as f:
      json.dump(json.loads(config.to_json_best_effort()), f, indent=2, sort_keys=True)
  processes.sync("capsjax_config_written")


@contextlib.contextmanager
def lock(workdir: str):
  """An exclusive lock: a second process training in the same workdir fails at once."""
  os.makedirs(workdir, exist_ok=True)
  # Every process of a multi-process run shares the workdir: lock per process index.
  path = os.path.join(workdir, f".lock.{jax.process_index()}")
  f = open(path, "w")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.close()
    raise errors.WorkdirInUseError(
        f"workdir {workdir} is in use by another capsjax process (lock {path}); wait for it "
        "to finish or use another --workdir") from None
  try:
    f.write(str(os.getpid()))
    f.flush()
    yield
  finally:
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()
