"""Training of CapsNet: `train_and_evaluate` (mode=eval hands over to `evaluate`).

The pieces live in their own modules: the pure steps (`steps`), config checks
(`run_config`), the workdir guard (`workdir`, which also describes the workdir's layout),
signals and processes (`processes`), checkpoints (`checkpoint`), metrics and logs
(`metrics`), how the loop advances (`loop`). This module is the driver: one flat loop with "is it time?" checks, and the
end-of-epoch work. Each turn of the loop runs one step (`config.loop='step'`, batches cut on
the host) or one chunk of steps as a single program on the devices ('scan'), with the same
results bit for bit; chunks end where the loop has work to do (log steps, epoch ends).

Model selection: with `config.val_examples > 0` a fixed part of the training split is held
out (`input_pipeline.split_validation`), and the kept "best" checkpoint, the selected epoch
and early stopping use validation accuracy only. Test accuracy is measured every epoch
for the record. With `val_examples = 0` (the reference recipes, to train on what they
trained on) selection falls back to test accuracy, as in the references, which used the
test set as their validation data, and every report says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

from absl import logging
from flax import nnx
import jax
import numpy as np

from capsjax.run import checkpoint as ckpt_lib
from capsjax import errors
from capsjax.data import input_pipeline
from capsjax import loop as loop_lib
from capsjax import metrics as metrics_lib
from capsjax import models
from capsjax import parallel
from capsjax.run import processes
from capsjax.run import config as run_config
from capsjax import steps as steps_lib
from capsjax.run import workdir as workdir_lib


# ----------------------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------------------
def _subset(images, labels, n: int):
  return (images[:n], labels[:n]) if n and n < len(labels) else (images, labels)


def load_data(config, split: str, limit: int):
  """uint8 images [N, H, W, C] and labels [N] of a split; its first `limit` if > 0."""
  images, labels = input_pipeline.load_split(
    config.dataset,
    split,
    data_dir=config.data_dir,
    manual_dir=config.manual_dir,
    download=config.download,
  )
  return _subset(images, labels, limit)


@dataclasses.dataclass(frozen=True)
class Splits:
  """uint8 images [N, H, W, C] and int labels [N] of the train, validation and test sets."""

  train: tuple[np.ndarray, np.ndarray]
  val: tuple[np.ndarray, np.ndarray]
  test: tuple[np.ndarray, np.ndarray]


def load_splits(config) -> Splits:
  """Train (less the validation split, then its first `train_examples`), val and test.

  The validation split is held out of the whole training split before `train_examples`
  subsets it, so it is the same for every `train_examples` and seed.
  """
  images, labels = load_data(config, "train", 0)
  train_images, train_labels, val_images, val_labels = input_pipeline.split_validation(
    images, labels, config.val_examples
  )
  if config.train_examples > len(train_labels):
    raise errors.ConfigError(
      f"config.train_examples={config.train_examples} exceeds the {len(train_labels)} "
      f"training examples of {config.dataset} (after holding out "
      f"config.val_examples={config.val_examples}); use 0 for all of them"
    )
  test = load_data(config, "test", config.eval_examples)
  if config.eval_examples > len(test[1]):
    raise errors.ConfigError(
      f"config.eval_examples={config.eval_examples} exceeds the {len(test[1])} test "
      f"examples of {config.dataset}; use 0 for all of them"
    )
  return Splits(
    train=_subset(train_images, train_labels, config.train_examples),
    val=(val_images, val_labels),
    test=test,
  )


# ----------------------------------------------------------------------------------------
# Set-up.
# ----------------------------------------------------------------------------------------
def selection_split(config) -> str:
  """'val' when the run holds out a validation split, else 'test' (as the references)."""
  return "val" if config.val_examples else "test"


def setup(config, steps_per_epoch: int):
  """(dataset info, mesh, graphdef, state, augmentation key, parameter count) of a run."""
  info = input_pipeline.dataset_info(config.dataset)
  mesh = parallel.make_mesh()
  for name in ("batch_size", "eval_batch_size"):
    try:
      parallel.check_batch_size(config[name], mesh, name=f"config.{name}")
    except ValueError as e:  # the message names the field and the device count.
      raise errors.ConfigError(str(e)) from e
  init_key, aug_key = jax.random.split(jax.random.key(config.seed))
  graphdef, state = steps_lib.create_model_and_optimizer(config, info, steps_per_epoch, init_key)
  logging.info(
    "mesh: %s over %d device(s): %s", dict(mesh.shape), parallel.num_devices(mesh), jax.devices()
  )
  model, _ = nnx.merge(graphdef, state)
  n_params = models.count_params(model)
  logging.info("CapsNet parameters: %s", f"{n_params:,}")
  return info, mesh, graphdef, state, aug_key, n_params


def restore_or_init(config, workdir: str, ckpt: ckpt_lib.Checkpointer, state):
  """Restores the latest checkpoint of `workdir`, or `init_from` weights, or keeps `state`.

  Returns (state, step, meta of the restored checkpoint or {}).
  """
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state, meta, step = restored
    logging.info("resumed from %s at step %d", ckpt.directory, step)
    return state, step, meta
  if config.init_from:
    src_dir, src_step = ckpt_lib.find_checkpoint(config.init_from)
    with ckpt_lib.Checkpointer(src_dir, read_only=True) as src:
      restored, _ = src.restore(src_step, state)
    # Only the weights: the optimizer (step count, moments) starts fresh.
    state = nnx.State({0: restored[0], 1: state[1]})
    logging.info("initialised weights from %s step %d", src.directory, src_step)
  return state, 0, {}


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir`) and evaluates on the whole test split.

  Returns the run's summary (final, selected and best-on-test accuracies). With
  `config.mode == 'eval'` it only evaluates a checkpoint and returns its test metrics.
  """
  run_config.validate_config(config)
  loop_lib.check_loop_config(config)
  if config.mode == "eval":
    # Imported here: capsjax.evaluate builds on this module's data and set-up helpers.
    from capsjax import evaluate  # pylint: disable=g-import-not-at-top

    return evaluate.evaluate_checkpoint(config, workdir)
  workdir = workdir_lib.resolve(workdir)
  with workdir_lib.lock(workdir):
    workdir_lib.check_config(config, workdir)
    return _train(config, workdir)


# ----------------------------------------------------------------------------------------
# The training loop.
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Run:
  """What the loop's helpers share: settings, data, and where results go."""

  config: Any
  workdir: str
  info: input_pipeline.DatasetInfo
  mesh: Any
  data: Splits
  steps_per_epoch: int
  ckpt: ckpt_lib.Checkpointer
  writer: metrics_lib.MetricWriter
  eval_fn: Callable
  meta: dict  # saved with every checkpoint, with `history` and `epoch`.
  # Per-epoch val/test accuracies, carried in every checkpoint's meta so that selection
  # and early stopping see the whole run after a resume, on every process.
  history: list[dict]
  is_main: bool

  @property
  def total_steps(self) -> int:
    return self.config.num_epochs * self.steps_per_epoch

  def save(self, state, step: int, epoch: float, metrics: dict | None = None) -> None:
    self.ckpt.save(step, state, dict(self.meta, epoch=epoch, history=self.history), metrics=metrics)

  def selected(self) -> dict | None:
    return metrics_lib.select(self.history, selection_split(self.config))

  def early_stopped(self) -> bool:
    patience, selected = self.config.early_stop_epochs, self.selected()
    return bool(
      patience
      and selected is not None
      and self.history[-1]["epoch"] - selected["epoch"] >= patience
    )

  def evaluate(self, state, images, labels) -> dict[str, float]:
    return steps_lib.evaluate(
      self.eval_fn,
      state,
      images,
      labels,
      batch_size=self.config.eval_batch_size,
      mesh=self.mesh,
      weights=steps_lib.LossWeights.from_config(self.config.loss),
    )

  def check_finite(self, recent: list[tuple[int, dict]]) -> None:
    """Raises NonFiniteLossError for the first non-finite metric of (step, metrics) pairs."""
    for at, values in jax.device_get(recent):
      bad = metrics_lib.first_non_finite(values)
      if bad is None:
        continue
      last = self.ckpt.latest_step()
      raise errors.NonFiniteLossError(
        f"non-finite {bad[0]}={bad[1]} at step {at} (epoch {at / self.steps_per_epoch:.2f}); "
        "training stopped without saving. "
        + (
          f"The last good checkpoint is {self.ckpt.directory}/{last}"
          if last is not None
          else "No checkpoint was written yet"
        )
        + f". To continue from it with a lower config.optim.learning_rate "
        f"(now {self.config.optim.learning_rate}), rerun with "
        "--config.optim.learning_rate=<lower> "
        "--config.resume_with_changes=optim.learning_rate; or start afresh with "
        "--config.overwrite=True (moves this run aside), or in a new --workdir with "
        "--config.init_from=<a good checkpoint> (weights only)"
      )

  def preempted(self, step: int, signum) -> processes.Preempted:
    self.ckpt.close()
    by = f"signal {signum}" if signum else "a signal to another process"
    return processes.Preempted(
      f"stopped by {by} at step {step} (epoch {step / self.steps_per_epoch:.2f}); "
      f"checkpoint saved in {self.ckpt.directory}/{step}. Rerun the same command to "
      f"resume (exit code {processes.PREEMPTED_EXIT_CODE})"
    )


def _train(config, workdir: str) -> dict[str, Any]:
  t_start = time.time()
  data = load_splits(config)
  num_train = len(data.train[1])
  steps_per_epoch = input_pipeline.steps_per_epoch(num_train, config.batch_size)
  if steps_per_epoch < 1:
    raise errors.ConfigError(
      f"config.batch_size={config.batch_size} is larger than the training set "
      f"({num_train} examples)"
    )
  info, mesh, graphdef, state, aug_key, n_params = setup(config, steps_per_epoch)
  is_main = jax.process_index() == 0
  if is_main:
    print(
      f"CapsNet: {n_params:,} parameters; {info.name}: {num_train} train / "
      f"{len(data.val[1])} validation / {len(data.test[1])} test examples; "
      f"{steps_per_epoch} steps/epoch on {parallel.num_devices(mesh)} device(s) in "
      f"{jax.process_count()} process(es)",
      flush=True,
    )
  ckpt = ckpt_lib.Checkpointer(
    workdir, keep=config.keep_checkpoints, best_metric=f"{selection_split(config)}_accuracy"
  )
  try:
    state, step, restored_meta = restore_or_init(config, workdir, ckpt, state)
    state = parallel.replicate(state, mesh)
    train_fn, eval_fn = steps_lib.make_steps(graphdef, config, steps_per_epoch, mesh)
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, resume_step=step)
    meta = {
      "dataset": config.dataset,
      "model": json.loads(config.model.to_json_best_effort()),
      "image_shape": list(info.image_shape),
      "num_classes": info.num_classes,
      "steps_per_epoch": steps_per_epoch,
    }
    run = _Run(
      config,
      workdir,
      info,
      mesh,
      data,
      steps_per_epoch,
      ckpt,
      writer,
      eval_fn,
      meta,
      [dict(h) for h in restored_meta.get("history", [])],
      is_main,
    )
    try:
      trainer = loop_lib.make_trainer(run, graphdef, train_fn, aug_key, step)
      state, step, test_metrics = _train_loop(run, state, step, trainer)
    finally:
      writer.close()
  except BaseException:
    # Let a save already in flight (the last good checkpoint) finish before leaving.
    try:
      ckpt.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("while stopping: %s", e)
    raise
  ckpt.close()
  if run.early_stopped() and is_main:
    print(
      f"early stop: no better validation accuracy for {config.early_stop_epochs} "
      f"epochs since epoch {run.selected()['epoch']}",
      flush=True,
    )
  if not test_metrics:  # Nothing left to train (a finished run rerun): evaluate once.
    test_metrics = run.evaluate(state, *data.test)
  summary = metrics_lib.summarize(
    run.history,
    dict(test_metrics, step=step, epochs=step / steps_per_epoch),
    on=selection_split(config),
  )
  summary["early_stopped"] = run.early_stopped()
  summary["wall_s"] = time.time() - t_start
  if is_main:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    print(metrics_lib.format_summary(summary, info.name), flush=True)
  return summary


def _train_loop(run: _Run, state, step: int, trainer):
  """Trains from `step` to the end; returns (state, step, last test metrics or {}).

  `trainer.advance(state, step)` runs one step or one chunk of steps; the rest (logging,
  NaN checks, evaluation, checkpoints, stopping) happens between advances.
  """
  config, steps_per_epoch = run.config, run.steps_per_epoch
  means = loop_lib.TrainMeans(config.batch_size)
  test_metrics: dict[str, float] = {}
  bar = None
  if run.early_stopped():  # a resumed run that had already stopped early.
    return state, step, test_metrics
  with processes.StopFlag() as stop:
    while step < run.total_steps:
      if bar is None:
        epoch, start = divmod(step, steps_per_epoch)
        bar = loop_lib.EpochBar(
          config, epoch, start, steps_per_epoch, enabled=config.progress_bar and run.is_main
        )
        means.start_epoch()
      state, values = trainer.advance(state, step)
      for v in values:
        step += 1
        means.add(step, v)
      bar.tick(values[-1]["loss"], len(values))
      epoch_end = step % steps_per_epoch == 0
      log_now = epoch_end or step % config.log_every_steps == 0
      if log_now:
        run.check_finite(means.take_recent())
        logged = means.take_interval()
        run.writer.write(step, step / steps_per_epoch, "train", logged)
        bar.show(logged)
      if not epoch_end:
        # Mid-epoch stop; at an epoch end the epoch's evaluation and checkpoint come first.
        if (log_now or trainer.stop_check_every_advance) and stop.anywhere():
          run.check_finite(means.take_recent())  # never checkpoint non-finite parameters.
          run.save(state, step, step / steps_per_epoch)
          raise run.preempted(step, stop.signal)
        continue
      bar.close()
      bar = None
      test_metrics = _end_of_epoch(run, state, step, means)
      # A run that has just stopped early is finished: a signal now must not ask for a
      # requeue (exit 75).
      stopping = step < run.total_steps and not run.early_stopped() and stop.anywhere()
      epoch_done = step // steps_per_epoch
      if (
        epoch_done % config.checkpoint_every_epochs == 0
        or step == run.total_steps
        or stopping
        or run.early_stopped()
      ):
        run.save(state, step, epoch_done, run.history[-1])
      if run.is_main:
        metrics_lib.plot_curves(
          run.writer.path,
          os.path.join(run.workdir, "plots", "curves.png"),
          title=f"CapsNet on {run.info.name}",
        )
      if stopping:
        raise run.preempted(step, stop.signal)
      if run.early_stopped():
        break
  return state, step, test_metrics


def _end_of_epoch(run: _Run, state, step: int, means: loop_lib.TrainMeans) -> dict[str, float]:
  """Evaluates on validation and test, records the epoch; returns the test metrics."""
  epoch_done = step // run.steps_per_epoch
  epoch_s = time.time() - means.epoch_t0
  val_images, val_labels = run.data.val
  val_metrics = run.evaluate(state, val_images, val_labels) if len(val_labels) else None
  test_metrics = run.evaluate(state, *run.data.test)
  for name, result in (("validation", val_metrics), ("test", test_metrics)):
    bad = None if result is None else metrics_lib.first_non_finite(result)
    if bad is not None:
      raise errors.NonFiniteLossError(
        f"non-finite {name} {bad[0]}={bad[1]} after step {step}; training stopped without saving"
      )
  entry = {"epoch": epoch_done, "test_accuracy": test_metrics["accuracy"]}
  if val_metrics is not None:
    entry["val_accuracy"] = val_metrics["accuracy"]
    run.writer.write(step, epoch_done, "val", val_metrics)
  run.history.append(entry)
  selected = run.selected()
  run.writer.write(step, epoch_done, "test", test_metrics)
  run.writer.write_epoch(
    epoch_done,
    step,
    means.epoch.result(),
    test_metrics,
    seconds=epoch_s,
    images=means.epoch.count * run.config.batch_size,
    val=val_metrics,
    selected=(selected["epoch"], selected["test_accuracy"]),
    train_steps=means.epoch.count,
  )
  logging.info(
    "epoch %d step %d: test accuracy %.4f, loss %.4f",
    epoch_done,
    step,
    test_metrics["accuracy"],
    test_metrics["loss"],
  )
  if run.is_main:
    val_text = (
      "" if val_metrics is None else f"validation accuracy {100 * val_metrics['accuracy']:.2f}%, "
    )
    print(
      f"epoch {epoch_done}: {val_text}test accuracy "
      f"{100 * test_metrics['accuracy']:.2f}% (loss {test_metrics['loss']:.4f})",
      flush=True,
    )
  return test_metrics
