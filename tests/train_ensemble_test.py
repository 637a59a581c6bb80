"""`--config.seeds`: several members as one program, each written as its single run.

`:smoke` on TFDS mock MNIST (32 training examples, batch 8: 4 steps per epoch). Member k
must see the batches and draws of the single run with seed k; resume must be exact after
an interruption at any point, including between two members' saves.
"""

import csv
import json
import os
import shutil

import jax
import numpy as np
import pytest

from capsjax import errors
from capsjax import main
from capsjax import metrics as metrics_lib
from capsjax import steps as steps_lib
from capsjax import train
from capsjax import train_ensemble
from capsjax.data import input_pipeline
from capsjax.run import checkpoint as ckpt_lib
from capsjax.run import processes
from tests import helpers

mock = helpers.mock_mnist_fixture()

# Columns that time the run; every other column must match.
_TIMING = {"images_per_s", "wall_s", "seconds"}


def _rows(path):
  with open(path) as f:
    return [{k: v for k, v in r.items() if k not in _TIMING} for r in csv.DictReader(f)]


def _params(workdir):
  """(step, leaves of the model and optimizer state) of the latest checkpoint."""
  config = helpers.mnist_smoke_config()
  info = input_pipeline.dataset_info("mnist")
  _, state = steps_lib.create_model_and_optimizer(config, info, 4, jax.random.key(0))
  with ckpt_lib.Checkpointer(workdir, read_only=True) as c:
    restored, _, step = c.restore_latest(state)
  return step, jax.tree.leaves(jax.device_get(restored))


def _config(**overrides):
  return helpers.mnist_smoke_config(**{"val_examples": 8, **overrides})


def _ensemble(workdir, seeds="0,1", **overrides):
  return main.run(_config(seeds=seeds, **overrides), workdir)


@pytest.mark.parametrize("loop", ["step", "scan"])
def test_members_equal_their_single_runs(mock, tmp_path, loop):
  del mock
  summary = _ensemble(str(tmp_path / "ens"), num_epochs=2, loop=loop)
  for seed in (0, 1):
    single = str(tmp_path / f"single{seed}")
    train.train_and_evaluate(_config(seed=seed, num_epochs=2, loop=loop), single)
    member = str(tmp_path / "ens" / f"seed-{seed}")
    a, b = _rows(os.path.join(member, "epochs.csv")), _rows(os.path.join(single, "epochs.csv"))
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == ["1", "2"]
    for ra, rb in zip(a, b, strict=True):
      for k in ra:
        # Accuracies count the same examples; losses may differ in the last float32
        # bits (vmap may reorder reductions), printed with 6 significant digits.
        np.testing.assert_allclose(float(ra[k] or 0), float(rb[k] or 0), rtol=2e-5, err_msg=k)
    with open(os.path.join(member, "config.json")) as f:
      saved = json.load(f)
    assert saved["seed"] == seed and saved["seeds"] == ""
    step_a, leaves_a = _params(member)
    step_b, leaves_b = _params(single)
    assert step_a == step_b == 8
    for x, y in zip(leaves_a, leaves_b, strict=True):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    s = summary["members"][f"seed-{seed}"]
    with open(os.path.join(single, "summary.json")) as f:
      single_summary = json.load(f)
    assert s["final_test_accuracy"] == pytest.approx(single_summary["final_test_accuracy"])
  accs = [summary["members"][f"seed-{s}"]["final_test_accuracy"] for s in (0, 1)]
  assert summary["final_test_accuracy"]["mean"] == pytest.approx(np.mean(accs))
  assert summary["final_test_accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
  with open(tmp_path / "ens" / "summary.json") as f:
    assert json.load(f)["final_test_accuracy"]["n"] == 2


@pytest.mark.parametrize("loop", ["step", "scan"])
def test_resume_is_exact_even_between_members_saves(mock, tmp_path, loop):
  del mock
  full = str(tmp_path / "full")
  _ensemble(full, num_epochs=3, loop=loop)
  cut = str(tmp_path / "cut")
  _ensemble(cut, num_epochs=2, loop=loop)
  # A kill between the members' saves of step 8: seed-1 saved it, seed-0 did not.
  shutil.rmtree(os.path.join(cut, "seed-0", "checkpoints", "8"))
  _ensemble(cut, num_epochs=3, loop=loop)
  # seed-1 went back to step 4 with seed-0; its step 8 was set aside (kept) so that it
  # could save step 8 again.
  assert os.listdir(os.path.join(cut, "seed-1", "checkpoints-superseded")) == ["8"]
  for seed in (0, 1):
    a, b = os.path.join(full, f"seed-{seed}"), os.path.join(cut, f"seed-{seed}")
    assert _rows(os.path.join(a, "epochs.csv")) == _rows(os.path.join(b, "epochs.csv"))
    assert _rows(os.path.join(a, "metrics.csv")) == _rows(os.path.join(b, "metrics.csv"))
    (step_a, leaves_a), (step_b, leaves_b) = _params(a), _params(b)
    assert step_a == step_b == 12
    for x, y in zip(leaves_a, leaves_b, strict=True):
      np.testing.assert_array_equal(x, y)


def test_a_preemption_mid_epoch_resumes_to_the_same_rows(mock, tmp_path, monkeypatch):
  """A stop in the middle of epoch 2: each member's checkpoint keeps its running means,
  so the resumed ensemble writes the rows of an uninterrupted one."""
  del mock
  full = str(tmp_path / "full")
  _ensemble(full, num_epochs=3)
  cut = str(tmp_path / "cut")
  # The per-step loop asks once per step whether to stop: the 6th answer is step 6.
  calls = []

  def stop_at_step_6(self):
    calls.append(1)
    return len(calls) == 6

  monkeypatch.setattr(processes.StopFlag, "anywhere", stop_at_step_6)
  with pytest.raises(processes.Preempted, match=r"at step 6 \(epoch 1.50\)"):
    _ensemble(cut, num_epochs=3)
  monkeypatch.undo()
  for seed in (0, 1):
    assert "6" in os.listdir(os.path.join(cut, f"seed-{seed}", "checkpoints"))
  _ensemble(cut, num_epochs=3)
  for seed in (0, 1):
    a, b = os.path.join(full, f"seed-{seed}"), os.path.join(cut, f"seed-{seed}")
    assert _rows(os.path.join(a, "epochs.csv")) == _rows(os.path.join(b, "epochs.csv"))
    assert _params(a)[0] == _params(b)[0] == 12


def test_non_finite_member_is_frozen_and_the_other_trains_on(mock, tmp_path):
  del mock
  good, bad = _config(seed=0, num_epochs=2), _config(seed=1, num_epochs=2)
  bad.optim.learning_rate = 1e30  # diverges in its first steps.
  dirs = [str(tmp_path / "good"), str(tmp_path / "bad")]
  summaries = train_ensemble.train_ensemble([good, bad], dirs)
  assert "non-finite" in summaries[1]["stopped"]
  with open(os.path.join(dirs[1], train_ensemble.STOPPED_NAME)) as f:
    assert "non-finite" in json.load(f)["reason"]
  single = str(tmp_path / "single")
  train.train_and_evaluate(_config(seed=0, num_epochs=2), single)
  assert summaries[0]["final_test_accuracy"] == pytest.approx(
    json.load(open(os.path.join(single, "summary.json")))["final_test_accuracy"]
  )
  assert len(_rows(os.path.join(dirs[0], "epochs.csv"))) == 2
  bad_rows = _rows(os.path.join(dirs[1], "metrics.csv"))
  # Rerun: the frozen member stays frozen with its records, the finished one is not
  # retrained.
  again = train_ensemble.train_ensemble([good, bad], dirs)
  assert again[1]["stopped"] == summaries[1]["stopped"]
  assert again[1]["step"] == summaries[1]["step"]
  assert _rows(os.path.join(dirs[1], "metrics.csv")) == bad_rows
  assert again[0]["final_test_accuracy"] == summaries[0]["final_test_accuracy"]
  # The ensemble's statistics leave the unfinished member out.
  agg = metrics_lib.aggregate_summaries(again, names=["good", "bad"])
  assert agg["final_test_accuracy"]["n"] == 1
  # Every member non-finite: the run fails as a single run would.
  worse = _config(seed=2, num_epochs=2)
  worse.optim.learning_rate = 1e30
  with pytest.raises(errors.NonFiniteLossError, match="every ensemble member"):
    train_ensemble.train_ensemble([bad, worse], [str(tmp_path / "b1"), str(tmp_path / "b2")])


def test_eval_and_init_from_take_a_member(mock, tmp_path):
  del mock
  workdir = str(tmp_path / "ens")
  summary = _ensemble(workdir, num_epochs=1)
  member = os.path.join(workdir, "seed-1")
  result = main.run(_config(seed=1, mode="eval"), member)
  assert result["accuracy"] == pytest.approx(summary["members"]["seed-1"]["final_test_accuracy"])
  results = main.run(_config(seeds="0,1", mode="eval"), workdir)
  assert [r["accuracy"] for r in results] == pytest.approx(
    [summary["members"][f"seed-{s}"]["final_test_accuracy"] for s in (0, 1)]
  )
  ft = train.train_and_evaluate(_config(num_epochs=1, init_from=member), str(tmp_path / "finetune"))
  assert ft["step"] == 4


def test_other_seeds_in_a_used_workdir_are_refused(mock, tmp_path):
  del mock
  workdir = str(tmp_path / "ens")
  _ensemble(workdir, num_epochs=1)
  with pytest.raises(errors.WorkdirError, match=r"seeds: '0,1' \(saved\) vs '0,2' \(now\)"):
    _ensemble(workdir, seeds="0,2", num_epochs=1)


def test_a_refused_change_leaves_every_config_json_as_it_was(mock, tmp_path):
  del mock
  workdir = str(tmp_path / "ens")
  _ensemble(workdir, num_epochs=1)
  paths = [os.path.join(workdir, d, "config.json") for d in ("", "seed-0", "seed-1")]

  def saved():
    return [open(p, "rb").read() for p in paths] + [
      sorted(n for n in os.listdir(os.path.dirname(p)) if n.startswith("config.json.prev"))
      for p in paths
    ]

  before = saved()
  with pytest.raises(errors.CheckpointMismatchError):
    _ensemble(workdir, num_epochs=2, resume_with_changes="model", **{"model.digit_dim": 4})
  assert saved() == before
  # A change that holds is written to every config.json once the members have saved.
  summary = _ensemble(
    workdir,
    num_epochs=2,
    resume_with_changes="optim.learning_rate",
    **{"optim.learning_rate": 5e-4},
  )
  assert summary["members"]["seed-0"]["step"] == 8
  for p in paths:
    with open(p) as f:
      assert json.load(f)["optim"]["learning_rate"] == 5e-4
    kept = [n for n in os.listdir(os.path.dirname(p)) if n.startswith("config.json.previous-")]
    assert len(kept) == 1, p


@pytest.mark.parametrize(
  "seeds, message",
  [
    ("0,x", r"config.seeds must be comma-separated integers"),
    ("1,1", r"config.seeds must be distinct"),
    ("-1,2", r"config.seeds must lie in \[0, 2\*\*32\)"),
  ],
)
def test_bad_seeds_are_one_line_errors(tmp_path, seeds, message):
  with pytest.raises(errors.ConfigError, match=message):
    main.run(_config(seeds=seeds), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_keep_checkpoints_below_two_is_refused(tmp_path):
  with pytest.raises(errors.ConfigError, match="keep_checkpoints=1"):
    main.run(_config(seeds="0,1", keep_checkpoints=1), str(tmp_path / "w"))


def test_a_member_that_stops_early_stops_where_its_single_run_does(mock, tmp_path):
  del mock
  overrides = dict(num_epochs=4, early_stop_epochs=1)
  summary = _ensemble(str(tmp_path / "ens"), **overrides)
  for seed in (0, 1):
    single = str(tmp_path / f"single{seed}")
    s = train.train_and_evaluate(_config(seed=seed, **overrides), single)
    m = summary["members"][f"seed-{seed}"]
    assert m["early_stopped"] == s["early_stopped"]
    assert m["step"] == s["step"]
    member = str(tmp_path / "ens" / f"seed-{seed}")
    assert [r["epoch"] for r in _rows(os.path.join(member, "epochs.csv"))] == [
      r["epoch"] for r in _rows(os.path.join(single, "epochs.csv"))
    ]
  assert any(summary["members"][f"seed-{s}"]["early_stopped"] for s in (0, 1)), (
    "the test needs a member that stops early: change the overrides"
  )
