"""Checkpoint storage failures as one line: what went wrong, what to do, nothing else.

A `checkpoints/` that cannot be written (read-only, no permission) fails when the
checkpointer opens (`check_writable`), before any training; one that fills up fails at
the save. Both become one `CheckpointSaveError` (`save_error`) naming the directory, the
cause (from the errno, or TensorStore's RESOURCE_EXHAUSTED for a full disk), the steps
still available and what to do.

A failed background save also leaves Orbax's threads to log it, each with a traceback,
and TensorStore's to print unraisable errors after capsjax's message;
`quiet_orbax_failures` keeps those to their one-line messages. Everything here works on
exceptions, logger records and file names: it needs no Orbax import (`checkpoint.py` is
the only module that has one).
"""

from __future__ import annotations

import errno
import logging as std_logging
import os
import sys
import tempfile

from absl import logging

from capsjax import errors


def first_line(e: BaseException) -> str:
  """'TypeName: first line of the message', for one-line logs and errors."""
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"


def save_failure(e: BaseException) -> tuple[str, str] | None:
  """(reason, advice) for a storage failure anywhere in `e`'s chain, else None.

  Orbax raises the OSError of a failed file operation, possibly wrapped; TensorStore,
  which writes the arrays, raises ValueError with an absl status code instead of errno
  (a full disk reads "RESOURCE_EXHAUSTED: ... No space left on device").
  """
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    text = str(e)
    full = (
      (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
      or "RESOURCE_EXHAUSTED" in text
      or "No space left on device" in text
      or "Disk quota exceeded" in text
    )
    if full:
      return "the disk is full", "free space"
    read_only = (
      isinstance(e, OSError) and e.errno == errno.EROFS
    ) or "Read-only file system" in text
    if read_only:
      return (
        "the file system is read-only",
        "make it writable (or start a copy of the run in another --workdir)",
      )
    denied = (
      (isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM))
      or "PERMISSION_DENIED" in text
      or "Permission denied" in text
    )
    if denied:
      return (
        "permission denied",
        "give this user write permission on it (or start a copy of the run in another --workdir)",
      )
    if isinstance(e, OSError):
      return first_line(e), "fix the storage"
    e = e.__cause__ or e.__context__
  return None


def save_error(
  e: BaseException, directory: str, step: int | None
) -> errors.CheckpointSaveError | None:
  """The one error to raise for `e`, a failure while writing checkpoints; None if `e` is
  not a storage failure (see `save_failure`) and should propagate as it is.

  Args:
    e: what the save (or opening the directory) raised.
    directory: the `checkpoints/` directory; its complete steps are named in the message.
    step: the step being saved, or None when the directory was being opened.
  """
  failure = save_failure(e)
  if failure is None:
    return None
  reason, advice = failure
  kept = (
    sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []
  )
  what = "could not write checkpoint" + ("" if step is None else f" (step {step})")
  earlier = (
    f"Earlier checkpoints are kept (steps {kept}); " if kept else "No checkpoint was written; "
  )
  return errors.CheckpointSaveError(
    f"{what} in {directory}: {reason}. {earlier}{advice} and rerun the same "
    "command to resume from the latest"
  )


def check_writable(directory: str) -> None:
  """Creates `directory` if needed, then creates and removes a file in it: an unwritable
  one raises OSError now, not at the first save an epoch later."""
  os.makedirs(directory, exist_ok=True)
  fd, probe = tempfile.mkstemp(prefix=".capsjax-write-test-", dir=directory)
  os.close(fd)
  os.remove(probe)


class _OrbaxErrorsWithoutTraceback(std_logging.Filter):
  """Drops the traceback of Orbax's own error records, keeping their one-line message.

  A failed background save is logged, with a traceback, by each Orbax thread it stops
  (about ten for one read-only directory), then raised to capsjax, which reports it as
  one CheckpointSaveError. The same goes for asyncio's "Task exception was never
  retrieved" about an Orbax write task, logged at exit. `--verbosity=1` keeps the
  tracebacks.
  """

  def filter(self, record) -> bool:
    if (
      record.exc_info
      and logging.get_verbosity() < 1
      and (
        "/orbax/" in record.pathname
        or (record.name == "asyncio" and "orbax" in record.getMessage())
      )
    ):
      record.exc_info = record.exc_text = None
    return True


_ORBAX_FILTER = _OrbaxErrorsWithoutTraceback()


def _quiet_closed_loop_callbacks() -> None:
  """Drops the 'Event loop is closed' errors left behind by a failed save (idempotent).

  When one array write fails (a full disk), Orbax closes its event loop while TensorStore
  still completes the other writes; each completion then raises RuntimeError in a
  TensorStore thread, which Python prints as an unraisable traceback after capsjax's
  one-line error. Only that exact error, with no object attached, is dropped.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_capsjax", False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if (
      unraisable.object is None and isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
    ):
      logging.debug("ignored after a failed save: RuntimeError: Event loop is closed")
      return
    previous(unraisable)

  hook._capsjax = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def quiet_orbax_failures() -> None:
  """Keeps a failed save's Orbax and TensorStore reports to one line each (idempotent).

  Installs the traceback filter on the 'absl' and 'asyncio' loggers and the unraisable
  hook for TensorStore's closed-loop callbacks.
  """
  for logger in ("absl", "asyncio"):
    std_logging.getLogger(logger).addFilter(_ORBAX_FILTER)  # idempotent.
  _quiet_closed_loop_callbacks()
