"""Every error a user can fix: a bad config value, missing or wrong data, a checkpoint
from another model, a workdir in use, a non-finite loss, a full disk.

Each is a `CapsjaxError`, and keeps the built-in exception it specialises as a second
base (`ConfigError` is a `ValueError`, `DatasetNotFoundError` a `FileNotFoundError`), so
code that catches the built-in still works. The entry points (`capsjax.main`,
`capsjax.visualize`, the experiments) print a `CapsjaxError` as one
`capsjax: error: ...` line and exit with code 2. Anything else, a `ValueError` from a
bug in capsjax, JAX or NumPy included, keeps its traceback.

The pure functions (`squash`, `dynamic_routing`, the losses, `conv2d`, the augmentations)
raise plain `ValueError`/`TypeError`: they are a library, and a bad argument there is the
calling code's bug. Code that passes a user's value to them converts with `config_field`.
"""

from __future__ import annotations

import contextlib


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
