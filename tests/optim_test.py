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
  _, moved = _run(optim.adam(1e-3, cfg), jax.tree.map(jnp.asarray, params), grads)
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
  k_step = _run(optim.adam(1e-3, keras), p, grads[:1])[1]["w"]
  o_step = _run(optim.adam(1e-3, plain), p, grads[:1])[1]["w"]
  g = np.abs(grads[0]["w"].astype(np.float64))
  # Step 1 of either: lr * g / (|g| + eps_effective); the ratio follows for each entry.
  ratio = (g + 1e-8 / np.sqrt(1 - 0.999)) / (g + 1e-8)
  np.testing.assert_allclose(np.abs(o_step) / np.abs(k_step), ratio, rtol=1e-3)
  assert ratio.min() > 1.1  # a real difference, not rounding.


def test_optax_convention_is_optax_adam():
  params, grads = _problem(1.0)
  cfg = config_dict.ConfigDict({"adam_epsilon": 1e-8, "adam_epsilon_convention": "optax"})
  p = jax.tree.map(jnp.asarray, params)
  got, want = _run(optim.adam(1e-3, cfg), p, grads)[0], _run(optax.adam(1e-3), p, grads)[0]
  for k in params:
    np.testing.assert_array_equal(got[k], want[k])
  # The same state tree either way: a checkpoint has one layout whatever the convention.
  keras = config_dict.ConfigDict({"adam_epsilon": 1e-8, "adam_epsilon_convention": "keras"})
  assert jax.tree.structure(optim.adam(1e-3, keras).init(p)) == jax.tree.structure(
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
