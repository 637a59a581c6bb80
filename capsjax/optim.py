"""The optax optimizer: Adam with an exponentially decaying learning rate.

Adam's epsilon comes in two conventions (`config.optim.adam_epsilon_convention`):
  - 'optax' (and PyTorch, and the paper's Algorithm 1): m_hat / (sqrt(v_hat) + eps);
  - 'keras' (Keras 2.x `Adam.get_updates` in keras-team/keras keras/optimizers.py, and
    tf.keras and TensorFlow 1's `tf.train.AdamOptimizer` through TensorFlow's ApplyAdam
    functor, tensorflow/core/kernels/training_ops.cc; tensorflow/python/training/adam.py
    calls it "epsilon hat"): the bias corrections folded into the step size,
    lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t), and eps added to the uncorrected sqrt(v):
    p -= lr_t * m / (sqrt(v) + eps). That is m_hat / (sqrt(v_hat) + eps / sqrt(1 - b2^t)):
    at step 1 (b2 = 0.999) an epsilon 31.6x larger, which matters while gradients are as
    small as eps, as CapsNet's class-capsule weights' can be at init under Keras' glorot
    init and epsilon-free capsule length.

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

import jax
import jax.numpy as jnp
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
  eps, convention = _epsilon(optim_cfg)
  if not 0 < eps < math.inf:
    raise errors.ConfigError(f"config.optim.adam_epsilon must be a finite number > 0, got {eps}")
  if convention not in EPSILON_CONVENTIONS:
    raise errors.ConfigError(
      f"config.optim.adam_epsilon_convention must be one of {EPSILON_CONVENTIONS}, got "
      f"{convention!r}"
    )
  patience, factor, min_scale = _plateau(optim_cfg)
  if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
    raise errors.ConfigError(
      f"config.optim.plateau_patience must be an int >= 0 (0 = no plateau schedule), got "
      f"{patience!r}"
    )
  if not 0 < factor < 1:
    raise errors.ConfigError(f"config.optim.plateau_factor must be in (0, 1), got {factor}")
  if not 0 <= min_scale <= 1:
    raise errors.ConfigError(f"config.optim.plateau_min_scale must be in [0, 1], got {min_scale}")
  floor = _floor(optim_cfg)
  if not 0 <= floor <= optim_cfg.learning_rate:
    raise errors.ConfigError(
      f"config.optim.min_learning_rate must be in [0, learning_rate={optim_cfg.learning_rate}], "
      f"got {floor}"
    )


EPSILON_CONVENTIONS = ("optax", "keras")


def _epsilon(optim_cfg) -> tuple[float, str]:
  # A saved config.json without the fields trained with optax's Adam and its epsilon.
  return (
    float(optim_cfg.get("adam_epsilon", 1e-8)),
    str(optim_cfg.get("adam_epsilon_convention", "optax")),
  )


def _plateau(optim_cfg) -> tuple[int, float, float]:
  # A saved config.json without the fields had no plateau schedule.
  return (
    optim_cfg.get("plateau_patience", 0),
    float(optim_cfg.get("plateau_factor", 0.1)),
    float(optim_cfg.get("plateau_min_scale", 0.0)),
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
  return adam(make_schedule(optim_cfg, steps_per_epoch), optim_cfg, steps_per_epoch)


def adam(learning_rate, optim_cfg, steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam at `learning_rate` (a float or schedule) with `optim_cfg`'s epsilon convention.

  Both conventions are chain(direction, scale_by_learning_rate) with optax's Adam state,
  so checkpoints, the schedule's step count (`opt_state[1].count`) and ensembles see the
  same tree either way. With `plateau_patience` > 0 a third element scales the updates
  as PyTorch's ReduceLROnPlateau does (`reduce_on_plateau`); its update takes the
  training error of the step's batch as `value=`.
  """
  eps, convention = _epsilon(optim_cfg)
  if convention == "keras":
    direction = scale_by_keras_adam(eps=eps)
  else:
    direction = optax.scale_by_adam(eps=eps)  # optax.adam is chain(this, learning rate).
  patience, factor, min_scale = _plateau(optim_cfg)
  if not patience:
    return optax.chain(direction, optax.scale_by_learning_rate(learning_rate))
  return optax.chain(
    direction,
    optax.scale_by_learning_rate(learning_rate),
    reduce_on_plateau(
      patience=patience, factor=factor, min_scale=min_scale, steps_per_epoch=steps_per_epoch
    ),
  )


def reduce_on_plateau(
  *, patience: int, factor: float, min_scale: float, steps_per_epoch: int
) -> optax.GradientTransformationExtraArgs:
  """PyTorch's `ReduceLROnPlateau(optimizer, 'max', patience)` on the epoch's training
  accuracy, as optax's `contrib.reduce_on_plateau` on the training error.

  optax averages the `value=` of each update over `steps_per_epoch` updates (the epoch's
  mean batch error, 1 - PyTorch's mean batch accuracy) and multiplies every later update
  by `factor` once the average has not improved for its own `patience` epochs in a row.
  PyTorch reduces when the bad epochs *exceed* `patience`, so optax's patience is
  `patience + 1`. PyTorch's improvement test in 'max' mode is acc > best * (1 + 1e-4);
  `atol=1e-4` on the error asks for error < best_error - 1e-4, the same test to within
  1e-4 x best_error. Two differences remain: optax applies a reduction to the update
  that ends the epoch, PyTorch from the next epoch's first step; PyTorch's rate stops
  falling when a reduction would change it by less than 1e-8, optax's scale at
  `min_scale`.
  """
  return optax.contrib.reduce_on_plateau(
    factor=factor,
    patience=patience + 1,
    rtol=0.0,
    atol=1e-4,
    accumulation_size=steps_per_epoch,
    min_scale=min_scale,
  )


def plateau_scale(opt_state) -> jax.Array | float:
  """The factor `reduce_on_plateau` applies to the updates (1.0 without it)."""
  last = opt_state[-1] if isinstance(opt_state, tuple) and opt_state else None
  if isinstance(last, optax.contrib.ReduceLROnPlateauState):
    return last.scale[...]  # an array, or in an nnx.Optimizer the Variable's value
  return 1.0


def scale_by_keras_adam(
  b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7
) -> optax.GradientTransformation:
  """Adam's direction as Keras computes it: sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps).

  With `optax.scale_by_learning_rate(lr)` after it, the update of Keras' `Adam` (see the
  module docstring): every array shaped like its parameter, t counting from 1. It is
  `optax.scale_by_adam` with eps / sqrt(1 - b2^t) for eps, the same optax steps in the
  same order (so XLA compiles it alike in a single run and in an ensemble's member loop),
  and the same state, `optax.ScaleByAdamState`.
  """

  def init_fn(params):
    # Two trees of their own: one array in both would be donated twice by the train step.
    return optax.ScaleByAdamState(
      count=jnp.zeros([], jnp.int32),
      mu=optax.tree.zeros_like(params),
      nu=optax.tree.zeros_like(params),
    )

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    eps_t = eps / jnp.sqrt(1 - b2 ** count.astype(jnp.float32))
    direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps_t), mu_hat, nu_hat)
    return direction, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)
