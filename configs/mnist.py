"""MNIST as in the paper, with the authors' code's training recipe.

Paper (Sabour, Frosst & Hinton 2017): 28x28 images "shifted by up to 2 pixels in each
direction with zero padding", 3 routing iterations with the reconstruction loss (0.0005 x
the sum of squares, = 0.392 x the per-pixel mean): **99.75%** (0.25% error).

The authors' code (Sarasra/models, research/capsules at 984fbc7; REFERENCES.md section C):
batch 128 (experiment.py L320), Adam 1e-3 decayed x0.96 every 2000 steps continuously
(models/model.py L63-70, no staircase) with a 1e-6 floor (L68), truncated-normal weights
and biases of 0.1 including a bias on the routed capsules (`init='tf'`), gradients
through every routing iteration, and the README's 300,000 steps (640 epochs at 468 steps
per epoch). Its shifts are precomputed (all 25 shifts in [-2, 2]^2, zero fill); capsjax
draws one of them per image and step, the same distribution. Its primary capsules are
conv / 32 + bias (a one-iteration routing over 32 zero logits, capsule_model.py L54-65
with layers.py L110-113: `model.primary_scale = 1/32`), and its margin loss is halved and
averaged over the classes (layers.py L357-362, L396: the paper's sum / 20,
`loss.class_weight = 0.05`) beside 0.0005 x the sum of squared errors (0.392 x the
per-pixel mean). Without the /32 the primary capsules start saturated under this init:
`python -m experiments.init_statistics` measures it on Fashion-MNIST images.

Its Adam is TensorFlow 1's `tf.train.AdamOptimizer` (models/model.py L70, epsilon 1e-8),
whose ApplyAdam kernel adds epsilon to the uncorrected sqrt(v) as Keras does
(`optim.adam_epsilon_convention = 'keras'`, capsjax.optim).

Departures: its squash has no epsilon (capsjax's adds 1e-7 inside the square root); its shifts
are drawn per epoch from a 25-copy file through a 5,000-image shuffle buffer, capsjax's
per step. Protocol: the paper's figure is the mean of 3 trials' test error; the config
trains on all 60,000 images (`val_examples = 0`), as the authors' code does, and reports
the final epoch.

  python -m capsjax.main --config=configs/mnist.py --workdir=/tmp/caps_mnist
"""

from configs import common


def get_config(arg=None):
  config = common.get_base_config()
  config.dataset = "mnist"
  config.num_epochs = 640
  config.batch_size = 128
  config.model.init = "tf"
  config.model.primary_scale = 1 / 32
  config.loss.class_weight = 0.05
  config.optim.adam_epsilon = 1e-8
  config.optim.adam_epsilon_convention = "keras"
  config.optim.decay_rate = 0.96
  config.optim.decay_steps = 2000
  config.optim.staircase = False
  config.optim.min_learning_rate = 1e-6
  config.augment.max_shift = 2
  config.augment.fill = "zero"
  config.val_examples = 0
  config.published.source = "Sabour, Frosst & Hinton 2017 (paper)"
  config.published.test_accuracy = 0.9975
  config.published.protocol = "paper, Table 1 (mean of 3 trials)"
  return common.apply_variant(config, arg)
