"""End-to-end training: overfitting a fixed batch, and `:smoke` runs on TFDS mock data
that write CSV/TensorBoard/checkpoints/plots, resume, and evaluate checkpoints."""

import csv
import glob
import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from capsjax import checkpoint
from capsjax import input_pipeline
from capsjax import parallel
from capsjax import train
from tests import helpers


def test_overfits_a_fixed_batch():
  config = helpers.smoke_config(**{"optim.decay_rate": 1.0, "augment.flip": False,
                                   "augment.max_shift": 0})
  info = input_pipeline.dataset_info("fashion_mnist")
  graphdef, state = train.create_model_and_optimizer(config, info, 100, jax.random.key(0))
  mesh = parallel.make_mesh(2)
  state = parallel.replicate(state, mesh)
  train_fn, _ = train.make_steps(graphdef, config, 100, mesh)
  batch = parallel.shard_batch(helpers.synthetic_batch(16, seed=1), mesh)
  losses, accs = [], []
  for _ in range(60):
    state, m = train_fn(state, batch, jax.random.key(0))
    losses.append(float(m["loss"]))
    accs.append(float(m["accuracy"]))
  assert losses[-1] < 0.5 * losses[0], losses
  assert accs[-1] == 1.0, accs


@pytest.fixture
def mock_fashion():
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def _run(workdir, **overrides):
  # MNIST, not Fashion-MNIST: for Fashion-MNIST the loader would find Debian's real files
  # (installed on CI) and build from them instead of using the mock.
  config = helpers.smoke_config(**{"dataset": "mnist", "train_examples": 32,
                                   "eval_examples": 24,
                                   "data_dir": os.path.join(workdir, "..", "tfds"),
                                   **overrides})
  return train.train_and_evaluate(config, workdir)


def _rows(workdir, name="metrics.csv"):
  with open(os.path.join(workdir, name)) as f:
    return list(csv.DictReader(f))


def test_smoke_run_logs_checkpoints_resumes_and_evaluates(tmp_path, mock_fashion, capsys):
  workdir = str(tmp_path / "run")
  summary = _run(workdir)
  # 32 examples / batch 8 = 4 steps per epoch, 2 epochs.
  assert summary["step"] == 8
  assert summary["count"] == 24
  rows = _rows(workdir)
  assert [int(r["step"]) for r in rows if r["split"] == "test"] == [4, 8]
  assert max(int(r["step"]) for r in rows if r["split"] == "train") == 8
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert os.path.getsize(os.path.join(workdir, "plots", "curves.png")) > 1000
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["step"] == 8
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["model"]["routing_iterations"] == 2 and saved["num_epochs"] == 2
  epochs = _rows(workdir, "epochs.csv")
  assert [(r["epoch"], r["step"]) for r in epochs] == [("1", "4"), ("2", "8")]
  test_rows = [r for r in rows if r["split"] == "test"]
  for e, t in zip(epochs, test_rows):
    assert e["test_accuracy"] == t["accuracy"] and e["test_loss"] == t["loss"]
    assert float(e["seconds"]) > 0 and float(e["images_per_s"]) > 0
    assert 0 <= float(e["train_accuracy"]) <= 1 and float(e["learning_rate"]) > 0
  assert float(epochs[1]["learning_rate"]) == pytest.approx(0.9e-3)

  # Rerunning with more epochs resumes at step 8 instead of starting over.
  summary = _run(workdir, num_epochs=3)
  assert summary["step"] == 12
  steps = [int(r["step"]) for r in _rows(workdir) if r["split"] == "train"]
  assert steps == sorted(steps) and len(steps) == len(set(steps)), steps
  assert [int(r["step"]) for r in _rows(workdir) if r["split"] == "test"] == [4, 8, 12]
  assert [r["epoch"] for r in _rows(workdir, "epochs.csv")] == ["1", "2", "3"]

  # mode=eval reproduces the logged test accuracy of the latest checkpoint.
  logged = [r for r in _rows(workdir) if r["split"] == "test"][-1]
  result = _run(workdir, num_epochs=3, mode="eval")
  assert result["step"] == 12
  np.testing.assert_allclose(result["accuracy"], float(logged["accuracy"]), atol=1e-6)
  np.testing.assert_allclose(result["loss"], float(logged["loss"]), rtol=1e-4)
  # A model setting that keeps parameter shapes (routing iterations) is taken from the
  # checkpoint, not the command line, and the difference is reported.
  other = _run(workdir, num_epochs=3, mode="eval", **{"model.routing_iterations": 3})
  assert other == result
  assert "model.routing_iterations: 2 (saved) vs 3 (now)" in capsys.readouterr().err


def test_two_identical_runs_are_identical(tmp_path, mock_fashion):
  a = _run(str(tmp_path / "a"), num_epochs=1)
  b = _run(str(tmp_path / "b"), num_epochs=1)
  assert a == b
  la = [r["loss"] for r in _rows(str(tmp_path / "a"))]
  lb = [r["loss"] for r in _rows(str(tmp_path / "b"))]
  assert la == lb


def test_init_from_loads_weights_and_rejects_other_architectures(tmp_path, mock_fashion):
  src = str(tmp_path / "src")
  first = _run(src, num_epochs=1)
  # Evaluating the source checkpoint through init_from gives the same accuracy.
  result = _run(str(tmp_path / "eval"), num_epochs=1, mode="eval", init_from=src)
  np.testing.assert_allclose(result["accuracy"], first["accuracy"])
  with pytest.raises(ValueError, match=r"parameter 0/decoder/layers/0/kernel has shape "
                                       r"\(80, 32\) in the checkpoint but \(40, 32\) in the model"):
    _run(str(tmp_path / "other"), num_epochs=1, init_from=src, **{"model.digit_dim": 4})
  with pytest.raises(FileNotFoundError, match="does not exist"):
    _run(str(tmp_path / "x"), init_from=str(tmp_path / "missing"))


def test_workdir_guards(tmp_path, mock_fashion):
  workdir = str(tmp_path / "run")
  _run(workdir, num_epochs=1)
  with pytest.raises(ValueError, match=r"model.routing_iterations: 2 \(saved\) vs 3 \(now\)"):
    _run(workdir, num_epochs=1, **{"model.routing_iterations": 3})
  # overwrite moves the earlier run aside instead of deleting it.
  _run(workdir, num_epochs=1, overwrite=True, **{"model.routing_iterations": 3})
  backups = glob.glob(os.path.join(workdir, "previous-*"))
  assert len(backups) == 1
  assert os.path.isdir(os.path.join(backups[0], "checkpoints", "4"))
  with pytest.raises(ValueError, match="routing_iterations must be an int >= 1, got 0"):
    _run(workdir, **{"model.routing_iterations": 0})
  with pytest.raises(ValueError, match="config.batch_size=6 must be a positive multiple"):
    _run(str(tmp_path / "b"), batch_size=6)
  with pytest.raises(ValueError, match="Unknown dataset|unknown dataset|not one of|supported"):
    _run(str(tmp_path / "c"), dataset="cifar100")


def test_cifar10_smoke_run_on_mock_data(tmp_path):
  # 32x32x3 inputs (the seeds' CIFAR-10 TODO): an 8x8 PrimaryCaps grid, a 3072-pixel decoder.
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
    summary = _run(str(tmp_path / "cifar"), dataset="cifar10", num_epochs=1)
  assert summary["step"] == 4 and summary["count"] == 24
  assert 0.0 <= summary["accuracy"] <= 1.0 and np.isfinite(summary["loss"])
  meta = checkpoint.Checkpointer(str(tmp_path / "cifar"), read_only=True).read_meta(4)
  assert meta["image_shape"] == [32, 32, 3]
  # An 8x8 PrimaryCaps grid of the smoke model's 4 types of 4-D capsules.
  assert meta["param_shapes"]["0/digit_caps/w"] == [8 * 8 * 4, 10, 4, 8]
