"""Base config shared by every dataset, and the `smoke`/`quick` shrink helpers.

Every field the training code reads is declared here, so a misspelt command-line
override (`--config.model.routing_iteration=1`) fails with "Did you mean" instead of
being ignored. Durations are in epochs; `capsjax.train` turns them into steps.
"""

from ml_collections import config_dict

from capsjax import losses


def get_base_config() -> config_dict.ConfigDict:
  """Paper-faithful CapsNet defaults (Sabour et al. 2017, Sec. 4)."""
  config = config_dict.ConfigDict()
  config.seed = 0
  # Several seeds as one program: "0,1,2" trains one member per seed in one jitted step
  # (capsjax.train_ensemble), each written to WORKDIR/seed-<s>/ as a single run with
  # that seed would be. Empty: one run with `seed`.
  config.seeds = ""
  # 'train' trains (resuming from --workdir); 'eval' evaluates the latest checkpoint
  # in --workdir (or `init_from`) on the whole test split without training.
  config.mode = "train"
  # Which checkpoint mode=eval evaluates: 'latest', or 'selected' (the epoch selected on
  # validation, or on test in a run without a validation split).
  config.eval_checkpoint = "latest"

  config.dataset = "fashion_mnist"
  config.data_dir = config_dict.placeholder(str)  # TFDS data dir; None = TFDS default.
  config.manual_dir = config_dict.placeholder(str)  # original IDX/npz files for offline builds.
  # Let TFDS download missing data. Off by default, so that a missing dataset fails at
  # once with the files/commands that would fix it; with it on and no network, capsjax
  # finds out in seconds (before TFDS's minutes of retries) and names the offline routes.
  config.download = False
  config.train_examples = 0  # > 0: train on the first N only (quick runs).
  config.eval_examples = 0  # > 0: evaluate on the first N only.
  # Training examples held out for validation (a fixed subset, the same for every seed):
  # the kept best checkpoint, the selected epoch and early stopping use it. 0: no split;
  # selection then falls back to test accuracy (the reference projects used the test set
  # as their validation data).
  config.val_examples = 5000
  config.early_stop_epochs = 0  # > 0: stop after N epochs without a
  # better validation accuracy.

  config.num_epochs = 50
  config.batch_size = 128  # global, split over every device.
  config.eval_batch_size = 256
  config.log_every_steps = 50
  config.checkpoint_every_epochs = 1
  config.keep_checkpoints = 3  # latest N; the selected one is kept too.
  config.init_from = ""  # checkpoint dir/step to load weights from.
  config.overwrite = False  # allow a workdir used with another config.
  # Resume a workdir's checkpoints although these run-defining fields changed (e.g.
  # 'optim.learning_rate' after a non-finite loss): comma-separated dotted fields or
  # prefixes ('optim' covers every optim.* field); '*' accepts any change, and is needed
  # when config.json is missing beside checkpoints. Each change is logged old -> new and
  # the old config.json is kept as config.json.previous-<time>. Checkpoints of another
  # model shape are still refused.
  config.resume_with_changes = ""
  config.progress_bar = True
  # The training loop (capsjax.train); both give the same parameters, bit for bit.
  # 'step': one jitted step per batch, batches cut and cast on the host. 'scan': the uint8
  # training set is copied to every device once, and a chunk of steps (gather, cast,
  # augmentation, update, metrics) runs as one jitted loop: the host touches the devices
  # once per chunk. 'auto': 'scan' on GPU/TPU; 'step' on CPU, where benchmarks/epoch_loop.py
  # measured the two equal within noise (RESULTS.md) and 'step' is the simpler program.
  config.loop = "auto"
  # A scanned chunk ends at the next log step or epoch end, after at most scan_chunk_steps
  # steps (0 = no limit) and, in a one-process run, after about scan_chunk_seconds: the
  # longest a SIGTERM waits before the checkpoint.
  config.scan_chunk_steps = 0
  config.scan_chunk_seconds = 10.0

  config.model = config_dict.ConfigDict()
  config.model.conv1_channels = 256
  config.model.conv1_kernel = 9
  config.model.primary_types = 32
  config.model.primary_dim = 8
  config.model.primary_kernel = 9
  config.model.primary_stride = 2
  # Multiplies PrimaryCaps' conv output before its bias: 1/32 is the authors' code's
  # primary capsules (conv / 32 + bias; capsjax.layers.PrimaryCaps), 1 the paper's text.
  config.model.primary_scale = 1.0
  config.model.digit_dim = 16
  config.model.routing_iterations = 3
  config.model.stop_gradient = False  # True: the common "u_hat stopped" variant.
  config.model.decoder_hidden = (512, 1024)
  config.model.use_decoder = True
  config.model.conv_impl = "auto"  # or one of capsjax.conv.IMPLS.
  config.model.dtype = "float32"  # 'bfloat16': bf16 matmuls, f32 params/losses.
  # Initialisation scheme (capsjax.layers.initializers): 'torch' (PyTorch's defaults,
  # W ~ N(0, 0.01^2)), 'keras' (glorot_uniform, zero biases: the Keras references), 'tf'
  # (the authors' code: truncated normal, biases 0.1, a bias on the routed capsules) or
  # 'he' (Efficient-CapsNet's he_normal, with glorot_normal for the decoder's output).
  config.model.init = "torch"
  # |v| = sqrt(|v|^2 + length_eps): keeps the gradient finite at v = 0. At initialisation
  # |v|^2 is ~5e-10 ('torch') or ~5e-18 ('keras'), so 1e-7 pins every length near 3e-4 and
  # scales the margin loss's gradient down. CapsNet-Fashion-MNIST's Length layer (2017) has
  # no epsilon; CapsNet-Keras' has added K.epsilon() = 1e-7 since its 923809b (2018-12),
  # as the K-MNIST seed project's TF2 port does.
  config.model.length_eps = 1e-7
  # Which class models.create_model builds: 'capsnet' (this skeleton); the
  # Efficient-CapsNet and matrix-capsule configs set their own model fields.
  config.model.architecture = "capsnet"
  # The routing of the class capsules, a name in capsjax.routing.ROUTINGS: 'dynamic'
  # (Sabour et al.), 'em' (Hinton et al. 2018), 'inverted_dot_product' (Tsai et al.
  # 2020), 'self_attention' (Mazzia et al. 2021). Each brings the primary-capsule
  # nonlinearity and learned parameters of its paper (capsjax.layers.RoutedCaps).
  config.model.routing = "dynamic"
  # EM routing's inverse-temperature limit (capsjax.routing.em_inverse_temperatures).
  config.model.em_final_lambda = 0.01

  config.optim = config_dict.ConfigDict()
  config.optim.learning_rate = 1e-3
  config.optim.decay_rate = 0.9  # per period (CapsNet-Keras, K-MNIST seed).
  config.optim.decay_epochs = 1.0
  config.optim.decay_steps = 0  # > 0 overrides decay_epochs (authors: 2000 @ 0.96).
  config.optim.staircase = True
  config.optim.min_learning_rate = 0.0  # floor of the schedule (authors: 1e-6).
  # Adam's epsilon and where it is added (capsjax.optim): 'optax' (optax, PyTorch, the
  # paper's Algorithm 1) adds it to sqrt(v_hat); 'keras' adds it to the uncorrected sqrt(v)
  # and folds the bias corrections into the step size (keras_recipe sets it).
  config.optim.adam_epsilon = 1e-8
  config.optim.adam_epsilon_convention = "optax"
  # > 0: PyTorch's ReduceLROnPlateau on the epoch's training accuracy with this patience
  # (yl-1993's matrix-capsule recipe): the rate x plateau_factor after more than
  # `plateau_patience` epochs without improvement, down to plateau_min_scale x the
  # schedule (capsjax.optim.reduce_on_plateau). 0: the schedule alone.
  config.optim.plateau_patience = 0
  config.optim.plateau_factor = 0.1
  config.optim.plateau_min_scale = 0.0

  # m_plus, m_minus, lam, recon_weight: the paper's values (capsjax.losses.LossWeights).
  # class_weight scales the class loss in the total (the authors' code: 1/20, its margin
  # loss halved and averaged over 10 classes); epochs.csv's class_loss is unscaled.
  # class_loss: 'margin' (Sabour et al.) or 'spread' (EM routing's loss, Hinton et al.
  # 2018), whose margin rises from spread_margin_start to spread_margin_end over the
  # first spread_ramp_fraction of the run's steps (num_epochs x steps per epoch: resuming
  # with more epochs stretches the rest of the ramp).
  config.loss = config_dict.ConfigDict(losses.LossWeights.config_defaults())

  config.augment = config_dict.ConfigDict()
  config.augment.max_shift = 2  # integer shift, uniform in [-k, k] px.
  # > 0: Keras ImageDataGenerator's width/height_shift_range instead of max_shift:
  # round(uniform(-f * size, f * size)) px per axis (capsjax.augment).
  config.augment.shift_fraction = 0.0
  config.augment.fill = "zero"  # shifted-in pixels: 'zero' or 'nearest'.
  config.augment.flip = False
  config.augment.cutout_size = 0
  # Efficient-CapsNet's MNIST pipeline (rotation, shift within the margins, squish, 4x4
  # erase; capsjax.augment.efficient_capsnet_example) before the others.
  config.augment.efficient_capsnet = False

  # What the recipe's source reports (metadata for reports and sweeps; not run-defining).
  config.published = config_dict.ConfigDict()
  config.published.source = ""  # e.g. "CapsNet-Fashion-MNIST".
  config.published.test_accuracy = 0.0  # 0 = none.
  config.published.protocol = ""  # how the reported epoch was chosen.
  return config


def keras_recipe(config: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """What every Keras reference (CapsNet-Keras and its descendants) shares.

  glorot_uniform weights with zero biases, the 2017 Length layer of CapsNet-Keras and
  CapsNet-Fashion-MNIST (no epsilon; CapsNet-Keras added 1e-7 in 923809b, 2018-12, and
  the K-MNIST seed's TF2 port overrides it), a learning rate multiplied by a constant each
  epoch (LearningRateScheduler), Keras' Adam (`optimizers.Adam(lr=...)`: epsilon added to
  the uncorrected sqrt(v), keras-team/keras keras/optimizers.py `Adam.get_updates`; 1e-8,
  the default of the Keras 2.0.x these 2017 projects ran, the K-MNIST seed's tf.keras
  overrides it), and no validation split: they passed the test set as `validation_data`.
  """
  config.optim.adam_epsilon_convention = "keras"
  config.model.init = "keras"
  config.model.length_eps = 1e-30
  config.optim.decay_epochs = 1.0
  config.optim.staircase = True
  config.val_examples = 0
  return config


def keras_shift(config: config_dict.ConfigDict, fraction: float = 0.1) -> config_dict.ConfigDict:
  """ImageDataGenerator(width_shift_range=f, height_shift_range=f) with its defaults."""
  config.augment.max_shift = 0
  config.augment.shift_fraction = fraction
  config.augment.fill = "nearest"
  return config


def split_variants(arg, own: tuple[str, ...] = ()) -> tuple[set[str], str | None]:
  """Splits `file.py:a,b` into the config file's own variants and the shared one.

  Returns (own variants given, the remaining 'quick'/'smoke' variant or None).
  """
  names = [a for a in (arg or "").split(",") if a]
  mine = {a for a in names if a in own}
  rest = [a for a in names if a not in own]
  if len(rest) > 1:
    raise ValueError(
      f"config variants {rest} cannot be combined; expected at most one of 'quick', 'smoke'"
    )
  return mine, (rest[0] if rest else None)


def smoke_run(config: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """The run size of every `:smoke` variant (2 epochs of 32 examples, batch 8, no bar);
  each config file shrinks its own model on top."""
  config.num_epochs = 2
  config.train_examples = 32
  config.eval_examples = 24
  config.batch_size = 8
  config.eval_batch_size = 16
  config.val_examples = 8
  config.log_every_steps = 2
  config.progress_bar = False
  return config


def apply_variant(config: config_dict.ConfigDict, arg) -> config_dict.ConfigDict:
  """Applies a `file.py:VARIANT` shrink to a full config.

  Variants:
    None: the full config.
    'quick': a CPU demo a new user can trust, not a shrunk reproduction of the recipe:
      the full model, one pass over 45,000 training images in batches of 50 (per-epoch
      decays do not act within it), no augmentation, PyTorch-style init and Adam (optax's
      epsilon convention), evaluated on the whole test split (no validation split: a
      one-epoch run has nothing to select). Each choice (no augmentation, batch 50, 'torch'
      init) won among the single CPU runs in RESULTS.md (the `:quick` section), which has
      the figures; all of them ran with optax's Adam.
    'smoke': a tiny model for tests and CI: seconds on CPU, any data (mock data too).
  """
  if arg in (None, ""):
    return config
  if arg == "quick":
    config.num_epochs = 1
    config.train_examples = 45000
    config.val_examples = 0
    config.batch_size = 50
    config.log_every_steps = 50
    config.model.init = "torch"
    config.model.length_eps = 1e-7
    config.optim.adam_epsilon = 1e-8
    config.optim.adam_epsilon_convention = "optax"
    config.augment.max_shift = 0
    config.augment.shift_fraction = 0.0
    config.augment.flip = False
    config.augment.cutout_size = 0
    config.augment.efficient_capsnet = False
    return config
  if arg == "smoke":
    smoke_run(config)
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
