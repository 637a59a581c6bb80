"""The data-parallel step on 1, 2 and 4 forced host devices equals the unsharded step.

conftest.py forces 4 CPU devices. The reference is a plain `jax.jit` on one device
with the same global batch; loss, gradients (not only Adam-updated parameters, since
Adam hides a constant gradient scale) and updated parameters must match.
"""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from capsjax.data import input_pipeline
from capsjax import optim
from capsjax import parallel
from capsjax import steps as steps_lib
from tests import helpers


def _setup():
  config = helpers.smoke_config()
  info = input_pipeline.dataset_info("fashion_mnist")
  graphdef, state = steps_lib.create_model_and_optimizer(config, info, 10, jax.random.key(0))
  batch = helpers.synthetic_batch(8, seed=3)
  weights = steps_lib.LossWeights.from_config(config.loss)
  aug = steps_lib.AugmentSpec.from_config(config.augment)
  return config, graphdef, state, batch, weights, aug


def _close(a, b, rtol=2e-5, atol=1e-6):
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=rtol, atol=atol),
    jax.device_get(a),
    jax.device_get(b),
  )


def test_four_devices_forced():
  assert jax.device_count() == 4


@pytest.mark.parametrize("n", [1, 2, 4])
def test_sharded_step_matches_single_device(n):
  config, graphdef, state, batch, weights, aug = _setup()
  key = jax.random.key(7)
  schedule = optim.make_schedule(config.optim, 10)

  def grads_fn(state, batch, key):
    loss, aux, grads = steps_lib.loss_and_grads(
      graphdef, state, batch, key, weights=weights, aug=aug
    )
    return loss, grads

  def step_fn(state, batch, key):
    return steps_lib.train_step(
      graphdef, state, batch, key, weights=weights, aug=aug, schedule=schedule
    )

  ref_loss, ref_grads = jax.jit(grads_fn)(state, batch, key)
  ref_state, ref_metrics = jax.jit(step_fn)(state, batch, key)

  mesh = parallel.make_mesh(n)
  sh_state = parallel.replicate(state, mesh)
  sh_batch = parallel.shard_batch(batch, mesh)
  assert sh_batch["image"].sharding.num_devices == n
  loss, grads = parallel.jit_data_parallel(grads_fn, mesh)(sh_state, sh_batch, key)
  new_state, metrics = parallel.jit_data_parallel(step_fn, mesh)(sh_state, sh_batch, key)

  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  _close(grads, ref_grads)
  _close(metrics, ref_metrics)
  _close(new_state, ref_state)
  # The step really changed the parameters (so the comparison above is not vacuous).
  w_old = state[0]["digit_caps"]["w"][...]
  w_new = jax.device_get(new_state[0]["digit_caps"]["w"][...])
  assert np.abs(w_new - w_old).max() > 1e-5
  # Replicated outputs: every device holds the whole new state.
  leaf = jax.tree.leaves(new_state)[0]
  assert leaf.sharding.is_fully_replicated


def test_gradient_is_the_mean_not_the_sum():
  # Averaging over 4 devices must give the gradient of the mean loss, not 4x it: compare
  # with a finite difference of the unsharded loss along the gradient direction.
  config, graphdef, state, batch, weights, aug = _setup()
  mesh = parallel.make_mesh(4)
  key = jax.random.key(1)

  def loss_fn(state):
    return steps_lib.loss_and_grads(graphdef, state, batch, key, weights=weights, aug=aug)[0]

  def grads_fn(state, batch):
    return steps_lib.loss_and_grads(graphdef, state, batch, key, weights=weights, aug=aug)[2]

  grads = jax.device_get(
    parallel.jit_data_parallel(grads_fn, mesh)(
      parallel.replicate(state, mesh), parallel.shard_batch(batch, mesh)
    )
  )
  # Directional derivative along the whole (normalised) gradient: analytic = |g|.
  norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
  d = jax.tree.map(lambda g: g / norm, grads)
  eps = 3e-3

  def shift(sign):
    model = jax.tree.map(lambda x, di: x + sign * eps * di, state[0], d)
    return nnx.State({0: model, 1: state[1]})

  loss = jax.jit(loss_fn)
  fd = (loss(shift(1.0)) - loss(shift(-1.0))) / (2 * eps)
  # float32 central differences are good to a few %; a summed gradient would be 4x off.
  np.testing.assert_allclose(norm, fd, rtol=0.1)


def test_indivisible_batch_is_a_clear_error():
  mesh = parallel.make_mesh(4)
  with pytest.raises(
    ValueError, match=r"must be a positive multiple of the number of devices \(4\)"
  ):
    parallel.shard_batch(helpers.synthetic_batch(6), mesh)
  with pytest.raises(ValueError, match=r"config.batch_size=10 must be a positive multiple"):
    parallel.check_batch_size(10, mesh, name="config.batch_size")
  with pytest.raises(ValueError, match=r"num_devices must be in \[1, 4\], got 5"):
    parallel.make_mesh(5)
