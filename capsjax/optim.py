"""The optax optimizer: Adam with an exponentially decaying learning rate.

One schedule covers the references' recipes:
  - CapsNet-Keras, CapsNet-Fashion-MNIST and the Fashion seed notebook: Keras'
    `LearningRateScheduler(lambda epoch: lr * decay ** epoch)`, i.e. a staircase per epoch
    (`decay_epochs=1, staircase=True`);
  - the authors' code (Sarasra/models, research/capsules): x0.96 every 2000 steps,
    continuous, floored at 1e-6 (`decay_steps=2000, decay_rate=0.96, staircase=False,
    min_learning_rate=1e-6`).
"""

from __future__ import annotations

import math

import optax

from capsjax import errors


def decay_steps(optim_cfg, steps_per_epoch: int) -> int:
  """Steps between learning-rate decays: `decay_steps` if > 0, else `decay_epochs` epochs."""
  if optim_cfg.decay_steps > 0:
    return int(optim_cfg.decay_steps)
  if optim_cfg.decay_epochs <= 0:
    raise errors.ConfigError(
      f"config.optim.decay_epochs must be > 0 when optim.decay_steps is 0, got "
      f"{optim_cfg.decay_epochs}"
    )
  return max(1, round(optim_cfg.decay_epochs * steps_per_epoch))


def validate(optim_cfg) -> None:
  """Raises `errors.ConfigError` naming the first invalid optimizer field."""
  if not 0 < optim_cfg.learning_rate < math.inf:
    raise errors.ConfigError(
      f"config.optim.learning_rate must be a finite number > 0, got {optim_cfg.learning_rate}"
    )
  if not 0 < optim_cfg.decay_rate <= 1:
    raise errors.ConfigError(
      f"config.optim.decay_rate must be in (0, 1], got {optim_cfg.decay_rate}"
    )
  if optim_cfg.decay_steps < 0:
    raise errors.ConfigError(
      f"config.optim.decay_steps must be >= 0 (0 = use decay_epochs), got {optim_cfg.decay_steps}"
    )
  if optim_cfg.decay_steps == 0 and not 0 < optim_cfg.decay_epochs < math.inf:
    raise errors.ConfigError(
      f"config.optim.decay_epochs must be a finite number > 0 when optim.decay_steps is 0, got "
      f"{optim_cfg.decay_epochs}"
    )
  floor = _floor(optim_cfg)
  if not 0 <= floor <= optim_cfg.learning_rate:
    raise errors.ConfigError(
      f"config.optim.min_learning_rate must be in [0, learning_rate={optim_cfg.learning_rate}], "
      f"got {floor}"
    )


def _floor(optim_cfg) -> float:
  # A saved config.json without the field has no floor.
  return float(optim_cfg.get("min_learning_rate", 0.0))


def make_schedule(optim_cfg, steps_per_epoch: int) -> optax.Schedule:
  """lr(step) = max(min_learning_rate, learning_rate * decay_rate ** (step / decay_steps)).

  `step / decay_steps` is floored when `staircase` is set. `step` counts optimizer
  updates from 0, so a per-epoch staircase gives epoch e (from 0) the rate
  learning_rate * decay_rate ** e, as Keras' LearningRateScheduler does.
  """
  validate(optim_cfg)
  floor = _floor(optim_cfg)
  return optax.exponential_decay(
    init_value=optim_cfg.learning_rate,
    transition_steps=decay_steps(optim_cfg, steps_per_epoch),
    decay_rate=optim_cfg.decay_rate,
    staircase=optim_cfg.staircase,
    # optax reads end_value as a ceiling when decay_rate >= 1; a constant rate needs
    # no floor (validate keeps the floor <= learning_rate).
    end_value=floor if floor > 0 and optim_cfg.decay_rate < 1 else None,
  )


def make_optimizer(optim_cfg, steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam (the paper's optimizer, default betas) on the decaying schedule."""
  return optax.adam(make_schedule(optim_cfg, steps_per_epoch))
