"""capsjax.analysis on a `:smoke` checkpoint: load_run (weights only), predict, the
perturbation grid's shape and exact zero column, couplings, entropy, the confusion matrix,
and the errors of a bad path or step."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from capsjax import analysis
from capsjax.run import checkpoint as ckpt_lib
from capsjax import errors
from capsjax.data import input_pipeline
from capsjax import steps as steps_lib
from capsjax import train
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir):
  # MNIST, not Fashion-MNIST: with fashion_mnist the loader finds the real Debian files.
  return helpers.smoke_config(
    **{"dataset": "mnist", "num_epochs": 1, "data_dir": data_dir, "model.digit_dim": 16}
  )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """One `:smoke` run (16-D class capsules, as in the paper) on mock MNIST data."""
  root = tmp_path_factory.mktemp("analysis")
  workdir, data_dir = str(root / "run"), str(root / "tfds")
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
    train.train_and_evaluate(_config(data_dir), workdir)
    yield workdir, data_dir


@pytest.fixture(scope="module")
def loaded(smoke_run):
  workdir, data_dir = smoke_run
  run = analysis.load_run(workdir)
  images, labels = analysis.load_test_images("mnist", 6, data_dir=data_dir)
  return run, images, labels


def test_load_run_rebuilds_the_model_from_checkpoint_meta(loaded):
  run, images, _ = loaded
  assert run.step == 4
  assert run.info.name == "mnist"
  assert run.model.digit_caps.routing_iterations == 2
  assert run.model.digit_caps.w.shape[-1] == 16
  assert images.shape == (6, 28, 28, 1) and images.dtype == np.float32


def test_load_run_weights_are_the_saved_ones_without_the_runs_optimizer(smoke_run, tmp_path):
  """The weights equal the model entry of a whole-state restore, also with config.json (the
  only record of the optimizer config) gone: no optimizer is rebuilt."""
  workdir, data_dir = smoke_run
  config = _config(data_dir)
  graphdef, state = steps_lib.create_model_and_optimizer(
    config, input_pipeline.dataset_info("mnist"), 4, jax.random.key(1)
  )
  full, _ = ckpt_lib.Checkpointer(workdir, read_only=True).restore(4, state)
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  os.remove(os.path.join(copy, "config.json"))
  run = analysis.load_run(copy)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(run.model), full[0])
  # Trained for 4 steps, so not the weights a fresh model of this config starts from.
  model, _ = nnx.merge(graphdef, state)
  assert not np.array_equal(run.model.digit_caps.w[...], model.digit_caps.w[...])


def test_perturbation_grid_shape_and_exact_zero_column(loaded):
  run, images, _ = loaded
  out = analysis.predict(run.model, images, batch_size=4)  # 2 batches, last one padded
  assert out["v"].shape == (6, 10, 16)
  assert out["reconstruction"].shape == (6, 28, 28, 1)
  np.testing.assert_array_equal(
    analysis.PERTURBATIONS,
    np.float32([-0.25, -0.2, -0.15, -0.1, -0.05, 0, 0.05, 0.1, 0.15, 0.2, 0.25]),
  )
  for i in range(2):
    cls = int(out["pred"][i])
    grid = analysis.perturbation_grid(run.model, out["v"][i], cls)
    assert grid.shape == (16, 11, 28, 28, 1)  # 16 dims x 11 offsets
    plain = np.asarray(run.model.decoder(out["v"][i : i + 1], np.int32([cls])))[0]
    for d in range(16):
      np.testing.assert_array_equal(grid[d, 5], plain)  # offset 0 == plain reconstruction
    # The batched reconstruction agrees to float precision as well.
    np.testing.assert_allclose(grid[0, 5], out["reconstruction"][i], atol=1e-5)
    # Non-zero offsets change the image, and the two ends differ from each other.
    assert np.abs(grid[:, 0] - grid[:, 10]).max() > 0


def test_perturbation_grid_and_predict_validate(loaded):
  run, images, _ = loaded
  v = analysis.predict(run.model, images[:1])["v"]
  with pytest.raises(ValueError, match=r"v must have shape \[N_out, D_out\]"):
    analysis.perturbation_grid(run.model, v, 0)
  with pytest.raises(ValueError, match=r"cls must be in \[0, 10\), got 10"):
    analysis.perturbation_grid(run.model, v[0], 10)
  # The model's own check (CapsNet.check_images), before anything is traced.
  with pytest.raises(
    ValueError,
    match=r"images must have shape \[B, 28, 28, 1\] for this "
    r"model, got \(2, 32, 32, 3\)",
  ):
    analysis.predict(run.model, np.zeros((2, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match=r"images must have shape \[B, 28, 28, 1\]"):
    analysis.couplings(run.model, np.zeros((28, 28, 1), np.float32))


def test_couplings_sum_to_one_and_match_the_primary_grid(loaded):
  run, images, _ = loaded
  c = analysis.couplings(run.model, images[:3])
  # smoke: 28 -> conv 9 -> 20 -> primary 9 stride 2 -> 6x6 grid, 4 types.
  assert analysis.primary_grid(run.model_cfg, (28, 28, 1)) == (6, 6, 4)
  assert c.shape == (3, 6 * 6 * 4, 10)
  np.testing.assert_allclose(c.sum(-1), 1.0, rtol=1e-5)


def test_coupling_entropy():
  uniform = np.full((2, 5, 10), 0.1)
  np.testing.assert_allclose(analysis.coupling_entropy(uniform), np.log(10), rtol=1e-12)
  one_hot = np.eye(4)[None]  # [1, 4, 4]
  np.testing.assert_array_equal(analysis.coupling_entropy(one_hot), 0.0)
  np.testing.assert_allclose(analysis.coupling_entropy([[0.5, 0.5, 0.0]]), [np.log(2)])


def test_confusion_matrix():
  cm = analysis.confusion_matrix([0, 1, 1, 2], [0, 1, 2, 2], 3)
  np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 1], [0, 0, 1]])
  with pytest.raises(ValueError, match="same shape"):
    analysis.confusion_matrix([0, 1], [0], 3)


def test_load_run_errors(tmp_path, smoke_run):
  with pytest.raises(errors.CheckpointNotFoundError, match="does not exist"):
    analysis.load_run(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(errors.CheckpointNotFoundError, match="no checkpoints under"):
    analysis.load_run(str(tmp_path / "empty"))
  with pytest.raises(
    errors.CheckpointNotFoundError, match=r"holds no checkpoint of step 3; its steps are \[4\]"
  ):
    analysis.load_run(smoke_run[0], step=3)
  # A checkpoint without model metadata and no config.json beside it.
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "bare"))
  ckpt.save(1, {"w": np.arange(3.0)}, {})
  ckpt.close()
  with pytest.raises(errors.CheckpointReadError, match="has no 'model'/'dataset' metadata"):
    analysis.load_run(str(tmp_path / "bare"))
  assert input_pipeline.dataset_info("fashion_mnist").class_names[9] == "Ankle boot"


def test_analysis_does_not_import_matplotlib():
  r = subprocess.run(
    [
      sys.executable,
      "-c",
      "import sys; import capsjax.analysis; "
      "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "PYTHONPATH": REPO},
  )
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == "[]"
