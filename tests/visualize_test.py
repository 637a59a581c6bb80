"""capsjax.visualize: every figure from a `:smoke` checkpoint, the perturbation grid's
shape and its exact zero column, couplings, entropy and the confusion matrix."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from capsjax import input_pipeline
from capsjax import train
from capsjax import visualize
from tests import helpers


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """One `:smoke` run (16-D class capsules, as in the paper) on mock MNIST data."""
  root = tmp_path_factory.mktemp("vis")
  workdir = str(root / "run")
  data_dir = str(root / "tfds")
  # MNIST, not Fashion-MNIST: with fashion_mnist the loader finds the real Debian files.
  config = helpers.smoke_config(**{"dataset": "mnist", "num_epochs": 1, "data_dir": data_dir,
                                   "model.digit_dim": 16})
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
    train.train_and_evaluate(config, workdir)
    yield workdir, data_dir


@pytest.fixture(scope="module")
def loaded(smoke_run):
  workdir, data_dir = smoke_run
  run = visualize.load_run(workdir)
  images, labels = visualize.load_test_images("mnist", 6, data_dir=data_dir)
  return run, images, labels


def test_load_run_rebuilds_the_model_from_checkpoint_meta(loaded):
  run, images, _ = loaded
  assert run.step == 4
  assert run.info.name == "mnist"
  assert run.model.digit_caps.routing_iterations == 2
  assert run.model.digit_caps.w.shape[-1] == 16
  assert images.shape == (6, 28, 28, 1) and images.dtype == np.float32


def test_make_figures_writes_every_png(smoke_run):
  workdir, data_dir = smoke_run
  paths = visualize.make_figures(workdir, data_dir=data_dir, num_examples=6, num_routing=2,
                                 eval_examples=24)
  assert sorted(paths) == sorted(visualize.FIGURES)
  for name in visualize.FIGURES:
    path = os.path.join(workdir, "figures", name)
    assert paths[name] == path
    with Image.open(path) as im:
      assert im.format == "PNG"
      assert min(im.size) > 100, (name, im.size)


def test_make_figures_from_an_explicit_checkpoint_into_out_dir(smoke_run, tmp_path):
  workdir, data_dir = smoke_run
  paths = visualize.make_figures(workdir, checkpoint=os.path.join(workdir, "checkpoints", "4"),
                                 out_dir=str(tmp_path / "figs"), data_dir=data_dir,
                                 num_examples=3, num_routing=1, eval_examples=0)
  assert set(os.listdir(tmp_path / "figs")) == set(visualize.FIGURES)
  assert all(p.startswith(str(tmp_path / "figs")) for p in paths.values())


def test_make_figures_reads_the_data_dir_from_the_runs_config(smoke_run, tmp_path,
                                                              monkeypatch):
  """Without data_dir, the test split is read from the data_dir the run trained with (its
  config.json); an explicit data_dir still wins."""
  workdir, data_dir = smoke_run
  seen = []
  load_split = input_pipeline.load_split

  def spy(*args, **kwargs):
    seen.append(kwargs.get("data_dir"))
    return load_split(*args, **kwargs)

  monkeypatch.setattr(input_pipeline, "load_split", spy)
  kwargs = dict(out_dir=str(tmp_path / "figs"), num_examples=2, num_routing=1,
                eval_examples=4)
  paths = visualize.make_figures(workdir, **kwargs)
  assert set(paths) == set(visualize.FIGURES)
  visualize.make_figures(workdir, data_dir=str(tmp_path / "elsewhere"), **kwargs)
  assert seen == [data_dir, str(tmp_path / "elsewhere")]


def test_perturbation_grid_shape_and_exact_zero_column(loaded):
  run, images, _ = loaded
  out = visualize.predict(run.model, images, batch_size=4)   # 2 batches, last one padded
  assert out["v"].shape == (6, 10, 16)
  assert out["reconstruction"].shape == (6, 28, 28, 1)
  np.testing.assert_array_equal(visualize.PERTURBATIONS,
                                np.float32([-.25, -.2, -.15, -.1, -.05, 0, .05, .1, .15, .2, .25]))
  for i in range(2):
    cls = int(out["pred"][i])
    grid = visualize.perturbation_grid(run.model, out["v"][i], cls)
    assert grid.shape == (16, 11, 28, 28, 1)   # 16 dims x 11 offsets
    plain = np.asarray(run.model.decoder(out["v"][i:i + 1], np.int32([cls])))[0]
    for d in range(16):
      np.testing.assert_array_equal(grid[d, 5], plain)   # offset 0 == plain reconstruction
    # The batched reconstruction agrees to float precision as well.
    np.testing.assert_allclose(grid[0, 5], out["reconstruction"][i], atol=1e-5)
    # Non-zero offsets change the image, and the two ends differ from each other.
    assert np.abs(grid[:, 0] - grid[:, 10]).max() > 0


def test_perturbation_grid_validates(loaded):
  run, images, _ = loaded
  v = visualize.predict(run.model, images[:1])["v"]
  with pytest.raises(ValueError, match=r"v must have shape \[N_out, D_out\]"):
    visualize.perturbation_grid(run.model, v, 0)
  with pytest.raises(ValueError, match=r"cls must be in \[0, 10\), got 10"):
    visualize.perturbation_grid(run.model, v[0], 10)
  with pytest.raises(ValueError, match=r"images must have shape \[B, 28, 28, 1\]"):
    visualize.predict(run.model, np.zeros((2, 32, 32, 3), np.float32))


def test_couplings_sum_to_one_and_match_the_primary_grid(loaded):
  run, images, _ = loaded
  c = visualize.couplings(run.model, images[:3])
  # smoke: 28 -> conv 9 -> 20 -> primary 9 stride 2 -> 6x6 grid, 4 types.
  assert visualize.primary_grid(run.model_cfg, (28, 28, 1)) == (6, 6, 4)
  assert c.shape == (3, 6 * 6 * 4, 10)
  np.testing.assert_allclose(c.sum(-1), 1.0, rtol=1e-5)


def test_coupling_entropy():
  uniform = np.full((2, 5, 10), 0.1)
  np.testing.assert_allclose(visualize.coupling_entropy(uniform), np.log(10), rtol=1e-12)
  one_hot = np.eye(4)[None]                                   # [1, 4, 4]
  np.testing.assert_array_equal(visualize.coupling_entropy(one_hot), 0.0)
  np.testing.assert_allclose(visualize.coupling_entropy([[0.5, 0.5, 0.0]]), [np.log(2)])


def test_confusion_matrix():
  cm = visualize.confusion_matrix([0, 1, 1, 2], [0, 1, 2, 2], 3)
  np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 1], [0, 0, 1]])
  with pytest.raises(ValueError, match="same shape"):
    visualize.confusion_matrix([0, 1], [0], 3)


def test_load_run_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    visualize.load_run(str(tmp_path / "missing"))
  assert input_pipeline.dataset_info("fashion_mnist").class_names[9] == "Ankle boot"
