"""Every config and variant loads, is complete, and has the values it documents."""

import importlib

import pytest

import numpy as np

from capsjax.data import input_pipeline
from capsjax import optim
from capsjax.run import config as run_config
from configs import common

CONFIGS = ("fashion", "capsnet_fashion_mnist", "fashion_best", "kmnist", "mnist", "cifar10")


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("variant", [None, "quick", "smoke"])
def test_config_loads(name, variant):
  config = importlib.import_module(f"configs.{name}").get_config(variant)
  base = common.get_base_config()
  # Same fields as the base config: every field is declared in common.py.
  assert set(config.to_dict()) == set(base.to_dict())
  assert config.dataset in input_pipeline.DATASETS
  assert config.model.routing_iterations >= 1
  if variant == "smoke":
    assert config.batch_size % 4 == 0  # divides the 4 forced test devices.
  run_config.validate_config(config)


def test_dataset_specific_augmentation():
  from configs import fashion, kmnist, mnist  # pylint: disable=g-import-not-at-top

  assert fashion.get_config().augment.flip
  # Characters and digits are never flipped.
  for config in (kmnist.get_config(), kmnist.get_config("augment"), mnist.get_config()):
    assert not config.augment.flip
  assert kmnist.get_config().augment.cutout_size == 0  # the seed's base run
  assert kmnist.get_config("augment").augment.cutout_size == 6  # its shift + Cutout run
  assert kmnist.get_config("augment,smoke").model.conv1_channels == 16
  with pytest.raises(ValueError, match="cannot be combined"):
    kmnist.get_config("quick,smoke")


def _recipe(config):
  a, o = config.augment, config.optim
  return (
    config.num_epochs,
    config.batch_size,
    o.learning_rate,
    o.decay_rate,
    o.decay_steps,
    o.staircase,
    o.min_learning_rate,
    config.model.init,
    config.model.stop_gradient,
    a.max_shift,
    a.shift_fraction,
    a.fill,
    a.flip,
    a.cutout_size,
    config.val_examples,
    config.published.test_accuracy,
  )


def test_reference_recipes():
  # The values each reference's own code uses (REFERENCES.md cites file and line).
  from configs import capsnet_fashion_mnist, fashion, kmnist, mnist  # pylint: disable=g-import-not-at-top

  assert _recipe(fashion.get_config()) == (
    200,
    128,
    1e-3,
    0.95,
    0,
    True,
    0.0,
    "keras",
    False,
    0,
    0.1,
    "nearest",
    True,
    0,
    0,
    0.9291,
  )
  assert _recipe(capsnet_fashion_mnist.get_config()) == (
    100,
    100,
    1e-3,
    0.95,
    0,
    True,
    0.0,
    "keras",
    True,
    0,
    0.1,
    "nearest",
    True,
    0,
    0,
    0.9362,
  )
  assert _recipe(kmnist.get_config()) == (
    50,
    100,
    1e-3,
    0.9,
    0,
    True,
    0.0,
    "keras",
    False,
    0,
    0.0,
    "zero",
    False,
    0,
    0,
    0.9534,
  )
  assert _recipe(kmnist.get_config("augment")) == (
    100,
    100,
    1e-3,
    0.9,
    0,
    True,
    0.0,
    "keras",
    False,
    0,
    0.1,
    "nearest",
    False,
    6,
    0,
    0.9749,
  )
  assert _recipe(mnist.get_config()) == (
    640,
    128,
    1e-3,
    0.96,
    2000,
    False,
    1e-6,
    "tf",
    False,
    2,
    0.0,
    "zero",
    False,
    0,
    0,
    0.9975,
  )
  # CapsNet-Keras' Length layer has no epsilon; the K-MNIST seed's TF2 port adds 1e-7.
  assert fashion.get_config().model.length_eps < 1e-20
  assert capsnet_fashion_mnist.get_config().model.length_eps < 1e-20
  assert kmnist.get_config().model.length_eps == 1e-7
  # Everything that is not a reference recipe selects on a validation split.
  assert common.get_base_config().val_examples > 0


def test_paper_defaults():
  config = common.get_base_config()
  assert config.model.routing_iterations == 3
  assert (config.loss.m_plus, config.loss.m_minus, config.loss.lam) == (0.9, 0.1, 0.5)
  # 0.392 x per-pixel mean over 784 pixels == the paper's 0.0005 x sum.
  assert abs(config.loss.recon_weight / 784 - 0.0005) < 1e-12
  assert config.optim.learning_rate == 1e-3


def test_unknown_variant_and_typed_placeholders():
  with pytest.raises(ValueError, match="unknown config variant 'tiny'"):
    common.apply_variant(common.get_base_config(), "tiny")
  config = common.get_base_config()
  config.data_dir = "/data"
  with pytest.raises(TypeError):
    config.data_dir = 3


def test_schedule_values_against_hand_computed_lists():
  cfg = common.get_base_config().optim
  # Keras LearningRateScheduler(lambda epoch: 1e-3 * 0.95 ** epoch) at 600 steps/epoch:
  # constant within an epoch, epoch e (from 0) at 1e-3 * 0.95^e.
  cfg.decay_rate = 0.95
  sched = optim.make_schedule(cfg, steps_per_epoch=600)
  steps = [0, 1, 599, 600, 1199, 1200, 6000, 59_999]
  expected = [1e-3, 1e-3, 1e-3, 9.5e-4, 9.5e-4, 9.025e-4, 5.9873694e-4, 6.2321360e-06]
  np.testing.assert_allclose([float(sched(s)) for s in steps], expected, rtol=1e-5)
  # The authors' code: 1e-3 * 0.96^(step / 2000), continuous, floored at 1e-6.
  cfg.decay_rate, cfg.decay_steps, cfg.staircase, cfg.min_learning_rate = 0.96, 2000, False, 1e-6
  sched = optim.make_schedule(cfg, steps_per_epoch=468)
  steps = [0, 1000, 2000, 3000, 200_000, 340_000, 400_000]
  expected = [1e-3, 9.797959e-4, 9.6e-4, 9.406041e-4, 1.6870319e-05, 1.0e-6, 1.0e-6]
  np.testing.assert_allclose([float(sched(s)) for s in steps], expected, rtol=1e-5)
  # A constant rate with a floor stays at the rate (optax reads end_value as a ceiling
  # when decay_rate >= 1).
  cfg.decay_rate = 1.0
  sched = optim.make_schedule(cfg, steps_per_epoch=468)
  np.testing.assert_allclose([float(sched(s)) for s in (0, 5000, 400_000)], 1e-3, rtol=1e-6)
  cfg.min_learning_rate = 2e-3
  with pytest.raises(ValueError, match=r"optim.min_learning_rate must be in \[0, learning"):
    optim.make_schedule(cfg, 100)


def test_schedule_decays_per_epoch_and_per_steps():
  cfg = common.get_base_config().optim
  sched = optim.make_schedule(cfg, steps_per_epoch=100)
  assert float(sched(0)) == pytest.approx(1e-3)
  assert float(sched(99)) == pytest.approx(1e-3)  # staircase
  assert float(sched(100)) == pytest.approx(0.9e-3)
  assert float(sched(250)) == pytest.approx(0.81e-3)
  cfg.decay_steps, cfg.decay_rate = 2000, 0.96  # the authors' schedule.
  sched = optim.make_schedule(cfg, steps_per_epoch=100)
  assert float(sched(4000)) == pytest.approx(1e-3 * 0.96**2)
  cfg.decay_rate = 1.5
  with pytest.raises(ValueError, match=r"optim.decay_rate must be in \(0, 1\], got 1.5"):
    optim.make_schedule(cfg, 100)
