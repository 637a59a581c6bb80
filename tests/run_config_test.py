"""Bad config values and workdirs end with one line naming them, before the workdir is
touched. In-process `capsjax.main` runs on
TFDS mock MNIST with the `:smoke` config; every case fails before any training step.
"""

import json
import os
import subprocess
import sys

import pytest

from tests import helpers
from tests.main_test import REPO
from tests.main_test import _cli
from tests.main_test import _one_line_error

mock = helpers.mock_mnist_fixture()


@pytest.mark.parametrize(
  "override,expected",
  [
    (
      "--config.optim.learning_rate=-1",
      "config.optim.learning_rate must be a finite number > 0, got -1",
    ),
    (
      "--config.optim.learning_rate=inf",
      "config.optim.learning_rate must be a finite number > 0, got inf",
    ),
    (
      "--config.model.routing_iterations=1000000000",
      "config.model.routing_iterations must be <= 100, got 1000000000",
    ),
    ("--config.model.primary_stride=0", "config.model.primary_stride"),
    ("--config.model.conv1_kernel=0", "config.model.conv1_kernel"),
    ("--config.model.digit_dim=0", "config.model.digit_dim"),
    ("--config.loss.m_plus=nan", "config.loss.m_plus must be a number >= 0, got nan"),
    ("--config.seed=-1", "config.seed must be >= 0, got -1"),
    (
      "--config.loss.class_loss=hinge",
      "config.loss.class_loss must be one of ('margin', 'spread'), got 'hinge'",
    ),
    ("--config.loss.spread_margin_end=-0.5", "config.loss.spread_margin_end must be a number"),
  ],
)
def test_a_rejected_config_leaves_the_workdir_untouched(capsys, tmp_path, mock, override, expected):
  workdir = tmp_path / "run"
  _one_line_error(capsys, (expected,), f"--workdir={workdir}", override)
  # Nothing was written: the same workdir then takes a valid config without complaint.
  assert not os.path.exists(workdir)


def test_an_empty_workdir_is_not_the_current_directory(capsys, tmp_path, mock, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "mine.txt").write_text("a user's file")
  # (`--config.overwrite=True` would move the cwd's files aside if it were taken as one.)
  _one_line_error(capsys, ("--workdir=''",), "--workdir=", "--config.keep_checkpoints=1")
  # Evaluation too: a checkpoint in the cwd is not what an unset workdir means.
  _one_line_error(capsys, ("--workdir=''",), "--workdir=", "--config.mode=eval")
  assert sorted(os.listdir(tmp_path)) == ["mine.txt"]


def test_a_workdir_that_is_a_file_or_a_dangling_link(capsys, tmp_path, mock):
  path = tmp_path / "file"
  path.write_text("x")
  _one_line_error(capsys, ("is a file, expected a directory",), f"--workdir={path}")
  # Under a file, too: the file is named, not a NotADirectoryError later.
  _one_line_error(capsys, (f"{path} is a file, expected a directory",), f"--workdir={path}/sub")
  link = tmp_path / "link"
  os.symlink(tmp_path / "missing", link)
  _one_line_error(capsys, ("is a dangling symlink",), f"--workdir={link}")
  assert path.read_text() == "x" and not os.path.exists(tmp_path / "missing")


def test_a_broken_saved_config_names_its_file(capsys, tmp_path, mock):
  workdir = tmp_path / "run"
  os.makedirs(workdir / "config.json")
  _one_line_error(capsys, (str(workdir / "config.json"), "is not a file"), f"--workdir={workdir}")
  other = tmp_path / "other"
  os.makedirs(other)
  (other / "config.json").write_text("{not json")
  _one_line_error(
    capsys, (str(other / "config.json"), "cannot read the run's saved config"), f"--workdir={other}"
  )
  assert (other / "config.json").read_text() == "{not json"  # never overwritten.
  code, _, _ = _cli(capsys, f"--workdir={other}", "--config.seed=-1")
  assert code == 2


def test_a_workdir_without_checkpoints_takes_the_corrected_config(tmp_path, caplog):
  # A config that failed a check against the data (after config.json was written) must
  # not lock the workdir: nothing was trained with it.
  from capsjax.run import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "run")
  workdir_lib.check_config(helpers.mnist_smoke_config(train_examples=10**7), workdir)
  with caplog.at_level("WARNING"):
    workdir_lib.check_config(helpers.mnist_smoke_config(train_examples=32), workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train_examples"] == 32
  kept = [n for n in os.listdir(workdir) if n.startswith("config.json.previous-")]
  assert len(kept) == 1 and "saved no checkpoint" in caplog.text


def test_seeds_that_jax_would_wrap_are_refused(capsys, tmp_path, mock):
  _one_line_error(
    capsys,
    ("config.seed must be < 2**32",),
    f"--workdir={tmp_path / 'r'}",
    f"--config.seed={2**32 + 5}",
  )


def test_a_bug_inside_a_config_file_keeps_its_traceback(tmp_path):
  # A KeyError raised by get_config itself is not an unknown --config. field.
  path = tmp_path / "buggy.py"
  path.write_text("def get_config():\n  return {}['missing']\n")
  r = subprocess.run(
    [sys.executable, "-m", "capsjax.main", f"--config={path}", f"--workdir={tmp_path / 'w'}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 1 and "Traceback" in r.stderr, r.stderr
  assert "unknown config field" not in r.stderr
