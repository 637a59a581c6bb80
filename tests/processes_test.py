"""Signals from process start: a real `capsjax.main` process gets SIGINT/SIGTERM at set
points and must end cleanly, with a documented exit code.

Outside the training loop a SIGTERM during model set-up must not kill the process with
-15, a Ctrl-C there must not print a KeyboardInterrupt traceback, and a second Ctrl-C
during the first compile must not crash the interpreter's shutdown (-11). Each child runs
the `:smoke` config on TFDS mock MNIST, paused at the chosen point by a test-only hook
that touches a marker file.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from capsjax.run import processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240

# The child: capsjax.main's own start (`_parse_flags` installs the signal handling), with
# one hook. 'setup' holds inside model set-up; 'compile' touches the marker just before
# the first train step, whose call compiles it.
_CHILD = r"""
import os, sys, time
from absl import app
import tensorflow_datasets as tfds
from capsjax import main as main_lib
from capsjax import steps as steps_lib
point, marker = os.environ["HOOK_POINT"], os.environ["HOOK_MARKER"]

def touch():
  with open(marker, "w") as f:
    f.write("x")

if point == "setup":
  real_create = steps_lib.create_model_and_optimizer
  def create(*args, **kwargs):
    touch()
    time.sleep(120)  # ended by the signal long before this.
    return real_create(*args, **kwargs)
  steps_lib.create_model_and_optimizer = create
else:
  real_make = steps_lib.make_steps
  def make_steps(*args, **kwargs):
    train_fn, eval_fn = real_make(*args, **kwargs)
    def first(*a, **k):
      touch()
      return train_fn(*a, **k)
    return first, eval_fn
  steps_lib.make_steps = make_steps
with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
  app.run(main_lib.main, argv=sys.argv, flags_parser=main_lib._parse_flags)
"""


def _start(tmp_path, point):
  marker = tmp_path / "marker"
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    PYTHONPATH=REPO,
    HOOK_POINT=point,
    HOOK_MARKER=str(marker),
    XLA_FLAGS="--xla_force_host_platform_device_count=1",
  )
  env.pop("CAPSJAX_TRACEBACK", None)
  proc = subprocess.Popen(
    [
      sys.executable,
      "-c",
      _CHILD,
      "--config=configs/fashion.py:smoke",
      f"--workdir={tmp_path / 'run'}",
      "--config.dataset=mnist",
      "--config.train_examples=32",
    ],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  t0 = time.time()
  while not marker.exists():
    if proc.poll() is not None:
      pytest.fail(f"child ended before the hook: {proc.communicate()[1][-3000:]}")
    assert time.time() - t0 < TIMEOUT, "the child never reached the hook"
    time.sleep(0.05)
  return proc


def _finish(proc):
  _, err = proc.communicate(timeout=TIMEOUT)
  assert "Traceback" not in err, err[-3000:]
  return proc.returncode, [ln for ln in err.split("\n") if ln.startswith("capsjax")], err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_model_set_up_exits_at_once_with_128_plus_signal(tmp_path, sig):
  proc = _start(tmp_path, "setup")
  proc.send_signal(sig)
  code, lines, err = _finish(proc)
  # Nothing was trained, so nothing to save: 130 (SIGINT) / 143 (SIGTERM), not 75.
  assert code == processes.interrupted_exit_code(sig) == 128 + sig, err[-3000:]
  assert len(lines) == 1 and lines[0].startswith(
    f"capsjax: stopped by signal {int(sig)} outside the training loop"
  ), err[-3000:]
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "1")


def test_second_ctrl_c_during_the_first_compile_exits_130(tmp_path):
  proc = _start(tmp_path, "compile")
  proc.send_signal(signal.SIGINT)
  time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  code, lines, err = _finish(proc)
  assert code == 130, err[-3000:]  # never -11, never a KeyboardInterrupt traceback.
  assert len(lines) == 1 and lines[0].startswith(
    "capsjax: stopped by signal 2 (a second Ctrl-C)"
  ), err[-3000:]


def test_sigterm_during_the_first_compile_saves_after_the_first_step(tmp_path):
  proc = _start(tmp_path, "compile")
  proc.send_signal(signal.SIGTERM)
  code, lines, err = _finish(proc)
  # The loop's handler was already in place: the first step finishes, is saved, exit 75.
  assert code == processes.PREEMPTED_EXIT_CODE, err[-3000:]
  assert lines and lines[-1].startswith("capsjax: stopped by signal 15 at step"), err[-3000:]
  steps = [n for n in os.listdir(tmp_path / "run" / "checkpoints") if n.isdigit()]
  assert steps, err[-3000:]


def test_a_step_that_never_ends_after_sigterm_exits_75_after_the_grace_period():
  """A step stuck in XLA (here: a sleep in the loop) is not waited for forever."""
  code = (
    "import os, signal, time\n"
    "from capsjax.run import processes\n"
    "processes.STOP_GRACE_S = 1.0\n"
    "processes.handle_signals()\n"
    "with processes.StopFlag():\n"
    "  os.kill(os.getpid(), signal.SIGTERM)\n"
    "  time.sleep(60)  # the step in progress, never reaching its boundary.\n"
  )
  t0 = time.time()
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT
  )
  assert proc.returncode == processes.PREEMPTED_EXIT_CODE, proc.stderr[-3000:]
  assert time.time() - t0 < 30  # a hang guard: the sleep alone would take 60 s.
  lines = [ln for ln in proc.stderr.split("\n") if ln.startswith("capsjax")]
  assert lines == [
    "capsjax: stopped by signal 15 during a training step that had not ended 1 s later: "
    "stopped without saving; the last complete checkpoint is kept, rerun the same command "
    "to resume from it (exit code 75)"
  ], proc.stderr[-3000:]


def test_exit_codes_are_documented():
  from capsjax import main as main_lib  # pylint: disable=g-import-not-at-top

  for code in ("75  preempted", "130 SIGINT", "143 SIGTERM"):
    assert code in main_lib.__doc__
  with open(os.path.join(REPO, "experiments", "slurm", "README.md")) as f:
    text = f.read()
  assert "| 130 |" in text and "| 143 |" in text
