"""The workdir guard: one process per workdir, one config per workdir.

Workdir layout (everything a run writes; only process 0 writes files):
  config.json            the resolved config of the run (a rerun that changes a run-defining
                         field, e.g. the model or dataset, is refused unless
                         config.resume_with_changes names it)
  config.json.previous-<time>  the config.json a resume with changes replaced
  checkpoints/<step>/    Orbax checkpoints (latest N + the selected one), see checkpoint.py
  metrics.csv, epochs.csv, tensorboard/, plots/curves.png   see metrics.py
  summary.json           test metrics of the final checkpoint, of the epoch selected on
                         validation, and the best test accuracy over epochs
  .lock.<process>        held while a process trains here
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import time
from typing import Any

from absl import logging
import jax

from capsjax.run import checkpoint as ckpt_lib
from capsjax import errors
from capsjax.run import processes
from capsjax.run import config as run_config

CONFIG_NAME = "config.json"


def resolve(workdir: str | None) -> str:
  """The absolute path of `workdir`; it must be a directory or not exist yet.

  An empty value is refused rather than taken as the current directory (a shell's
  `--workdir=$UNSET` would otherwise train, and with `overwrite` move files, in the cwd).
  """
  if workdir is None or not str(workdir).strip():
    raise errors.WorkdirError(
      f"--workdir={workdir!r}: expected the path of a directory (existing or to be made)"
    )
  path = os.path.abspath(os.path.expanduser(str(workdir)))
  # The path itself, or the nearest part of it that exists (a workdir made later under a
  # file would fail there with NotADirectoryError).
  existing = path
  while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
    existing = os.path.dirname(existing)
  if os.path.lexists(existing) and not os.path.isdir(existing):
    what = "a dangling symlink" if os.path.islink(existing) else "a file"
    raise errors.WorkdirError(f"--workdir={workdir}: {existing} is {what}, expected a directory")
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


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir/checkpoints/` holds a step (complete or being written), or an
  ensemble member's `seed-<s>/checkpoints/` below it."""

  def has_steps(d: str) -> bool:
    try:
      return any(n[:1].isdigit() for n in os.listdir(os.path.join(d, ckpt_lib.CKPT_DIR)))
    except OSError:
      return False

  if has_steps(workdir):
    return True
  try:
    members = [e.path for e in os.scandir(workdir) if re.fullmatch(r"seed-\d+", e.name)]
  except OSError:
    return False
  return any(has_steps(d) for d in members)


def _move_aside(workdir: str) -> None:
  backup = os.path.join(workdir, time.strftime("previous-%Y%m%d-%H%M%S"))
  os.makedirs(backup)
  for name in os.listdir(workdir):
    if not name.startswith(("previous-", ".lock")):
      shutil.move(os.path.join(workdir, name), os.path.join(backup, name))
  logging.warning("config differs from the earlier run; moved its files to %s", backup)


def _log_changes(config, workdir: str, changed) -> None:
  for field, old, new in changed:
    logging.warning(
      "resuming %s with config.%s changed: %r -> %r (config.resume_with_changes=%r)",
      workdir,
      field,
      old,
      new,
      config.resume_with_changes,
    )


def _keep_previous(path: str) -> None:
  """Copies config.json to config.json.previous-<time>; never overwrites a kept one."""
  if not os.path.lexists(path):
    return
  backup = f"{path}.previous-{time.strftime('%Y%m%d-%H%M%S')}"
  n = 1
  while os.path.lexists(backup):
    backup = f"{path}.previous-{time.strftime('%Y%m%d-%H%M%S')}.{n}"
    n += 1
  shutil.copy2(path, backup)
  logging.warning("the earlier config.json is kept as %s", backup)


def _write_config(config, path: str) -> None:
  """The whole resolved config (only the run-defining fields are compared on reruns).

  Written whole or not at all: a run stopped mid-write must not leave half a file.
  """
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(json.loads(config.to_json_best_effort()), f, indent=2, sort_keys=True)
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise _storage_error(e, path) from e


@dataclasses.dataclass
class ConfigRecord:
  """What `check_config` left to write: a resume's accepted changes, until they hold.

  A resume with changes (`config.resume_with_changes`) rewrites config.json only through
  `commit()`, which the trainer calls once a checkpoint trained under the new config is
  saved, or when the run ends well. Until then config.json keeps describing the
  checkpoints beside it, so a changed run that fails first (a model the checkpoints do not
  fit, missing data, a loss that diverges) or is killed leaves the workdir as it was: the
  original command still resumes it, and the changed one can be retried.
  """

  config: Any
  path: str
  pending: bool = False

  def commit(self) -> None:
    """Writes the pending config.json (keeping the one it replaces); then a no-op."""
    if not self.pending:
      return
    self.pending = False
    if jax.process_index() == 0:
      _keep_previous(self.path)
      _write_config(self.config, self.path)


def check_config(config, workdir: str) -> ConfigRecord:
  """Refuses to reuse a workdir trained with a different run-defining config.

  With `config.overwrite`, the earlier run's files are moved to
  `WORKDIR/previous-<time>/` (never deleted) and training starts fresh. With
  `config.resume_with_changes`, changes to the fields it names are accepted: each is
  logged old -> new, and once they hold (`ConfigRecord.commit`) the old config.json is
  kept as `config.json.previous-<time>`. Checkpoints without a config.json beside them are
  refused unless `overwrite` is set or `resume_with_changes` is '*', since nothing tells
  which config trained them. Otherwise writes the whole resolved config to
  `WORKDIR/config.json` now.

  Returns the record whose `commit()` the trainer calls after its first save.
  """
  path = os.path.join(workdir, CONFIG_NAME)
  now = run_config.run_defining_view(config)
  allowed = run_config.resume_changes(config)
  changed = []
  if os.path.lexists(path):
    saved = _read_saved_config(path)
    changed = run_config.changes(
      {k: saved[k] for k in run_config.RUN_DEFINING_FIELDS if k in saved}, now
    )
    refused = [c for c in changed if not run_config.change_allowed(c[0], allowed)]
    if refused and not config.overwrite and not has_checkpoints(workdir):
      # Nothing was trained with the saved config (e.g. it failed a check that needs the
      # data, such as train_examples > the dataset): replacing it loses nothing, and the
      # user can fix the value. The old file is kept and each change logged.
      logging.warning("%s is from a run that saved no checkpoint: replacing it", path)
      refused = []
    if refused and not config.overwrite:
      raise errors.WorkdirError(
        f"workdir {workdir} was used by a run with a different config ("
        + "; ".join(f"{f}: {a!r} (saved) vs {b!r} (now)" for f, a, b in refused[:5])
        + "). Use another --workdir; or --config.resume_with_changes="
        + ",".join(f for f, _, _ in refused[:5])
        + " to continue its checkpoints with "
        "the new values; or --config.overwrite=True to move the earlier run aside and "
        "start fresh"
      )
    if changed and config.overwrite and jax.process_index() == 0:
      _move_aside(workdir)
    elif changed:
      _log_changes(config, workdir, changed)
      if has_checkpoints(workdir):
        processes.sync("capsjax_config_checked")
        return ConfigRecord(config, path, pending=True)
      if jax.process_index() == 0:
        _keep_previous(path)
  elif has_checkpoints(workdir):
    if config.overwrite:
      if jax.process_index() == 0:
        _move_aside(workdir)
    elif run_config.ANY_CHANGE in allowed:
      logging.warning(
        "resuming the checkpoints of %s without a %s: their config is "
        "unknown, so nothing was compared (config.resume_with_changes='*'); "
        "checkpoints of another model shape are still refused",
        workdir,
        CONFIG_NAME,
      )
    else:
      raise errors.WorkdirError(
        f"workdir {workdir} has checkpoints but no {CONFIG_NAME}, so nothing tells "
        "whether they were trained with this config. Restore its config.json; or pass "
        "--config.resume_with_changes='*' to continue them with this config anyway; or "
        "--config.overwrite=True to move them aside and start fresh"
      )
  # Every process has read the saved config (and raised alike) before process 0 rewrites it.
  processes.sync("capsjax_config_checked")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    _write_config(config, path)
  processes.sync("capsjax_config_written")
  return ConfigRecord(config, path)


def check_init_from(config, workdir: str) -> None:
  """Refuses a `config.init_from` without a checkpoint before the workdir is touched.

  Only for a run that will start from it: a workdir with checkpoints resumes them, and
  the run it was initialised from may since have been deleted.
  """
  if config.init_from and not has_checkpoints(workdir):
    ckpt_lib.find_checkpoint(config.init_from)


@contextlib.contextmanager
def lock(workdir: str):
  """An exclusive lock: a second process training in the same workdir fails at once."""
  # Every process of a multi-process run shares the workdir: lock per process index.
  path = os.path.join(workdir, f".lock.{jax.process_index()}")
  try:
    os.makedirs(workdir, exist_ok=True)
    f = open(path, "w")
  except OSError as e:
    raise _storage_error(e, path) from e
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.close()
    raise errors.WorkdirInUseError(
      f"workdir {workdir} is in use by another capsjax process (lock {path}); wait for it "
      "to finish or use another --workdir"
    ) from None
  try:
    try:
      f.write(str(os.getpid()))
      f.flush()
    except OSError as e:  # a full disk: the run could not write anything else either.
      raise _storage_error(e, path) from e
    yield
  finally:
    fcntl.flock(f, fcntl.LOCK_UN)
    try:
      f.close()
    except OSError:  # the pid that could not be flushed: the error above says why.
      pass


def _storage_error(e: OSError, path: str) -> Exception:
  """The one-line WorkdirError for a workdir the storage refuses; `e` itself otherwise."""
  message = errors.storage_message(e, path)
  return errors.WorkdirError(f"cannot use the workdir: {message}") if message else e
