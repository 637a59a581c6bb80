"""Every config and variant loads, is complete, and has the values it documents."""

import importlib

import pytest

from capsjax import input_pipeline
from capsjax import optim
from configs import common

CONFIGS = ("fashion", "kmnist", "mnist", "cifar10")


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


def test_dataset_specific_augmentation():
  from configs import fashion, kmnist, mnist  # pylint: disable=g-import-not-at-top
  assert fashion.get_config().augment.flip
  # Characters and digits are never flipped.
  assert not kmnist.get_config().augment.flip
  assert not mnist.get_config().augment.flip
  assert kmnist.get_config().augment.cutout_size > 0


def test_seed_settings():
  from configs import fashion, kmnist  # pylint: disable=g-import-not-at-top
  f, k = fashion.get_config(), kmnist.get_config()
  assert (f.num_epochs, f.batch_size, f.optim.decay_rate) == (200, 128, 0.9)
  assert (k.num_epochs, k.batch_size, k.optim.decay_rate) == (50, 100, 0.9)


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


def test_schedule_decays_per_epoch_and_per_steps():
  cfg = common.get_base_config().optim
  sched = optim.make_schedule(cfg, steps_per_epoch=100)
  assert float(sched(0)) == pytest.approx(1e-3)
  assert float(sched(99)) == pytest.approx(1e-3)           # staircase
  assert float(sched(100)) == pytest.approx(0.9e-3)
  assert float(sched(250)) == pytest.approx(0.81e-3)
  cfg.decay_steps, cfg.decay_rate = 2000, 0.96               # the authors' schedule.
  sched = optim.make_schedule(cfg, steps_per_epoch=100)
  assert float(sched(4000)) == pytest.approx(1e-3 * 0.96 ** 2)
  cfg.decay_rate = 1.5
  with pytest.raises(ValueError, match=r"optim.decay_rate must be in \(0, 1\], got 1.5"):
    optim.make_schedule(cfg, 100)
