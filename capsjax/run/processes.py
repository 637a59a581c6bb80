"""Signals and processes: stopping at a step boundary, and agreeing across processes.

A SIGTERM (a SLURM preemption) or a first Ctrl-C during training only sets a flag; the
training loop checks it at step boundaries, saves a checkpoint and raises `Preempted`,
which the entry point turns into exit code 75 so a job script can tell preemption from
failure. A step that has not ended `STOP_GRACE_S` after the signal is not waited for: the
process exits 75 without saving, and the last complete checkpoint is resumed. Under
`jax.distributed` the processes must agree on when to stop, so the flag is combined
across them (`any_process`) and barriers (`sync`) order file writes.

Outside the training loop (imports, data loading, model initialisation, evaluation) there
is no step boundary to stop at: from process start (`handle_signals`) a signal there ends
the process at once with 128 + the signal number (130 for SIGINT, 143 for SIGTERM), and
so does a second Ctrl-C during training. Python raising KeyboardInterrupt there instead
could unwind while XLA's threads were still compiling, and the interpreter's shutdown
could then crash (exit -11).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from absl import logging
import numpy as np

from capsjax import errors

# A run stopped by SIGTERM/SIGINT after saving a checkpoint exits with this code, so a
# SLURM script can tell preemption (requeue) from failure. 75 is EX_TEMPFAIL.
PREEMPTED_EXIT_CODE = 75
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Set once `handle_signals` runs: a process-wide fact, as signal handlers themselves are.
_WATCHING = threading.Event()


def interrupted_exit_code(signum: int) -> int:
  """128 + the signal number, as a shell reports a process ended by that signal."""
  return 128 + int(signum)


class Preempted(Exception):
  """Training stopped on SIGTERM/SIGINT after writing a checkpoint."""


def sync(name: str) -> None:
  """A barrier across the processes of a `jax.distributed` run; a no-op with one."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is true on any of them (a collective: call in step)."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


class StopFlag:
  """Turns SIGTERM/SIGINT into a flag (`.signal`) the loop checks at step boundaries.

  A second Ctrl-C stops at once: exit code 130 under `handle_signals` (an entry point),
  else a KeyboardInterrupt. Outside the main thread (a notebook worker) no handler can be
  installed and the flag stays unset.
  """

  def __init__(self):
    self.signal = None
    self.done = threading.Event()  # set when the loop leaves (saved, or failed).
    self._old = {}

  def __enter__(self):
    for sig in _SIGNALS:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread.
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None and signum == signal.SIGINT:
      if _WATCHING.is_set():
        return  # the watcher thread is already ending the process (exit 130).
      raise KeyboardInterrupt
    self.signal = signum
    logging.warning("received signal %d: saving a checkpoint at the next step boundary", signum)

  def __exit__(self, *exc):
    self.done.set()
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def anywhere(self) -> bool:
    """Whether this or any other process received a signal (a collective)."""
    return any_process(self.signal is not None)


def _ignore(signum, frame):
  """The Python-level handler outside training: the watcher thread acts instead."""
  del signum, frame


# How long the training loop has, after a first SIGTERM/Ctrl-C, to reach a step boundary
# and save: a step (or scanned chunk) that has not ended by then is not waited for (the
# process exits 75 without saving, keeping the last complete checkpoint). Long enough for
# a scanned chunk (`config.scan_chunk_seconds`) and a save; SLURM's own grace before
# SIGKILL is usually shorter and then decides first.
STOP_GRACE_S = 120.0


def _exit_now(signum: int, why: str, code: int | None = None) -> None:
  code = interrupted_exit_code(signum) if code is None else code
  try:
    sys.stdout.flush()
    errors.print_fresh_line(f"capsjax: stopped by signal {signum} {why} (exit code {code})")
  finally:
    # No interpreter shutdown: XLA or Orbax threads may be mid-compile or mid-write, and
    # tearing Python down under them is what crashed. A checkpoint being written is left
    # as a temporary directory, which the next run ignores.
    os._exit(code)  # pylint: disable=protected-access


def _watch(read_fd: int) -> None:
  """Reacts to signals as they arrive, even while the main thread is inside XLA."""
  training, count = None, 0
  while True:
    try:
      data = os.read(read_fd, 64)
    except InterruptedError:
      continue
    for signum in data:
      if signum not in _SIGNALS:
        continue
      stop = getattr(signal.getsignal(signum), "__self__", None)
      if isinstance(stop, StopFlag):
        # The loop's StopFlag handles the first signal at the next step boundary.
        if stop is not training:
          training, count = stop, 0
          threading.Thread(
            target=_stop_within_grace,
            args=(stop, signum),
            name="capsjax-stop-grace",
            daemon=True,
          ).start()
        count += 1
        if signum == signal.SIGINT and count >= 2:
          _exit_now(
            signum,
            "(a second Ctrl-C): stopped at once without saving; the last "
            "complete checkpoint is kept, rerun the same command to resume from it",
          )
        continue
      _exit_now(
        signum,
        "outside the training loop (start-up, data, model set-up or "
        "evaluation): nothing new to save; rerun the same command to resume from "
        "the last checkpoint, if any",
      )


def _stop_within_grace(stop: StopFlag, signum: int) -> None:
  """Ends the process (exit 75, nothing saved) if the loop has not stopped in time."""
  if stop.done.wait(STOP_GRACE_S):
    return
  _exit_now(
    signum,
    f"during a training step that had not ended {STOP_GRACE_S:.0f} s later: stopped "
    "without saving; the last complete checkpoint is kept, rerun the same command to "
    "resume from it",
    code=PREEMPTED_EXIT_CODE,
  )


def handle_signals() -> bool:
  """Handles SIGTERM/SIGINT from here on, for an entry point's whole process.

  Call it first thing in the main thread. Inside the training loop `StopFlag` handles a
  signal (checkpoint, exit 75); elsewhere, and on a second Ctrl-C, the process exits at
  once with `interrupted_exit_code(signum)`. Returns False where it cannot be done (not
  the main thread).
  """
  if threading.current_thread() is not threading.main_thread():
    return False
  if _WATCHING.is_set():
    return True
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  for sig in _SIGNALS:
    signal.signal(sig, _ignore)
  # The C-level handler writes the signal number to the pipe the moment it arrives; a
  # Python handler would only run once the main thread is back in Python.
  signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
  _WATCHING.set()
  threading.Thread(target=_watch, args=(read_fd,), name="capsjax-signals", daemon=True).start()
  return True
