"""CIFAR-10 CapsNet (32x32x3), which neither the Fashion nor the K-MNIST seed project
covers. The model sizes follow from the image shape (PrimaryCaps 8x8x32 = 2048 capsules,
decoder output 3072).

  python -m capsjax.main --config=configs/cifar10.py --workdir=/tmp/caps_cifar10
"""

from configs import common


def get_config(arg=None):
  config = common.get_base_config()
  config.dataset = "cifar10"
  config.augment.max_shift = 2
  config.augment.flip = True
  return common.apply_variant(config, arg)
