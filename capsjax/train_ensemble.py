"""Several seeds (or learning rates, loss weights) trained as one program.

`train_seeds(config, workdir)` is what `--config.seeds=0,1,2` runs: one member per seed,
each written to `WORKDIR/seed-<s>/` exactly as the single run with that seed writes its
workdir (config.json, checkpoints, metrics.csv, epochs.csv, TensorBoard, plots,
summary.json), so `mode=eval`, `capsjax.visualize` and `init_from` take a member's
directory like any run's. `WORKDIR/summary.json` adds the members' mean and standard
deviation. `train_ensemble(configs, dirs)` is the same for any configs that
`ensemble.check_packable` accepts (`experiments.sweep --parallel`).

The members move in lockstep through one jitted step (`capsjax.ensemble`); everything
between steps follows `capsjax.train`, per member. A member whose loss turns non-finite,
or that stops early, is reported and frozen (its state masked, its records closed) while
the others go on; a non-finite member keeps its last good checkpoint and a `stopped.json`
saying why. Rerunning the command resumes every member from the newest step all the
training members have saved, so an ensemble killed at any point (even between two
members' saves) ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from typing import Any, Sequence

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from capsjax import ensemble
from capsjax import ensemble_memory
from capsjax import errors
from capsjax import loop as loop_lib
from capsjax import metrics as metrics_lib
from capsjax import models
from capsjax import parallel
from capsjax import setup
from capsjax import train
from capsjax.data import input_pipeline
from capsjax.run import checkpoint as ckpt_lib
from capsjax.run import config as run_config
from capsjax.run import processes
from capsjax.run import workdir as workdir_lib

STOPPED_NAME = "stopped.json"
# Curves are redrawn at most this often (and at the end): K plots an epoch would cost
# more than a GPU epoch of a small CapsNet.
PLOT_EVERY_S = 60.0


def member_name(seed: int) -> str:
  """The directory of seed `seed`'s member under an ensemble's workdir."""
  return f"seed-{seed}"


def member_configs(config) -> list:
  """One single-run config per seed of `config.seeds` (`seed` set, `seeds` emptied)."""
  out = []
  for seed in run_config.seeds(config):
    member = config.copy_and_resolve_references()
    with member.unlocked():
      member.seed = seed
      member.seeds = ""
    out.append(member)
  return out


def train_seeds(config, workdir: str) -> dict[str, Any]:
  """Trains one member per seed of `config.seeds` under `workdir`; returns the summary.

  `workdir/config.json` records the ensemble's config (a rerun with other seeds is
  refused as for any run-defining change); each member's directory is a single run's.
  """
  run_config.validate_config(config, num_devices=jax.device_count())
  configs = member_configs(config)
  if not configs:
    raise errors.ConfigError("config.seeds is empty: capsjax.train trains a single run")
  _check_ensemble(configs)
  workdir = workdir_lib.resolve(workdir)
  dirs = [os.path.join(workdir, member_name(c.seed)) for c in configs]
  for c, d in zip(configs, dirs, strict=True):
    workdir_lib.check_init_from(c, d)
  with contextlib.ExitStack() as stack:
    # Every lock before any check: a run already training in a member's directory is
    # refused before the ensemble's config check could move that directory aside.
    for d in [workdir, *dirs]:
      stack.enter_context(workdir_lib.lock(d))
    record = workdir_lib.check_config(config, workdir)
    summaries = _check_and_train(configs, dirs, record)
    summary = metrics_lib.aggregate_summaries(
      summaries, names=[member_name(c.seed) for c in configs]
    )
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
      print(metrics_lib.format_aggregate(summary), flush=True)
    return summary


def train_ensemble(configs: Sequence[Any], dirs: Sequence[str]) -> list[dict[str, Any]]:
  """Trains `configs[m]` into `dirs[m]` for every m as one program; returns their summaries.

  Each config is checked as a single run's, then together (`ensemble.check_packable`);
  each directory is guarded as a single run's workdir (`workdir.check_config`).
  """
  if len(configs) != len(dirs) or len(set(map(os.path.abspath, dirs))) != len(dirs):
    raise errors.ConfigError(
      f"an ensemble needs one distinct directory per member: {len(configs)} configs, "
      f"directories {list(dirs)}"
    )
  for config in configs:
    run_config.validate_config(config, num_devices=jax.device_count())
  _check_ensemble(configs)
  dirs = [workdir_lib.resolve(d) for d in dirs]
  for c, d in zip(configs, dirs, strict=True):
    workdir_lib.check_init_from(c, d)
  with contextlib.ExitStack() as stack:
    for d in dirs:
      stack.enter_context(workdir_lib.lock(d))
    return _check_and_train(list(configs), dirs)


def _check_ensemble(configs: Sequence[Any]) -> None:
  """Raises ConfigError unless the (each valid) configs can train as one ensemble."""
  for config in configs:
    if config.keep_checkpoints < 2:
      # Members save one after another: a member's previous checkpoint is the common
      # step to resume from when a kill lands between two members' saves.
      raise errors.ConfigError(
        f"config.keep_checkpoints={config.keep_checkpoints}: an ensemble keeps at least 2"
      )
  ensemble.check_packable(configs)


def _check_and_train(
  configs: list, dirs: list[str], root: workdir_lib.ConfigRecord | None = None
) -> list[dict[str, Any]]:
  """Guards each member's (locked) directory as a single run's workdir, then trains.

  `root`: the ensemble directory's config record, committed with the first member's.
  """
  records = [workdir_lib.check_config(c, d) for c, d in zip(configs, dirs, strict=True)]
  return _train(configs, dirs, records, root)


@dataclasses.dataclass(kw_only=True)
class _Member:
  """One member's records: where it writes, what it has seen, whether it still trains."""

  config: Any
  workdir: str
  record: workdir_lib.ConfigRecord  # its config.json, while a resume's changes are pending.
  ckpt: ckpt_lib.Checkpointer
  history: train.History
  step: int = 0  # the member's own step: the ensemble's, or where it was frozen.
  stopped: str = ""  # why it was frozen ("" = training).
  writer: metrics_lib.MetricWriter | None = None
  means: loop_lib.TrainMeans | None = None
  resume_means: dict | None = None  # the running means a mid-epoch checkpoint kept.
  last_test: dict | None = None  # test metrics of its last evaluated epoch.

  @property
  def name(self) -> str:
    return os.path.basename(self.workdir)


def _train(
  configs: list,
  dirs: list[str],
  records: list[workdir_lib.ConfigRecord],
  root: workdir_lib.ConfigRecord | None,
) -> list[dict[str, Any]]:
  t_start = time.time()
  is_main = jax.process_index() == 0
  config = configs[0]  # every field but the per-member ones is shared.

  # ----------------------------------------------------------------------------------------
  # Data: one copy for every member (the validation split does not depend on the seed).
  # ----------------------------------------------------------------------------------------
  data = setup.load_splits(config)
  num_train = len(data.train[1])
  spe = input_pipeline.steps_per_epoch(num_train, config.batch_size)
  total_steps = config.num_epochs * spe

  # ----------------------------------------------------------------------------------------
  # Models, optimizers, mesh; the memory the K-member step needs.
  # ----------------------------------------------------------------------------------------
  info = input_pipeline.dataset_info(config.dataset)
  mesh = parallel.make_mesh()
  graphdef, stacked, aug_keys = ensemble.init_members(configs, info, spe)
  init_states = [ensemble.member_state(stacked, m) for m in range(len(configs))]
  num_params = models.count_params(nnx.merge(graphdef, init_states[0])[0])
  ensemble_memory.check_members_fit(
    graphdef, config, init_states[0], info.image_shape, len(configs), mesh
  )
  if is_main:
    print(
      f"CapsNet ensemble: {len(configs)} members ({', '.join(map(os.path.basename, dirs))}), "
      f"{num_params:,} parameters each; {info.name}: {num_train} train / "
      f"{len(data.val[1])} validation / {len(data.test[1])} test examples; {spe} steps/epoch "
      f"on {parallel.num_devices(mesh)} device(s) in {jax.process_count()} process(es)",
      flush=True,
    )

  on = setup.selection_split(config)
  members = [
    _Member(
      config=c,
      workdir=d,
      record=r,
      ckpt=ckpt_lib.Checkpointer(d, keep=c.keep_checkpoints, best_metric=f"{on}_accuracy"),
      history=train.History(on, c.early_stop_epochs),
    )
    for c, d, r in zip(configs, dirs, records, strict=True)
  ]
  metas = [setup.checkpoint_meta(m.config, info, spe) for m in members]

  def save(state, m: _Member, k: int, epoch: float, metrics: dict | None = None) -> None:
    # Mid-epoch (a preemption's save), the epoch's running means go with it.
    extra = {"train_means": m.means.state()} if m.step % spe else {}
    saved = m.ckpt.save(
      m.step,
      ensemble.member_state(state, k),
      dict(metas[k], epoch=epoch, history=m.history.epochs, **extra),
      metrics=metrics,
    )
    # A resume's changes hold once a checkpoint trained under them has landed.
    if saved and any(r.pending for r in (m.record, root) if r is not None):
      m.ckpt.wait()
      m.record.commit()
      if root is not None:
        root.commit()

  try:
    # --------------------------------------------------------------------------------------
    # Checkpoints: every member resumes from the newest step all training members have.
    # --------------------------------------------------------------------------------------
    states, step = _restore(members, init_states, spe)
    state = parallel.replicate(ensemble.stack_states(states), mesh)
    for m in members:
      # A member frozen as non-finite keeps every row it wrote, the divergence included.
      resume_step = None if m.stopped.startswith("non-finite") else m.step
      m.writer = metrics_lib.MetricWriter(m.workdir, enabled=is_main, resume_step=resume_step)
      m.means = loop_lib.TrainMeans(config.batch_size)
      m.means.resume(m.resume_means if step % spe else None)

    # --------------------------------------------------------------------------------------
    # The jitted steps and the loop that advances them.
    # --------------------------------------------------------------------------------------
    train_fn, eval_fn = ensemble.make_ensemble_steps(graphdef, configs, spe, mesh)
    weights = ensemble.Members.from_configs(configs, spe).weights

    def evaluate(state, images, labels) -> list[dict[str, float]]:
      return ensemble.evaluate(
        eval_fn,
        state,
        images,
        labels,
        batch_size=config.eval_batch_size,
        mesh=mesh,
        weights=weights,
      )

    ctx = loop_lib.LoopContext(
      config=config,
      images=data.train[0],
      labels=data.train[1],
      steps_per_epoch=spe,
      mesh=mesh,
      members=tuple(configs),
    )
    trainer = loop_lib.make_trainer(ctx, graphdef, train_fn, aug_keys, step)

    masks = {}  # one device copy per mask the run has had.

    def set_active() -> list[_Member]:
      mask = tuple(not m.stopped for m in members)
      if mask not in masks:
        masks[mask] = parallel.replicate(jnp.asarray(mask), mesh)
      trainer.active = masks[mask]
      return [m for m in members if not m.stopped]

    active = set_active()
    pending: list[tuple[int, dict]] = []  # (step, metrics [K]) not yet split per member.
    bar = None
    last_plot = time.time()

    # --------------------------------------------------------------------------------------
    # The loop: advance every training member, then whatever it is time for.
    # --------------------------------------------------------------------------------------
    try:
      with processes.StopFlag() as stop:
        while step < total_steps and active:
          if bar is None:
            bar = loop_lib.EpochBar(
              config, *divmod(step, spe), spe, enabled=config.progress_bar and is_main
            )
            if step % spe == 0:  # mid-epoch, the means go on from the checkpoints'.
              for m in members:
                m.means.start_epoch()
          state, values = trainer.advance(state, step)
          for v in values:
            step += 1
            pending.append((step, v))
          for m in active:
            m.step = step
          bar.tick(values[-1]["loss"], len(values))
          epoch_end = step % spe == 0
          if epoch_end or step % config.log_every_steps == 0:
            _split_pending(pending, members)
            _freeze_non_finite(members, spe, is_main)
            if epoch_end or jax.process_count() == 1:  # failed saves, as a single run.
              for m in members:
                m.ckpt.check_saves(block=epoch_end)
            training = [m for m in members if not m.stopped]
            logged = [m.means.take_interval() for m in training]
            for m, values_m in zip(training, logged, strict=True):
              m.writer.write(step, step / spe, "train", values_m)
            if logged:
              bar.show({k: float(np.mean([x[k] for x in logged])) for k in logged[0]})
            if not epoch_end and stop.anywhere():
              raise _save_and_stop(save, state, members, step, spe, stop.signal)
          elif trainer.stop_check_every_advance and stop.anywhere():
            _split_pending(pending, members)
            _freeze_non_finite(members, spe, is_main)  # never save a non-finite state.
            raise _save_and_stop(save, state, members, step, spe, stop.signal)
          active = set_active()
          if not epoch_end:
            continue

          # End of an epoch: evaluate every member, record the training ones, checkpoint.
          bar.close()
          bar = None
          epoch, epoch_end_t = step // spe, time.time()
          val_all = evaluate(state, *data.val) if len(data.val[1]) else None
          test_all = evaluate(state, *data.test)
          recorded = []
          for k, m in enumerate(members):
            if m.stopped:
              continue
            val_m, test_m = (None if val_all is None else val_all[k]), test_all[k]
            bad = train.non_finite_evaluation(val_m, test_m)
            if bad is not None:
              _freeze(m, f"non-finite {bad} after step {step}", is_main)
              continue
            epoch_s = epoch_end_t - m.means.epoch_t0
            m.history.epochs.append(train.history_entry(epoch, val_m, test_m))
            train.record_epoch(m.writer, m.history, epoch, step, epoch_s, m.means, val_m, test_m)
            m.last_test = test_m
            if is_main:
              print(f"{m.name} ", end="")
              train.print_epoch(epoch, val_m, test_m)
            recorded.append((k, m))
          stopping = step < total_steps and stop.anywhere()
          plot = time.time() - last_plot >= PLOT_EVERY_S or step == total_steps or stopping
          last_plot = time.time() if plot else last_plot
          for k, m in recorded:
            stopped_early = m.history.early_stopped()
            if train.checkpoint_due(config, epoch, step, total_steps, stopping, stopped_early):
              save(state, m, k, epoch, m.history.epochs[-1])
            if is_main and (plot or stopped_early):
              metrics_lib.plot_curves(
                m.writer.path,
                os.path.join(m.workdir, "plots", "curves.png"),
                title=f"CapsNet on {info.name} ({m.name})",
              )
            if stopped_early:
              m.stopped = (
                f"early stop: no better validation accuracy for {m.config.early_stop_epochs} "
                f"epochs since epoch {m.history.selected()['epoch']}"
              )
              if is_main:
                print(f"{m.name}: {m.stopped}", flush=True)
          active = set_active()
          if stopping and active:
            raise _preempted(members, step, spe, stop.signal)
    finally:
      for m in members:
        if m.writer is not None:
          m.writer.close()
  except BaseException:
    # Let saves already in flight (the last good checkpoints) finish before leaving.
    for m in members:
      try:
        m.ckpt.close()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("while stopping: %s", e)
    raise
  for m in members:
    m.ckpt.close()
    m.record.commit()
    if root is not None:
      root.commit()
    if is_main:  # the curves as they end (redrawn at most once a minute while training).
      metrics_lib.plot_curves(
        m.writer.path,
        os.path.join(m.workdir, "plots", "curves.png"),
        title=f"CapsNet on {info.name} ({m.name})",
      )

  # ----------------------------------------------------------------------------------------
  # Summaries: each member's as its single run's.
  # ----------------------------------------------------------------------------------------
  if any(m.last_test is None and not m.stopped.startswith("non-finite") for m in members):
    finals = evaluate(state, *data.test)  # nothing trained in this invocation: once.
    for k, m in enumerate(members):
      if m.last_test is None and not m.stopped.startswith("non-finite"):
        m.last_test = finals[k]
  summaries = []
  for m in members:
    final = m.last_test or _final_from_history(m, len(data.test[1]))
    summary = metrics_lib.summarize(
      m.history.epochs, dict(final, step=m.step, epochs=m.step / spe), on=on
    )
    summary["early_stopped"] = m.history.early_stopped()
    if m.stopped.startswith("non-finite"):
      summary["stopped"] = m.stopped
    summary["wall_s"] = time.time() - t_start
    if is_main:
      with open(os.path.join(m.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    summaries.append(summary)
  if all(m.stopped.startswith("non-finite") for m in members):
    raise errors.NonFiniteLossError(
      "every ensemble member stopped with a non-finite loss: "
      + "; ".join(f"{m.name}: {m.stopped}" for m in members)
    )
  return summaries


# ------------------------------------------------------------------------------------------
# The loop's helpers.
# ------------------------------------------------------------------------------------------
def _restore(members: list[_Member], init_states: list, steps_per_epoch: int) -> tuple[list, int]:
  """Each member's state and step; returns (states, the ensemble's step).

  A member frozen in an earlier invocation (early stop, `stopped.json`) resumes at its own
  last checkpoint and stays frozen. The training members resume at the newest step they
  all have, which a kill between two members' saves can leave older than some members'
  latest: those restore that older checkpoint.
  """
  states = []
  for m, init in zip(members, init_states, strict=True):
    state, step, meta = setup.restore_or_init(
      m.config, m.ckpt, init, steps_per_epoch=steps_per_epoch
    )
    m.history.epochs = [dict(h) for h in meta.get("history", [])]
    m.step, m.resume_means = step, meta.get("train_means")
    stopped_path = os.path.join(m.workdir, STOPPED_NAME)
    if m.history.early_stopped():
      m.stopped = "early stop (before this invocation)"
    elif os.path.exists(stopped_path):
      with open(stopped_path) as f:
        stopped = json.load(f)
      # Where it stood when it was frozen: its records go on past its last checkpoint.
      m.stopped = stopped["reason"]
      m.step, m.last_test = stopped["step"], stopped.get("last_test")
      m.history.epochs = stopped["history"]
    states.append(state)
  training = [k for k, m in enumerate(members) if not m.stopped]
  step = min((members[k].step for k in training), default=0)
  for k in training:
    m = members[k]
    if m.step == step:
      continue
    if step == 0:  # a member that never saved: every training member starts afresh.
      states[k], m.history.epochs = setup.initial_state(m.config, init_states[k]), []
      m.resume_means = None
    else:
      states[k], meta = m.ckpt.restore(step, init_states[k])
      setup.check_same_run(m.config, meta, f"{m.ckpt.directory}/{step}")
      setup.check_steps_per_epoch(meta, steps_per_epoch, f"{m.ckpt.directory}/{step}")
      m.history.epochs = [dict(h) for h in meta.get("history", [])]
      m.resume_means = meta.get("train_means")
    # It will save those steps again, and Orbax refuses a step at or below its latest.
    later = m.ckpt.set_aside_after(step)
    logging.info("%s: resuming at the ensemble's step %d (set aside: %s)", m.name, step, later)
    m.step = step
  return states, step


def _split_pending(pending: list[tuple[int, dict]], members: list[_Member]) -> None:
  """Moves the steps' [K] metrics into each training member's running means."""
  for at, values in jax.device_get(pending):
    for k, m in enumerate(members):
      if not m.stopped:
        m.means.add(at, {name: v[k] for name, v in values.items()})
  pending.clear()


def _freeze_non_finite(members: list[_Member], steps_per_epoch: int, is_main: bool) -> None:
  """Freezes every training member with a non-finite metric since the last check."""
  for m in members:
    if m.stopped:
      continue
    for at, values in m.means.take_recent():
      bad = metrics_lib.first_non_finite(values)
      if bad is not None:
        last = m.ckpt.latest_step()
        _freeze(
          m,
          f"non-finite {bad[0]}={bad[1]} at step {at} (epoch {at / steps_per_epoch:.2f}); "
          + (
            f"its last good checkpoint is {m.ckpt.directory}/{last}"
            if last is not None
            else "it wrote no checkpoint"
          ),
          is_main,
        )
        break


def _freeze(m: _Member, reason: str, is_main: bool) -> None:
  """Freezes a member for a non-finite value; `stopped.json` keeps it frozen on reruns."""
  m.stopped = reason
  if is_main:
    path = os.path.join(m.workdir, STOPPED_NAME)
    print(
      f"capsjax: member {m.name} frozen: {reason}; the others go on. To train it again "
      f"(e.g. with a lower learning rate), delete {path} and rerun that directory as a "
      "single run",
      flush=True,
    )
    with open(path, "w") as f:
      json.dump(
        {"reason": reason, "step": m.step, "last_test": m.last_test, "history": m.history.epochs},
        f,
      )


def _final_from_history(m: _Member, count: int) -> dict[str, float]:
  last = m.history.epochs[-1] if m.history.epochs else {}
  return {"accuracy": last.get("test_accuracy", math.nan), "count": count}


def _save_and_stop(save, state, members: list[_Member], step: int, steps_per_epoch: int, signum):
  """Saves every training member at `step` and closes the checkpointers; returns the
  exception that exits with 75."""
  for k, m in enumerate(members):
    if not m.stopped:
      save(state, m, k, step / steps_per_epoch)
  return _preempted(members, step, steps_per_epoch, signum)


def _preempted(members: list[_Member], step: int, steps_per_epoch: int, signum):
  for m in members:
    m.ckpt.close()
  by = f"signal {signum}" if signum else "a signal to another process"
  where = ", ".join(sorted({os.path.dirname(m.workdir) for m in members}))
  return processes.Preempted(
    f"stopped by {by} at step {step} (epoch {step / steps_per_epoch:.2f}); every training "
    f"member saved a checkpoint (under {where}). Rerun the same command to resume (exit "
    f"code {processes.PREEMPTED_EXIT_CODE})"
  )
