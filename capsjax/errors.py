"""Every error a user can fix: a bad config value, missing or wrong data, a checkpoint
from another model, a workdir in use, a non-finite loss, a full disk.

Each is a `CapsjaxError`, and keeps the built-in exception it specialises as a second
base (`ConfigError` is a `ValueError`, `DatasetNotFoundError` a `FileNotFoundError`), so
code that catches the built-in still works. The entry points (`capsjax.main`,
`capsjax.visualize`, the experiments) print a `CapsjaxError` as one
`capsjax: error: ...` line, on a line of its own, and exit with code 2; they share the
helpers at the end of this module: `parse_flags` (absl's flag parsing, mistakes included)
and `exit_on_user_error` (around the work). Anything else, a `ValueError` from a bug in
capsjax, JAX or NumPy included, keeps its traceback.

The pure functions (`squash`, `dynamic_routing`, the losses, `conv2d`, the augmentations)
raise plain `ValueError`/`TypeError`: they are a library, and a bad argument there is the
calling code's bug. Code that passes a user's value to them converts with `config_field`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys


class CapsjaxError(Exception):
  """Base class of the errors a user can fix; printed as one line, exit code 2."""


class ConfigError(CapsjaxError, ValueError):
  """A config field or command-line flag has a value capsjax cannot use."""


class DatasetNotFoundError(CapsjaxError, FileNotFoundError):
  """Neither a prepared TFDS dataset, a cache, nor the original files were found."""


class DatasetValidationError(CapsjaxError, ValueError):
  """Original files are present but wrong (count, shape, labels, checksum, corrupt)."""


class CheckpointNotFoundError(CapsjaxError, FileNotFoundError):
  """A path given as a checkpoint holds no checkpoint."""


class CheckpointMismatchError(CapsjaxError, ValueError):
  """A checkpoint does not fit the model it is being loaded into."""


class CheckpointReadError(CapsjaxError, RuntimeError):
  """Checkpoints exist but none of them can be restored."""


class CheckpointSaveError(CapsjaxError, RuntimeError):
  """Writing a checkpoint failed (disk full, permissions, ...); earlier ones are intact."""


class WorkdirError(CapsjaxError, ValueError):
  """The workdir cannot be used: it holds another run's config, or is not a directory."""


class WorkdirInUseError(CapsjaxError, RuntimeError):
  """Another process holds the workdir's lock."""


class NonFiniteLossError(CapsjaxError, FloatingPointError):
  """Training produced a NaN or infinite loss or metric."""


class DistributedInitError(CapsjaxError, RuntimeError):
  """`jax.distributed.initialize` failed with the given coordinator/process flags."""


@contextlib.contextmanager
def config_field(name: str):
  """Turns a library `ValueError`/`TypeError` about a user's value into a `ConfigError`.

  with errors.config_field("model.routing_iterations"):
    caps_ops.check_iterations(config.model.routing_iterations)

  The message gains the field's name: "config.model.routing_iterations: must be >= 1, got 0".
  """
  try:
    yield
  except CapsjaxError:
    raise
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.{name}: {e}") from e


# ----------------------------------------------------------------------------------------
# The entry points' shared ending for user mistakes.
# ----------------------------------------------------------------------------------------
USER_ERROR_EXIT_CODE = 2


def print_fresh_line(text: str, *, stream=None) -> None:
  """Writes `text` and a newline to stderr (or `stream`), starting on a line of its own.

  A progress bar (TFDS's, the epoch bar) leaves the cursor after a carriage return, not
  a newline: in a log file the text would then share the bar's line, and
  `grep '^capsjax: error'` would miss it. So a newline comes first; on a terminal the
  bar's line is cleared and reused instead, so the screen shows no empty line.
  """
  stream = sys.stderr if stream is None else stream
  try:
    tty = stream.isatty()
  except (AttributeError, ValueError):
    tty = False
  stream.write(("\r\033[K" if tty else "\n") + text + "\n")
  stream.flush()


def print_user_error(message: str, *, stream=None) -> None:
  """Writes `capsjax: error: <message>` on a line of its own (see `print_fresh_line`)."""
  print_fresh_line(f"capsjax: error: {message}", stream=stream)


# A file operation on a named path that failed for one of these reasons is the machine's
# storage, not a bug: (what happened, what to do).
_STORAGE_ERRNOS = {
  errno.ENOSPC: ("the disk is full", "free space"),
  errno.EDQUOT: ("the disk quota is exceeded", "free space"),
  errno.EROFS: ("the file system is read-only", "use a writable directory"),
  errno.EACCES: ("permission denied", "give this user access to it, or use another directory"),
  errno.EPERM: ("permission denied", "give this user access to it, or use another directory"),
  errno.ENOTDIR: ("a part of the path is a file, not a directory", "use a path of directories"),
}


def storage_message(e: BaseException, path: str | None = None) -> str | None:
  """One line for an OSError of the storage (disk full, read-only, ...) on a named path.

  `path`: the file the failed operation was on, for errors that do not carry it (a
  write or flush of an open file). None for anything else, which keeps its traceback: an
  OSError without a path, or of another kind (a missing file is a missing file: the code
  that opens it says which).
  """
  path = path or (getattr(e, "filename", None) if isinstance(e, OSError) else None)
  if not isinstance(e, OSError) or e.errno not in _STORAGE_ERRNOS or not path:
    return None
  what, advice = _STORAGE_ERRNOS[e.errno]
  return f"{path}: {what}; {advice} (runs write under --workdir, datasets under --config.data_dir)"


@contextlib.contextmanager
def exit_on_user_error():
  """Ends the process on a `CapsjaxError`: one `capsjax: error:` line, exit code 2.

  with errors.exit_on_user_error():
    run(flags)

  A storage failure (`storage_message`: a full disk, a read-only or unwritable workdir or
  data_dir, a path through a file) ends the same way. Anything else (a bug in capsjax,
  JAX or NumPy) propagates with its traceback, and so does a `CapsjaxError` when
  $CAPSJAX_TRACEBACK is set.
  """
  try:
    yield
  except (CapsjaxError, OSError) as e:
    message = str(e) if isinstance(e, CapsjaxError) else storage_message(e)
    if message is None or os.environ.get("CAPSJAX_TRACEBACK"):
      raise
    print_user_error(message)
    from absl import logging  # pylint: disable=g-import-not-at-top

    # The traceback only with --verbosity=1: user mistakes get the one line above.
    logging.debug("traceback (set CAPSJAX_TRACEBACK=1 to raise it)", exc_info=True)
    sys.exit(USER_ERROR_EXIT_CODE)


def add_config_root(config_path: str) -> None:
  """Makes `from configs import common` work in a config file loaded by path from any cwd.

  Config files are loaded by path, not imported, so their `configs` package is only found
  when its parent directory is on sys.path (the repository root as the cwd). For a path
  `<root>/configs/x.py[:arg]`, `<root>` is added.
  """
  path = os.path.abspath(os.path.expanduser(config_path.split(":", 1)[0]))
  parent = os.path.dirname(path)
  if os.path.basename(parent) == "configs" and os.path.isfile(os.path.join(parent, "__init__.py")):
    root = os.path.dirname(parent)
    if root not in sys.path:
      sys.path.insert(0, root)


def _flag_error_text(e: Exception) -> str:
  """One line from absl's/ml_collections' error text (which may hold a whole traceback)."""
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  if not lines:
    return type(e).__name__
  required = re.search(r"Flag --(\S+) must have a value other than None", lines[0])
  if required:
    return f"missing required flag --{required.group(1)}"
  if "Traceback (most recent call last)" in str(e):
    # A config file's get_config raised: its own message is the traceback's last line.
    flag = lines[0].split(": Error whilst parsing config file")[0]
    return f"{flag.removeprefix('flag ')}: {lines[-1].removeprefix('ValueError: ')}"
  return lines[0].removeprefix("flag ")


def parse_flags(argv: list[str], *, config_flags: tuple[str, ...] = ("config",)) -> list[str]:
  """absl's flag parsing, ending every mistake with one `capsjax: error:` line and exit 2.

  For `app.run(main, flags_parser=errors.parse_flags)`. absl itself exits 1 with
  "FATAL Flags parsing error" (and ml_collections with a traceback) for: a value of the
  wrong type, a missing required flag, an unknown `--config.` field, a config file that
  cannot be loaded or whose `get_config` rejects its argument. `config_flags` names the
  config-file flags whose loading is checked after parsing.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  given = {}
  for arg, following in zip(argv[1:], [*argv[2:], None], strict=False):
    name, sep, value = arg.lstrip("-").partition("=")
    if name in config_flags and arg.startswith("-") and (sep or following is not None):
      given[name] = value if sep else following  # --config=FILE or --config FILE.
      add_config_root(given[name])

  def load_error(name, e):
    # ml_collections words a missing file over several lines; the last names the cause.
    last = [ln.strip() for ln in str(e).splitlines() if ln.strip()][-1:] or [type(e).__name__]
    return ConfigError(f"--{name}={given[name]}: cannot load the config file ({last[0]})")

  try:
    try:
      rest = flags.FLAGS(argv)
    except OSError as e:  # a --config. override applied to a file that failed to load.
      if given:
        raise load_error(next(iter(given)), e) from e
      raise
    for name in given:
      try:
        getattr(flags.FLAGS, name).keys()  # a file that failed to load raises only when used.
      except OSError as e:
        raise load_error(name, e) from e
  except ConfigError as e:
    print_user_error(str(e))
    sys.exit(USER_ERROR_EXIT_CODE)
  except flags.Error as e:
    print_user_error(_flag_error_text(e))
    sys.exit(USER_ERROR_EXIT_CODE)
  except (AttributeError, KeyError) as e:  # ml_collections: an unknown --config. field.
    text = str(e).replace("\\n", "\n").replace("\\'", "'")
    hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"\?', text)
    overrides = " ".join(a for a in argv[1:] if a.startswith("--config."))
    missing = text.strip("'\"").splitlines()[0] if text.strip() else ""
    parts = set(re.split(r"[.=\s]", overrides))
    # Only a field named by an override is a user's misspelling; the same exception from
    # inside a config file's get_config is a bug there and keeps its traceback.
    if (
      os.environ.get("CAPSJAX_TRACEBACK")
      or not overrides
      or (hint is None and missing not in parts)
    ):
      raise
    what = f'"{hint.group(2)}" (did you mean "{hint.group(1)}"?)' if hint else missing
    print_user_error(f"unknown config field {what} in: {overrides}")
    sys.exit(USER_ERROR_EXIT_CODE)
  return rest
