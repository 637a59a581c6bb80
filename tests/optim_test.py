"""capsjax.optim's Adam: the Keras epsilon convention against Keras' update formula in
NumPy, the optax convention against optax's own Adam, and which recipes use which."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import config_dict

from capsjax import errors
from capsjax import optim
from capsjax.run import config as run_config
from configs import capsnet_fashion_mnist
from configs import common
from configs import efficient_capsnet
from configs import fashion
from configs import kmnist


def _keras_adam(params, grads, lr, eps, b1=0.9, b2=0.999):
  """Keras' `Adam.get_updates`, step by step in float64: p -= lr_t * m / (sqrt(v) + eps)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, g in enumerate(grads, start=1):
    lr_t = lr * np.sqrt(1.0 - b2**t) / (1.0 - b1**t)
    for k in p:
      m[k] = b1 * m[k] + (1.0 - b1) * g[k]
      v[k] = b2 * v[k] + (1.0 - b2) * np.square(g[k])
      p[k] = p[k] - lr_t * m[k] / (np.sqrt(v[k]) + eps)
  return p


def _run(tx, params, grads):
  """The parameters after the updates, and the updates' sum in float64 (free of the
  rounding of float32 parameters near 1, which is larger than a small step's error)."""
  state = tx.init(params)
  total = jax.tree.map(lambda x: np.zeros(x.shape, np.float64), params)
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    total = jax.tree.map(lambda s, u: s + np.asarray(u, np.float64), total, updates)
  return params, total


def _problem(scale):
  rng = np.random.default_rng(0)
  params = {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}
  grads = [
    {k: (scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in params.items()}
    for _ in range(6)
  ]
  return params, grads


@pytest.mark.parametrize("eps", [1e-8, 1e-7])
@pytest.mark.parametrize("scale", [1.0, 1e-7])
def test_keras_convention_is_keras_update_formula(eps, scale):
  """Six steps at lr 1e-3, for ordinary gradients and for gradients as small as eps (the
  regime where the conventions part), against Keras' formula in float64."""
  params, grads = _problem(scale)
  cfg = config_dict.ConfigDict({"adam_epsilon": eps, "adam_epsilon_convention": "keras"})
  _, moved = _run(optim.adam(1e-3, cfg, 1), jax.tree.map(jnp.asarray, params), grads)
  want = _keras_adam(params, grads, 1e-3, eps)
  # float32 arithmetic, as in Keras: 1 - b2^t cancels, so its float32 rounding grows by
  # 1 / (1 - b2^t) (~170x at step 6); at gradients of 1e-7 the two conventions' steps
  # differ by a factor of 2 to 15 (test below).
  rtol = 2 * np.finfo(np.float32).eps / (1 - 0.999 ** len(grads))
  for k in params:
    expected = want[k] - params[k]
    np.testing.assert_allclose(moved[k], expected, rtol=rtol, atol=1e-6 * np.abs(expected).max())


def test_the_conventions_differ_where_the_gradients_are_as_small_as_epsilon():
  """With gradients of 1e-7, optax's first step is up to 31.6x Keras' (eps 1e-8): Keras'
  effective epsilon at step 1 is eps / sqrt(1 - 0.999) = 31.6 eps."""
  params, grads = _problem(1e-7)
  keras = config_dict.ConfigDict({"adam_epsilon": 1e-8, "adam_epsilon_convention": "keras"})
  plain = config_dict.ConfigDict({"adam_epsilon": 1e-8, "adam_epsilon_convention": "optax"})
  p = jax.tree.map(jnp.asarray, params)
  k_step = _run(optim.adam(1e-3, keras, 1), p, grads[:1])[1]["w"]
  o_step = _run(optim.adam(1e-3, plain, 1), p, grads[:1])[1]["w"]
  g = np.abs(grads[0]["w"].astype(np.float64))
  # Step 1 of either: lr * g / (|g| + eps_effective); the ratio follows for each entry.
  ratio = (g + 1e-8 / np.sqrt(1 - 0.999)) / (g + 1e-8)
  np.testing.assert_allclose(np.abs(o_step) / np.abs(k_step), ratio, rtol=1e-3)
  assert ratio.min() > 1.1  # a real difference, not rounding.


def test_optax_convention_is_optax_adam():
  params, grads = _problem(1.0)
  cfg = config_dict.ConfigDict({"adam_epsilon": 1e-8, "adam_epsilon_convention": "optax"})
  p = jax.tree.map(jnp.asarray, params)
  got, want = _run(optim.adam(1e-3, cfg, 1), p, grads)[0], _run(optax.adam(1e-3), p, grads)[0]
  for k in params:
    np.testing.assert_array_equal(got[k], want[k])
  # The same state tree either way: a checkpoint has one layout whatever the convention.
  keras = config_dict.ConfigDict({"adam_epsilon": 1e-8, "adam_epsilon_convention": "keras"})
  assert jax.tree.structure(optim.adam(1e-3, keras, 1).init(p)) == jax.tree.structure(
    optax.adam(1e-3).init(p)
  )


def test_keras_recipes_use_keras_adam_and_the_rest_optax():
  for config, eps in (
    (fashion.get_config(), 1e-8),
    (capsnet_fashion_mnist.get_config(), 1e-8),
    (kmnist.get_config(), 1e-7),  # tf.keras
  ):
    assert (config.optim.adam_epsilon_convention, config.optim.adam_epsilon) == ("keras", eps)
  # Efficient-CapsNet trains with tf.keras' Adam, floored at 5e-5 from epoch 76 on.
  eff = efficient_capsnet.get_config()
  assert (eff.optim.adam_epsilon_convention, eff.optim.adam_epsilon) == ("keras", 1e-7)
  lr = optim.make_schedule(eff.optim, steps_per_epoch=10)
  np.testing.assert_allclose(
    [float(lr(10 * e)) for e in (0, 10, 75, 76, 149)],
    [5e-4, 5e-4 * 0.97**10, 5e-4 * 0.97**75, 5e-5, 5e-5],
    rtol=5e-6,  # float32(0.97) is 3e-8 (relative) off, 75 times over at epoch 75.
  )
  assert 5e-4 * 0.97**75 > 5e-5 > 5e-4 * 0.97**76  # where their max(., 5e-5) takes over.
  # The CPU demo is PyTorch-style throughout (its figures in RESULTS.md ran with optax's).
  assert fashion.get_config("quick").optim.adam_epsilon_convention == "optax"
  base = common.get_base_config()
  assert (base.optim.adam_epsilon_convention, base.optim.adam_epsilon) == ("optax", 1e-8)
  # A config.json written before the fields existed trained with optax's Adam.
  saved = run_config.with_legacy_defaults({"optim": {"learning_rate": 1e-3}})
  assert saved["optim"]["adam_epsilon_convention"] == "optax"
  assert saved["optim"]["adam_epsilon"] == 1e-8


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("adam_epsilon", 0.0, "config.optim.adam_epsilon must be a finite number > 0, got 0.0"),
    (
      "adam_epsilon_convention",
      "torch",
      "config.optim.adam_epsilon_convention must be one of ('optax', 'keras'), got 'torch'",
    ),
  ],
)
def test_bad_epsilon_fields_are_named(field, value, message):
  cfg = common.get_base_config().optim
  cfg[field] = value
  with pytest.raises(errors.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    optim.validate(cfg)


def _torch_reduce_on_plateau(epoch_accuracies, lr, *, patience, factor, min_lr=0.0):
  """PyTorch's ReduceLROnPlateau(mode='max', threshold=1e-4 'rel', cooldown 0, eps 1e-8)
  written out: the rate each epoch trains at, stepped with the epoch's mean accuracy."""
  best, bad, rates = -np.inf, 0, []
  for acc in epoch_accuracies:
    rates.append(lr)
    if acc > best * (1 + 1e-4):
      best, bad = acc, 0
    else:
      bad += 1
    if bad > patience:
      new = max(lr * factor, min_lr)
      if lr - new > 1e-8:
        lr = new
      bad = 0
  return rates


def test_plateau_schedule_is_pytorchs_reduce_lr_on_plateau():
  """yl-1993's matrix-capsule recipe: ReduceLROnPlateau(optimizer, 'max', patience=1) on
  the epoch's mean training accuracy, stepped after each epoch of 3 steps here."""
  cfg = common.get_base_config().optim
  cfg.plateau_patience, cfg.plateau_factor = 1, 0.1
  steps = 3
  # Batch accuracies per epoch: improving, flat (two bad epochs -> x0.1), one bad epoch
  # then better, a rise of 5e-5 (under PyTorch's 1e-4 relative threshold: bad), ...
  epochs = [
    [0.5, 0.6, 0.7],
    [0.7, 0.7, 0.7],
    [0.6, 0.7, 0.8],
    [0.7, 0.7, 0.7],
    [0.8, 0.8, 0.8],
    [0.8, 0.8, 0.80015],
    [0.8, 0.8, 0.8],
    [0.9, 0.9, 0.9],
    [0.9, 0.9, 0.9],
    [0.9, 0.9, 0.9],
  ]
  # One more epoch gives the rate after the last one.
  accuracies = [np.mean(e) for e in epochs] + [0.0]
  expected = _torch_reduce_on_plateau(accuracies, 1.0, patience=1, factor=0.1)
  np.testing.assert_allclose(sorted(set(expected), reverse=True), [1.0, 0.1, 0.01, 0.001])
  # A constant gradient makes Adam's direction 1 (to eps): each update is -rate.
  tx = optim.adam(1.0, cfg, steps)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  grads = {"w": jnp.ones(2)}
  update = jax.jit(lambda s, v: tx.update(grads, s, params, value=v))
  for e, accs in enumerate(epochs):
    for i, acc in enumerate(accs):
      updates, state = update(state, 1.0 - acc)
      rate = -float(updates["w"][0])
      scale = optim.plateau_scale(state)
      last = i == steps - 1
      next_rate = expected[e + 1]
      # optax applies a reduction to the update that ends the epoch; PyTorch from the
      # next epoch on.
      want = next_rate if last else expected[e]
      np.testing.assert_allclose(rate, want, rtol=1e-4, err_msg=f"epoch {e} step {i}")
      np.testing.assert_allclose(scale, want, rtol=1e-6)
  assert optim.plateau_scale(optim.adam(1.0, common.get_base_config().optim, 3).init(params)) == 1


def test_plateau_fields_are_validated():
  for field, value, message in (
    ("plateau_patience", -1, "plateau_patience must be an int >= 0"),
    ("plateau_patience", 1.5, "plateau_patience must be an int >= 0"),
    ("plateau_factor", 1.0, "plateau_factor must be in \\(0, 1\\), got 1.0"),
    ("plateau_min_scale", 2.0, "plateau_min_scale must be in \\[0, 1\\], got 2.0"),
  ):
    cfg = common.get_base_config().optim
    with cfg.ignore_type():
      cfg[field] = value
    with pytest.raises(errors.ConfigError, match=message):
      optim.validate(cfg)
