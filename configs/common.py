"""Base config shared by every dataset, and the `smoke`/`quick` shrink helpers.

Every field the training code reads is declared here, so a misspelt command-line
override (`--config.model.routing_iteration=1`) fails with "Did you mean" instead of
being ignored. Durations are in epochs; `capsjax.train` turns them into steps.
"""

from ml_collections import config_dict


def get_base_config() -> config_dict.ConfigDict:
  """Paper-faithful CapsNet defaults (Sabour et al. 2017, Sec. 4)."""
  config = config_dict.ConfigDict()
  config.seed = 0
  # 'train' trains (resuming from --workdir); 'eval' evaluates the latest checkpoint
  # in --workdir (or `init_from`) on the whole test split without training.
  config.mode = "train"

  config.dataset = "fashion_mnist"
  config.data_dir = config_dict.placeholder(str)     # TFDS data dir; None = TFDS default.
  config.manual_dir = config_dict.placeholder(str)   # original IDX/npz files for offline builds.
  # Let TFDS download missing data. Off by default: offline, a TFDS download retries for
  # minutes; capsjax instead fails at once with the files/commands that would fix it.
  config.download = False
  config.train_examples = 0                          # > 0: train on the first N only (quick runs).
  config.eval_examples = 0                           # > 0: evaluate on the first N only.

  config.num_epochs = 50
  config.batch_size = 128                            # global, split over every device.
  config.eval_batch_size = 256
  config.log_every_steps = 50
  config.checkpoint_every_epochs = 1
  config.keep_checkpoints = 3                        # latest N; the best-accuracy one is kept too.
  config.init_from = ""                              # checkpoint dir/step to load weights from.
  config.overwrite = False                           # allow a workdir used with another config.
  config.progress_bar = True

  config.model = config_dict.ConfigDict()
  config.model.conv1_channels = 256
  config.model.conv1_kernel = 9
  config.model.primary_types = 32
  config.model.primary_dim = 8
  config.model.primary_kernel = 9
  config.model.primary_stride = 2
  config.model.digit_dim = 16
  config.model.routing_iterations = 3
  config.model.stop_gradient = False                 # True: the common "u_hat stopped" variant.
  config.model.decoder_hidden = (512, 1024)
  config.model.use_decoder = True
  config.model.conv_impl = "auto"                    # see capsjax.conv.IMPLS.
  config.model.dtype = "float32"                     # 'bfloat16': bf16 matmuls, f32 params/losses.

  config.optim = config_dict.ConfigDict()
  config.optim.learning_rate = 1e-3
  config.optim.decay_rate = 0.9                      # seeds: x0.9 per epoch.
  config.optim.decay_epochs = 1.0
  config.optim.decay_steps = 0                       # > 0 overrides decay_epochs (authors: 2000 @ 0.96).
  config.optim.staircase = True

  config.loss = config_dict.ConfigDict()
  config.loss.m_plus = 0.9
  config.loss.m_minus = 0.1
  config.loss.lam = 0.5
  config.loss.recon_weight = 0.392                   # x per-pixel MSE == 0.0005 x SSE on 28x28.

  config.augment = config_dict.ConfigDict()
  config.augment.max_shift = 2
  config.augment.flip = False
  config.augment.cutout_size = 0
  return config


def apply_variant(config: config_dict.ConfigDict, arg) -> config_dict.ConfigDict:
  """Applies a `file.py:VARIANT` shrink to a full config.

  Variants:
    None: the full config.
    'quick': a real Fashion-MNIST/K-MNIST run that finishes on a laptop CPU (minutes):
      the full model, a 12k-example training subset, 2 epochs.
    'smoke': a tiny model for tests and CI: seconds on CPU, any data (mock data too).
  """
  if arg in (None, ""):
    return config
  if arg == "quick":
    config.num_epochs = 2
    config.train_examples = 12000
    config.batch_size = 100
    config.log_every_steps = 20
    return config
  if arg == "smoke":
    config.num_epochs = 2
    config.train_examples = 32
    config.eval_examples = 24
    config.batch_size = 8
    config.eval_batch_size = 16
    config.log_every_steps = 2
    config.progress_bar = False
    m = config.model
    m.conv1_channels = 16
    m.conv1_kernel = 9
    m.primary_types = 4
    m.primary_dim = 4
    m.primary_kernel = 9
    m.digit_dim = 8
    m.routing_iterations = 2
    m.decoder_hidden = (32, 64)
    return config
  raise ValueError(f"unknown config variant {arg!r}; expected one of: 'quick', 'smoke'")
