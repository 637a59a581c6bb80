"""experiments.routing_sweep on `:smoke` mock data: both runs, the CSV/MD tables, the plot,
skipping finished runs, resuming unfinished ones, and the flag parsing of the CLI."""

import csv
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from capsjax import errors
from capsjax import train
from experiments import routing_sweep
from experiments import sweep as sweep_lib
from tests import helpers


def _config(tmp_path, **overrides):
  # MNIST, not Fashion-MNIST: with fashion_mnist the loader finds the real Debian files.
  return helpers.smoke_config(
    **{"dataset": "mnist", "data_dir": str(tmp_path / "tfds"), **overrides}
  )


@pytest.fixture
def mock_data():
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


@pytest.fixture
def count_training(monkeypatch):
  calls = []
  real = train.train_and_evaluate

  def counting(config, workdir):
    calls.append((config.model.routing_iterations, config.seed, os.path.basename(workdir)))
    return real(config, workdir)

  monkeypatch.setattr(train, "train_and_evaluate", counting)
  return calls


def _read(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


@pytest.mark.slow  # two smoke trainings: ~25 s on an idle 2-core CPU, ~60 s when loaded.
def test_sweep_runs_tabulates_and_skips_finished_runs(tmp_path, mock_data, count_training):
  sweep = str(tmp_path / "sweep")
  config = _config(tmp_path, num_epochs=1)
  rows = routing_sweep.run_sweep(config, sweep, [1, 2], [0], entropy_examples=16)
  assert count_training == [(1, 0, "iter1_seed0"), (2, 0, "iter2_seed0")]
  assert [(r["iterations"], r["seed"], r["skipped"]) for r in rows] == [
    (1, 0, False),
    (2, 0, False),
  ]
  # The :smoke CapsNet's parameters (tests/models_routing_test.py counts them by hand).
  assert [r["parameters"] for r in rows] == [123_808, 123_808]
  for it in (1, 2):
    rdir = os.path.join(sweep, f"iter{it}_seed0")
    assert os.listdir(os.path.join(rdir, "checkpoints")) == ["4"]  # 32 examples / batch 8
    assert os.path.exists(os.path.join(rdir, "summary.json"))
    assert os.path.exists(os.path.join(rdir, routing_sweep.RUN_JSON))

  results = _read(os.path.join(sweep, "results.csv"))
  assert tuple(results[0]) == routing_sweep.RESULT_FIELDS
  assert [int(r["iterations"]) for r in results] == [1, 2]
  for r in results:
    assert int(r["num_seeds"]) == 1
    assert 0.0 <= float(r["accuracy_mean"]) <= 1.0
    assert float(r["accuracy_std"]) == 0.0
    assert float(r["images_per_s"]) > 0 and float(r["wall_s"]) > 0
    assert np.isfinite(float(r["loss"])) and np.isfinite(float(r["recon_loss"]))
  # One routing iteration leaves the couplings uniform: entropy is exactly ln 10.
  np.testing.assert_allclose(float(results[0]["coupling_entropy"]), np.log(10), rtol=1e-5)
  np.testing.assert_allclose(rows[0]["coupling_entropy"], np.log(10), rtol=1e-6)
  # Two iterations: routed by agreement, so at most uniform (after 4 smoke steps the
  # weights are still ~0.01, so only just below it).
  assert 0.0 < rows[1]["coupling_entropy"] <= np.log(10) + 1e-6

  runs = _read(os.path.join(sweep, "runs.csv"))
  assert tuple(runs[0]) == routing_sweep.RUN_FIELDS and len(runs) == 2
  assert [float(r["accuracy"]) for r in runs] == pytest.approx([r["accuracy"] for r in rows])

  with open(os.path.join(sweep, "results.md")) as f:
    md = f.read()
  assert "| routing iterations | seeds | test accuracy (%) |" in md
  assert "coupling entropy (nats)" in md and "train images/s" in md
  assert md.count("\n| dynamic | 123,808 | 1 | 1 |") == 1
  assert md.count("\n| dynamic | 123,808 | 2 | 1 |") == 1
  assert os.path.getsize(os.path.join(sweep, "accuracy_vs_iterations.png")) > 5000

  # Rerun: nothing is retrained and the runs' files are untouched; tables are rewritten.
  watched = [
    os.path.join(sweep, f"iter{it}_seed0", name)
    for it in (1, 2)
    for name in ("summary.json", "metrics.csv")
  ]
  before = {p: (os.stat(p).st_mtime_ns, open(p).read()) for p in watched}
  rows2 = routing_sweep.run_sweep(config, sweep, [1, 2], [0], entropy_examples=16)
  assert len(count_training) == 2
  assert all(r["skipped"] for r in rows2)
  assert {p: (os.stat(p).st_mtime_ns, open(p).read()) for p in watched} == before
  assert [r["accuracy"] for r in rows2] == [r["accuracy"] for r in rows]
  assert [r["wall_s"] for r in rows2] == [r["wall_s"] for r in rows]

  # "Finished" means: same run-defining config and num_epochs reached.
  rdir = routing_sweep.run_dir(sweep, 1, 0)
  assert sweep_lib.is_finished(routing_sweep.run_config(config, 1, 0), rdir)
  assert not sweep_lib.is_finished(routing_sweep.run_config(config, 2, 0), rdir)
  other = _config(tmp_path, num_epochs=1, **{"optim.learning_rate": 0.01})
  assert not sweep_lib.is_finished(routing_sweep.run_config(other, 1, 0), rdir)
  longer = _config(tmp_path, num_epochs=2)
  assert not sweep_lib.is_finished(routing_sweep.run_config(longer, 1, 0), rdir)


@pytest.mark.slow
def test_unfinished_run_resumes(tmp_path, mock_data, count_training):
  sweep = str(tmp_path / "sweep")
  # A run that stopped after 1 of 2 epochs (what a killed run leaves behind).
  routing_sweep.run_sweep(_config(tmp_path, num_epochs=1), sweep, [2], [0], entropy_examples=0)
  rows = routing_sweep.run_sweep(_config(tmp_path), sweep, [2], [0], entropy_examples=0)
  assert len(count_training) == 2 and not rows[0]["skipped"]
  assert rows[0]["step"] == 8 and rows[0]["epochs"] == 2
  metrics = _read(os.path.join(sweep, "iter2_seed0", "metrics.csv"))
  # Resumed at step 4: the first epoch's rows are not repeated.
  assert [int(r["step"]) for r in metrics if r["split"] == "test"] == [4, 8]
  record = sweep_lib.read_json(os.path.join(sweep, "iter2_seed0", routing_sweep.RUN_JSON))
  assert [c["end_step"] for c in record["calls"]] == [4, 8]
  assert record["wall_s"] == pytest.approx(sum(c["wall_s"] for c in record["calls"]))


@pytest.mark.slow  # two smoke trainings.
def test_sweep_over_routings(tmp_path, mock_data, count_training):
  """--routings: one run per routing in its own dir; self-attention (a single pass) runs
  once, as iterations=1; parameters per routing in the table."""
  sweep = str(tmp_path / "sweep")
  config = _config(tmp_path, num_epochs=1)
  rows = routing_sweep.run_sweep(
    config, sweep, [2, 3], [0], entropy_examples=8, routings=["em", "self_attention"]
  )
  assert count_training == [
    (2, 0, "em_iter2_seed0"),
    (3, 0, "em_iter3_seed0"),
    (1, 0, "self_attention_iter1_seed0"),
  ]
  results = _read(os.path.join(sweep, "results.csv"))
  assert [(r["routing"], int(r["iterations"]), int(r["parameters"])) for r in results] == [
    ("em", 2, 129_016),
    ("em", 3, 129_016),
    ("self_attention", 1, 125_248),
  ]
  for r in rows:  # every routing's assignments sum to 1: entropy in (0, ln 10].
    assert 0.0 < r["coupling_entropy"] <= np.log(10) + 1e-6
  with open(os.path.join(sweep, "results.md")) as f:
    md = f.read()
  assert "\n| em | 129,016 | 3 | 1 |" in md and "\n| self_attention | 125,248 | 1 | 1 |" in md
  with pytest.raises(errors.ConfigError, match=r"^--routings: unknown routing 'fast'; valid "):
    routing_sweep.run_sweep(config, sweep, [1], [0], routings=["fast"])


def test_summarize_mean_and_std_over_seeds():
  rows = [
    {
      "routing": "dynamic",
      "iterations": 3,
      "seed": s,
      "accuracy": a,
      "loss": 1.0,
      "class_loss": 0.5,
      "recon_loss": 0.1,
      "images_per_s": 10.0,
      "wall_s": 2.0,
      "coupling_entropy": e,
      "epochs": 1.0,
      "parameters": 7,
    }
    for s, a, e in ((0, 0.8, 2.0), (1, 0.9, 1.0))
  ]
  rows.append(dict(rows[0], routing="em", accuracy=0.5))
  r, em = routing_sweep.summarize(rows)
  assert (em["routing"], em["num_seeds"], em["accuracy_mean"]) == ("em", 1, 0.5)
  assert r["num_seeds"] == 2 and r["parameters"] == 7
  np.testing.assert_allclose(r["accuracy_mean"], 0.85)
  np.testing.assert_allclose(r["accuracy_std"], np.std([0.8, 0.9], ddof=1))
  np.testing.assert_allclose(r["coupling_entropy"], 1.5)


def test_a_finished_run_with_the_old_margin_loss_key_is_tabulated(tmp_path):
  # summary.json of a finished run that named its class loss 'margin_loss': skipped, and
  # its value lands in the class_loss columns.
  sweep = str(tmp_path / "sweep")
  config = _config(tmp_path, num_epochs=1)
  rdir = routing_sweep.run_dir(sweep, 1, 0)
  os.makedirs(rdir)
  with open(os.path.join(rdir, "config.json"), "w") as f:
    f.write(routing_sweep.run_config(config, 1, 0).to_json_best_effort())
  summary = {"accuracy": 0.5, "loss": 0.3, "margin_loss": 0.25, "recon_loss": 0.05}
  sweep_lib.write_json(os.path.join(rdir, "summary.json"), dict(summary, step=4, epochs=1.0))
  row = routing_sweep.run_one(config, sweep, 1, 0)
  assert row["skipped"] and row["class_loss"] == 0.25 and "margin_loss" not in row
  (result,) = routing_sweep.summarize([dict(row, coupling_entropy=1.0)])
  assert result["class_loss"] == 0.25


def test_validates_arguments(tmp_path):
  config = _config(tmp_path)
  with pytest.raises(ValueError, match=r"iterations must be a non-empty list of ints >= 1"):
    routing_sweep.run_sweep(config, str(tmp_path), [0, 1], [0])
  with pytest.raises(ValueError, match="seeds must be a non-empty list"):
    routing_sweep.run_sweep(config, str(tmp_path), [1], [])
  with pytest.raises(ValueError, match="must not repeat"):
    routing_sweep.run_sweep(config, str(tmp_path), [1, 1], [0])


def test_command_line_flags_and_config_overrides(monkeypatch):
  from absl import flags

  argv = [
    "prog",
    "--config=configs/fashion.py:smoke",
    "--config.model.digit_dim=4",
    "--iterations=1,3,5",
    "--seeds=0,1",
    "--workdir=/tmp/x",
    "--routings=em,dynamic",
  ]
  monkeypatch.setattr("sys.argv", argv)  # config_flags reads its overrides from sys.argv.
  fv = flags.FlagValues()
  routing_sweep._define_flags(fv)
  fv(argv)
  assert fv.iterations == ["1", "3", "5"] and fv.seeds == ["0", "1"]
  assert fv.routings == ["em", "dynamic"]
  assert fv.config.model.digit_dim == 4 and fv.config.train_examples == 32
