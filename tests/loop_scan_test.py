"""The scanned training loop (`config.loop='scan'`) equals the per-step loop bit for bit.

`steps.train_chunk` against `steps.make_steps`' step on 1 and 4 forced devices, then whole
`:smoke` runs on TFDS mock MNIST (32 examples / batch 8 = 4 steps per epoch): the same
parameters, metrics.csv and epochs.csv rows, also after a stop and resume in the middle
of a chunk; two jax.distributed processes (equal to float tolerance, as gloo's all-reduce
is); and the conv weight gradient that made the loops equal on XLA:CPU. The SIGTERM in the
middle of a chunk, in a real subprocess, is in train_resume_test.py.
"""

import csv
import json
import os
import signal
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capsjax import loop as loop_lib
from capsjax.run import checkpoint as ckpt_lib
from capsjax import conv
from capsjax import errors
from capsjax.data import input_pipeline
from capsjax import parallel
from capsjax.run import processes
from capsjax import steps as steps_lib
from capsjax import train
from tests import helpers

mock = helpers.mock_mnist_fixture()

# Columns that time the run; every other column must match between the loops.
_TIMING = {"images_per_s", "wall_s", "seconds"}


def _chunk_plan_data():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (44, 28, 28, 1), dtype=np.uint8)  # 44 % 8: 4 dropped.
  labels = rng.integers(0, 10, 44)
  return images, labels


@pytest.mark.parametrize("n", [1, 4])
def test_chunks_equal_steps(n):
  # Two epochs of 5 steps as chunks of 3, 2 | 1, 4 (one starting mid-epoch, one of
  # max_steps) against one jitted step per host batch.
  config = helpers.smoke_config()
  info = input_pipeline.dataset_info("fashion_mnist")
  images, labels = _chunk_plan_data()
  spe = input_pipeline.steps_per_epoch(len(labels), config.batch_size)
  assert spe == 5
  graphdef, state0 = steps_lib.create_model_and_optimizer(config, info, spe, jax.random.key(0))
  state0 = jax.device_get(state0)  # host copies: each loop donates its own device state.
  key = jax.random.key(3)
  mesh = parallel.make_mesh(n)

  train_fn, _ = steps_lib.make_steps(graphdef, config, spe, mesh)
  state, ref_metrics = parallel.replicate(state0, mesh), []
  for epoch in range(2):
    for batch in input_pipeline.train_batches(
      images, labels, batch_size=8, seed=config.seed, epoch=epoch
    ):
      state, m = train_fn(state, parallel.shard_batch(batch, mesh), key)
      ref_metrics.append(m)
  ref = jax.device_get(state)
  ref_metrics = jax.device_get(ref_metrics)

  chunk = steps_lib.make_train_chunk(graphdef, config, spe, mesh, max_steps=4)
  data = parallel.put_dataset(images, labels, mesh)
  assert data["image"].dtype == np.uint8 and data["image"].sharding.is_fully_replicated
  state, metrics = parallel.replicate(state0, mesh), []
  for epoch, plan in ((0, [(0, 3), (3, 2)]), (1, [(0, 1), (1, 4)])):
    indices = parallel.put_batch_indices(
      input_pipeline.epoch_batch_indices(len(labels), batch_size=8, seed=config.seed, epoch=epoch),
      mesh,
    )  # [5, 8]
    for start, steps in plan:
      state, stacked = chunk(state, data, indices, np.int32(start), np.int32(steps), key)
      stacked = jax.device_get(stacked)
      assert all(v.shape == (4,) for v in stacked.values())
      metrics += [{k: v[i] for k, v in stacked.items()} for i in range(steps)]
  got = jax.device_get(state)

  jax.tree.map(np.testing.assert_array_equal, got, ref)
  assert len(metrics) == len(ref_metrics) == 10
  for a, b in zip(metrics, ref_metrics, strict=False):
    assert a == b
  # Ten Adam steps moved the parameters: the comparison is not of two initial states.
  assert np.abs(got[0]["digit_caps"]["w"][...] - state0[0]["digit_caps"]["w"][...]).max() > 0


@pytest.mark.parametrize("impl", ["hybrid", "winograd"])
def test_conv1_weight_gradient_has_the_same_bits_in_a_loop_body(impl):
  # XLA:CPU rewrites a weight-gradient conv into Eigen's layout only at a program's top
  # level; conv.py writes the stride-1 one out so that a loop body computes the same.
  rng = np.random.default_rng(0)
  x = rng.random((8, 28, 28, 1), np.float32)  # [B, H, W, C_in]
  w = rng.standard_normal((9, 9, 1, 16)).astype(np.float32)  # [kh, kw, C_in, C_out]
  g = rng.standard_normal((8, 20, 20, 16)).astype(np.float32)  # [B, Ho, Wo, C_out]

  def dw(x, w):
    return jax.vjp(lambda w: conv.conv2d(x, w, impl=impl), w)[1](g)[0]

  def in_loop(x, w, n):
    return jax.lax.fori_loop(0, n, lambda i, acc: acc + dw(x, w), jnp.zeros_like(w))

  top = jax.jit(dw)(x, w)
  np.testing.assert_array_equal(jax.jit(in_loop)(x, w, 1), top)
  # Against XLA's own transpose of the conv (what the step compiled to before): same bits.
  ref = jax.jit(lambda x, w: jax.vjp(lambda w: conv.conv2d(x, w, impl="xla"), w)[1](g)[0])
  np.testing.assert_array_equal(top, ref(x, w))


def test_epoch_batch_indices_are_train_batches():
  images, labels = _chunk_plan_data()
  indices = input_pipeline.epoch_batch_indices(44, batch_size=8, seed=5, epoch=2)
  assert indices.shape == (5, 8) and indices.dtype == np.int32
  batches = list(input_pipeline.train_batches(images, labels, batch_size=8, seed=5, epoch=2))
  for idx, batch in zip(indices, batches, strict=False):
    np.testing.assert_array_equal(batch["label"], labels[idx])
    np.testing.assert_array_equal(batch["image"], input_pipeline.to_float(images[idx]))


def _run(workdir, **overrides):
  config = helpers.mnist_smoke_config(
    **{"data_dir": os.path.join(workdir, "..", "tfds"), "num_epochs": 3, **overrides}
  )
  return train.train_and_evaluate(config, workdir)


def _params(workdir):
  config = helpers.mnist_smoke_config()
  info = input_pipeline.dataset_info("mnist")
  _, state = steps_lib.create_model_and_optimizer(config, info, 4, jax.random.key(0))
  restored, _, step = ckpt_lib.Checkpointer(workdir, read_only=True).restore_latest(state)
  return jax.device_get(restored), step


def _rows(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return [{k: v for k, v in r.items() if k not in _TIMING} for r in csv.DictReader(f)]


def _assert_same_run(workdir, reference):
  (params, step), (ref_params, ref_step) = _params(workdir), _params(reference)
  assert step == ref_step == 12
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  for name in ("metrics.csv", "epochs.csv"):
    assert _rows(workdir, name) == _rows(reference, name), name


@pytest.fixture(scope="module")
def step_run(tmp_path_factory, mock):
  del mock
  workdir = str(tmp_path_factory.mktemp("step") / "run")
  _run(workdir, loop="step")
  return workdir


def test_scan_run_equals_step_run_on_4_devices(tmp_path, mock, step_run):
  assert jax.device_count() == 4
  workdir = str(tmp_path / "scan")
  # log_every_steps=3 against 4 steps per epoch: chunks end at log steps (3, 6, 9) and
  # at epoch ends (4, 8, 12), so they are 3, 1, 2, 1, 1, 2, 1, 1 steps long.
  summary = _run(workdir, loop="scan", log_every_steps=3)
  assert summary["step"] == 12
  (params, _), (ref_params, _) = _params(workdir), _params(step_run)
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  train_steps = [int(r["step"]) for r in _rows(workdir, "metrics.csv") if r["split"] == "train"]
  assert train_steps == [3, 4, 6, 8, 9, 12]
  assert _rows(workdir, "epochs.csv") == _rows(step_run, "epochs.csv")


def test_scan_run_matches_row_for_row(tmp_path, mock, step_run):
  workdir = str(tmp_path / "scan")
  _run(workdir, loop="scan", scan_chunk_steps=1)  # smoke logs every 2 steps.
  _assert_same_run(workdir, step_run)


@pytest.mark.slow
def test_scan_run_equals_step_run_on_1_device(tmp_path, mock, monkeypatch):
  real = parallel.make_mesh
  monkeypatch.setattr(parallel, "make_mesh", lambda num_devices=None: real(1))
  _run(str(tmp_path / "step"), loop="step")
  _run(str(tmp_path / "scan"), loop="scan")
  _assert_same_run(str(tmp_path / "scan"), str(tmp_path / "step"))


def test_resume_in_the_middle_of_a_chunk_is_bit_identical(tmp_path, mock, step_run, monkeypatch):
  # A run stopped after step 5 (chunks of 1 step), resumed in chunks of up to 2 steps
  # (smoke logs every 2): its chunks 5-6, 6-8, ... cut across those of an uninterrupted
  # scanned run (4-6, 6-8) and of the per-step reference.
  real = steps_lib.make_train_chunk
  steps_run = [0]

  def make_train_chunk(*args, **kwargs):
    chunk_fn = real(*args, **kwargs)

    def hooked(state, data, indices, start, num_steps, key):
      out = chunk_fn(state, data, indices, start, num_steps, key)
      steps_run[0] += int(num_steps)
      if steps_run[0] == 5:  # a SIGTERM while the chunk ending at step 5 runs.
        os.kill(os.getpid(), signal.SIGTERM)
      return out

    return hooked

  workdir = str(tmp_path / "run")
  monkeypatch.setattr(steps_lib, "make_train_chunk", make_train_chunk)
  with pytest.raises(processes.Preempted, match=r"at step 5 \(epoch 1.25\)"):
    _run(workdir, loop="scan", scan_chunk_steps=1)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "5"]
  monkeypatch.setattr(steps_lib, "make_train_chunk", real)
  summary = _run(workdir, loop="scan")
  (params, step), (ref_params, _) = _params(workdir), _params(step_run)
  assert step == 12
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)

  # Evaluations match row for row. (Train rows after the resume average from step 6, not
  # 5, as after any mid-interval resume.)
  def evals(w):
    return [r for r in _rows(w, "metrics.csv") if r["split"] != "train"]

  assert evals(workdir) == evals(step_run)
  with open(os.path.join(step_run, "summary.json")) as f:
    assert summary["accuracy"] == json.load(f)["accuracy"]


def test_chunk_ends_fall_on_log_steps_epoch_ends_and_bounds():
  plan = dict(steps_per_epoch=7, log_every=5, max_steps=4)
  ends, step = [], 0
  while step < 21:
    step = loop_lib.chunk_end(step, seconds=10.0, step_seconds=0.1, **plan)
    ends.append(step)
  # Log steps 5, 10, 15, 20; epoch ends 7, 14, 21; at most 4 steps.
  assert ends == [4, 5, 7, 10, 14, 15, 19, 20, 21]
  # 4 s a step against a 10 s bound: 2 steps a chunk.
  assert loop_lib.chunk_end(0, seconds=10.0, step_seconds=4.0, **plan) == 2
  # A step longer than the bound still makes progress.
  assert loop_lib.chunk_end(0, seconds=10.0, step_seconds=60.0, **plan) == 1
  # Speed not known yet: one step. No time bound (several processes): none.
  assert loop_lib.chunk_end(0, seconds=10.0, step_seconds=None, **plan) == 1
  assert loop_lib.chunk_end(0, seconds=None, step_seconds=60.0, **plan) == 4


def test_loop_settings_are_checked(tmp_path):
  for overrides, message in (
    ({"loop": "fast"}, r"config.loop must be one of \('auto'"),
    ({"scan_chunk_steps": -1}, "config.scan_chunk_steps must be"),
    ({"scan_chunk_seconds": 0.0}, "config.scan_chunk_seconds must be"),
  ):
    with pytest.raises(errors.ConfigError, match=message):
      train.train_and_evaluate(helpers.smoke_config(**overrides), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
  assert parallel.resolve_loop("scan") == "scan" and parallel.resolve_loop("step") == "step"
  assert parallel.resolve_loop("auto") == "step"  # on CPU (benchmarks/epoch_loop.py).


@pytest.mark.slow
def test_two_processes_scanning_match_one_process_stepping(tmp_path):
  # jax.distributed (gloo, 1 CPU device per process): the set is placed on every process's
  # devices, chunks end at the same steps everywhere (no time bound), stop flags are
  # compared at chunk ends.
  from experiments import fault_injection as fi  # pylint: disable=g-import-not-at-top

  config = "configs/fashion.py:smoke"
  overrides = ("--config.dataset=mnist", "--config.train_examples=32", "--config.num_epochs=1")
  cache = str(tmp_path / "jax_cache")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = []
  for pid in range(2):
    env = fi.child_env(
      devices=1, cache_dir=cache, mock_examples=48, dump_dir=str(tmp_path / "dist_params")
    )
    cmd = fi.child_cmd(
      config,
      str(tmp_path / "dist"),
      *overrides,
      "--config.loop=scan",
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={pid}",
    )
    procs.append(fi.start(cmd, env, str(tmp_path / f"dist{pid}.log")))
  for pid, p in enumerate(procs):
    with open(tmp_path / f"dist{pid}.log") as f:
      assert p.wait(timeout=300) == 0, f.read()[-3000:]
  env = fi.child_env(
    devices=2, cache_dir=cache, mock_examples=48, dump_dir=str(tmp_path / "single_params")
  )
  p = fi.start(
    fi.child_cmd(config, str(tmp_path / "single"), *overrides, "--config.loop=step"),
    env,
    str(tmp_path / "single.log"),
  )
  assert p.wait(timeout=300) == 0
  p0 = fi.final_params(str(tmp_path / "dist_params"), process=0)
  p1 = fi.final_params(str(tmp_path / "dist_params"), process=1)
  single = fi.final_params(str(tmp_path / "single_params"))
  assert fi.diverges(p0, p1) is None
  # Gloo's all-reduce against one process's: equal to float tolerance (as main_distributed_test).
  for k in single:
    np.testing.assert_allclose(p0[k], single[k], rtol=1e-6, atol=1e-7, err_msg=k)
