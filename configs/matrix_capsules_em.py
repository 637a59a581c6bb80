"""The small matrix-capsule network with EM routing (Hinton, Sabour & Frosst, "Matrix
capsules with EM routing", ICLR 2018): A=64, B=8, C=D=16.

Source: yl-1993/Matrix-Capsules-EM-PyTorch at commit c4547bf (train.py, model/capsules.py).

Published for this network:
- yl-1993, README.md L25-33 at c4547bf: MNIST **98.9%** after 30 epochs with 2 EM
  iterations, coordinate addition and the spread loss, without BatchNorm (99.1% with the
  BatchNorm after Conv1 that its code at c4547bf has, model/capsules.py L324; capsjax
  has none). The figure is the **maximum test accuracy over every evaluation** (before
  training and after each epoch: train.py L210-218 prints "best test accuracy"), so a
  test-set selection; this config has no validation split (`val_examples = 0`), so its
  selected epoch is the best on test as well.
- The paper: 2.2% test error on smallNORB for this "smaller capsule network ... with
  only 68K trainable parameters" (Sec. 5). `models.MatrixCapsNet` with these sizes has
  68,444 (tests/models_routing_test.py asserts it).

Recipe, train.py at c4547bf: Adam lr 0.01 (L25), batch 128 (L17), no weight decay (L27),
no augmentation, images standardised with torchvision's Normalize((0.1307,), (0.3081,))
(L51-55: `model.input_mean`, `model.input_std`), Conv1 with padding=2
(model/capsules.py L322-323: `model.conv1_padding`, a 14x14 grid, class capsules routing
from 4x4x16 = 256 children); the spread loss's margin rises linearly from 0.2 to 0.9
over the run (L137 and loss/spread_loss.py); ReduceLROnPlateau(optimizer, 'max',
patience=1) stepped with the epoch's mean training accuracy (L208, L212-214:
`optim.plateau_patience = 1`, capsjax.optim.reduce_on_plateau, which says how it
differs: a reduction lands one update earlier).

Departures: EM's inverse temperature is fixed at 1e-3 there (model/capsules.py L82);
capsjax's schedule (`routing.em_inverse_temperatures`, final lambda 0.01) gives 5.0e-4
and 9.75e-4 for the two iterations. Its last training batch is partial (469 batches an
epoch); capsjax drops it (468).

Network: ReLU Conv1 (5x5, stride 2, A=64) -> PrimaryCaps (B=8 types of 4x4 poses and
sigmoid activations) -> ConvCaps1 (K=3, stride 2, C=16) -> ConvCaps2 (K=3, stride 1,
D=16) -> class capsules (shared W, coordinate addition), EM routing between every pair
of capsule layers, class scores = class activations, spread loss. As in yl-1993's code,
each ConvCaps cell routes its own receptive field (`convcaps_per_cell=True`);
`--config.model.convcaps_per_cell=False` normalises a child's assignments over all the
cells that see it, as the paper does (`matrix_layers.MatrixConvCaps`). The paper's full
network (A=B=C=D=32, MNIST 0.44% error) is
`--config.model.conv1_channels=32 --config.model.primary_types=32
--config.model.convcaps_types=32,32 --config.model.routing_iterations=3
--config.model.convcaps_per_cell=False`.

  python -m capsjax.main --config=configs/matrix_capsules_em.py --workdir=/tmp/em
  python -m capsjax.main --config=configs/matrix_capsules_em.py:quick --workdir=/tmp/em_q
  python -m capsjax.main --config=configs/matrix_capsules_em.py:smoke --workdir=/tmp/em_s
"""

from ml_collections import config_dict

from configs import common


def model_config() -> config_dict.ConfigDict:
  """The `config.model` of the matrix-capsule network (`models.MatrixCapsNet`'s keywords)."""
  m = config_dict.ConfigDict()
  m.architecture = "matrix_capsnet"
  m.conv1_channels = 64  # A
  m.conv1_kernel = 5
  m.conv1_stride = 2
  m.conv1_padding = 2  # yl-1993's nn.Conv2d(padding=2).
  m.input_mean = 0.1307  # yl-1993's Normalize((0.1307,), (0.3081,)).
  m.input_std = 0.3081
  m.primary_types = 8  # B
  m.convcaps_types = (16, 16)  # C, D
  m.convcaps_kernels = (3, 3)
  m.convcaps_strides = (2, 1)
  m.convcaps_per_cell = True  # yl-1993's; False: the paper's (see the docstring).
  m.routing = "em"
  m.routing_iterations = 2  # yl-1993's best (the paper: 3).
  m.em_final_lambda = 0.01
  m.coordinate_addition = True
  m.decoder_hidden = (512, 1024)
  m.use_decoder = False  # the paper has no decoder.
  m.conv_impl = "auto"
  m.dtype = "float32"
  m.init = "torch"
  m.length_eps = 1e-7  # shared field; unused here.
  return m


def get_config(arg=None):
  config = common.get_base_config()
  config.dataset = "mnist"
  config.model = model_config()
  config.num_epochs = 30
  config.batch_size = 128
  config.val_examples = 0
  config.optim.learning_rate = 0.01
  config.optim.decay_rate = 1.0  # no decay: only the plateau schedule lowers the rate.
  config.optim.plateau_patience = 1
  config.optim.plateau_factor = 0.1
  # PyTorch stops once a reduction would change the rate by less than its eps, 1e-8:
  # from 0.01, at 1e-8.
  config.optim.plateau_min_scale = 1e-6
  config.loss.class_loss = "spread"
  config.loss.recon_weight = 0.0  # no decoder.
  config.augment.max_shift = 0
  config.published.source = "yl-1993/Matrix-Capsules-EM-PyTorch, A=64 B=8 C=D=16, no BN"
  config.published.test_accuracy = 0.989
  config.published.protocol = "best test accuracy over every epoch's evaluation"
  if arg == "smoke":
    return _smoke(config)
  return common.apply_variant(config, arg)


def _smoke(config):
  """A tiny model for tests: seconds on CPU, any data (mock data too)."""
  common.smoke_run(config)
  config.model.conv1_channels = 16
  config.model.primary_types = 2
  config.model.convcaps_types = (3,)
  config.model.convcaps_kernels = (3,)
  config.model.convcaps_strides = (2,)
  config.model.routing_iterations = 2
  return config
