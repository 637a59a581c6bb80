"""Kuzushiji-MNIST CapsNet (the TF2 seed: shift + Cutout; never flipped).

  python -m capsjax.main --config=configs/kmnist.py --workdir=/tmp/caps_kmnist

The K-MNIST train split needs internet (TFDS) or your own copy of
kmnist-train-{imgs,labels}.npz (--config.manual_dir=DIR).
"""

from configs import common


def get_config(arg=None):
  config = common.get_base_config()
  config.dataset = "kmnist"
  config.num_epochs = 50           # the TF2 seed: 50 epochs, batch 100, x0.9 lr per epoch.
  config.batch_size = 100
  config.augment.max_shift = 2
  config.augment.flip = False
  config.augment.cutout_size = 8
  return common.apply_variant(config, arg)
