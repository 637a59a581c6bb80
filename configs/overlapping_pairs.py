"""The paper's overlapping-pairs experiment (MultiMNIST, Sabour, Frosst & Hinton 2017, Sec. 6)
on any 28x28 dataset, run by `experiments.robustness`.

Each image is overlaid with one of a different class, each shifted by up to 4 pixels in
each direction on a 36x36 canvas (`capsjax.canvas.overlapping_pairs`), drawn fresh every
step; the test pairs are deterministic in `seed`. CapsNet trains with the margin loss
with both classes present (`capsjax.pair_losses.two_target_margin_loss`) and reconstructs
each object from its own capsule (the decoder masked by each label, each reconstruction
against that object alone); the baseline CNN with a sigmoid cross-entropy over both
labels. Accuracy: both labels among the two highest scores (the paper's metric).

The paper (MNIST, 60M training pairs): **5.2%** error for CapsNet with 3 routing
iterations and the reconstruction, **8.1%** for the baseline CNN (Table 1).

  python -m experiments.robustness --config=configs/overlapping_pairs.py --workdir=runs/pairs
  python -m experiments.robustness --config=configs/overlapping_pairs.py:quick \\
      --models=capsnet,baseline_cnn --workdir=runs/pairs_quick

Variants: 'quick' (minutes on a CPU), 'smoke' (tiny, for tests).
"""

from ml_collections import config_dict

from configs import robustness_common


def get_config(arg=None):
  config = robustness_common.base_config(experiment="pairs", canvas=36)
  config.pairs = config_dict.ConfigDict()
  config.pairs.max_shift = 4
  config.published.source = "Sabour, Frosst & Hinton 2017, Sec. 6 and Table 1 (MultiMNIST)"
  config.published.capsnet = 1 - 0.052
  config.published.baseline_cnn = 1 - 0.081
  return robustness_common.apply_variant(config, arg)
