"""How the training loop advances: one jitted step at a time, or scanned chunks of steps.

`make_trainer(ctx, ...)` returns the loop `config.loop` resolves to on this backend
(`parallel.resolve_loop`); the driver (`capsjax.train`) calls its `advance(state, step)`
and does everything else (logging, NaN checks, evaluation, checkpoints, stopping) between
advances. Also here: the per-epoch progress bar and the host-side running means of train
metrics.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from absl import logging
import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from capsjax import ensemble
from capsjax import metrics as metrics_lib
from capsjax import parallel
from capsjax import steps as steps_lib
from capsjax.data import input_pipeline


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopContext:
  """What the trainers read: the run's config, its training split, steps and mesh.

  images: uint8 [N, H, W, C]; labels: int [N] (the training split, validation held out).
  members: an ensemble's member configs (`capsjax.ensemble`), () for a single run; the
    state, batches and metrics then carry a leading member axis [K].
  """

  config: ml_collections.ConfigDict
  images: np.ndarray
  labels: np.ndarray
  steps_per_epoch: int
  mesh: jax.sharding.Mesh
  members: tuple[ml_collections.ConfigDict, ...] = ()

  @property
  def seeds(self) -> tuple[int, ...]:
    return tuple(c.seed for c in self.members)


def batches_from(ctx: LoopContext, step: int):
  """The host batches of every epoch from `step` to the end of training, in order."""
  config, spe = ctx.config, ctx.steps_per_epoch
  for epoch in range(step // spe, config.num_epochs):
    start = step - epoch * spe if epoch == step // spe else 0
    kwargs = dict(batch_size=config.batch_size, epoch=epoch, start_step=start)
    if ctx.members:  # [K, B, ...]: member m's batch is its single run's.
      yield from ensemble.train_batches(ctx.images, ctx.labels, seeds=ctx.seeds, **kwargs)
    else:
      yield from input_pipeline.train_batches(ctx.images, ctx.labels, seed=config.seed, **kwargs)


def _epoch_indices(ctx: LoopContext, epoch: int) -> jax.Array:
  """The epoch's example indices on the mesh: int32 [S, B], or [K, S, B] for an ensemble."""
  config, n = ctx.config, len(ctx.labels)
  if ctx.members:
    indices = ensemble.epoch_batch_indices(
      n, batch_size=config.batch_size, seeds=ctx.seeds, epoch=epoch
    )
    return parallel.put_member_batch_indices(indices, ctx.mesh)
  indices = input_pipeline.epoch_batch_indices(
    n, batch_size=config.batch_size, seed=config.seed, epoch=epoch
  )
  return parallel.put_batch_indices(indices, ctx.mesh)


class EpochBar:
  """A tqdm bar over one epoch's steps that shows computed steps, not dispatched ones.

  JAX dispatch is asynchronous: a step is counted when the next one is dispatched and
  the previous one has finished, so one step stays queued.
  """

  def __init__(self, config, epoch: int, initial: int, total: int, enabled: bool):
    self._bar = tqdm(
      total=total,
      initial=initial,
      unit="step",
      dynamic_ncols=True,
      desc=f"epoch {epoch + 1}/{config.num_epochs}",
      disable=not enabled,
    )
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
    self._bar.set_postfix(
      loss=f"{values['loss']:.4f}",
      acc=f"{values['accuracy']:.3f}",
      img_s=f"{values['images_per_s']:.1f}",
    )

  def close(self) -> None:
    if self._in_flight is not None:
      self._bar.update(self._in_flight[1])
    self._bar.close()


class TrainMeans:
  """Host-side means of the train metrics since the last log line and over the epoch."""

  def __init__(self, batch_size: int):
    self._batch_size = batch_size
    self.start_epoch()

  def start_epoch(self) -> None:
    self.epoch, self.interval = metrics_lib.Averager(), metrics_lib.Averager()
    self.epoch_t0 = self.interval_t0 = time.time()
    self.recent: list[tuple[int, dict]] = []  # (step, metrics) not yet checked for NaN.

  def add(self, step: int, values: dict) -> None:
    self.interval.add(values)
    self.epoch.add(values)
    self.recent.append((step, values))

  def images(self) -> int:
    """Training images seen in this epoch's steps so far."""
    return self.epoch.count * self._batch_size

  def take_recent(self) -> list[tuple[int, dict]]:
    recent, self.recent = self.recent, []
    return recent

  def take_interval(self) -> dict[str, float]:
    values = self.interval.result()
    dt = time.time() - self.interval_t0
    values["images_per_s"] = self.interval.count * self._batch_size / max(dt, 1e-9)
    self.interval, self.interval_t0 = metrics_lib.Averager(), time.time()
    return values

  def state(self) -> dict:
    """The means so far, as JSON for a checkpoint saved mid-epoch (a preemption's).

    A run resumed from it (`resume`) writes the same epoch row, and the same next train
    row, as if it had not stopped; only the timing columns differ.
    """
    now = time.time()
    return {
      "epoch": self.epoch.state(),
      "interval": self.interval.state(),
      "epoch_seconds": now - self.epoch_t0,
      "interval_seconds": now - self.interval_t0,
    }

  def resume(self, saved: dict | None) -> None:
    """Continues the epoch a mid-epoch checkpoint's `state()` recorded (None: afresh)."""
    self.start_epoch()
    if not saved:
      return
    self.epoch.load(saved["epoch"])
    self.interval.load(saved["interval"])
    now = time.time()
    self.epoch_t0 = now - float(saved["epoch_seconds"])
    self.interval_t0 = now - float(saved["interval_seconds"])


class StepTrainer:
  """The per-step loop: host batches (`batches_from`), one jitted step each.

  `active` (an ensemble's bool [K] of members still training, set by the driver) is passed
  to every step after the key.
  """

  def __init__(self, ctx: LoopContext, train_fn: Callable, aug_key: jax.Array, step: int):
    self._train_fn, self._aug_key = train_fn, aug_key
    shard = parallel.shard_member_batch if ctx.members else parallel.shard_batch
    self._batches = parallel.prefetch(batches_from(ctx, step), ctx.mesh, shard=shard)
    # Under jax.distributed the processes compare stop flags (a collective) at steps they
    # all know of: logging steps. With one process: after every step.
    self.stop_check_every_advance = jax.process_count() == 1
    self.active = None

  def advance(self, state, step: int):
    """One step from `step`: (state, [its metrics, device scalars or [K]])."""
    del step  # The batches follow on from the start step.
    extra = () if self.active is None else (self.active,)
    state, values = self._train_fn(state, next(self._batches), self._aug_key, *extra)
    return state, [values]


def chunk_end(
  step: int,
  *,
  steps_per_epoch: int,
  log_every: int,
  max_steps: int,
  seconds: float | None,
  step_seconds: float | None,
) -> int:
  """Where a scanned chunk from `step` ends (exclusive): at the next log step or epoch
  end, after `max_steps`, and after about `seconds` at `step_seconds` a step; while the
  speed is unknown (`step_seconds` None), after one step."""
  end = min(
    (step // steps_per_epoch + 1) * steps_per_epoch,
    (step // log_every + 1) * log_every,
    step + max_steps,
  )
  if seconds is not None:
    end = min(end, step + (max(1, int(seconds / step_seconds)) if step_seconds else 1))
  return end


class ScanTrainer:
  """The scanned loop: chunks of steps as one jitted loop over the set on the devices.

  The uint8 training set goes to every device once (`parallel.put_dataset`); each epoch's
  batch indices are computed on the host and sent once per epoch. A chunk runs from
  `step` to the next log step or epoch end, capped by `config.scan_chunk_steps` and, in
  a one-process run, by `config.scan_chunk_seconds` at the last chunk's speed; so
  logging, NaN checks, evaluation, checkpoints and SIGTERM all fall on chunk ends.
  An ensemble's members share the one device-resident set; `active` as for StepTrainer.
  """

  def __init__(self, ctx: LoopContext, graphdef, aug_key: jax.Array):
    config, spe = ctx.config, ctx.steps_per_epoch
    self._ctx, self._aug_key = ctx, aug_key
    self.max_steps = min(spe, config.log_every_steps, config.scan_chunk_steps or spe)
    if ctx.members:
      self._chunk = ensemble.make_ensemble_chunk(
        graphdef, list(ctx.members), spe, ctx.mesh, self.max_steps
      )
    else:
      self._chunk = steps_lib.make_train_chunk(graphdef, config, spe, ctx.mesh, self.max_steps)
    self._data = parallel.put_dataset(ctx.images, ctx.labels, ctx.mesh)
    self._epoch, self._indices = None, None
    # Processes must agree on chunk ends (they compare stop flags there), so a time bound,
    # which each would measure differently, applies only to a one-process run.
    self._seconds = config.scan_chunk_seconds if jax.process_count() == 1 else None
    self._step_s = None  # seconds per step of the last timed chunk.
    self._compiled = False
    self.stop_check_every_advance = True
    self.active = None

  def advance(self, state, step: int):
    """One chunk from `step`: (state, [metrics of each step, host scalars or [K]])."""
    config, spe = self._ctx.config, self._ctx.steps_per_epoch
    epoch, start = divmod(step, spe)
    if epoch != self._epoch:
      self._epoch = epoch
      self._indices = _epoch_indices(self._ctx, epoch)  # [S, B] or [K, S, B]
    n = (
      chunk_end(
        step,
        steps_per_epoch=spe,
        log_every=config.log_every_steps,
        max_steps=self.max_steps,
        seconds=self._seconds,
        step_seconds=self._step_s,
      )
      - step
    )
    t0 = time.perf_counter()
    extra = () if self.active is None else (self.active,)
    state, stacked = self._chunk(
      state, self._data, self._indices, np.int32(start), np.int32(n), self._aug_key, *extra
    )
    stacked = jax.device_get(stacked)  # the chunk's one wait for the devices.
    # The first chunk's time is mostly compilation: the second one (also one step under
    # a time bound) is the first timed.
    if self._compiled:
      self._step_s = (time.perf_counter() - t0) / n
    self._compiled = True
    return state, [{k: v[i] for k, v in stacked.items()} for i in range(n)]


def make_trainer(ctx: LoopContext, graphdef, train_fn: Callable, aug_key: jax.Array, step: int):
  """The loop `config.loop` resolves to on this backend (`parallel.resolve_loop`)."""
  kind = parallel.resolve_loop(ctx.config.loop)
  logging.info("training loop: %s (config.loop=%r)", kind, ctx.config.loop)
  if kind == "scan":
    return ScanTrainer(ctx, graphdef, aug_key)
  return StepTrainer(ctx, train_fn, aug_key, step)
