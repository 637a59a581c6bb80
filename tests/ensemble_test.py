"""K-member ensembles (`capsjax.ensemble`) against the single runs they stand for.

Tiny `:smoke` models on 3 steps of synthetic uint8 data, on a mesh of 4 forced CPU
devices (each member's batch of 8 split 2 per device), against `steps.make_steps` runs of
each member's config (`SINGLES`):
  - members computed one after another (`vmap_size=1`, the CPU default), with their own
    seeds and learning rates, run each single run's program: losses, metrics and
    parameters equal bit for bit, also in the scanned chunk, in evaluation and for a
    frozen member;
  - vectorised members (`vmap_size=K`, the accelerator default), with their own learning
    rates and reconstruction weights, equal to rounding (tolerances derived at
    `_ROUNDING_RTOL`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capsjax import ensemble
from capsjax import ensemble_memory
from capsjax import errors
from capsjax import losses
from capsjax import parallel
from capsjax import steps as steps_lib
from capsjax.data import input_pipeline
from tests import helpers

STEPS = 3
BATCH = 8
SPE = STEPS  # steps per epoch of the 24 synthetic examples.
INFO = input_pipeline.dataset_info("fashion_mnist")


@dataclasses.dataclass
class Run:
  """A run's per-step aux (host) and its state after each step (host)."""

  aux: list[dict[str, np.ndarray]]
  states: list


def _data():
  rng = np.random.default_rng(7)
  images = rng.integers(0, 256, (SPE * BATCH, 28, 28, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, SPE * BATCH).astype(np.int32)
  return images, labels


# The single runs the members are compared with: (seed, learning rate, recon weight).
SINGLES = {"A": (0, 1e-3, 0.392), "B": (1, 3e-3, 0.392), "C": (0, 3e-3, 0.1)}


def _config(name):
  seed, lr, rw = SINGLES[name]
  return helpers.smoke_config(seed=seed, **{"optim.learning_rate": lr, "loss.recon_weight": rw})


def _configs(*overrides):
  return [helpers.smoke_config(seed=m, **o) for m, o in enumerate(overrides)]


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh(4)


@pytest.fixture(scope="module")
def singles(mesh):
  """{name in SINGLES: Run} of the plain single-run step."""
  images, labels = _data()
  out = {}
  for name in SINGLES:
    config = _config(name)
    init_key, aug_key = jax.random.split(jax.random.key(config.seed))  # as train.setup.
    graphdef, state = steps_lib.create_model_and_optimizer(config, INFO, SPE, init_key)
    train_fn, _ = steps_lib.make_steps(graphdef, config, SPE, mesh)
    state, run = parallel.replicate(state, mesh), Run([], [])
    for batch in input_pipeline.train_batches(
      images, labels, batch_size=BATCH, seed=config.seed, epoch=0
    ):
      state, aux = train_fn(state, parallel.shard_batch(batch, mesh), aug_key)
      run.aux.append(jax.device_get(aux))
      run.states.append(jax.device_get(state))
    out[name] = run
  return out


def _train(configs, mesh, vmap_size=None):
  """(Run of the ensemble, graphdef, initial host state, aug keys, train_fn, eval_fn)."""
  images, labels = _data()
  graphdef, state, keys = ensemble.init_members(configs, INFO, SPE)
  state0 = jax.device_get(state)
  train_fn, eval_fn = ensemble.make_ensemble_steps(
    graphdef, configs, SPE, mesh, vmap_size=vmap_size
  )
  state, run = parallel.replicate(state, mesh), Run([], [])
  active = jnp.ones(len(configs), bool)
  seeds = [c.seed for c in configs]
  for batch in ensemble.train_batches(images, labels, batch_size=BATCH, seeds=seeds, epoch=0):
    state, aux = train_fn(state, parallel.shard_member_batch(batch, mesh), keys, active)
    run.aux.append(jax.device_get(aux))
    run.states.append(jax.device_get(state))
  return run, graphdef, state0, keys, train_fn, eval_fn


@pytest.fixture(scope="module")
def seeds_run(mesh):
  """Members A and B (seeds 0 and 1, learning rates 1e-3 and 3e-3), one after another."""
  configs = [_config("A"), _config("B")]
  return (configs, *_train(configs, mesh, vmap_size=1))


def test_members_in_a_loop_are_their_single_runs_bit_for_bit(seeds_run, singles):
  _, run, *_ = seeds_run
  for m, name in enumerate("AB"):
    single = singles[name]
    for t in range(STEPS):
      assert set(run.aux[t]) == set(single.aux[t])
      for k, v in single.aux[t].items():
        np.testing.assert_array_equal(run.aux[t][k][m], v, err_msg=f"member {m} step {t} {k}")
      jax.tree.map(
        np.testing.assert_array_equal, ensemble.member_state(run.states[t], m), single.states[t]
      )
  # The members did train apart, each at its own rate.
  assert run.aux[0]["loss"][0] != run.aux[0]["loss"][1]
  np.testing.assert_allclose(run.aux[0]["learning_rate"], [1e-3, 3e-3], rtol=1e-7)


# Vectorised members sum in another order than the single run (XLA batches the convs and
# matmuls over members), and a traced reconstruction weight is not folded into constants
# as the single run's is, so results agree to rounding, not bit for bit:
#   - loss, grad_norm, accuracy of one step from equal parameters: float32 rounding (unit
#     u = 2^-24) of sums of up to n = 1296 terms (PrimaryCaps' 9*9*16 contraction) is at most
#     n*u = 7.7e-5 of the summed magnitudes; rtol 1e-4.
#   - parameters: rounding moves a component's Adam update lr*m/sqrt(v) by lr*|dg/g| for a
#     gradient g off by dg, which is tiny next to lr except for components whose gradient is
#     itself at rounding level. Allow 1% of lr per step; a wrong batch, key, rate or weight
#     moves every component by O(lr) per step.
_ROUNDING_RTOL = 1e-4
_UPDATE_SHARE = 0.01


def test_vectorised_members_with_own_rate_and_weight_match_their_single_runs(mesh, singles):
  # Both seed 0 (a sweep): C's rate 3e-3 and reconstruction weight 0.1, A's 1e-3 and 0.392.
  run, *_ = _train([_config("C"), _config("A")], mesh, vmap_size=2)
  for m, name in enumerate("CA"):
    single, lr = singles[name], SINGLES[name][1]
    for t in range(STEPS):
      for k, v in single.aux[t].items():
        np.testing.assert_allclose(run.aux[t][k][m], v, rtol=_ROUNDING_RTOL, err_msg=f"{m} {t} {k}")
      atol = _UPDATE_SHARE * lr * (t + 1)
      jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=0, atol=atol),
        ensemble.member_state(run.states[t], m)[0],  # the model's parameters.
        single.states[t][0],
      )
  np.testing.assert_allclose(run.aux[0]["learning_rate"], [3e-3, 1e-3], rtol=1e-7)


def test_frozen_member_keeps_its_state_bit_for_bit(seeds_run, mesh):
  _, run, _, _, keys, train_fn, _ = seeds_run
  images, labels = _data()
  before = run.states[-1]
  batch = next(ensemble.train_batches(images, labels, batch_size=BATCH, seeds=[0, 1], epoch=1))
  state, aux = train_fn(
    parallel.replicate(before, mesh),
    parallel.shard_member_batch(batch, mesh),
    keys,
    jnp.array([True, False]),
  )
  state = jax.device_get(state)
  jax.tree.map(
    np.testing.assert_array_equal, ensemble.member_state(state, 1), ensemble.member_state(before, 1)
  )
  # The active member trained; the frozen one's metrics are still computed.
  assert not np.array_equal(state[0]["conv1"]["kernel"][0], before[0]["conv1"]["kernel"][0])
  assert np.all(np.isfinite(aux["loss"]))


def test_scanned_chunk_equals_per_step_training(seeds_run, mesh):
  configs, run, graphdef, state0, keys, *_ = seeds_run
  images, labels = _data()
  chunk = ensemble.make_ensemble_chunk(graphdef, configs, SPE, mesh, max_steps=STEPS, vmap_size=1)
  indices = ensemble.epoch_batch_indices(len(labels), batch_size=BATCH, seeds=[0, 1], epoch=0)
  assert indices.shape == (2, SPE, BATCH)
  state, aux = chunk(
    parallel.replicate(state0, mesh),
    parallel.put_dataset(images, labels, mesh),
    parallel.put_member_batch_indices(indices, mesh),
    np.int32(0),
    np.int32(STEPS),
    keys,
    jnp.ones(2, bool),
  )
  aux = jax.device_get(aux)
  for k in run.aux[0]:
    assert aux[k].shape == (STEPS, 2)
    np.testing.assert_array_equal(aux[k], np.stack([a[k] for a in run.aux]), err_msg=k)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), run.states[-1])


def test_evaluation_equals_single_run_evaluation(seeds_run, mesh):
  configs, run, graphdef, *_, eval_fn = seeds_run
  images, labels = _data()
  images, labels = images[:20], labels[:20]  # a padded last batch (20 = 16 + 4).
  members = ensemble.Members.from_configs(configs, SPE)
  state = parallel.replicate(run.states[-1], mesh)
  got = ensemble.evaluate(
    eval_fn,
    state,
    images,
    labels,
    batch_size=16,
    mesh=mesh,
    weights=members.weights,
  )
  # The eval step reads only the loss weights, which A and B share: one program serves both.
  _, single_eval = steps_lib.make_steps(graphdef, configs[0], SPE, mesh)
  for m, config in enumerate(configs):
    want = steps_lib.evaluate_split(
      single_eval,
      parallel.replicate(ensemble.member_state(run.states[-1], m), mesh),
      images,
      labels,
      batch_size=16,
      mesh=mesh,
      weights=losses.LossWeights.from_config(config.loss, config.num_epochs * SPE),
    )
    assert got[m] == want, m
    assert want["count"] == 20


def test_stack_and_member_state_round_trip(seeds_run):
  _, run, *_ = seeds_run
  state = run.states[0]
  parts = [ensemble.member_state(state, m) for m in range(2)]
  assert ensemble.num_members(state) == 2
  jax.tree.map(np.testing.assert_array_equal, ensemble.stack_states(parts), state)


def test_check_packable():
  ensemble.check_packable(
    _configs({}, {"optim.learning_rate": 3e-3, "optim.decay_rate": 0.5, "loss.recon_weight": 0.1})
  )
  for field in ("optim.learning_rate", "optim.decay_rate", "loss.recon_weight", "seed"):
    assert field in ensemble.packable_fields()
  with pytest.raises(errors.ConfigError, match=r"config\.model\.routing_iterations differs"):
    ensemble.check_packable(_configs({}, {}, {"model.routing_iterations": 3}))
  with pytest.raises(errors.ConfigError, match=r"config\.batch_size differs .*member 1"):
    ensemble.check_packable(_configs({}, {"batch_size": 16, "num_epochs": 3}))
  with pytest.raises(errors.ConfigError, match="at least one"):
    ensemble.check_packable([])


def test_members_trace_only_the_loss_weights_that_differ():
  members = ensemble.Members.from_configs([_config("C"), _config("A")], SPE, vmap_size=1)
  assert list(members.loss) == ["recon_weight"]
  np.testing.assert_array_equal(members.loss["recon_weight"], np.float32([0.1, 0.392]))
  # Host-side weights keep the configs' Python floats, as the single runs' do.
  assert [w.recon_weight for w in members.weights] == [0.1, 0.392]
  assert [float(s(0)) for s in members.schedules] == pytest.approx([3e-3, 1e-3], rel=1e-7)
  assert ensemble.Members.from_configs([_config("A"), _config("B")], SPE).loss == {}


def test_vmap_size():
  assert ensemble.resolve_vmap_size(None, 4) == 1  # CPU: one member after another.
  assert ensemble.resolve_vmap_size(8, 4) == 4
  with pytest.raises(ValueError, match="vmap_size"):
    ensemble.resolve_vmap_size(0, 4)


def test_memory_estimate_grows_with_members_and_check_fits(mesh):
  config = helpers.smoke_config()
  graphdef, state = steps_lib.create_model_and_optimizer(config, INFO, SPE, jax.random.key(0))
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  fit = ensemble_memory.memory_fit(
    graphdef, config, state, (BATCH, 28, 28, 1), mesh, available=10**12
  )
  # Each member adds at least its state: input and (donated, aliased) output.
  assert fit.per_member >= state_bytes
  assert fit.first >= state_bytes
  fit = dataclasses.replace(fit, available=fit.bytes_for(2) + fit.per_member // 2)
  assert fit.max_members == 2
  ensemble_memory.check_fits(fit, 2)
  with pytest.raises(
    errors.ConfigError, match=r"3 ensemble members need .*at most 2 members fit"
  ) as e:
    ensemble_memory.check_fits(fit, 3)
  assert "\n" not in str(e.value)
  assert dataclasses.replace(fit, available=fit.first - 1).max_members == 0
