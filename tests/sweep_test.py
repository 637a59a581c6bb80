"""experiments.sweep: field parsing, and 2 recipes x 2 seeds on `:smoke` mock data."""

import csv
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from capsjax import metrics as metrics_lib
from capsjax import train
from configs import common
from experiments import sweep

RECIPES = ["configs/fashion.py:smoke", "configs/capsnet_fashion_mnist.py:smoke"]


def test_parse_value_types_like_the_field():
  config = common.get_base_config()
  assert sweep.parse_value(config, "optim.decay_rate", "1") == 1.0
  assert isinstance(sweep.parse_value(config, "optim.decay_rate", "1"), float)
  assert sweep.parse_value(config, "model.routing_iterations", "3") == 3
  assert sweep.parse_value(config, "model.stop_gradient", "True") is True
  assert sweep.parse_value(config, "model.init", "keras") == "keras"
  assert sweep.parse_value(config, "model.decoder_hidden", "(8, 16)") == (8, 16)
  with pytest.raises(ValueError, match="model.routing_iterations expects a int, got '1.5'"):
    sweep.parse_value(config, "model.routing_iterations", "1.5")
  with pytest.raises(ValueError, match="unknown config field 'model.routings'"):
    sweep.parse_value(config, "model.routings", "3")
  axes = sweep.parse_axes(config, ["optim.decay_rate=0.9,0.95", "model.routing_iterations=1,3"])
  assert axes == [("optim.decay_rate", [0.9, 0.95]), ("model.routing_iterations", [1, 3])]
  with pytest.raises(ValueError, match="not 'seed'"):
    sweep.parse_axes(config, ["seed=1,2"])
  assert sweep.recipe_name("configs/kmnist.py:augment,quick") == "kmnist-augment-quick"
  # absl splits --recipes at every comma, variants included.
  assert sweep.join_recipe_specs(
    ["configs/kmnist.py:augment", "quick", "configs/fashion.py", "configs/mnist.py:smoke"]
  ) == ["configs/kmnist.py:augment,quick", "configs/fashion.py", "configs/mnist.py:smoke"]


def test_mean_std_and_summary_groups():
  assert sweep.mean_std([0.9, 0.92, None]) == pytest.approx((0.91, np.std([0.9, 0.92], ddof=1)))
  rows = [
    {
      "recipe": "a",
      "values": "",
      "final_test_accuracy": x,
      "selected_test_accuracy": x,
      "best_test_accuracy": x + 0.01,
      "selected_on": "test",
      "epochs": 2.0,
      "images_per_s": 10.0,
      "wall_s": 1.0,
    }
    for x in (0.8, 0.9)
  ]
  (res,) = sweep.summarize(rows, {"a": (0.93, "ref")})
  assert res["num_seeds"] == 2 and res["final_mean"] == pytest.approx(0.85)
  assert res["final_std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
  assert res["best_test_mean"] == pytest.approx(0.86) and res["published"] == 0.93


@pytest.mark.slow  # four smoke trainings: ~40 s on an idle 2-core CPU.
def test_two_recipes_two_seeds_write_mean_and_std(tmp_path, monkeypatch):
  calls = []
  real = train.train_and_evaluate

  def counting(config, workdir):
    calls.append(os.path.basename(workdir))
    return real(config, workdir)

  monkeypatch.setattr(train, "train_and_evaluate", counting)
  workdir = str(tmp_path / "sweep")
  # MNIST, not Fashion-MNIST: with fashion_mnist the loader finds the real Debian files.
  overrides = ["dataset=mnist", f"data_dir={tmp_path / 'tfds'}", "num_epochs=1"]
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
    rows = sweep.run_sweep(RECIPES, workdir, seeds=[0, 1], overrides=overrides)
    assert calls == [
      "fashion-smoke__seed0",
      "fashion-smoke__seed1",
      "capsnet_fashion_mnist-smoke__seed0",
      "capsnet_fashion_mnist-smoke__seed1",
    ]
    with open(os.path.join(workdir, "results.csv"), newline="") as f:
      results = list(csv.DictReader(f))
    assert [r["recipe"] for r in results] == ["fashion-smoke", "capsnet_fashion_mnist-smoke"]
    for res in results:
      accs = [r["final_test_accuracy"] for r in rows if r["recipe"] == res["recipe"]]
      assert int(res["num_seeds"]) == 2
      np.testing.assert_allclose(float(res["final_mean"]), np.mean(accs), rtol=1e-5)
      np.testing.assert_allclose(float(res["final_std"]), np.std(accs, ddof=1), atol=1e-6)
      assert res["selected_on"] == "val"  # :smoke holds out 8 examples.
    assert float(results[0]["published"]) == 0.9291
    assert float(results[1]["published"]) == 0.9362
    md = open(os.path.join(workdir, "results.md")).read()
    assert "| fashion-smoke | - | 2 | val |" in md and "92.91 (Fashion seed notebook" in md
    assert os.path.getsize(os.path.join(workdir, "curves.png")) > 1000
    # The seeds differ (the table's std comes from different runs): different losses.
    losses = [
      [
        row["loss"]
        for row in metrics_lib.read_csv(os.path.join(r["workdir"], "metrics.csv"))
        if row["split"] == "train"
      ]
      for r in rows
    ]
    assert losses[0] != losses[1] and losses[2] != losses[3]
    # Rerunning skips every finished run.
    again = sweep.run_sweep(RECIPES, workdir, seeds=[0, 1], overrides=overrides)
  assert len(calls) == 4 and all(r["skipped"] for r in again)


# ---------------------------------------------------------------------------------------
# The command line: a user mistake is one `capsjax: error:` line and exit code 2.
# ---------------------------------------------------------------------------------------
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli_error(module, *argv) -> str:
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  r = subprocess.run(
    [sys.executable, "-m", module, *argv], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert r.returncode == 2, r.stderr
  assert "Traceback" not in r.stderr and "FATAL" not in r.stderr, r.stderr
  lines = [l for l in r.stderr.split("\n") if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("capsjax: error: "), r.stderr
  return lines[0][len("capsjax: error: ") :]


@pytest.mark.parametrize(
  "argv,expected",
  [
    (
      ("--recipes=configs/nothere.py",),
      "recipe config file 'configs/nothere.py' (from 'configs/nothere.py') does not exist",
    ),
    (
      ("--recipes=configs/fashion.py:bogus",),
      "recipe 'configs/fashion.py:bogus': unknown config variant 'bogus'; expected one of: "
      "'quick', 'smoke'",
    ),
    (
      ("--recipes=configs/fashion.py:smoke", "--seeds=a"),
      "--seeds expects integers, e.g. --seeds=0,1, got 'a'",
    ),
    (
      ("--recipes=configs/fashion.py:smoke", "--set=model.routings=2"),
      "unknown config field 'model.routings'",
    ),
    (
      ("--recipes=configs/fashion.py:smoke", "--set=model.routing_iterations=0"),
      "config.model.routing_iterations: num_iterations must be >= 1, got 0",
    ),
    (
      ("--recipes=configs/fashion.py:smoke", "--sweep=seed=1,2"),
      "--sweep fields must be distinct and not 'seed' (use --seeds): ['seed']",
    ),
    (
      ("--recipes=configs/fashion.py:smoke", "stray"),
      "unexpected arguments: ['stray']; only flags are taken",
    ),
    ((), "missing required flag --recipes"),
  ],
)
def test_command_line_mistakes_are_one_line(tmp_path, argv, expected):
  argv = [*argv, f"--workdir={tmp_path / 'w'}"] if argv else [f"--workdir={tmp_path}"]
  assert _cli_error("experiments.sweep", *argv) == expected


@pytest.mark.parametrize(
  "argv,expected",
  [
    (
      ("--config=configs/fashion.py:bogus",),
      "--config=configs/fashion.py:bogus: unknown config variant 'bogus'; expected one of: "
      "'quick', 'smoke'",
    ),
    (
      ("--config=configs/fashion.py:smoke", "--config.seed=x"),
      "--config.seed=x: invalid literal for int() with base 10: 'x'",
    ),
    (
      ("--config=configs/fashion.py:smoke", "--iterations=0"),
      "iterations must be a non-empty list of ints >= 1, got [0]",
    ),
    (
      ("--config=configs/fashion.py:smoke", "--iterations=one"),
      "--iterations expects integers, e.g. --iterations=0,1, got 'one'",
    ),
  ],
)
def test_routing_sweep_command_line_mistakes_are_one_line(tmp_path, argv, expected):
  assert _cli_error("experiments.routing_sweep", *argv, f"--workdir={tmp_path / 'w'}") == expected
