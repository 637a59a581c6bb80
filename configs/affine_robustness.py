"""The paper's affine-robustness experiment (Sabour, Frosst & Hinton 2017, Sec. 5.2) on any
28x28 dataset, run by `experiments.robustness`.

Train on "expanded" images (each 28x28 image at a random position on a 40x40 canvas,
`capsjax.canvas.random_translate`, drawn fresh every step) and test on the same test
images centred ('clean'), randomly placed ('expanded') and under random affine maps of
growing strength ('affine', `capsjax.canvas.random_affine`; strength 1 = the affNIST
ranges of `capsjax.canvas.AffineRanges`, strength s scales rotation and shear by s and
the scale range to 1 +- 0.2 s). The test sets are deterministic in `seed`.

The paper (MNIST, early-stopped when both nets reached ~99.2% on expanded MNIST): CapsNet
**79%** on affNIST against **66%** for a CNN of similar accuracy on expanded MNIST (99.23%
vs 99.22%). `model.name` picks the network: 'capsnet' (CapsNet on the 40x40 canvas) or
'baseline_cnn' (the paper's baseline, `capsjax.models.baseline_cnn`).

  python -m experiments.robustness --config=configs/affine_robustness.py --workdir=runs/affine
  python -m experiments.robustness --config=configs/affine_robustness.py:quick \\
      --models=capsnet,baseline_cnn --workdir=runs/affine_quick
  --config.dataset=mnist --config.download=True  (with internet) for the paper's setting.

Variants: 'quick' (smaller networks, 10,000 training images, 2 epochs: minutes on a CPU),
'smoke' (tiny, for tests).
"""

from ml_collections import config_dict

from configs import robustness_common


def get_config(arg=None):
  config = robustness_common.base_config(experiment="affine", canvas=40)
  a = config.affine = config_dict.ConfigDict()
  # capsjax.canvas.AffineRanges at strength 1 (affNIST's ranges as stated there).
  a.max_rotation_deg = 20.0
  a.max_shear = 0.2
  a.scale_min = 0.8
  a.scale_max = 1.2
  a.strengths = (0.0, 0.25, 0.5, 0.75, 1.0)
  config.published.source = "Sabour, Frosst & Hinton 2017, Sec. 5.2 (MNIST -> affNIST)"
  config.published.capsnet = 0.79
  config.published.baseline_cnn = 0.66
  return robustness_common.apply_variant(config, arg)
