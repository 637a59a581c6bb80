r"""CapsNet's capsules at initialisation: are the primary capsules saturated?

Builds a config's model (default `configs/mnist.py`, the authors' recipe with its 'tf'
init) with `model.primary_scale` = 1 and = 1/32 (the authors' code divides the primary
pre-activation by 32), runs the first test images through it and prints, for each:

  |s|        mean norm of the primary capsules' pre-activation s;
  |u|        mean norm after the squash, |s|^2 / (1 + |s|^2);
  d|u|/d|s|  mean slope of the squash there, 2|s| / (1 + |s|^2)^2: near 0 the margin
             loss's gradient barely reaches conv1 and the primary capsules;
  |v|        mean class-capsule length.

  python -m experiments.init_statistics                       # 256 Fashion-MNIST images
  python -m experiments.init_statistics --dataset=mnist --num_images=1000
  python -m experiments.init_statistics --config=configs/fashion.py --scales=1
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app
from absl import flags
from flax import nnx
from ml_collections import config_flags

from capsjax import analysis
from capsjax import models
from capsjax.run import cpu_runtime


def statistics(model: models.CapsNet, images: jax.Array) -> dict[str, float]:
  """Mean capsule statistics of a CapsNet on images [B, H, W, C] (see the module doc).

  Returns:
    {'s': mean |s|, 'u': mean |u|, 'slope': mean d|u|/d|s|, 'v': mean |v|} over every
    primary capsule of every image ('s', 'u', 'slope') and every class capsule ('v').
  """
  pc = model.primary_caps
  h = jax.nn.relu(model.conv1(images))  # [B, H1, W1, C1]
  s = pc.conv(h, scale=pc.preact_scale).reshape(images.shape[0], -1, pc.dim)  # [B, N_in, D]
  n = jnp.sqrt(jnp.sum(jnp.square(s), axis=-1))  # [B, N_in]
  lengths = model(images)["class_scores"]  # [B, N_out]
  return {
    "s": float(jnp.mean(n)),
    "u": float(jnp.mean(n**2 / (1 + n**2))),
    "slope": float(jnp.mean(2 * n / (1 + n**2) ** 2)),
    "v": float(jnp.mean(lengths)),
  }


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  images, _ = analysis.load_test_images(f.dataset, f.num_images, data_dir=config.data_dir)
  images = jnp.asarray(images)
  print(f"{config.model.init!r} init, seed {f.seed}, {len(images)} {f.dataset} images")
  print(f"{'primary_scale':>14} {'|s|':>8} {'|u|':>8} {'d|u|/d|s|':>10} {'|v|':>8}")
  for scale in f.scales:
    model_cfg = config.model.copy_and_resolve_references()
    model_cfg.primary_scale = float(scale)
    model = models.create_model(
      model_cfg,
      image_shape=images.shape[1:],
      num_classes=10,
      rngs=nnx.Rngs(params=jax.random.key(f.seed)),
      conv_impl=cpu_runtime.resolve_conv_impl(model_cfg.conv_impl),
    )
    st = statistics(model, images)
    print(f"{float(scale):>14.5g} {st['s']:8.3f} {st['u']:8.3f} {st['slope']:10.4f} {st['v']:8.3f}")


def _define_flags() -> None:
  # Defined when run as a script only, as capsjax.main defines --config too.
  config_flags.DEFINE_config_file("config", "configs/mnist.py", "A CapsNet config.")
  flags.DEFINE_string("dataset", "fashion_mnist", "The images' dataset.")
  flags.DEFINE_integer("num_images", 256, "How many test images (the first ones).")
  flags.DEFINE_list("scales", ["1", "0.03125"], "model.primary_scale values.")
  flags.DEFINE_integer("seed", 0, "The initialisation seed.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
