"""Training: `train_and_evaluate(config, workdir)`, read top to bottom.

The phases, in order: the data splits, the model and optimizer, checkpoints (resume or
`init_from`), the jitted steps and the loop that advances them (`capsjax.loop`), the logs,
then one flat loop over steps with "is it time?" checks: log, stop on a signal, end an
epoch (evaluate, record, checkpoint, plot, stop early). Each turn of the loop runs one step
(`config.loop='step'`) or one scanned chunk of steps ('scan'), with the same results bit
for bit; chunks end where the loop has work to do (log steps, epoch ends).

Model selection (which epoch is reported and kept) is on validation accuracy when the run
holds out a validation split, else on test accuracy as the reference projects did
(`setup.selection_split`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from absl import logging
import jax

from capsjax import errors
from capsjax import loop as loop_lib
from capsjax import metrics as metrics_lib
from capsjax import parallel
from capsjax import setup
from capsjax import steps as steps_lib
from capsjax.data import input_pipeline
from capsjax.run import checkpoint as ckpt_lib
from capsjax.run import config as run_config
from capsjax.run import processes
from capsjax.run import workdir as workdir_lib


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir`) and evaluates on the whole test split.

  Returns the run's summary (final, selected and best-on-test accuracies, wall time).
  `capsjax.main` chooses between this and `capsjax.evaluate` by `config.mode`.
  """
  run_config.validate_config(config, num_devices=jax.device_count())
  if config.mode != "train":
    raise errors.ConfigError(
      f"train_and_evaluate trains; config.mode={config.mode!r} is for "
      "capsjax.evaluate.evaluate_checkpoint (capsjax.main.run chooses by mode)"
    )
  if config.seeds:
    raise errors.ConfigError(
      f"train_and_evaluate trains one run; config.seeds={config.seeds!r} is for "
      "capsjax.train_ensemble.train_seeds (capsjax.main.run chooses)"
    )
  workdir = workdir_lib.resolve(workdir)
  workdir_lib.check_init_from(config, workdir)
  with workdir_lib.lock(workdir):
    record = workdir_lib.check_config(config, workdir)
    return _train(config, workdir, record)


@dataclasses.dataclass
class History:
  """Per-epoch val/test accuracies: what selection and early stopping read.

  Saved in every checkpoint's metadata, so that after a resume they see the whole run, on
  every process.
  """

  on: str  # 'val' or 'test': the split selection reads.
  patience: int  # config.early_stop_epochs; 0 = never stop early.
  epochs: list[dict] = dataclasses.field(default_factory=list)

  def selected(self) -> dict | None:
    return metrics_lib.select(self.epochs, self.on)

  def early_stopped(self) -> bool:
    selected = self.selected()
    return bool(
      self.patience
      and selected is not None
      and self.epochs[-1]["epoch"] - selected["epoch"] >= self.patience
    )


def _train(config, workdir: str, record: workdir_lib.ConfigRecord) -> dict[str, Any]:
  t_start = time.time()
  is_main = jax.process_index() == 0

  # ----------------------------------------------------------------------------------------
  # Data.
  # ----------------------------------------------------------------------------------------
  data = setup.load_splits(config)
  num_train = len(data.train[1])
  spe = input_pipeline.steps_per_epoch(num_train, config.batch_size)
  total_steps = config.num_epochs * spe

  # ----------------------------------------------------------------------------------------
  # Model, optimizer, mesh.
  # ----------------------------------------------------------------------------------------
  start = setup.build(config, spe)
  mesh = start.mesh
  if is_main:
    print(
      f"CapsNet: {start.num_params:,} parameters; {start.info.name}: {num_train} train / "
      f"{len(data.val[1])} validation / {len(data.test[1])} test examples; "
      f"{spe} steps/epoch on {parallel.num_devices(mesh)} device(s) in "
      f"{jax.process_count()} process(es)",
      flush=True,
    )

  # ----------------------------------------------------------------------------------------
  # Checkpoints: resume, or start from `init_from` weights, or from scratch.
  # ----------------------------------------------------------------------------------------
  on = setup.selection_split(config)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints, best_metric=f"{on}_accuracy")
  try:
    state, step, restored_meta = setup.restore_or_init(
      config, ckpt, start.state, steps_per_epoch=spe
    )
    state = parallel.replicate(state, mesh)
    history = History(
      on, config.early_stop_epochs, [dict(h) for h in restored_meta.get("history", [])]
    )
    meta = setup.checkpoint_meta(config, start.info, spe)

    def save(state, step: int, epoch: float, metrics: dict | None = None) -> None:
      # Mid-epoch (a preemption's save), the epoch's running means go with it.
      extra = {"train_means": means.state()} if step % spe else {}
      saved = ckpt.save(
        step, state, dict(meta, epoch=epoch, history=history.epochs, **extra), metrics=metrics
      )
      # A resume's changes hold once a checkpoint trained under them has landed.
      if saved and record.pending:
        ckpt.wait()
        record.commit()

    # --------------------------------------------------------------------------------------
    # The jitted steps, the loop that advances them, the logs.
    # --------------------------------------------------------------------------------------
    train_fn, eval_fn = steps_lib.make_steps(start.graphdef, config, spe, mesh)
    weights = steps_lib.LossWeights.from_config(config.loss)

    def evaluate(state, images, labels) -> dict[str, float]:
      return steps_lib.evaluate_split(
        eval_fn,
        state,
        images,
        labels,
        batch_size=config.eval_batch_size,
        mesh=mesh,
        weights=weights,
      )

    ctx = loop_lib.LoopContext(
      config=config, images=data.train[0], labels=data.train[1], steps_per_epoch=spe, mesh=mesh
    )
    trainer = loop_lib.make_trainer(ctx, start.graphdef, train_fn, start.aug_key, step)
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, resume_step=step)
    means = loop_lib.TrainMeans(config.batch_size)
    means.resume(restored_meta.get("train_means") if step % spe else None)
    bar = None
    test_metrics: dict[str, float] = {}

    # --------------------------------------------------------------------------------------
    # The loop: advance, then whatever it is time for.
    # --------------------------------------------------------------------------------------
    try:
      with processes.StopFlag() as stop:
        while step < total_steps and not history.early_stopped():
          if bar is None:
            bar = loop_lib.EpochBar(
              config, *divmod(step, spe), spe, enabled=config.progress_bar and is_main
            )
            if step % spe == 0:  # mid-epoch, the means go on from the checkpoint's.
              means.start_epoch()
          state, values = trainer.advance(state, step)
          for v in values:
            step += 1
            means.add(step, v)
          bar.tick(values[-1]["loss"], len(values))
          epoch_end = step % spe == 0
          if epoch_end or step % config.log_every_steps == 0:
            check_finite(means.take_recent(), ckpt=ckpt, steps_per_epoch=spe, config=config)
            # A failed background save is reported now, not at the next save; at an epoch
            # end, before the epoch is recorded. Between epochs only with one process: a
            # save that finished on one process but not yet on another would split them.
            if epoch_end or jax.process_count() == 1:
              ckpt.check_saves(block=epoch_end)
            logged = means.take_interval()
            writer.write(step, step / spe, "train", logged)
            bar.show(logged)
            if not epoch_end and stop.anywhere():
              save(state, step, step / spe)
              raise preempted(ckpt, step, spe, stop.signal)
          elif trainer.stop_check_every_advance and stop.anywhere():
            check_finite(means.take_recent(), ckpt=ckpt, steps_per_epoch=spe, config=config)
            save(state, step, step / spe)  # never a non-finite state: checked above.
            raise preempted(ckpt, step, spe, stop.signal)
          if not epoch_end:
            continue

          # End of an epoch: evaluate and record it, checkpoint, plot, maybe stop.
          bar.close()
          bar = None
          epoch, epoch_s = step // spe, time.time() - means.epoch_t0
          val_metrics, test_metrics = evaluate_epoch(evaluate, state, data, step)
          history.epochs.append(history_entry(epoch, val_metrics, test_metrics))
          record_epoch(writer, history, epoch, step, epoch_s, means, val_metrics, test_metrics)
          if is_main:
            print_epoch(epoch, val_metrics, test_metrics)
          # A run that has just stopped early is finished: a signal now must not ask for
          # a requeue (exit 75).
          stopping = step < total_steps and not history.early_stopped() and stop.anywhere()
          if checkpoint_due(config, epoch, step, total_steps, stopping, history.early_stopped()):
            save(state, step, epoch, history.epochs[-1])
          if is_main:
            metrics_lib.plot_curves(
              writer.path,
              os.path.join(workdir, "plots", "curves.png"),
              title=f"CapsNet on {start.info.name}",
            )
          if stopping:
            raise preempted(ckpt, step, spe, stop.signal)
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
  record.commit()

  # ----------------------------------------------------------------------------------------
  # Summary.
  # ----------------------------------------------------------------------------------------
  if history.early_stopped() and is_main:
    print(
      f"early stop: no better validation accuracy for {config.early_stop_epochs} "
      f"epochs since epoch {history.selected()['epoch']}",
      flush=True,
    )
  if not test_metrics:  # Nothing left to train (a finished run rerun): evaluate once.
    test_metrics = evaluate(state, *data.test)
  summary = metrics_lib.summarize(
    history.epochs, dict(test_metrics, step=step, epochs=step / spe), on=on
  )
  summary["early_stopped"] = history.early_stopped()
  summary["wall_s"] = time.time() - t_start
  if is_main:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    print(metrics_lib.format_summary(summary, start.info.name), flush=True)
  return summary


# ------------------------------------------------------------------------------------------
# The loop's helpers.
# ------------------------------------------------------------------------------------------
def check_finite(
  recent: list[tuple[int, dict]], *, ckpt: ckpt_lib.Checkpointer, steps_per_epoch: int, config
) -> None:
  """Raises NonFiniteLossError for the first non-finite metric of (step, metrics) pairs."""
  for at, values in jax.device_get(recent):
    bad = metrics_lib.first_non_finite(values)
    if bad is None:
      continue
    last = ckpt.latest_step()
    raise errors.NonFiniteLossError(
      f"non-finite {bad[0]}={bad[1]} at step {at} (epoch {at / steps_per_epoch:.2f}); "
      "training stopped without saving. "
      + (
        f"The last good checkpoint is {ckpt.directory}/{last}"
        if last is not None
        else "No checkpoint was written yet"
      )
      + f". To continue from it with a lower config.optim.learning_rate "
      f"(now {config.optim.learning_rate}), rerun with "
      "--config.optim.learning_rate=<lower> "
      "--config.resume_with_changes=optim.learning_rate; or start afresh with "
      "--config.overwrite=True (moves this run aside), or in a new --workdir with "
      "--config.init_from=<a good checkpoint> (weights only)"
    )


def preempted(
  ckpt: ckpt_lib.Checkpointer, step: int, steps_per_epoch: int, signum
) -> processes.Preempted:
  """Closes `ckpt` (its last save lands) and returns the exception that exits with 75."""
  ckpt.close()
  by = f"signal {signum}" if signum else "a signal to another process"
  return processes.Preempted(
    f"stopped by {by} at step {step} (epoch {step / steps_per_epoch:.2f}); "
    f"checkpoint saved in {ckpt.directory}/{step}. Rerun the same command to "
    f"resume (exit code {processes.PREEMPTED_EXIT_CODE})"
  )


def checkpoint_due(
  config, epoch: int, step: int, total_steps: int, stopping: bool, stopped_early: bool
) -> bool:
  """Whether the end of `epoch` saves a checkpoint: every `checkpoint_every_epochs`, at the
  end of training, before stopping for a signal, and when the run has just stopped early."""
  return (
    epoch % config.checkpoint_every_epochs == 0 or step == total_steps or stopping or stopped_early
  )


def non_finite_evaluation(val_metrics: dict | None, test_metrics: dict) -> str | None:
  """'validation class_loss=nan' for the first non-finite metric of an epoch's evaluation."""
  for name, result in (("validation", val_metrics), ("test", test_metrics)):
    bad = None if result is None else metrics_lib.first_non_finite(result)
    if bad is not None:
      return f"{name} {bad[0]}={bad[1]}"
  return None


def evaluate_epoch(evaluate, state, data: setup.Splits, step: int):
  """(validation metrics or None, test metrics); raises NonFiniteLossError on a NaN."""
  val_images, val_labels = data.val
  val_metrics = evaluate(state, val_images, val_labels) if len(val_labels) else None
  test_metrics = evaluate(state, *data.test)
  bad = non_finite_evaluation(val_metrics, test_metrics)
  if bad is not None:
    raise errors.NonFiniteLossError(
      f"non-finite {bad} after step {step}; training stopped without saving"
    )
  return val_metrics, test_metrics


def history_entry(epoch: int, val_metrics: dict | None, test_metrics: dict) -> dict:
  entry = {"epoch": epoch, "test_accuracy": test_metrics["accuracy"]}
  if val_metrics is not None:
    entry["val_accuracy"] = val_metrics["accuracy"]
  return entry


def record_epoch(
  writer: metrics_lib.MetricWriter,
  history: History,
  epoch: int,
  step: int,
  seconds: float,
  means: loop_lib.TrainMeans,
  val_metrics: dict | None,
  test_metrics: dict,
) -> None:
  """Writes the epoch's val and test rows, its epochs.csv row and a log line."""
  if val_metrics is not None:
    writer.write(step, epoch, "val", val_metrics)
  selected = history.selected()
  writer.write(step, epoch, "test", test_metrics)
  writer.write_epoch(
    epoch,
    step,
    means.epoch.result(),
    test_metrics,
    seconds=seconds,
    images=means.images(),
    val=val_metrics,
    selected=(selected["epoch"], selected["test_accuracy"]),
    train_steps=means.epoch.count,
  )
  logging.info(
    "epoch %d step %d: test accuracy %.4f, loss %.4f",
    epoch,
    step,
    test_metrics["accuracy"],
    test_metrics["loss"],
  )


def print_epoch(epoch: int, val_metrics: dict | None, test_metrics: dict) -> None:
  val_text = (
    "" if val_metrics is None else f"validation accuracy {100 * val_metrics['accuracy']:.2f}%, "
  )
  print(
    f"epoch {epoch}: {val_text}test accuracy "
    f"{100 * test_metrics['accuracy']:.2f}% (loss {test_metrics['loss']:.4f})",
    flush=True,
  )
