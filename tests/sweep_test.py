"""experiments.sweep: field parsing, 2 recipes x 2 seeds on `:smoke` mock data, and
--parallel (runs packed into ensembles) against the sequential sweep."""

import csv
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from capsjax import errors
from capsjax import metrics as metrics_lib
from capsjax import train
from capsjax import train_ensemble
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
# --parallel: runs that differ only in per-member fields train as one ensemble.
# ---------------------------------------------------------------------------------------
def _mock_overrides(tmp_path):
  # MNIST, not Fashion-MNIST: with fashion_mnist the loader finds the real Debian files.
  return ["dataset=mnist", f"data_dir={tmp_path / 'tfds'}", "num_epochs=1"]


def _count(monkeypatch, module, name):
  """Replaces module.name with a wrapper recording each call's directory names."""
  calls = []
  real = getattr(module, name)

  def counting(configs, dirs):
    many = isinstance(dirs, (list, tuple))
    calls.append([os.path.basename(d) for d in dirs] if many else os.path.basename(dirs))
    return real(configs, dirs)

  monkeypatch.setattr(module, name, counting)
  return calls


def test_pack_splits_on_program_fields_and_caps_members():
  config = common.get_base_config()
  runs = [
    sweep.make_run(
      config, "/w", "r", {"model.routing_iterations": it, "optim.learning_rate": lr}, s
    )
    for it in (1, 2)
    for lr in (1e-3, 3e-3)
    for s in (0, 1)
  ]
  packs = sweep.pack(runs)
  assert [[r.workdir for r in p] for p in packs] == [
    [r.workdir for r in runs[:4]],
    [r.workdir for r in runs[4:]],
  ]
  assert [len(p) for p in sweep.pack(runs, max_members=3)] == [3, 1, 3, 1]
  # Members resume from one step they all saved: a kill between two members' saves
  # (0 and 1) packs again; a fresh run (2) and a run saved elsewhere (3) do not join.
  saved = {
    r.workdir: frozenset(s) for r, s in zip(runs, [{4, 8}, {4, 8, 12}, {0}, {20}], strict=False)
  }
  assert [[runs.index(r) for r in p] for p in sweep.pack(runs[:4], saved=saved)] == [
    [0, 1],
    [2],
    [3],
  ]
  # A loss weight packs; the batch size (a shape) does not.
  other = runs[0].config.copy_and_resolve_references()
  other.loss.recon_weight = 0.1
  assert len(sweep.pack([runs[0], sweep.make_run(other, "/w", "o", {}, 5)])) == 1
  other.batch_size = 7
  assert len(sweep.pack([runs[0], sweep.make_run(other, "/w", "o", {}, 5)])) == 2


def test_parallel_sweep_over_routing_iterations_trains_two_ensembles(tmp_path, monkeypatch):
  calls = []

  def fake(configs, dirs):
    # Stands in for the training (tested in train_ensemble_test.py): records the packs.
    calls.append(
      [
        (c.model.routing_iterations, c.seed, os.path.basename(d))
        for c, d in zip(configs, dirs, strict=False)
      ]
    )
    for d in dirs:
      os.makedirs(d, exist_ok=True)
    return [{"final_test_accuracy": 0.5, "step": 8, "epochs": 2.0} for _ in configs]

  monkeypatch.setattr(train_ensemble, "train_ensemble", fake)
  monkeypatch.setattr(train, "train_and_evaluate", None)  # no run may train alone.
  workdir = str(tmp_path / "sweep")
  kw = {"sweep": ["model.routing_iterations=1,2"], "seeds": [0, 1], "parallel": True}
  rows = sweep.run_sweep(RECIPES[:1], workdir, overrides=_mock_overrides(tmp_path), **kw)
  assert calls == [
    [(it, s, f"fashion-smoke__model.routing_iterations={it}__seed{s}") for s in (0, 1)]
    for it in (1, 2)
  ]
  assert [(r["values"], r["seed"]) for r in rows] == [
    (f"model.routing_iterations={it}", s) for it in (1, 2) for s in (0, 1)
  ]
  record = sweep.read_json(os.path.join(rows[0]["workdir"], sweep.RUN_JSON))
  assert record["calls"][0]["members"] == 2
  assert record["wall_s"] == pytest.approx(record["calls"][0]["ensemble_wall_s"] / 2)
  # An ensemble keeps >= 2 checkpoints: refused before anything trains.
  with pytest.raises(errors.ConfigError, match="keep_checkpoints=1; an ensemble keeps at least"):
    sweep.run_sweep(
      RECIPES[:1],
      str(tmp_path / "other"),
      overrides=[*_mock_overrides(tmp_path), "keep_checkpoints=1"],
      **kw,
    )
  assert len(calls) == 2


def _table(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _listing(rdir):
  """A run directory's entries (event files are named by their creation time)."""
  names = sorted(os.listdir(rdir))
  ckpts = sorted(os.listdir(os.path.join(rdir, "checkpoints")))
  events = [n.startswith("events.out") for n in os.listdir(os.path.join(rdir, "tensorboard"))]
  return names, ckpts, events


@pytest.mark.slow  # 4 smoke runs, an ensemble of 4, 2 resumed ones: ~50 s on 2 busy cores.
def test_parallel_sweep_equals_sequential_one(tmp_path, monkeypatch):
  singles = _count(monkeypatch, train, "train_and_evaluate")
  ensembles = _count(monkeypatch, train_ensemble, "train_ensemble")
  seq, par = str(tmp_path / "seq"), str(tmp_path / "par")
  kw = {
    "sweep": ["optim.learning_rate=0.001,0.003"],
    "seeds": [0, 1],
    "overrides": _mock_overrides(tmp_path),
  }
  names = [
    f"fashion-smoke__optim.learning_rate={lr}__seed{s}" for lr in (0.001, 0.003) for s in (0, 1)
  ]
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
    sweep.run_sweep(RECIPES[:1], seq, **kw)
    assert singles == names and not ensembles
    sweep.run_sweep(RECIPES[:1], par, parallel=True, **kw)
    assert ensembles == [names] and len(singles) == 4

    # Same tables: every row and column but the timings and the sweep's own directory.
    timing = {"images_per_s", "wall_s"}
    for table in ("runs.csv", "results.csv"):
      a, b = _table(os.path.join(seq, table)), _table(os.path.join(par, table))
      assert len(a) == len(b) == (4 if table == "runs.csv" else 2) and list(a[0]) == list(b[0])
      for ra, rb in zip(a, b, strict=True):
        for k in ra:
          if k.endswith(("accuracy", "_mean", "_std")):
            # Accuracies count test images (24): on CPU each member runs its single run's
            # program (ensemble.resolve_vmap_size), so its weights match to float32
            # rounding and the counts are equal; half an image bounds the difference.
            np.testing.assert_allclose(float(ra[k]), float(rb[k]), atol=0.5 / 24, err_msg=k)
          elif k == "workdir":
            assert os.path.relpath(ra[k], seq) == os.path.relpath(rb[k], par)
          elif k not in timing:
            assert ra[k] == rb[k], k
    assert sorted(os.listdir(seq)) == sorted(os.listdir(par))
    for name in names:
      a, b = os.path.join(seq, name), os.path.join(par, name)
      assert _listing(a) == _listing(b)
      assert sweep.read_json(os.path.join(a, "config.json")) == sweep.read_json(
        os.path.join(b, "config.json")
      )
      # The members are those runs: their logged losses, gradient norms and learning rates,
      # printed with 6 significant digits (5e-6 relative), plus a few float32 ulps where
      # reordered sums compound over the 4 steps.
      for csv_name in ("metrics.csv", "epochs.csv"):
        ra, rb = _table(os.path.join(a, csv_name)), _table(os.path.join(b, csv_name))
        assert len(ra) == len(rb) > 0
        for x, y in zip(ra, rb, strict=True):
          assert x.get("split") == y.get("split")
          for k in set(x) - timing - {"split", "seconds"}:
            np.testing.assert_allclose(float(x[k] or 0), float(y[k] or 0), rtol=2e-5, err_msg=k)

    # A rerun packs only the unfinished runs (here: killed after their last checkpoint).
    first = _table(os.path.join(par, "runs.csv"))
    for name in names[2:]:
      os.remove(os.path.join(par, name, "summary.json"))
    again = sweep.run_sweep(RECIPES[:1], par, parallel=True, **kw)
  assert ensembles == [names, names[2:]] and len(singles) == 4
  assert [r["skipped"] for r in again] == [True, True, False, False]
  for r, f in zip(again, first, strict=True):
    assert f"{r['final_test_accuracy']:.6g}" == f["final_test_accuracy"]


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
  lines = [ln for ln in r.stderr.split("\n") if ln.strip()]
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
    (
      ("--recipes=configs/fashion.py:smoke", "--parallel", "--max_members=0"),
      "--max_members expects an integer >= 1, got 0",
    ),
    (
      # Every combination is checked before the first run trains.
      ("--recipes=configs/fashion.py:smoke", "--sweep=model.routing=dynamic,bogus"),
      "run fashion-smoke model.routing=bogus seed 0: config.model.routing: unknown routing "
      "'bogus'; valid routings: 'dynamic', 'em', 'inverted_dot_product', 'self_attention'",
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
