"""Errors a user can fix (bad config, data, checkpoint, workdir): `capsjax.main` prints
them as one `capsjax: error: ...` line with exit code 2 instead of a traceback.

ValueError, FileNotFoundError and FloatingPointError raised by capsjax are treated the
same way; other exceptions (bugs, JAX/XLA runtime failures) keep their traceback.
"""


class CapsjaxError(Exception):
  """Base class of the user-facing errors that are not ValueError/FileNotFoundError."""


class DistributedInitError(CapsjaxError, RuntimeError):
  """`jax.distributed.initialize` failed with the given coordinator/process flags."""
