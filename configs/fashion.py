"""Fashion-MNIST CapsNet (the Keras CapsNet seed: shift 2 px + horizontal flip).

  python -m capsjax.main --config=configs/fashion.py --workdir=/tmp/caps_fmnist
  python -m capsjax.main --config=configs/fashion.py:quick --workdir=/tmp/caps_quick
  python -m capsjax.main --config=configs/fashion.py:smoke --workdir=/tmp/caps_smoke
"""

from configs import common


def get_config(arg=None):
  config = common.get_base_config()
  config.dataset = "fashion_mnist"
  config.num_epochs = 200          # the Keras seed: 200 epochs, batch 128, x0.9 lr per epoch.
  config.batch_size = 128
  config.augment.max_shift = 2
  config.augment.flip = True
  return common.apply_variant(config, arg)
