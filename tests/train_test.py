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

from capsjax import augment
from capsjax.run import checkpoint
from capsjax import errors
from capsjax import main
from capsjax.data import input_pipeline
from capsjax import metrics as metrics_lib
from capsjax import parallel
from capsjax import steps as steps_lib
from capsjax.run import workdir as workdir_lib
from tests import helpers


def test_overfits_a_fixed_batch():
  config = helpers.smoke_config(
    **{
      "optim.decay_rate": 1.0,
      "augment.flip": False,
      "augment.max_shift": 0,
      "augment.shift_fraction": 0.0,
    }
  )
  info = input_pipeline.dataset_info("fashion_mnist")
  graphdef, state = steps_lib.create_model_and_optimizer(config, info, 100, jax.random.key(0))
  mesh = parallel.make_mesh(2)
  state = parallel.replicate(state, mesh)
  train_fn, _ = steps_lib.make_steps(graphdef, config, 100, mesh)
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
  config = helpers.smoke_config(
    **{
      "dataset": "mnist",
      "train_examples": 32,
      "eval_examples": 24,
      "data_dir": os.path.join(workdir, "..", "tfds"),
      **overrides,
    }
  )
  return main.run(config, workdir)


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
  for e, t in zip(epochs, test_rows, strict=False):
    assert e["test_accuracy"] == t["accuracy"] and e["test_loss"] == t["loss"]
    assert float(e["seconds"]) > 0 and float(e["images_per_s"]) > 0
    assert 0 <= float(e["train_accuracy"]) <= 1 and float(e["learning_rate"]) > 0
  assert float(epochs[1]["learning_rate"]) == pytest.approx(0.95e-3)  # x0.95 per epoch

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
  assert a.pop("wall_s") > 0 and b.pop("wall_s") > 0  # the only field that may differ.
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
  with pytest.raises(
    ValueError,
    match=r"parameter 0/decoder/layers/0/kernel has shape "
    r"\(80, 32\) in the checkpoint but \(40, 32\) in the model",
  ):
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
  with pytest.raises(
    errors.ConfigError, match="config.model.routing_iterations: .*must be >= 1, got 0"
  ):
    _run(workdir, **{"model.routing_iterations": 0})
  with pytest.raises(errors.ConfigError, match="config.batch_size=6 must be a positive multiple"):
    _run(str(tmp_path / "b"), batch_size=6)
  with pytest.raises(errors.ConfigError, match="Unknown dataset 'cifar100'"):
    _run(str(tmp_path / "c"), dataset="cifar100")


def test_cifar10_smoke_run_on_mock_data(tmp_path):
  # 32x32x3 inputs (a TODO in the Fashion and K-MNIST seed projects): an 8x8 PrimaryCaps
  # grid, a 3072-pixel decoder.
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
    summary = _run(str(tmp_path / "cifar"), dataset="cifar10", num_epochs=1)
  assert summary["step"] == 4 and summary["count"] == 24
  assert 0.0 <= summary["accuracy"] <= 1.0 and np.isfinite(summary["loss"])
  meta = checkpoint.Checkpointer(str(tmp_path / "cifar"), read_only=True).read_meta(4)
  assert meta["image_shape"] == [32, 32, 3]
  # An 8x8 PrimaryCaps grid of the smoke model's 4 types of 4-D capsules.
  assert meta["param_shapes"]["0/digit_caps/w"] == [8 * 8 * 4, 10, 4, 8]


def _indexed_images(n):
  """uint8 [n, 28, 28, 1] whose pixel (0, 0) and (0, 1) spell the example's index."""
  images = np.zeros((n, 28, 28, 1), np.uint8)
  images[:, 0, 0, 0], images[:, 0, 1, 0] = np.arange(n) // 256, np.arange(n) % 256
  return images, np.arange(n) % 10


def _ids(images):
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = np.round(images * 255).astype(np.int64)
  return set((256 * images[:, 0, 0, 0].astype(np.int64) + images[:, 0, 1, 0]).tolist())


def test_validation_split_is_disjoint_from_every_training_batch():
  images, labels = _indexed_images(1000)
  tr_i, tr_l, va_i, va_l = input_pipeline.split_validation(images, labels, 150)
  assert len(va_l) == 150 and len(tr_l) == 850
  val_ids = _ids(va_i)
  assert len(val_ids) == 150 and val_ids | _ids(tr_i) == set(range(1000))
  np.testing.assert_array_equal(va_l, np.array(sorted(val_ids)) % 10)  # labels follow
  # Training keeps its original order; the held-out examples are spread over the split.
  assert sorted(_ids(tr_i)) == [256 * int(a) + int(b) for a, b in tr_i[:, 0, :2, 0]]
  assert min(val_ids) < 200 and max(val_ids) > 800
  for epoch in range(3):
    for batch in input_pipeline.train_batches(tr_i, tr_l, batch_size=64, seed=7, epoch=epoch):
      assert not _ids(batch["image"]) & val_ids
  # The same examples for any seed and any training subset (load_splits holds them out
  # before train_examples subsets the rest).
  again = input_pipeline.split_validation(images.copy(), labels.copy(), 150)[2]
  assert _ids(again) == val_ids
  assert _ids(input_pipeline.split_validation(images, labels, 300)[2]) != val_ids
  with pytest.raises(ValueError, match=r"config.val_examples must be in \[0, 1000\)"):
    input_pipeline.split_validation(images, labels, 1000)


def test_validation_selects_and_survives_a_resume(tmp_path, mock_fashion, monkeypatch):
  seen = {}
  real = input_pipeline.split_validation

  def spy(images, labels, num_val):
    out = real(images, labels, num_val)
    seen.setdefault("val", []).append(_ids(out[2]))
    return out

  monkeypatch.setattr(input_pipeline, "split_validation", spy)
  full = str(tmp_path / "full")
  summary = _run(full, num_epochs=3, seed=1)
  split = str(tmp_path / "split")
  _run(split, num_epochs=1, seed=1)
  resumed = _run(split, num_epochs=3, seed=1)
  # Every invocation held out the same 8 examples, and the resumed run's validation and
  # test numbers equal the uninterrupted run's.
  assert len(seen["val"]) == 3 and all(v == seen["val"][0] for v in seen["val"])
  assert len(seen["val"][0]) == 8
  keys = (
    "epoch",
    "val_accuracy",
    "val_loss",
    "test_accuracy",
    "selected_epoch",
    "selected_test_accuracy",
  )
  rows_full = [{k: r[k] for k in keys} for r in _rows(full, "epochs.csv")]
  assert rows_full == [{k: r[k] for k in keys} for r in _rows(split, "epochs.csv")]
  summary.pop("wall_s"), resumed.pop("wall_s")
  assert summary == resumed
  # Selection uses validation only: the selected epoch is the first with the best
  # validation accuracy, and its test accuracy is reported beside the final one.
  val = [float(r["val_accuracy"]) for r in rows_full]
  best = val.index(max(val))
  assert summary["selected_on"] == "val" and summary["selected_epoch"] == best + 1
  assert summary["selected_test_accuracy"] == pytest.approx(
    float(rows_full[best]["test_accuracy"]), abs=1e-6
  )
  assert summary["final_test_accuracy"] == summary["accuracy"]
  test = [float(r["test_accuracy"]) for r in rows_full]
  assert summary["best_test_accuracy"] == pytest.approx(max(test), abs=1e-6)
  assert rows_full[-1]["selected_epoch"] == str(best + 1)
  # The kept best checkpoint is the validation-selected one, and mode=eval can evaluate it.
  ckpt = checkpoint.Checkpointer(full, read_only=True, best_metric="val_accuracy")
  assert ckpt.best_step() == 4 * (best + 1)
  result = _run(full, num_epochs=3, seed=1, mode="eval", eval_checkpoint="selected")
  assert result["step"] == 4 * (best + 1)
  assert result["accuracy"] == pytest.approx(float(rows_full[best]["test_accuracy"]), abs=1e-6)
  assert _run(full, num_epochs=3, seed=1, mode="eval")["step"] == 12  # 'latest'
  with pytest.raises(
    errors.ConfigError,
    match=r"config.eval_checkpoint must be one of \('latest', 'selected'\), got 'best'",
  ):
    _run(full, mode="eval", eval_checkpoint="best")


def test_summary_protocols():
  history = [
    {"epoch": 1, "val_accuracy": 0.5, "test_accuracy": 0.7},
    {"epoch": 2, "val_accuracy": 0.8, "test_accuracy": 0.6},
    {"epoch": 3, "val_accuracy": 0.8, "test_accuracy": 0.9},
    {"epoch": 4, "val_accuracy": 0.6, "test_accuracy": 0.65},
  ]
  final = {"accuracy": 0.65, "count": 100, "step": 40, "epochs": 4.0}
  s = metrics_lib.summarize(history, final, on="val")
  assert (s["selected_epoch"], s["selected_test_accuracy"], s["selected_val_accuracy"]) == (
    2,
    0.6,
    0.8,
  )  # ties keep the earliest epoch.
  assert (s["best_test_epoch"], s["best_test_accuracy"]) == (3, 0.9)
  assert s["final_test_accuracy"] == 0.65
  text = metrics_lib.format_summary(s, "fashion_mnist")
  assert "60.00%  epoch 2, selected on validation" in text
  assert "90.00%  epoch 3, best on test" in text and "65.00%  final checkpoint" in text
  s = metrics_lib.summarize(
    [{k: h[k] for k in ("epoch", "test_accuracy")} for h in history], final, on="test"
  )
  assert s["selected_on"] == "test" and s["selected_epoch"] == 3
  assert "selected on validation" not in metrics_lib.format_summary(s, "fashion_mnist")


def test_early_stopping_needs_validation_and_stops(tmp_path, mock_fashion):
  with pytest.raises(ValueError, match="early_stop_epochs=1 needs a validation split"):
    _run(str(tmp_path / "a"), val_examples=0, early_stop_epochs=1)
  workdir = str(tmp_path / "b")
  summary = _run(workdir, num_epochs=6, early_stop_epochs=1, **{"optim.learning_rate": 1e-9})
  # With a learning rate of 1e-9 nothing improves after epoch 1: stop after epoch 2.
  assert summary["early_stopped"] and summary["epochs"] == 2
  assert summary["selected_epoch"] == 1
  # Rerunning does not train on.
  again = _run(workdir, num_epochs=6, early_stop_epochs=1, **{"optim.learning_rate": 1e-9})
  assert again["epochs"] == 2 and again["early_stopped"]


def test_workdir_saved_before_the_new_fields_compares_with_their_legacy_values(tmp_path):
  config = helpers.smoke_config(
    **{
      "val_examples": 0,
      "model.init": "torch",
      "model.length_eps": 1e-7,
      "augment.shift_fraction": 0.0,
      "augment.fill": "zero",
      "augment.max_shift": 2,
    }
  )
  saved = json.loads(config.to_json_best_effort())
  for parent, leaf in (
    (saved, "val_examples"),
    (saved["model"], "init"),
    (saved["model"], "length_eps"),
    (saved["augment"], "shift_fraction"),
    (saved["augment"], "fill"),
    (saved["optim"], "min_learning_rate"),
  ):
    del parent[leaf]
  workdir = tmp_path / "old"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(saved))
  os.makedirs(workdir / "checkpoints" / "4")  # it trained: its config binds the workdir.
  workdir_lib.check_config(config, str(workdir))  # how the old run trained: accepted.
  (workdir / "config.json").write_text(json.dumps(saved))
  config.val_examples = 8  # a different training set: refused.
  with pytest.raises(ValueError, match=r"val_examples: 0 \(saved\) vs 8 \(now\)"):
    workdir_lib.check_config(config, str(workdir))


def test_training_sees_no_validation_example_and_the_recipe_shift(
  tmp_path, mock_fashion, monkeypatch
):
  held_out, trained, aug_kwargs = [], [], []
  real_split, real_batches = input_pipeline.split_validation, input_pipeline.train_batches
  real_augment = augment.augment_batch

  def split(images, labels, num_val):
    out = real_split(images, labels, num_val)
    held_out.extend(bytes(x) for x in out[2])
    return out

  def batches(images, labels, **kw):
    for b in real_batches(images, labels, **kw):
      trained.extend(bytes(np.round(x * 255).astype(np.uint8)) for x in b["image"])
      yield b

  def augment_batch(key, images, **kw):
    aug_kwargs.append(kw)
    return real_augment(key, images, **kw)

  monkeypatch.setattr(input_pipeline, "split_validation", split)
  monkeypatch.setattr(input_pipeline, "train_batches", batches)
  monkeypatch.setattr(augment, "augment_batch", augment_batch)
  _run(str(tmp_path / "run"), num_epochs=2, train_examples=0)
  assert len(held_out) == 8 and len(set(held_out)) == 8  # distinct mock images.
  assert len(trained) == 2 * 40 and not set(held_out) & set(trained)
  # The Fashion recipe's Keras-style shift reaches the jitted step.
  assert aug_kwargs and all(
    (k["shift_fraction"], k["fill"], k["flip"], k["max_shift"]) == (0.1, "nearest", True, 0)
    for k in aug_kwargs
  )


def test_invalid_optimizer_config_is_refused_before_the_workdir_is_touched(tmp_path, mock_fashion):
  workdir = tmp_path / "w"
  with pytest.raises(
    ValueError, match=r"optim.learning_rate must be a finite number > 0, got -1.0"
  ):
    _run(str(workdir), **{"optim.learning_rate": -1.0})
  assert not (workdir / "config.json").exists()
  assert _run(str(workdir), num_epochs=1)["step"] == 4  # the workdir is still usable.


def test_train_examples_beyond_the_split_is_an_error(tmp_path, mock_fashion):
  # 48 mock examples, 8 held out for validation: 40 remain.
  with pytest.raises(ValueError, match=r"train_examples=41 exceeds the 40 training examples"):
    _run(str(tmp_path / "w"), train_examples=41)
  summary = _run(str(tmp_path / "ok"), train_examples=40, num_epochs=1)
  assert summary["step"] == 5
  rows = _rows(str(tmp_path / "ok"), "epochs.csv")
  assert rows[0]["train_steps"] == "5"  # epochs.csv says what it averages.
