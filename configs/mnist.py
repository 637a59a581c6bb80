"""MNIST CapsNet as in the paper (shift up to 2 px, no flip; 0.25% error reported).

  python -m capsjax.main --config=configs/mnist.py --workdir=/tmp/caps_mnist
"""

from configs import common


def get_config(arg=None):
  config = common.get_base_config()
  config.dataset = "mnist"
  config.augment.max_shift = 2
  return common.apply_variant(config, arg)
