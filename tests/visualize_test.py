"""capsjax.visualize: every figure from a `:smoke` checkpoint, the routing heatmap's
colour scale, and the command line's one-line user errors (exit code 2)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from capsjax import errors
from capsjax.data import input_pipeline
from capsjax import train
from capsjax import visualize
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """One `:smoke` run (16-D class capsules, as in the paper) on mock MNIST data."""
  root = tmp_path_factory.mktemp("vis")
  workdir = str(root / "run")
  data_dir = str(root / "tfds")
  # MNIST, not Fashion-MNIST: with fashion_mnist the loader finds the real Debian files.
  config = helpers.smoke_config(
    **{"dataset": "mnist", "num_epochs": 1, "data_dir": data_dir, "model.digit_dim": 16}
  )
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
    train.train_and_evaluate(config, workdir)
    yield workdir, data_dir


def test_make_figures_writes_every_png(smoke_run):
  workdir, data_dir = smoke_run
  paths = visualize.make_figures(
    workdir, data_dir=data_dir, num_examples=6, num_routing=2, eval_examples=24
  )
  assert sorted(paths) == sorted(visualize.FIGURES)
  for name in visualize.FIGURES:
    path = os.path.join(workdir, "figures", name)
    assert paths[name] == path
    with Image.open(path) as im:
      assert im.format == "PNG"
      assert min(im.size) > 100, (name, im.size)


def test_make_figures_from_an_explicit_checkpoint_into_out_dir(smoke_run, tmp_path):
  workdir, data_dir = smoke_run
  paths = visualize.make_figures(
    workdir,
    checkpoint=os.path.join(workdir, "checkpoints", "4"),
    out_dir=str(tmp_path / "figs"),
    data_dir=data_dir,
    num_examples=3,
    num_routing=1,
    eval_examples=0,
  )
  assert set(os.listdir(tmp_path / "figs")) == set(visualize.FIGURES)
  assert all(p.startswith(str(tmp_path / "figs")) for p in paths.values())


def test_make_figures_reads_the_data_dir_from_the_runs_config(smoke_run, tmp_path, monkeypatch):
  """Without data_dir, the test split is read from the data_dir the run trained with (its
  config.json); an explicit data_dir still wins."""
  workdir, data_dir = smoke_run
  seen = []
  load_split = input_pipeline.load_split

  def spy(*args, **kwargs):
    seen.append(kwargs.get("data_dir"))
    return load_split(*args, **kwargs)

  monkeypatch.setattr(input_pipeline, "load_split", spy)
  kwargs = dict(out_dir=str(tmp_path / "figs"), num_examples=2, num_routing=1, eval_examples=4)
  paths = visualize.make_figures(workdir, **kwargs)
  assert set(paths) == set(visualize.FIGURES)
  visualize.make_figures(workdir, data_dir=str(tmp_path / "elsewhere"), **kwargs)
  assert seen == [data_dir, str(tmp_path / "elsewhere")]


def test_make_figures_user_errors(smoke_run, tmp_path):
  workdir, data_dir = smoke_run
  with pytest.raises(
    errors.ConfigError,
    match=r"example_index=48 is out of range: the mnist test split has 48 "
    r"examples",
  ):
    visualize.make_figures(
      workdir, data_dir=data_dir, out_dir=str(tmp_path), example_index=48, eval_examples=0
    )
  with pytest.raises(errors.ConfigError, match="num_routing must be >= 1, got 0"):
    visualize.make_figures(workdir, num_routing=0)
  with pytest.raises(
    errors.CheckpointNotFoundError, match=f"workdir {tmp_path / 'missing'} does not exist"
  ):
    visualize.make_figures(str(tmp_path / "missing"))
  with pytest.raises(errors.CheckpointNotFoundError, match="no checkpoints under"):
    visualize.make_figures(str(tmp_path))


def _routing_figure(c, preds, grid_hwt=(1, 1, 1)):
  b, _, n_out = c.shape
  return visualize.routing_figure(
    np.zeros((b, 4, 4, 1), np.float32),
    c,
    np.zeros(b, int),
    preds,
    [str(k) for k in range(n_out)],
    grid_hwt,
  )


def test_routing_heatmap_diverges_around_uniform():
  from matplotlib import colors
  from matplotlib import pyplot as plt

  rng = np.random.default_rng(0)
  n_in, n_out = 12, 5  # uniform = 1/5 = 0.2
  c = 0.2 + rng.uniform(-1e-3, 1e-3, (2, n_in, n_out))  # near-uniform, as trained
  c[1, 3] = [0.2 + 4e-3, 0.2 - 1e-3, 0.2 - 1e-3, 0.2 - 1e-3, 0.2 - 1e-3]  # largest deviation
  fig, axes = _routing_figure(c, np.array([0, 1]), grid_hwt=(2, 2, 3))
  assert axes.shape == (2, 4)
  for row in range(2):
    (im,) = axes[row, 1].images
    assert isinstance(im.norm, colors.TwoSlopeNorm)
    assert im.get_cmap().name == "RdBu_r"
    np.testing.assert_allclose(im.norm.vcenter, 0.2, rtol=1e-12)
    # Symmetric about the centre, spanning the largest deviation of any row.
    np.testing.assert_allclose([im.norm.vmin, im.norm.vmax], [0.2 - 4e-3, 0.2 + 4e-3], rtol=1e-9)
    np.testing.assert_allclose(im.norm(0.2), 0.5)  # uniform is the middle colour
    assert "uniform 1/5" in im.colorbar.ax.get_ylabel()
  # The spatial maps (mean over types of the predicted class's column) share their own
  # centred norm, spanning their own largest deviation.
  maps = [c[i][:, p].reshape(2, 2, 3).mean(-1) for i, p in enumerate([0, 1])]
  dev = max(np.abs(m - 0.2).max() for m in maps)
  for row in range(2):
    norm = axes[row, 3].images[0].norm
    np.testing.assert_allclose(
      [norm.vmin, norm.vcenter, norm.vmax], [0.2 - dev, 0.2, 0.2 + dev], rtol=1e-9
    )
  plt.close(fig)


def test_routing_heatmap_of_uniform_and_of_peaked_couplings():
  from matplotlib import pyplot as plt

  # One routing iteration: exactly uniform. A valid (tiny) range, every cell the centre.
  c = np.full((1, 6, 10), 0.1, np.float32)
  fig, axes = _routing_figure(c, np.array([0]))
  im = axes[0, 1].images[0]
  assert im.norm.vmin < im.norm.vcenter == 0.1 < im.norm.vmax
  np.testing.assert_allclose(im.norm(c[0]), 0.5, atol=1e-3)
  plt.close(fig)
  # Routed all-to-one: the range below is cut at 0, where couplings end.
  c = np.zeros((1, 6, 10), np.float32)
  c[0, :, 2] = 1.0
  fig, axes = _routing_figure(c, np.array([2]))
  im = axes[0, 1].images[0]
  np.testing.assert_allclose(
    [im.norm.vmin, im.norm.vcenter, im.norm.vmax], [0.0, 0.1, 1.0], rtol=1e-6
  )
  plt.close(fig)


def _cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "capsjax.visualize", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "PYTHONPATH": REPO},
  )


@pytest.mark.parametrize(
  "what,expected",
  [
    ("missing", "does not exist: expected the workdir of a training run"),
    ("empty", "no checkpoints under"),
  ],
)
def test_cli_user_error_is_one_line_and_exit_code_2(tmp_path, what, expected):
  workdir = tmp_path / what
  if what == "empty":
    workdir.mkdir()
  r = _cli(f"--workdir={workdir}")
  assert r.returncode == 2, r.stderr
  assert "Traceback" not in r.stderr, r.stderr
  lines = r.stderr.strip().splitlines()
  assert [ln for ln in lines if ln.startswith("capsjax")] == [lines[-1]], r.stderr
  assert lines[-1].startswith("capsjax: error: ") and expected in lines[-1], r.stderr
  assert str(workdir) in lines[-1]


def test_cli_unexpected_argument(capsys):
  with pytest.raises(SystemExit) as e:
    visualize.main(["visualize", "stray"])
  assert e.value.code == 2
  # Not a terminal: the error starts on a fresh line (after a newline), a line of its own.
  assert capsys.readouterr().err == (
    "\ncapsjax: error: unexpected arguments: ['stray']; capsjax.visualize takes only flags, "
    "e.g. --workdir=RUN\n"
  )
