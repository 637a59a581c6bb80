"""The command line (`capsjax.main`): user mistakes end with one line and exit code 2,
everything else keeps its traceback.

The in-process checks call `capsjax.main.main` with parsed flags on TFDS mock MNIST and
the `:smoke` config; a real process is used where flag parsing itself, or what reaches
the console, is under test.
"""

import fcntl
import os
import subprocess
import sys
import types

from absl import logging as absl_logging
import pytest

from capsjax import losses
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

mock = helpers.mock_mnist_fixture()
src = helpers.finished_run_fixture()
_config = helpers.mnist_smoke_config
_copy = helpers.copy_run


def _cli(capsys, *argv):
  """Runs capsjax.main.main in-process with `--workdir=...` and `--config.k=v` flags.

  The flags are applied to the `:smoke` config here (flag parsing itself is tested in
  a real process below); returns (exit code, 'capsjax' lines of stderr, stderr).
  """
  from capsjax import main as main_lib  # pylint: disable=g-import-not-at-top
  values = dict(a[2:].split("=", 1) for a in argv)
  config = _config(**{k[len("config."):]: _parse(v) for k, v in values.items()
                      if k.startswith("config.")})
  holder = lambda v: types.SimpleNamespace(value=v)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(main_lib, "flags", types.SimpleNamespace(
        FLAGS=types.SimpleNamespace(config=config, verbosity=0)))
    mp.setattr(main_lib, "_WORKDIR", holder(values["workdir"]))
    for name in ("_COORDINATOR", "_NUM_PROCESSES", "_PROCESS_ID"):
      mp.setattr(main_lib, name, holder(None))
    mp.setattr(main_lib, "_DISTRIBUTED", holder("off"))
    handler = absl_logging.get_absl_handler()
    filters = list(handler.filters)
    try:
      with pytest.raises(SystemExit) as e:
        main_lib.main(["capsjax"])
    finally:
      handler.filters[:] = filters
  err = capsys.readouterr().err
  return e.value.code, [l for l in err.splitlines() if l.startswith("capsjax")], err


def _parse(v):
  for cast in (int, float):
    try:
      return cast(v)
    except ValueError:
      pass
  return v


def _one_line_error(capsys, expected, *argv):
  code, lines, err = _cli(capsys, *argv)
  assert code == 2, err
  assert len(lines) == 1 and lines[0].startswith("capsjax: error: "), err
  assert "Traceback" not in err
  for part in expected:
    assert part in lines[0], lines[0]


def _cli_process_error(tmp_path, override: str) -> str:
  """Runs the smoke CLI in a real process with one override; returns its stderr.

  In-process tests cannot see absl's stderr handler; a real process shows what users see.
  Asserts the user-error exit code and that no traceback reached the console.
  """
  r = subprocess.run(
      [sys.executable, "-m", "capsjax.main", "--config=configs/fashion.py:smoke",
       f"--workdir={tmp_path}", override],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr
  assert "Traceback" not in r.stderr, r.stderr
  return r.stderr


def test_cli_user_error_in_a_real_process_has_no_traceback(tmp_path):
  err = _cli_process_error(tmp_path, "--config.model.routing_iterations=0")
  errors = [l for l in err.splitlines() if l.startswith("capsjax: error: ")]
  assert errors == ["capsjax: error: config.model.routing_iterations: num_iterations must be "
                    ">= 1, got 0"], err


def test_cli_unknown_config_field_fails_at_flag_parsing(tmp_path):
  err = _cli_process_error(tmp_path, "--config.model.routing_iteration=1")
  assert err.strip() == (
      'capsjax: error: unknown config field "routing_iteration" (did you mean '
      '"routing_iterations"?) in: --config.model.routing_iteration=1'), err


@pytest.mark.parametrize("argv,expected", [
    (("--config.dataset=mnist_typo",), ("mnist_typo",)),
    (("--config.model.routing_iterations=0",),
     ("config.model.routing_iterations: num_iterations must be >= 1, got 0",)),
    (("--config.batch_size=6",),
     ("config.batch_size=6 must be a positive multiple of the number of devices (4)",)),
])
def test_cli_config_guards(capsys, tmp_path, mock, argv, expected):
  _one_line_error(capsys, expected, f"--workdir={tmp_path}", *argv)


def test_cli_init_from_missing_and_other_architecture(capsys, tmp_path, src):
  _one_line_error(capsys, ("does not exist", str(tmp_path / "nothing")),
                  f"--workdir={tmp_path / 'a'}", f"--config.init_from={tmp_path / 'nothing'}")
  _one_line_error(capsys, ("parameter 0/decoder/layers/0/kernel has shape (80, 32) in the "
                           "checkpoint but (40, 32) in the model",),
                  f"--workdir={tmp_path / 'b'}", f"--config.init_from={src}",
                  "--config.model.digit_dim=4")


def test_cli_workdir_with_other_config_and_locked_workdir(capsys, tmp_path, src):
  workdir = _copy(src, tmp_path)
  _one_line_error(capsys, ("was used by a run with a different config",
                           "seed: 0 (saved) vs 1 (now)", "--config.overwrite=True"),
                  f"--workdir={workdir}", "--config.seed=1", "--config.keep_checkpoints=1")
  with open(os.path.join(workdir, ".lock.0"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process trains here.
    _one_line_error(capsys, ("is in use by another capsjax process",),
                    f"--workdir={workdir}", "--config.keep_checkpoints=1")


def test_a_library_value_error_keeps_its_traceback(capsys, tmp_path, mock, monkeypatch):
  # A ValueError from a bug (here: inside the loss, as JAX or NumPy would raise it) is not
  # a user mistake: main must not turn it into a one-line error with exit code 2.
  def broken(*args, **kwargs):
    raise ValueError("a bug inside the loss")
  monkeypatch.setattr(losses, "margin_loss", broken)
  with pytest.raises(ValueError, match="a bug inside the loss"):
    _cli(capsys, f"--workdir={tmp_path / 'run'}")
  assert "capsjax: error" not in capsys.readouterr().err
