"""Training and evaluation of CapsNet: `train_and_evaluate` and `evaluate_checkpoint`.

The pieces live in their own modules: the pure steps (`steps`), config checks
(`run_config`), the workdir guard (`workdir`, which also describes the workdir's layout),
signals and processes (`processes`), checkpoints (`checkpoint`), metrics and logs
(`metrics`). This module is the driver: one flat loop with "is it time?" checks, and the
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
from tqdm import tqdm

from capsjax import checkpoint as ckpt_lib
from capsjax import errors
from capsjax import input_pipeline
from capsjax import metrics as metrics_lib
from capsjax import models
from capsjax import parallel
from capsjax import processes
from capsjax import run_config
from capsjax import steps as steps_lib
from capsjax import workdir as workdir_lib


# ----------------------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------------------
def _subset(images, labels, n: int):
  return (images[:n], labels[:n]) if n and n < len(labels) else (images, labels)


def load_data(config, split: str, limit: int):
  """uint8 images [N, H, W, C] and labels [N] of a split; its first `limit` if > 0."""
  images, labels = input_pipeline.load_split(config.dataset, split, data_dir=config.data_dir,
                                             manual_dir=config.manual_dir,
                                             download=config.download)
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
      images, labels, config.val_examples)
  if config.train_examples > len(train_labels):
    raise errors.ConfigError(
        f"config.train_examples={config.train_examples} exceeds the {len(train_labels)} "
        f"training examples of {config.dataset} (after holding out "
        f"config.val_examples={config.val_examples}); use 0 for all of them")
  test = load_data(config, "test", config.eval_examples)
  if config.eval_examples > len(test[1]):
    raise errors.ConfigError(
        f"config.eval_examples={config.eval_examples} exceeds the {len(test[1])} test "
        f"examples of {config.dataset}; use 0 for all of them")
  return Splits(train=_subset(train_images, train_labels, config.train_examples),
                val=(val_images, val_labels), test=test)


def _train_batches(config, images, labels, steps_per_epoch: int, step: int):
  """The batches of every epoch from `step` to the end of training, in order."""
  for epoch in range(step // steps_per_epoch, config.num_epochs):
    start = step - epoch * steps_per_epoch if epoch == step // steps_per_epoch else 0
    yield from input_pipeline.train_batches(images, labels, batch_size=config.batch_size,
                                            seed=config.seed, epoch=epoch, start_step=start)


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
    with errors.config_field(name):
      parallel.check_batch_size(config[name], mesh, name=f"config.{name}")
  init_key, aug_key = jax.random.split(jax.random.key(config.seed))
  graphdef, state = steps_lib.create_model_and_optimizer(config, info, steps_per_epoch,
                                                         init_key)
  logging.info("mesh: %s over %d device(s): %s", dict(mesh.shape), parallel.num_devices(mesh),
               jax.devices())
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


def _check_loop_config(config) -> None:
  """Raises ConfigError for a training-loop setting the loop could not use."""
  if config.loop not in parallel.LOOPS:
    raise errors.ConfigError(f"config.loop must be one of {parallel.LOOPS}, got {config.loop!r}")
  steps = config.scan_chunk_steps
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
    raise errors.ConfigError(
        f"config.scan_chunk_steps must be an integer >= 0 (0 = no limit), got {steps!r}")
  if not config.scan_chunk_seconds > 0:
    raise errors.ConfigError(
        f"config.scan_chunk_seconds must be > 0, got {config.scan_chunk_seconds!r}")


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir`) and evaluates on the whole test split.

  Returns the run's summary (final, selected and best-on-test accuracies). With
  `config.mode == 'eval'` it only evaluates a checkpoint and returns its test metrics.
  """
  run_config.validate_config(config)
  _check_loop_config(config)
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
  meta: dict                  # saved with every checkpoint, with `history` and `epoch`.
  # Per-epoch val/test accuracies, carried in every checkpoint's meta so that selection
  # and early stopping see the whole run after a resume, on every process.
  history: list[dict]
  is_main: bool

  @property
  def total_steps(self) -> int:
    return self.config.num_epochs * self.steps_per_epoch

  def save(self, state, step: int, epoch: float, metrics: dict | None = None) -> None:
    self.ckpt.save(step, state, dict(self.meta, epoch=epoch, history=self.history),
                   metrics=metrics)

  def selected(self) -> dict | None:
    return metrics_lib.select(self.history, selection_split(self.config))

  def early_stopped(self) -> bool:
    patience, selected = self.config.early_stop_epochs, self.selected()
    return bool(patience and selected is not None
                and self.history[-1]["epoch"] - selected["epoch"] >= patience)

  def evaluate(self, state, images, labels) -> dict[str, float]:
    return steps_lib.evaluate(self.eval_fn, state, images, labels,
                              batch_size=self.config.eval_batch_size, mesh=self.mesh,
                              weights=steps_lib.LossWeights.from_config(self.config.loss))

  def check_finite(self, recent: list[tuple[int, dict]]) -> None:
    """Raises NonFiniteLossError for the first non-finite metric of (step, metrics) pairs."""
    for at, values in jax.device_get(recent):
      bad = metrics_lib.first_non_finite(values)
      if bad is None:
        continue
      last = self.ckpt.latest_step()
      raise errors.NonFiniteLossError(
          f"non-finite {bad[0]}={bad[1]} at step {at} (epoch {at / self.steps_per_epoch:.2f}); "
          "training stopped without saving. " + (
              f"The last good checkpoint is {self.ckpt.directory}/{last}" if last is not None
              else "No checkpoint was written yet")
          + f". To continue from it with a lower config.optim.learning_rate "
          f"(now {self.config.optim.learning_rate}), rerun with "
          "--config.optim.learning_rate=<lower> "
          "--config.resume_with_changes=optim.learning_rate; or start afresh with "
          "--config.overwrite=True (moves this run aside), or in a new --workdir with "
          "--config.init_from=<a good checkpoint> (weights only)")

  def preempted(self, step: int, signum) -> processes.Preempted:
    self.ckpt.close()
    by = f"signal {signum}" if signum else "a signal to another process"
    return processes.Preempted(
        f"stopped by {by} at step {step} (epoch {step / self.steps_per_epoch:.2f}); "
        f"checkpoint saved in {self.ckpt.directory}/{step}. Rerun the same command to "
        f"resume (exit code {processes.PREEMPTED_EXIT_CODE})")


class _EpochBar:
  """A tqdm bar over one epoch's steps that shows computed steps, not dispatched ones.

  JAX dispatch is asynchronous: a step is counted when the next one is dispatched and
  the previous one has finished, so one step stays queued.
  """

  def __init__(self, config, epoch: int, initial: int, total: int, enabled: bool):
    self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                     desc=f"epoch {epoch + 1}/{config.num_epochs}", disable=not enabled)
    self._in_flight = None

  def tick(self, value, steps: int = 1) -> None:
    """Counts `steps` more steps once `value`, the last one's output, is computed.

    A device value counts when the next step is dispatched; a host value (a scanned
    chunk's, fetched at its end) counts at once.
    """
    if self._in_flight is not None:
      jax.block_until_ready(self._in_flight[0])
      self._bar.update(self._in_flight[1])
      self._in_flight = None
    if isinstance(value, jax.Array):
      self._in_flight = (value, steps)
    else:
      self._bar.update(steps)

  def show(self, values: dict[str, float]) -> None:
    self._bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['accuracy']:.3f}",
                          img_s=f"{values['images_per_s']:.1f}")

  def close(self) -> None:
    if self._in_flight is not None:
      self._bar.update(self._in_flight[1])
    self._bar.close()


class _TrainMeans:
  """Host-side means of the train metrics since the last log line and over the epoch."""

  def __init__(self, batch_size: int):
    self._batch_size = batch_size
    self.start_epoch()

  def start_epoch(self) -> None:
    self.epoch, self.interval = metrics_lib.Averager(), metrics_lib.Averager()
    self.epoch_t0 = self.interval_t0 = time.time()
    self.recent: list[tuple[int, dict]] = []   # (step, metrics) not yet checked for NaN.

  def add(self, step: int, values: dict) -> None:
    self.interval.add(values)
    self.epoch.add(values)
    self.recent.append((step, values))

  def take_recent(self) -> list[tuple[int, dict]]:
    recent, self.recent = self.recent, []
    return recent

  def take_interval(self) -> dict[str, float]:
    values = self.interval.result()
    dt = time.time() - self.interval_t0
    values["images_per_s"] = self.interval.count * self._batch_size / max(dt, 1e-9)
    self.interval, self.interval_t0 = metrics_lib.Averager(), time.time()
    return values


def _train(config, workdir: str) -> dict[str, Any]:
  t_start = time.time()
  data = load_splits(config)
  num_train = len(data.train[1])
  steps_per_epoch = input_pipeline.steps_per_epoch(num_train, config.batch_size)
  if steps_per_epoch < 1:
    raise errors.ConfigError(
        f"config.batch_size={config.batch_size} is larger than the training set "
        f"({num_train} examples)")
  info, mesh, graphdef, state, aug_key, n_params = setup(config, steps_per_epoch)
  is_main = jax.process_index() == 0
  if is_main:
    print(f"CapsNet: {n_params:,} parameters; {info.name}: {num_train} train / "
          f"{len(data.val[1])} validation / {len(data.test[1])} test examples; "
          f"{steps_per_epoch} steps/epoch on {parallel.num_devices(mesh)} device(s) in "
          f"{jax.process_count()} process(es)", flush=True)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints,
                               best_metric=f"{selection_split(config)}_accuracy")
  try:
    state, step, restored_meta = restore_or_init(config, workdir, ckpt, state)
    state = parallel.replicate(state, mesh)
    train_fn, eval_fn = steps_lib.make_steps(graphdef, config, steps_per_epoch, mesh)
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, resume_step=step)
    meta = {"dataset": config.dataset, "model": json.loads(config.model.to_json_best_effort()),
            "image_shape": list(info.image_shape), "num_classes": info.num_classes,
            "steps_per_epoch": steps_per_epoch}
    run = _Run(config, workdir, info, mesh, data, steps_per_epoch, ckpt, writer, eval_fn,
               meta, [dict(h) for h in restored_meta.get("history", [])], is_main)
    try:
      trainer = _make_trainer(run, graphdef, train_fn, aug_key, step)
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
    print(f"early stop: no better validation accuracy for {config.early_stop_epochs} "
          f"epochs since epoch {run.selected()['epoch']}", flush=True)
  if not test_metrics:  # Nothing left to train (a finished run rerun): evaluate once.
    test_metrics = run.evaluate(state, *data.test)
  summary = metrics_lib.summarize(
      run.history, dict(test_metrics, step=step, epochs=step / steps_per_epoch),
      on=selection_split(config))
  summary["early_stopped"] = run.early_stopped()
  summary["wall_s"] = time.time() - t_start
  if is_main:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    print(metrics_lib.format_summary(summary, info.name), flush=True)
  return summary


class _StepTrainer:
  """The per-step loop: host batches (`_train_batches`), one jitted step each."""

  def __init__(self, run: _Run, train_fn: Callable, aug_key: jax.Array, step: int):
    self._train_fn, self._aug_key = train_fn, aug_key
    self._batches = parallel.prefetch(
        _train_batches(run.config, *run.data.train, run.steps_per_epoch, step), run.mesh)
    # Under jax.distributed the processes compare stop flags (a collective) at steps they
    # all know of: logging steps. With one process: after every step.
    self.stop_check_every_advance = jax.process_count() == 1

  def advance(self, state, step: int):
    """One step from `step`: (state, [its metrics, device scalars])."""
    del step  # The batches follow on from the start step.
    state, values = self._train_fn(state, next(self._batches), self._aug_key)
    return state, [values]


def _chunk_end(step: int, *, steps_per_epoch: int, log_every: int, max_steps: int,
               seconds: float | None, step_seconds: float | None) -> int:
  """Where a scanned chunk from `step` ends (exclusive): at the next log step or epoch
  end, after `max_steps`, and after about `seconds` at `step_seconds` a step; while the
  speed is unknown (`step_seconds` None), after one step."""
  end = min((step // steps_per_epoch + 1) * steps_per_epoch,
            (step // log_every + 1) * log_every, step + max_steps)
  if seconds is not None:
    end = min(end, step + (max(1, int(seconds / step_seconds)) if step_seconds else 1))
  return end


class _ScanTrainer:
  """The scanned loop: chunks of steps as one jitted loop over the set on the devices.

  The uint8 training set goes to every device once (`parallel.put_dataset`); each epoch's
  batch indices are computed on the host and sent once per epoch. A chunk runs from
  `step` to the next log step or epoch end, capped by `config.scan_chunk_steps` and, in
  a one-process run, by `config.scan_chunk_seconds` at the last chunk's speed; so
  logging, NaN checks, evaluation, checkpoints and SIGTERM all fall on chunk ends.
  """

  def __init__(self, run: _Run, graphdef, aug_key: jax.Array):
    config, spe = run.config, run.steps_per_epoch
    self._run, self._aug_key = run, aug_key
    self.max_steps = min(spe, config.log_every_steps, config.scan_chunk_steps or spe)
    self._chunk = steps_lib.make_train_chunk(graphdef, config, spe, run.mesh,
                                             self.max_steps)
    self._data = parallel.put_dataset(*run.data.train, run.mesh)
    self._epoch, self._indices = None, None
    # Processes must agree on chunk ends (they compare stop flags there), so a time bound,
    # which each would measure differently, applies only to a one-process run.
    self._seconds = config.scan_chunk_seconds if jax.process_count() == 1 else None
    self._step_s = None       # seconds per step of the last timed chunk.
    self._compiled = False
    self.stop_check_every_advance = True

  def advance(self, state, step: int):
    """One chunk from `step`: (state, [metrics of each step, host scalars])."""
    config, spe = self._run.config, self._run.steps_per_epoch
    epoch, start = divmod(step, spe)
    if epoch != self._epoch:
      self._epoch = epoch
      self._indices = parallel.put_batch_indices(input_pipeline.epoch_batch_indices(
          len(self._run.data.train[1]), batch_size=config.batch_size, seed=config.seed,
          epoch=epoch), self._run.mesh)                                   # [S, B]
    n = _chunk_end(step, steps_per_epoch=spe, log_every=config.log_every_steps,
                   max_steps=self.max_steps, seconds=self._seconds,
                   step_seconds=self._step_s) - step
    t0 = time.perf_counter()
    state, stacked = self._chunk(state, self._data, self._indices, np.int32(start),
                                 np.int32(n), self._aug_key)
    stacked = jax.device_get(stacked)     # the chunk's one wait for the devices.
    # The first chunk's time is mostly compilation: the second one (also one step under
    # a time bound) is the first timed.
    if self._compiled:
      self._step_s = (time.perf_counter() - t0) / n
    self._compiled = True
    return state, [{k: v[i] for k, v in stacked.items()} for i in range(n)]


def _make_trainer(run: _Run, graphdef, train_fn: Callable, aug_key: jax.Array, step: int):
  """The loop `config.loop` resolves to on this backend (`parallel.resolve_loop`)."""
  kind = parallel.resolve_loop(run.config.loop)
  logging.info("training loop: %s (config.loop=%r)", kind, run.config.loop)
  if kind == "scan":
    return _ScanTrainer(run, graphdef, aug_key)
  return _StepTrainer(run, train_fn, aug_key, step)


def _train_loop(run: _Run, state, step: int, trainer):
  """Trains from `step` to the end; returns (state, step, last test metrics or {}).

  `trainer.advance(state, step)` runs one step or one chunk of steps; the rest (logging,
  NaN checks, evaluation, checkpoints, stopping) happens between advances.
  """
  config, steps_per_epoch = run.config, run.steps_per_epoch
  means = _TrainMeans(config.batch_size)
  test_metrics: dict[str, float] = {}
  bar = None
  if run.early_stopped():   # a resumed run that had already stopped early.
    return state, step, test_metrics
  with processes.StopFlag() as stop:
    while step < run.total_steps:
      if bar is None:
        epoch, start = divmod(step, steps_per_epoch)
        bar = _EpochBar(config, epoch, start, steps_per_epoch,
                        enabled=config.progress_bar and run.is_main)
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
          run.check_finite(means.take_recent())   # never checkpoint non-finite parameters.
          run.save(state, step, step / steps_per_epoch)
          raise run.preempted(step, stop.signal)
        continue
      bar.close()
      bar = None
      test_metrics = _end_of_epoch(run, state, step, means)
      stopping = step < run.total_steps and stop.anywhere()
      epoch_done = step // steps_per_epoch
      if (epoch_done % config.checkpoint_every_epochs == 0 or step == run.total_steps
          or stopping or run.early_stopped()):
        run.save(state, step, epoch_done, run.history[-1])
      if run.is_main:
        metrics_lib.plot_curves(run.writer.path,
                                os.path.join(run.workdir, "plots", "curves.png"),
                                title=f"CapsNet on {run.info.name}")
      if stopping:
        raise run.preempted(step, stop.signal)
      if run.early_stopped():
        break
  return state, step, test_metrics


def _end_of_epoch(run: _Run, state, step: int, means: _TrainMeans) -> dict[str, float]:
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
          f"non-finite {name} {bad[0]}={bad[1]} after step {step}; training stopped "
          "without saving")
  entry = {"epoch": epoch_done, "test_accuracy": test_metrics["accuracy"]}
  if val_metrics is not None:
    entry["val_accuracy"] = val_metrics["accuracy"]
    run.writer.write(step, epoch_done, "val", val_metrics)
  run.history.append(entry)
  selected = run.selected()
  run.writer.write(step, epoch_done, "test", test_metrics)
  run.writer.write_epoch(epoch_done, step, means.epoch.result(), test_metrics,
                         seconds=epoch_s, images=means.epoch.count * run.config.batch_size,
                         val=val_metrics,
                         selected=(selected["epoch"], selected["test_accuracy"]),
                         train_steps=means.epoch.count)
  logging.info("epoch %d step %d: test accuracy %.4f, loss %.4f", epoch_done, step,
               test_metrics["accuracy"], test_metrics["loss"])
  if run.is_main:
    val_text = ("" if val_metrics is None else
                f"validation accuracy {100 * val_metrics['accuracy']:.2f}%, ")
    print(f"epoch {epoch_done}: {val_text}test accuracy "
          f"{100 * test_metrics['accuracy']:.2f}% (loss {test_metrics['loss']:.4f})",
          flush=True)
  return test_metrics
