"""The plain CapsNet on Fashion-MNIST with the best recipe we can justify, selected on
validation. Target: >= 94.0% test accuracy, mean of 3 seeds.

Model: the paper's CapsNet unchanged (8,215,568 parameters, 3 iterations of dynamic
routing, masked decoder, margin + 0.392 x per-pixel MSE).

Recipe, and why:
  - CapsNet-Fashion-MNIST's setting as the base (batch 100, Keras' Adam 1e-3, Keras shift 0.1 with
    nearest fill, horizontal flip, glorot_uniform, Keras' epsilon-free capsule length):
    the best published figure for this model (93.62%, selected on test).
  - Gradients through every routing iteration: CapsNet-Keras removed the u_hat
    stop-gradient in 540f15d, its author measuring better accuracy without it.
  - A slower decay over a longer run: x0.97 per epoch for 150 epochs ends at 1e-3 x
    0.97^149 = 1.1e-5. The Fashion seed's x0.95 over 200 epochs is below 1e-5 from
    epoch 90 on, and capsjax's former x0.9 was below 2e-6 by epoch 60: an H200 run
    with it (2026-11-30, 92.45%) stopped improving at epoch 75 of 200.
  - A 4x4 Cutout on top (DeVries & Taylor 2017; Zhong et al.'s Random Erasing, a
    relative, reports gains on Fashion-MNIST); small, so that a garment stays
    recognisable.
  - 5,000 training images held out for validation; the kept checkpoint and the reported
    epoch are selected on them, never on test.

Status: not yet run to completion. This machine has no GPU, and an epoch of the full model
takes ~5 min on its 2 CPU cores; RESULTS.md lists what has been run. To test it on a GPU:

  python -m experiments.sweep --recipes=configs/fashion_best.py --seeds=0,1,2 \
      --workdir=runs/fashion_best
"""

from configs import common


def get_config(arg=None):
  config = common.keras_recipe(common.get_base_config())
  config.dataset = "fashion_mnist"
  config.val_examples = 5000
  config.num_epochs = 150
  config.batch_size = 100
  config.optim.decay_rate = 0.97
  common.keras_shift(config, 0.1)
  config.augment.flip = True
  config.augment.cutout_size = 4
  config.model.stop_gradient = False
  return common.apply_variant(config, arg)
