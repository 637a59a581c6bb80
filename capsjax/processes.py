"""Signals and processes: stopping at a step boundary, and agreeing across processes.

A SIGTERM (a SLURM preemption) or a first Ctrl-C only sets a flag; the training loop
checks it at step boundaries, saves a checkpoint and raises `Preempted`, which the entry
point turns into exit code 75 so a job script can tell preemption from failure. Under
`jax.distributed` the processes must agree on when to stop, so the flag is combined
across them (`any_process`) and barriers (`sync`) order file writes.
"""

from __future__ import annotations

import signal

from absl import logging
import jax
import numpy as np

# A run stopped by SIGTERM/SIGINT after saving a checkpoint exits with this code, so a
# SLURM script can tell preemption (requeue) from failure. 75 is EX_TEMPFAIL.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
  """Training stopped on SIGTERM/SIGINT after writing a checkpoint."""


def sync(name: str) -> None:
  """A barrier across the processes of a `jax.distributed` run; a no-op with one."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is true on any of them (a collective: call in step)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


class StopFlag:
  """Turns SIGTERM/SIGINT into a flag (`.signal`) the loop checks at step boundaries.

  A second Ctrl-C raises KeyboardInterrupt at once. Outside the main thread (a notebook
  worker) no handler can be installed and the flag stays unset.
  """

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread.
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal = signum
    logging.warning("received signal %d: saving a checkpoint at the next step boundary",
                    signum)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def anywhere(self) -> bool:
    """Whether this or any other process received a signal (a collective)."""
    return any_process(self.signal is not None)
