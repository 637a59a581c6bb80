"""Shared test fixtures: tiny configs and synthetic batches (no real data)."""

import numpy as np

from capsjax import run_config

from configs import fashion


def smoke_config(**overrides):
  """The `:smoke` Fashion-MNIST config, with dotted-key overrides."""
  config = fashion.get_config("smoke")
  for key, value in overrides.items():
    run_config.set_field(config, key, value)
  return config


def synthetic_batch(n: int, *, seed: int = 0, shape=(28, 28, 1), num_classes: int = 10):
  """A learnable batch: class k has a bright bar at rows 2k..2k+5 over faint noise."""
  rng = np.random.default_rng(seed)
  labels = (np.arange(n) % num_classes).astype(np.int32)
  rng.shuffle(labels)
  images = rng.uniform(0, 0.2, (n, *shape)).astype(np.float32)
  for i, k in enumerate(labels):
    images[i, 2 * k % (shape[0] - 6):2 * k % (shape[0] - 6) + 6, 4:shape[1] - 4, :] = 1.0
  return {"image": images, "label": labels}
