"""Storage failures of checkpoint saves: classification, the one error, Orbax's noise.

The failures here are exceptions built by hand, as Orbax and TensorStore raise them;
`checkpoint_test.py` and `checkpoint_storage_test.py` provoke real ones.
"""

import errno
import logging as std_logging
import os
import sys
import types

import pytest
from absl import logging

from capsjax import errors
from capsjax.run import storage

FULL = ("the disk is full", "free space")
READ_ONLY = (
  "the file system is read-only",
  "make it writable (or start a copy of the run in another --workdir)",
)
DENIED = (
  "permission denied",
  "give this user write permission on it (or start a copy of the run in another --workdir)",
)


def _wrapped(inner: BaseException) -> RuntimeError:
  """`inner` as the cause of another error, as Orbax re-raises a failed write."""
  try:
    try:
      raise inner
    except BaseException as e:
      raise RuntimeError("save failed") from e
  except RuntimeError as outer:
    return outer


@pytest.mark.parametrize(
  "error,expected",
  [
    (OSError(errno.ENOSPC, "No space left on device"), FULL),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), FULL),
    (
      ValueError(
        "RESOURCE_EXHAUSTED: Error writing ... Failed to write 287463 bytes to file 11: "
        "No space left on device [os_error_code='28']"
      ),
      FULL,
    ),
    (OSError(errno.EROFS, "Read-only file system"), READ_ONLY),
    (ValueError("INTERNAL: ... Read-only file system"), READ_ONLY),
    (PermissionError(errno.EACCES, "Permission denied"), DENIED),
    (OSError(errno.EPERM, "Operation not permitted"), DENIED),
    (ValueError("PERMISSION_DENIED: cannot open"), DENIED),
    (
      OSError(errno.EIO, "Input/output error"),
      ("OSError: [Errno 5] Input/output error", "fix the storage"),
    ),
  ],
)
def test_save_failure_reads_the_cause_from_errno_or_tensorstore_status(error, expected):
  assert storage.save_failure(error) == expected
  assert storage.save_failure(_wrapped(error)) == expected  # anywhere in the chain


def test_errors_other_than_storage_are_not_save_failures():
  assert storage.save_failure(ValueError("shape mismatch")) is None
  assert storage.save_failure(_wrapped(KeyError("state"))) is None
  assert storage.save_error(TypeError("x"), "/nowhere", 4) is None


def test_save_error_names_directory_cause_kept_steps_and_advice(tmp_path):
  ckpt_dir = str(tmp_path / "checkpoints")
  e = OSError(errno.ENOSPC, "No space left on device")
  error = storage.save_error(e, ckpt_dir, 12)
  assert isinstance(error, errors.CheckpointSaveError)
  assert str(error) == (
    f"could not write checkpoint (step 12) in {ckpt_dir}: the disk is full. No checkpoint "
    "was written; free space and rerun the same command to resume from the latest"
  )
  for name in ("8", "4", "9.orbax-checkpoint-tmp-1", "meta"):
    os.makedirs(os.path.join(ckpt_dir, name))
  error = storage.save_error(OSError(errno.EROFS, "Read-only file system"), ckpt_dir, None)
  assert str(error) == (
    f"could not write checkpoint in {ckpt_dir}: the file system is read-only. Earlier "
    "checkpoints are kept (steps [4, 8]); make it writable (or start a copy of the run in "
    "another --workdir) and rerun the same command to resume from the latest"
  )


def test_check_writable_creates_the_directory_and_leaves_nothing(tmp_path):
  path = tmp_path / "run" / "checkpoints"
  storage.check_writable(str(path))
  assert path.is_dir() and os.listdir(path) == []


def test_first_line():
  assert storage.first_line(ValueError("  first\nsecond\n")) == "ValueError: first"
  assert storage.first_line(RuntimeError()) == "RuntimeError: "


def _record(pathname: str, name: str = "absl", msg: str = "write failed"):
  try:
    raise OSError(errno.EROFS, "Read-only file system")
  except OSError:
    exc_info = sys.exc_info()
  return std_logging.LogRecord(name, std_logging.ERROR, pathname, 1, msg, (), exc_info)


def test_orbax_records_lose_their_traceback_unless_verbose():
  old = logging.get_verbosity()
  try:
    logging.set_verbosity(logging.INFO)
    orbax = _record("/venv/site-packages/orbax/checkpoint/_src/foo.py")
    task = _record("/usr/lib/asyncio/base_events.py", "asyncio", "Task exception: orbax write")
    other = _record("/work/capsjax/train.py")
    for record in (orbax, task, other):
      assert storage._ORBAX_FILTER.filter(record)  # the message itself is always kept.
    assert orbax.exc_info is None and task.exc_info is None
    assert other.exc_info is not None
    logging.set_verbosity(1)
    verbose = _record("/venv/site-packages/orbax/checkpoint/_src/foo.py")
    storage._ORBAX_FILTER.filter(verbose)
    assert verbose.exc_info is not None
  finally:
    logging.set_verbosity(old)


def test_only_the_closed_event_loop_error_is_dropped(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  storage.quiet_orbax_failures()
  hook = sys.unraisablehook
  storage.quiet_orbax_failures()  # idempotent: not wrapped twice.
  assert sys.unraisablehook is hook
  closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), object=None)
  other = types.SimpleNamespace(exc_value=RuntimeError("something else"), object=None)
  attached = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), object=hook)
  for unraisable in (closed, other, attached):
    sys.unraisablehook(unraisable)
  assert seen == [other, attached]
  assert storage._ORBAX_FILTER in std_logging.getLogger("absl").filters
