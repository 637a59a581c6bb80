"""experiments.robustness and its configs: the test sets, the strength scaling, and a
`:smoke` training of CapsNet and the baseline CNN on each experiment (mock MNIST data)."""

import csv
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capsjax import canvas as canvas_lib
from configs import affine_robustness
from configs import overlapping_pairs
from experiments import robustness
from tests import helpers

mock_mnist = helpers.mock_mnist_fixture()


def test_strength_scales_the_affnist_ranges():
  config = affine_robustness.get_config()
  r = robustness.affine_ranges(config, 0.5)
  assert (r.max_rotation_deg, r.max_shear) == (10.0, 0.1)
  assert (r.scale_min, r.scale_max) == pytest.approx((0.9, 1.1))
  assert robustness.affine_ranges(config, 1.0) == canvas_lib.AFFNIST_RANGES
  zero = robustness.affine_ranges(config, 0.0)
  assert (zero.max_rotation_deg, zero.max_shear, zero.scale_min, zero.scale_max) == (0, 0, 1, 1)


def test_test_sets_are_deterministic_and_clean_is_centred():
  config = affine_robustness.get_config("smoke")
  x = jax.random.uniform(jax.random.key(0), (3, 28, 28, 1))
  y = jnp.array([0, 1, 2], jnp.int32)
  sets = {(n, t): make for n, t, make in robustness.test_sets(config)}
  assert list(sets)[:2] == [("clean", None), ("expanded", None)]
  assert [t for n, t in sets if n == "affine"] == [0.0, 0.25, 0.5, 0.75, 1.0]
  clean = np.asarray(sets[("clean", None)](jax.random.key(1), x, y)["image"])
  want = np.zeros((3, 40, 40, 1), np.float32)
  want[:, 6:34, 6:34] = x  # affNIST's untransformed digits: centred, a 6-pixel border
  np.testing.assert_array_equal(clean, want)
  for make in sets.values():
    a, b = make(jax.random.key(2), x, y), make(jax.random.key(2), x, y)
    np.testing.assert_array_equal(a["image"], b["image"])
  # Strength 1 moves pixels that strength 0 (translation alone) does not rotate away.
  s0 = sets[("affine", 0.0)](jax.random.key(3), x, y)["image"]
  s1 = sets[("affine", 1.0)](jax.random.key(3), x, y)["image"]
  assert not np.allclose(s0, s1)


def test_unknown_model_and_variant_are_named():
  config = affine_robustness.get_config("smoke")
  with pytest.raises(ValueError, match="model name must be one of .* got 'resnet'"):
    robustness.build_model(config, "resnet", 10, jax.random.key(0))
  with pytest.raises(ValueError, match="unknown config variant 'tiny'"):
    affine_robustness.get_config("tiny")


def _check_run(workdir, rows, config, hard_sets):
  assert {r["model"] for r in rows} == {"capsnet", "baseline_cnn"}
  for r in rows:
    assert 0.0 <= r["accuracy"] <= 1.0 and r["count"] == config.eval_examples
    hard = (r["set"], r["strength"]) in hard_sets
    assert r["published"] == (config.published[r["model"]] if hard else 0.0)
  with open(os.path.join(workdir, "results.csv")) as f:
    saved = list(csv.DictReader(f))
  assert [float(s["accuracy"]) for s in saved] == pytest.approx([r["accuracy"] for r in rows])


@pytest.mark.slow
def test_affine_smoke_trains_both_models(tmp_path, mock_mnist):
  config = affine_robustness.get_config("smoke")
  config.dataset = "mnist"
  config.data_dir = str(tmp_path / "tfds")
  rows = robustness.run(config, ["capsnet", "baseline_cnn"], str(tmp_path))
  assert len(rows) == 2 * (2 + len(config.affine.strengths))
  _check_run(tmp_path, rows, config, {("affine", 1.0)})
  for name in ("accuracy_vs_strength.png", "examples.png", "results.md"):
    assert os.path.getsize(tmp_path / name) > 0


@pytest.mark.slow
def test_pairs_smoke_trains_both_models(tmp_path, mock_mnist):
  config = overlapping_pairs.get_config("smoke")
  config.dataset = "mnist"
  config.data_dir = str(tmp_path / "tfds")
  rows = robustness.run(config, ["capsnet", "baseline_cnn"], str(tmp_path))
  assert [r["set"] for r in rows] == ["pairs", "pairs"]
  assert all(0.0 < r["mean_overlap"] < 1.0 for r in rows)
  _check_run(tmp_path, rows, config, {("pairs", None)})
  assert os.path.getsize(tmp_path / "reconstructions.png") > 0
