"""What the robustness configs (configs/affine_robustness.py, configs/overlapping_pairs.py)
share: the data, the two networks, the optimizer, and the `quick`/`smoke` shrinks.

Every field `experiments.robustness` reads is declared here, so a misspelt override
fails with "Did you mean" instead of being ignored.
"""

from ml_collections import config_dict


def base_config(*, experiment: str, canvas: int) -> config_dict.ConfigDict:
  """The paper's networks on a `canvas` x `canvas` input, for 'affine' or 'pairs'."""
  config = config_dict.ConfigDict()
  config.experiment = experiment
  config.dataset = "fashion_mnist"
  config.data_dir = config_dict.placeholder(str)
  config.manual_dir = config_dict.placeholder(str)
  config.download = False  # let TFDS download a missing dataset (MNIST needs internet).
  config.seed = 0
  config.canvas = canvas
  config.num_epochs = 50
  config.batch_size = 128
  config.train_examples = 0  # > 0: the first N training images only.
  config.eval_examples = 0  # > 0: the first N test images only.
  config.eval_batch_size = 250
  config.learning_rate = 1e-3
  config.decay_rate = 0.95  # x per epoch.
  config.recon_weight = 0.392  # CapsNet: x per-pixel MSE of each reconstruction.

  config.model = config_dict.ConfigDict()
  config.model.name = "capsnet"  # or 'baseline_cnn'.
  # capsjax.models.CapsNet's keywords (the paper's sizes; 40x40 gives 12x12x32 = 4,608
  # primary capsules, 36x36 10x10x32 = 3,200).
  c = config.model.capsnet = config_dict.ConfigDict()
  c.conv1_channels = 256
  c.conv1_kernel = 9
  c.primary_types = 32
  c.primary_dim = 8
  c.primary_kernel = 9
  c.primary_stride = 2
  c.digit_dim = 16
  c.routing_iterations = 3
  c.decoder_hidden = (512, 1024)
  c.init = "torch"
  # capsjax.models.BaselineCNN's keywords (the paper's: 35.4M parameters on 28x28).
  b = config.model.baseline_cnn = config_dict.ConfigDict()
  b.channels = (256, 256, 128)
  b.kernel = 5
  b.hidden = (328, 192)
  b.dropout_rate = 0.5
  b.init = "torch"

  config.published = config_dict.ConfigDict()
  config.published.source = ""
  config.published.capsnet = 0.0  # the paper's accuracy on the hard set; 0 = none.
  config.published.baseline_cnn = 0.0
  return config


def apply_variant(config, arg):
  """'quick': small networks, 10,000 images, 2 epochs (minutes on a 2-core CPU);
  'smoke': tiny, for tests; None: the paper's networks."""
  if arg in (None, ""):
    return config
  c, b = config.model.capsnet, config.model.baseline_cnn
  if arg == "quick":
    config.num_epochs = 2
    config.train_examples = 10000
    config.eval_examples = 2000
    config.batch_size = 50
    c.conv1_channels = 64
    c.primary_types = 8
    b.channels = (32, 32, 16)
    return config
  if arg == "smoke":
    config.num_epochs = 1
    config.train_examples = 64
    config.eval_examples = 40
    config.batch_size = 16
    config.eval_batch_size = 20
    c.conv1_channels = 8
    c.primary_types = 2
    c.decoder_hidden = (16, 16)
    b.channels = (4, 4, 2)
    b.hidden = (8, 8)
    return config
  raise ValueError(f"unknown config variant {arg!r}; expected 'quick' or 'smoke'")
