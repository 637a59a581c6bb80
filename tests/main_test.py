"""The command line (`capsjax.main`): user mistakes end with one line and exit code 2,
everything else keeps its traceback.

The in-process checks call `capsjax.main.main` with parsed flags on TFDS mock MNIST and
the `:smoke` config; a real process is used where flag parsing itself, or what reaches
the console, is under test.
"""

import fcntl
import json
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
  config = _config(
    **{k[len("config.") :]: _parse(v) for k, v in values.items() if k.startswith("config.")}
  )

  def holder(v):
    return types.SimpleNamespace(value=v)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(
      main_lib,
      "flags",
      types.SimpleNamespace(FLAGS=types.SimpleNamespace(config=config, verbosity=0)),
    )
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
  return e.value.code, [ln for ln in err.splitlines() if ln.startswith("capsjax")], err


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
    [
      sys.executable,
      "-m",
      "capsjax.main",
      "--config=configs/fashion.py:smoke",
      f"--workdir={tmp_path}",
      override,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 2, r.stderr
  assert "Traceback" not in r.stderr, r.stderr
  return r.stderr


def test_cli_user_error_in_a_real_process_has_no_traceback(tmp_path):
  err = _cli_process_error(tmp_path, "--config.model.routing_iterations=0")
  errors = [ln for ln in err.splitlines() if ln.startswith("capsjax: error: ")]
  assert errors == [
    "capsjax: error: config.model.routing_iterations: num_iterations must be >= 1, got 0"
  ], err


def test_cli_unknown_config_field_fails_at_flag_parsing(tmp_path):
  err = _cli_process_error(tmp_path, "--config.model.routing_iteration=1")
  assert err.strip() == (
    'capsjax: error: unknown config field "routing_iteration" (did you mean '
    '"routing_iterations"?) in: --config.model.routing_iteration=1'
  ), err


@pytest.mark.parametrize(
  "argv,expected",
  [
    (("--config.dataset=mnist_typo",), ("mnist_typo",)),
    (
      ("--config.model.routing_iterations=0",),
      ("config.model.routing_iterations: num_iterations must be >= 1, got 0",),
    ),
    (
      ("--config.batch_size=6",),
      ("config.batch_size=6 must be a positive multiple of the number of devices (4)",),
    ),
  ],
)
def test_cli_config_guards(capsys, tmp_path, mock, argv, expected):
  _one_line_error(capsys, expected, f"--workdir={tmp_path}", *argv)


def test_cli_init_from_missing_and_other_architecture(capsys, tmp_path, src):
  _one_line_error(
    capsys,
    ("does not exist", str(tmp_path / "nothing")),
    f"--workdir={tmp_path / 'a'}",
    f"--config.init_from={tmp_path / 'nothing'}",
  )
  _one_line_error(
    capsys,
    (
      "parameter 0/decoder/layers/0/kernel has shape (80, 32) in the "
      "checkpoint but (40, 32) in the model",
    ),
    f"--workdir={tmp_path / 'b'}",
    f"--config.init_from={src}",
    "--config.model.digit_dim=4",
  )


def test_cli_workdir_with_other_config_and_locked_workdir(capsys, tmp_path, src):
  workdir = _copy(src, tmp_path)
  _one_line_error(
    capsys,
    (
      "was used by a run with a different config",
      "seed: 0 (saved) vs 1 (now)",
      "--config.overwrite=True",
    ),
    f"--workdir={workdir}",
    "--config.seed=1",
    "--config.keep_checkpoints=1",
  )
  with open(os.path.join(workdir, ".lock.0"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process trains here.
    _one_line_error(
      capsys,
      ("is in use by another capsjax process",),
      f"--workdir={workdir}",
      "--config.keep_checkpoints=1",
    )


def test_a_library_value_error_keeps_its_traceback(capsys, tmp_path, mock, monkeypatch):
  # A ValueError from a bug (here: inside the loss, as JAX or NumPy would raise it) is not
  # a user mistake: main must not turn it into a one-line error with exit code 2.
  def broken(*args, **kwargs):
    raise ValueError("a bug inside the loss")

  monkeypatch.setattr(losses, "margin_loss", broken)
  with pytest.raises(ValueError, match="a bug inside the loss"):
    _cli(capsys, f"--workdir={tmp_path / 'run'}")
  assert "capsjax: error" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Flag parsing: every mistake is one line and exit code 2.
# ---------------------------------------------------------------------------------------


def _main_process(argv, cwd=REPO, env=None):
  return subprocess.run(
    [sys.executable, "-m", "capsjax.main", *argv],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


def _only_error_line(r) -> str:
  assert r.returncode == 2, r.stderr
  assert "Traceback" not in r.stderr and "FATAL" not in r.stderr, r.stderr
  lines = [ln for ln in r.stderr.split("\n") if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith("capsjax: error: "), r.stderr
  return lines[0]


@pytest.mark.parametrize(
  "argv,expected",
  [
    (
      ("--config=configs/fashion.py:smoke", "--workdir=W", "--config.seed=abc"),
      "capsjax: error: --config.seed=abc: invalid literal for int() with base 10: 'abc'",
    ),
    (
      ("--config=configs/fashion.py:smoke", "--workdir=W", "--config.optim.learning_rate=x"),
      "capsjax: error: --config.optim.learning_rate=x: could not convert string to float: 'x'",
    ),
    (
      ("--config=configs/fashion.py:bogus", "--workdir=W"),
      "capsjax: error: --config=configs/fashion.py:bogus: unknown config variant 'bogus'; "
      "expected one of: 'quick', 'smoke'",
    ),
    (
      ("--config=configs/nothere.py", "--workdir=W", "--config.seed=1"),
      "capsjax: error: --config=configs/nothere.py: cannot load the config file ([Errno 2] No "
      "such file or directory: 'configs/nothere.py')",
    ),
    (("--config=configs/fashion.py:smoke",), "capsjax: error: missing required flag --workdir"),
    (("--workdir=W",), "capsjax: error: missing required flag --config"),
    (
      ("--config=configs/fashion.py:smoke", "--workdir=W", "stray"),
      "capsjax: error: unexpected command-line arguments ['stray']; capsjax.main takes only "
      "flags, e.g. --config=FILE --workdir=DIR",
    ),
  ],
)
def test_flag_parsing_errors_are_one_line_and_exit_2(tmp_path, argv, expected):
  argv = [a.replace("=W", f"={tmp_path / 'w'}") for a in argv]
  assert _only_error_line(_main_process(argv)) == expected
  assert not (tmp_path / "w").exists()


def test_a_config_file_loads_from_any_cwd(tmp_path):
  # capsjax importable, but neither the cwd nor sys.path holds the repository root (an
  # installed capsjax, a job script run from elsewhere): `from configs import common` in
  # the config file must still work.
  site = tmp_path / "site"
  site.mkdir()
  os.symlink(os.path.join(REPO, "capsjax"), site / "capsjax")
  env = dict(os.environ, PYTHONPATH=str(site))
  config = os.path.relpath(os.path.join(REPO, "configs", "kmnist.py"), tmp_path)
  r = _main_process(
    [f"--config={config}:augment,smoke", f"--workdir={tmp_path / 'w'}", "--config.seed=-1"],
    cwd=str(tmp_path),
    env=env,
  )
  # The config loaded: the error is about the value, found by capsjax's own checks.
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
  assert [ln for ln in r.stderr.split("\n") if ln.startswith("capsjax")] == [
    "capsjax: error: config.seed must be >= 0, got -1"
  ], r.stderr


def test_user_error_starts_on_a_fresh_line_after_a_progress_bar(capsys, tmp_path, monkeypatch):
  # A progress bar (TFDS's, the epoch bar) ends its updates with '\r', not '\n': the error
  # must still start a line of its own, so `grep '^capsjax: error'` finds it in a log.
  from capsjax import errors  # pylint: disable=g-import-not-at-top
  from capsjax import train  # pylint: disable=g-import-not-at-top

  def fails_mid_bar(config, workdir):
    sys.stderr.write("\rGenerating train examples...:  42%|####      | 25k/60k")
    raise errors.DatasetValidationError("train-images-idx3-ubyte.gz: corrupt")

  monkeypatch.setattr(train, "train_and_evaluate", fails_mid_bar)
  code, _, err = _cli(capsys, f"--workdir={tmp_path}")
  assert code == 2
  grep = [ln for ln in err.split("\n") if ln.startswith("capsjax: error")]
  assert grep == ["capsjax: error: train-images-idx3-ubyte.gz: corrupt"], repr(err)


def test_a_storage_failure_on_a_named_path_is_one_line_and_other_os_errors_are_not(capsys):
  import errno  # pylint: disable=g-import-not-at-top

  from capsjax import errors  # pylint: disable=g-import-not-at-top

  with pytest.raises(SystemExit) as e:
    with errors.exit_on_user_error():
      raise OSError(errno.EROFS, "Read-only file system", "/data/fashion/cache.npz")
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert [ln for ln in err.splitlines() if ln] == [
    "capsjax: error: /data/fashion/cache.npz: the file system is read-only; use a writable "
    "directory (runs write under --workdir, datasets under --config.data_dir)"
  ]
  # A missing file, or an OSError without a path, may be a bug: it keeps its traceback.
  for other in (OSError(errno.ENOENT, "No such file", "/x"), OSError(errno.ENOSPC, "full")):
    with pytest.raises(OSError):
      with errors.exit_on_user_error():
        raise other


def test_print_user_error_in_a_log_file_and_on_a_terminal(tmp_path):
  from capsjax import errors  # pylint: disable=g-import-not-at-top

  log = tmp_path / "run.log"
  with open(log, "w") as f:
    f.write("epoch 1/2:  50%|#####     | 2/4\r")
    errors.print_user_error("bad", stream=f)
  assert [ln for ln in log.read_text().split("\n") if ln.startswith("capsjax: error")] == [
    "capsjax: error: bad"
  ]

  class Tty(list):
    def isatty(self):
      return True

    write = list.append

    def flush(self):
      pass

  tty = Tty()
  errors.print_user_error("bad", stream=tty)
  # On a terminal the bar's line is cleared and reused: no empty line on screen.
  assert "".join(tty) == "\r\033[Kcapsjax: error: bad\n"


# ---------------------------------------------------------------------------------------
# Resuming with changes: refused naming the fields, unless resume_with_changes names them.
# ---------------------------------------------------------------------------------------


def _train(workdir, **overrides):
  from capsjax import train  # pylint: disable=g-import-not-at-top

  return train.train_and_evaluate(_config(**overrides), workdir)


def test_checkpoints_without_config_json_are_refused(capsys, tmp_path, src):
  workdir = _copy(src, tmp_path)
  os.remove(os.path.join(workdir, "config.json"))
  # Continuing these checkpoints with 1 routing iteration would mix two experiments.
  _one_line_error(
    capsys,
    (
      "has checkpoints but no config.json",
      "--config.resume_with_changes='*'",
      "--config.overwrite=True",
    ),
    f"--workdir={workdir}",
    "--config.model.routing_iterations=1",
    "--config.num_epochs=3",
  )
  assert not os.path.exists(os.path.join(workdir, "config.json"))
  # The escape hatch, given explicitly, resumes them (step 8 -> 12).
  summary = _train(workdir, num_epochs=3, resume_with_changes="*")
  assert summary["step"] == 12
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["resume_with_changes"] == "*"


def test_overwrite_moves_checkpoints_without_config_json_aside(tmp_path, src):
  workdir = _copy(src, tmp_path)
  os.remove(os.path.join(workdir, "config.json"))
  assert _train(workdir, num_epochs=1, overwrite=True)["step"] == 4
  assert [n for n in os.listdir(workdir) if n.startswith("previous-")]


def test_resume_with_changes_after_nan_advice(capsys, tmp_path, src, caplog):
  workdir = _copy(src, tmp_path)
  # A plain retry with a lower learning rate is refused, naming the way on.
  _one_line_error(
    capsys,
    (
      "optim.learning_rate: 0.001 (saved) vs 0.0001 (now)",
      "--config.resume_with_changes=optim.learning_rate",
    ),
    f"--workdir={workdir}",
    "--config.optim.learning_rate=0.0001",
    "--config.num_epochs=3",
  )
  with caplog.at_level("WARNING"):
    summary = _train(
      workdir,
      num_epochs=3,
      resume_with_changes="optim.learning_rate",
      **{"optim.learning_rate": 1e-4},
    )
  assert summary["step"] == 12  # continued from step 8, not restarted.
  assert "config.optim.learning_rate changed: 0.001 -> 0.0001" in caplog.text
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["optim"]["learning_rate"] == 1e-4
  previous = [n for n in os.listdir(workdir) if n.startswith("config.json.previous-")]
  assert len(previous) == 1, os.listdir(workdir)
  with open(os.path.join(workdir, previous[0])) as f:
    assert json.load(f)["optim"]["learning_rate"] == 1e-3
  # Only the fields named: another change is still refused.
  _one_line_error(
    capsys,
    ("seed: 0 (saved) vs 1 (now)",),
    f"--workdir={workdir}",
    "--config.optim.learning_rate=0.0001",
    "--config.seed=1",
    "--config.resume_with_changes=optim.learning_rate",
  )


def _saved_config(workdir) -> tuple[bytes, list[str]]:
  """config.json's bytes and the names of the config.json.previous-* files beside it."""
  with open(os.path.join(workdir, "config.json"), "rb") as f:
    data = f.read()
  return data, sorted(n for n in os.listdir(workdir) if n.startswith("config.json.previous-"))


def test_resume_with_changes_still_refuses_another_model_shape(capsys, tmp_path, src):
  workdir = _copy(src, tmp_path)
  before = _saved_config(workdir)
  _one_line_error(
    capsys,
    ("has shape (80, 32) in the checkpoint but (40, 32) in the model",),
    f"--workdir={workdir}",
    "--config.model.digit_dim=4",
    "--config.resume_with_changes=model",
    "--config.num_epochs=3",
  )
  # The refused change left the workdir as it was: the original command still resumes it.
  assert _saved_config(workdir) == before
  assert _train(workdir, num_epochs=3)["step"] == 12


def test_checkpoints_of_another_run_with_the_same_shapes_are_refused(capsys, tmp_path, src):
  """Another run's checkpoints beside this config.json: the same shapes, other values."""
  workdir = _copy(src, tmp_path)
  config_path = os.path.join(workdir, "config.json")
  with open(config_path) as f:
    saved = json.load(f)
  iterations = saved["model"]["routing_iterations"]
  saved["model"]["routing_iterations"] = iterations + 1
  with open(config_path, "w") as f:
    json.dump(saved, f)
  _one_line_error(
    capsys,
    (
      f"checkpoint {workdir}/checkpoints/8 was trained with a different config",
      f"model.routing_iterations: {iterations} (checkpoint) vs {iterations + 1} (now)",
      "--config.resume_with_changes=model.routing_iterations",
    ),
    f"--workdir={workdir}",
    f"--config.model.routing_iterations={iterations + 1}",
    "--config.num_epochs=3",
  )
  # Named, the change is accepted.
  summary = _train(
    workdir,
    num_epochs=3,
    resume_with_changes="model.routing_iterations",
    **{"model.routing_iterations": iterations + 1},
  )
  assert summary["step"] == 12


@pytest.mark.parametrize("batch_size", [16, 4])
def test_a_resume_at_another_batch_size_is_refused_not_miscounted(
  capsys, tmp_path, src, batch_size
):
  """Progress is counted in steps: at another batch size, step 8 would be another epoch."""
  workdir = _copy(src, tmp_path)
  before = _saved_config(workdir)
  _one_line_error(
    capsys,
    (
      f"checkpoint {workdir}/checkpoints/8 was trained at 4 steps per epoch, this config "
      f"makes {32 // batch_size}",
      "--config.init_from=<this checkpoint>",
    ),
    f"--workdir={workdir}",
    f"--config.batch_size={batch_size}",
    "--config.num_epochs=3",
    "--config.resume_with_changes=batch_size",
  )
  assert _saved_config(workdir) == before
  with open(os.path.join(workdir, "epochs.csv")) as f:
    assert [row.split(",")[0] for row in f.read().splitlines()[1:]] == ["1", "2"]


def test_a_hand_edited_config_json_of_any_json_type_is_named(capsys, tmp_path, src):
  workdir = _copy(src, tmp_path)
  config_path = os.path.join(workdir, "config.json")
  with open(config_path) as f:
    saved = json.load(f)
  saved["model"]["architecture"] = ["x"]
  with open(config_path, "w") as f:
    json.dump(saved, f)
  _one_line_error(
    capsys, ("model.architecture: ['x'] (saved) vs 'capsnet' (now)",), f"--workdir={workdir}"
  )


def test_a_resume_with_changes_that_fails_before_its_first_save_changes_nothing(tmp_path, src):
  from capsjax import errors  # pylint: disable=g-import-not-at-top

  workdir = _copy(src, tmp_path)
  before = _saved_config(workdir)
  # Diverges at once: no checkpoint under the new learning rate ever lands.
  with pytest.raises(errors.NonFiniteLossError):
    _train(
      workdir,
      num_epochs=3,
      resume_with_changes="optim.learning_rate",
      **{"optim.learning_rate": 1e30},
    )
  assert _saved_config(workdir) == before
  assert _train(workdir, num_epochs=3)["step"] == 12
  with open(os.path.join(workdir, "epochs.csv")) as f:
    assert [row.split(",")[0] for row in f.read().splitlines()[1:]] == ["1", "2", "3"]


@pytest.mark.parametrize(
  "value,expected",
  [
    (
      "optim.learnin_rate",
      "config.resume_with_changes: 'optim.learnin_rate' is not a config field",
    ),
    ("num_epochs", "config.resume_with_changes lists 'num_epochs', which is not run-defining"),
  ],
)
def test_resume_with_changes_names_run_defining_fields(capsys, tmp_path, mock, value, expected):
  _one_line_error(
    capsys, (expected,), f"--workdir={tmp_path}", f"--config.resume_with_changes={value}"
  )
  assert not os.listdir(tmp_path)


def test_non_finite_message_names_resume_with_changes():
  from capsjax import train  # pylint: disable=g-import-not-at-top

  ckpt = types.SimpleNamespace(latest_step=lambda: 8, directory="W/checkpoints")
  with pytest.raises(errors_lib().NonFiniteLossError) as e:
    train.check_finite(
      [(9, {"loss": float("nan")})], ckpt=ckpt, steps_per_epoch=4, config=_config()
    )
  assert (
    "--config.optim.learning_rate=<lower> --config.resume_with_changes=optim.learning_rate"
  ) in str(e.value)


def errors_lib():
  from capsjax import errors  # pylint: disable=g-import-not-at-top

  return errors
