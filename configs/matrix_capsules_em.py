"""A small matrix-capsule network with EM routing (Hinton, Sabour & Frosst, "Matrix
capsules with EM routing", ICLR 2018).

Published: **1.8%** test error on smallNORB and **0.44%** on MNIST, with the paper's
full network: ReLU Conv1 (5x5, A=32 channels) -> PrimaryCaps (B=32 types of
4x4 pose matrices with sigmoid activations) -> ConvCaps1 (K=3, stride 2, C=32) -> ConvCaps2
(K=3, D=32) -> Class Capsules (shared transformation matrices, coordinate addition),
3 EM iterations, spread loss. This config is a SMALL version (`models.MatrixCapsNet`):
Conv1 (5x5, stride 2, A=64) -> PrimaryCaps (B=8) -> Class Capsules, without the two
ConvCaps layers (capsjax has no convolutional EM routing yet); A=64 and B=8 are the
first two sizes of the small "A=64, B=8, C=D=16" network that public implementations
train (yl-1993/Matrix-Capsules-EM-PyTorch, README.md). It trains with the margin loss
on the class activations (the loss every capsjax routing shares), not the spread loss
(`losses.spread_loss` exists but the train step does not use it); do not compare its
accuracy with the published numbers as a reproduction.

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
  m.primary_types = 8  # B
  m.routing = "em"
  m.routing_iterations = 3
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
  config.num_epochs = 50
  config.val_examples = 0
  config.published.source = "Matrix capsules with EM routing (Hinton et al. 2018), full model"
  config.published.test_accuracy = 0.9956
  config.published.protocol = "paper, MNIST 0.44% error (this config is a smaller network)"
  if arg == "smoke":
    return _smoke(config)
  return common.apply_variant(config, arg)


def _smoke(config):
  """A tiny model for tests: seconds on CPU, any data (mock data too)."""
  common.smoke_run(config)
  config.model.conv1_channels = 16
  config.model.primary_types = 2
  config.model.routing_iterations = 2
  return config
