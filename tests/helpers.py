"""Shared test fixtures: tiny configs, a finished tiny run, synthetic batches (no real data)."""

import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from capsjax.run import config as run_config

from configs import fashion


def smoke_config(**overrides):
  """The `:smoke` Fashion-MNIST config, with dotted-key overrides."""
  config = fashion.get_config("smoke")
  for key, value in overrides.items():
    run_config.set_field(config, key, value)
  return config


def synthetic_batch(n: int, *, seed: int = 0, shape=(28, 28, 1), num_classes: int = 10):
  """A learnable batch: class k has a bright bar at rows 2k..2k+5 over faint noise."""
  rng = np.random.default_rng(seed)
  labels = (np.arange(n) % num_classes).astype(np.int32)
  rng.shuffle(labels)
  images = rng.uniform(0, 0.2, (n, *shape)).astype(np.float32)
  for i, k in enumerate(labels):
    images[i, 2 * k % (shape[0] - 6) : 2 * k % (shape[0] - 6) + 6, 4 : shape[1] - 4, :] = 1.0
  return {"image": images, "label": labels}


def mnist_smoke_config(**overrides):
  """`:smoke` on TFDS mock MNIST: 32 training examples, 4 steps per epoch."""
  return smoke_config(**{"dataset": "mnist", "train_examples": 32, **overrides})


def mock_mnist_fixture():
  """A module-scoped fixture under which TFDS serves 48 mock examples per split."""

  @pytest.fixture(scope="module")
  def mock():
    with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
      yield

  return mock


def finished_run_fixture():
  """A module-scoped fixture: the workdir of a finished 2-epoch run (checkpoints 4, 8).

  Needs the `mock` fixture of `mock_mnist_fixture` in the same module.
  """

  @pytest.fixture(scope="module")
  def src(tmp_path_factory, mock):
    from capsjax import train  # pylint: disable=g-import-not-at-top

    del mock
    workdir = str(tmp_path_factory.mktemp("src") / "run")
    train.train_and_evaluate(mnist_smoke_config(), workdir)
    return workdir

  return src


def copy_run(src: str, tmp_path) -> str:
  """A copy of the run in `src` at tmp_path/run, to change without touching `src`."""
  dst = str(tmp_path / "run")
  shutil.copytree(src, dst)
  return dst


def numpy_conv(x, w, stride):
  """Float64 NumPy VALID conv: [B, H, W, C_in] x [kh, kw, C_in, C_out] -> [B, Ho, Wo, C_out]."""
  xn, wn = np.asarray(x, np.float64), np.asarray(w, np.float64)
  kh, kw = wn.shape[:2]
  ho, wo = (xn.shape[1] - kh) // stride + 1, (xn.shape[2] - kw) // stride + 1
  out = np.zeros((xn.shape[0], ho, wo, wn.shape[3]))
  for i in range(kh):
    for j in range(kw):
      tap = xn[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
      out += tap @ wn[i, j]
  return out
