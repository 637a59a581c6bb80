"""Two `jax.distributed` CPU processes (gloo collectives, 1 device each) on 127.0.0.1 train
the `:smoke` config; both must end with identical parameters, equal to one process
driving 2 devices, and only process 0 writes metrics/config files."""

import os
import socket

import numpy as np
import pytest

from experiments import fault_injection as fi

CONFIG = "configs/fashion.py:smoke"
OVERRIDES = ("--config.dataset=mnist", "--config.train_examples=32", "--config.num_epochs=1")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _log(path):
  with open(path) as f:
    return f.read()[-3000:]


@pytest.mark.slow
def test_two_processes_match_one_process_with_two_devices(tmp_path):
  cache = str(tmp_path / "jax_cache")
  port = _free_port()
  procs = []
  for pid in range(2):
    env = fi.child_env(
      devices=1, cache_dir=cache, mock_examples=48, dump_dir=str(tmp_path / "dist_params")
    )
    cmd = fi.child_cmd(
      CONFIG,
      str(tmp_path / "dist"),
      *OVERRIDES,
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={pid}",
    )
    procs.append(fi.start(cmd, env, str(tmp_path / f"dist{pid}.log")))
  for pid, p in enumerate(procs):
    assert p.wait(timeout=300) == 0, _log(tmp_path / f"dist{pid}.log")
  log0 = _log(tmp_path / "dist0.log")
  assert "4 steps/epoch on 2 device(s) in 2 process(es)" in log0
  assert "epoch 1: validation accuracy" in log0 and "test accuracy" in log0
  assert "epoch 1: validation accuracy" not in _log(tmp_path / "dist1.log")  # printed once.

  env = fi.child_env(
    devices=2, cache_dir=cache, mock_examples=48, dump_dir=str(tmp_path / "single_params")
  )
  p = fi.start(
    fi.child_cmd(CONFIG, str(tmp_path / "single"), *OVERRIDES), env, str(tmp_path / "single.log")
  )
  assert p.wait(timeout=300) == 0, _log(tmp_path / "single.log")

  p0 = fi.final_params(str(tmp_path / "dist_params"), process=0)
  p1 = fi.final_params(str(tmp_path / "dist_params"), process=1)
  single = fi.final_params(str(tmp_path / "single_params"))
  assert fi.diverges(p0, p1) is None
  for k in single:
    np.testing.assert_allclose(p0[k], single[k], rtol=1e-6, atol=1e-7, err_msg=k)
  # One checkpoint and one metrics file, written by process 0 (Orbax coordinates saves).
  assert sorted(os.listdir(tmp_path / "dist" / "checkpoints")) == ["4"]
  rows = _log(tmp_path / "dist" / "metrics.csv").splitlines()
  assert len([r for r in rows if ",test," in r]) == 1
