"""Training and evaluation: the pure train/eval steps and `train_and_evaluate`.

Flax NNX in its functional form: `graphdef, state = nnx.split((model, optimizer))` once,
then a `jax.jit` step `(state, batch, key) -> (state, metrics)` merges, differentiates,
updates and splits again, as the Flax NNX functional-API examples do. The state is
donated; the routing iteration count is part of `graphdef`, so it is static.

Workdir layout (everything a run writes; only process 0 writes files):
  config.json            the resolved config of the run (a rerun that changes a run-defining
                         field, e.g. the model or dataset, is refused)
  checkpoints/<step>/    Orbax checkpoints (latest N + the selected one), see checkpoint.py
  metrics.csv, epochs.csv, tensorboard/, plots/curves.png   see metrics.py
  summary.json           test metrics of the final checkpoint, of the epoch selected on
                         validation, and the best test accuracy over epochs (labelled: it
                         is selected on test, the reference projects' protocol)

Model selection: with `config.val_examples > 0` a fixed part of the training split is held
out (`input_pipeline.split_validation`), and the kept "best" checkpoint, the selected epoch
and early stopping use validation accuracy only. Test accuracy is measured every epoch
for the record. With `val_examples = 0` (the reference recipes, to train on what they
trained on) selection falls back to test accuracy, as in the references, which used the
test set as their validation data, and every report says so.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from ml_collections import config_dict

from capsjax import augment
from capsjax import checkpoint as ckpt_lib
from capsjax import errors
from capsjax import input_pipeline
from capsjax import layers
from capsjax import losses
from capsjax import metrics as metrics_lib
from capsjax import models
from capsjax import optim
from capsjax import parallel

# A run stopped by SIGTERM/SIGINT after saving a checkpoint exits with this code, so a
# SLURM script can tell preemption (requeue) from failure. 75 is EX_TEMPFAIL.
PREEMPTED_EXIT_CODE = 75

# Config fields that define a run: resuming with different values would silently mix
# two experiments, so a workdir keeps its values unless `overwrite` is set.
RUN_DEFINING_FIELDS = ("seed", "dataset", "train_examples", "val_examples", "batch_size",
                       "model", "optim", "loss", "augment")


WorkdirInUseError = errors.WorkdirInUseError


class Preempted(Exception):
  """Training stopped on SIGTERM/SIGINT after writing a checkpoint."""


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Plain (hashable) loss hyperparameters pulled out of the config."""
  m_plus: float = 0.9
  m_minus: float = 0.1
  lam: float = 0.5
  recon_weight: float = 0.392

  @classmethod
  def from_config(cls, loss_cfg) -> "LossWeights":
    return cls(float(loss_cfg.m_plus), float(loss_cfg.m_minus), float(loss_cfg.lam),
               float(loss_cfg.recon_weight))


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  max_shift: int = 0
  flip: bool = False
  cutout_size: int = 0
  shift_fraction: float = 0.0
  fill: str = "zero"

  @classmethod
  def from_config(cls, aug_cfg) -> "AugmentSpec":
    return cls(int(aug_cfg.max_shift), bool(aug_cfg.flip), int(aug_cfg.cutout_size),
               float(aug_cfg.get("shift_fraction", 0.0)), str(aug_cfg.get("fill", "zero")))


# ----------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------
def validate_config(config) -> None:
  """Checks values that would otherwise fail deep inside JAX, with messages naming them."""
  if config.mode not in ("train", "eval"):
    raise ValueError(f"config.mode must be 'train' or 'eval', got {config.mode!r}")
  if config.eval_checkpoint not in ("latest", "selected"):
    raise ValueError(f"config.eval_checkpoint must be 'latest' or 'selected', got "
                     f"{config.eval_checkpoint!r}")
  input_pipeline.dataset_info(config.dataset)  # raises for an unknown dataset.
  it = config.model.routing_iterations
  if not isinstance(it, int) or isinstance(it, bool) or it < 1:
    raise ValueError(f"config.model.routing_iterations must be an int >= 1, got {it!r}")
  for name in ("batch_size", "eval_batch_size", "log_every_steps", "checkpoint_every_epochs"):
    if config[name] < 1:
      raise ValueError(f"config.{name} must be >= 1, got {config[name]}")
  for name, zero in (("num_epochs", ""), ("train_examples", " (0 = all)"),
                     ("eval_examples", " (0 = all)")):
    if config[name] < 0:
      raise ValueError(f"config.{name} must be >= 0{zero}, got {config[name]}")
  if config.augment.max_shift < 0 or config.augment.cutout_size < 0:
    raise ValueError(
        "config.augment.max_shift and cutout_size must be >= 0, got "
        f"{config.augment.max_shift} and {config.augment.cutout_size}")
  aug = config.augment
  if not 0.0 <= aug.shift_fraction < 0.5:
    raise ValueError(f"config.augment.shift_fraction must be in [0, 0.5), got "
                     f"{aug.shift_fraction}")
  if aug.max_shift and aug.shift_fraction:
    raise ValueError(
        f"config.augment.max_shift={aug.max_shift} and shift_fraction={aug.shift_fraction} "
        "are two kinds of shift: set the other to 0")
  if aug.fill not in augment.FILLS:
    raise ValueError(f"config.augment.fill must be one of {augment.FILLS}, got {aug.fill!r}")
  if config.model.init not in layers.INITS:
    raise ValueError(f"config.model.init must be one of {layers.INITS}, got "
                     f"{config.model.init!r}")
  optim.validate(config.optim)
  if config.val_examples < 0:
    raise ValueError(f"config.val_examples must be >= 0 (0 = no validation split), got "
                     f"{config.val_examples}")
  if config.early_stop_epochs < 0:
    raise ValueError(f"config.early_stop_epochs must be >= 0 (0 = off), got "
                     f"{config.early_stop_epochs}")
  if config.early_stop_epochs and not config.val_examples:
    raise ValueError(
        f"config.early_stop_epochs={config.early_stop_epochs} needs a validation split "
        "(config.val_examples > 0): capsjax never stops early on test accuracy")


# Run-defining fields added after runs were already saved, with the values those runs
# trained with: a config.json without them compares as if it had these. (Such runs
# initialised 'torch' biases to zero rather than PyTorch's uniform draw; a resumed run is
# past initialisation, so that difference does not matter to the comparison.)
LEGACY_DEFAULTS = {"val_examples": 0, "model.init": "torch", "model.length_eps": 1e-7,
                   "augment.shift_fraction": 0.0, "augment.fill": "zero",
                   "optim.min_learning_rate": 0.0}


def with_legacy_defaults(saved: dict, prefix: str = "") -> dict:
  """A copy of a saved config dict (or its `prefix` sub-dict) with LEGACY_DEFAULTS filled in."""
  saved = copy.deepcopy(saved)
  for dotted, value in LEGACY_DEFAULTS.items():
    if not dotted.startswith(prefix):
      continue
    *parents, leaf = dotted[len(prefix):].split(".")
    node = saved
    for p in parents:
      node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict):
      node.setdefault(leaf, value)
  return saved


def _config_view(config) -> dict:
  d = json.loads(config.to_json_best_effort())
  return {k: d[k] for k in RUN_DEFINING_FIELDS if k in d}


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} (saved) vs {b!r} (now)"]


def check_workdir_config(config, workdir: str) -> None:
  """Refuses to reuse a workdir trained with a different run-defining config.

  With `config.overwrite`, the earlier run's files are moved to
  `WORKDIR/previous-<time>/` (never deleted) and training starts fresh.
  """
  path = os.path.join(workdir, "config.json")
  now = _config_view(config)
  if os.path.exists(path):
    with open(path) as f:
      saved = with_legacy_defaults(json.load(f))
    diffs = _diff({k: saved[k] for k in RUN_DEFINING_FIELDS if k in saved}, now)
    if diffs and not config.overwrite:
      raise ValueError(
          f"workdir {workdir} was used by a run with a different config ("
          + "; ".join(diffs[:5]) + "). Use another --workdir, or "
          "--config.overwrite=True to move the earlier run aside and start fresh")
    if diffs and jax.process_index() == 0:
      backup = os.path.join(workdir, time.strftime("previous-%Y%m%d-%H%M%S"))
      os.makedirs(backup)
      for name in os.listdir(workdir):
        if not name.startswith(("previous-", ".lock")):
          shutil.move(os.path.join(workdir, name), os.path.join(backup, name))
      logging.warning("config differs from the earlier run; moved its files to %s", backup)
  # Every process has read the saved config (and raised alike) before process 0 rewrites it.
  _sync_processes("capsjax_config_checked")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    # The whole resolved config; only the run-defining fields are compared on reruns.
    with open(path, "w") as f:
      json.dump(json.loads(config.to_json_best_effort()), f, indent=2, sort_keys=True)
  _sync_processes("capsjax_config_written")


def _sync_processes(name: str) -> None:
  """A barrier across the processes of a `jax.distributed` run; a no-op with one."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _any_process(flag: bool) -> bool:
  """True on every process if `flag` is true on any of them (a collective: call in step)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """An exclusive lock: a second process training in the same workdir fails at once."""
  os.makedirs(workdir, exist_ok=True)
  # Every process of a multi-process run shares the workdir: lock per process index.
  path = os.path.join(workdir, f".lock.{jax.process_index()}")
  f = open(path, "w")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.close()
    raise WorkdirInUseError(
        f"workdir {workdir} is in use by another capsjax process (lock {path}); wait for it "
        "to finish or use another --workdir") from None
  try:
    f.write(str(os.getpid()))
    f.flush()
    yield
  finally:
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


# ----------------------------------------------------------------------------------------
# Model, optimizer and the pure steps.
# ----------------------------------------------------------------------------------------
def create_model_and_optimizer(config, info: input_pipeline.DatasetInfo, steps_per_epoch: int,
                               init_key: jax.Array):
  """Builds (model, nnx.Optimizer) from the config. Returns (graphdef, state)."""
  model = models.create_model(config.model, image_shape=info.image_shape,
                              num_classes=info.num_classes, rngs=nnx.Rngs(params=init_key))
  tx = optim.make_optimizer(config.optim, steps_per_epoch)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  return nnx.split((model, optimizer))


def compute_losses(model: models.CapsNet, images: jax.Array, labels: jax.Array,
                   weights: LossWeights) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean total loss over the batch and a dict of float32 batch metrics.

  images [B, H, W, C], labels [B] -> (loss [], {'loss', 'margin_loss', 'recon_loss',
  'accuracy'} scalars).
  """
  out = model(images, labels)
  margin = losses.margin_loss(out["lengths"], labels, m_plus=weights.m_plus,
                              m_minus=weights.m_minus, lam=weights.lam)       # [B]
  if "reconstruction" in out:
    recon = losses.reconstruction_loss(images, out["reconstruction"], reduction="mean")
  else:
    recon = jnp.zeros_like(margin)                                             # [B]
  loss = jnp.mean(margin + weights.recon_weight * recon)
  aux = {"loss": loss, "margin_loss": jnp.mean(margin), "recon_loss": jnp.mean(recon),
         "accuracy": metrics_lib.accuracy(out["lengths"], labels)}
  return loss, aux


def loss_and_grads(graphdef, state, batch, key, *, weights: LossWeights,
                   aug: AugmentSpec):
  """Pure: (loss, aux, grads) of the model in `state` on one (augmented) batch."""
  model, optimizer = nnx.merge(graphdef, state)
  images = augment.augment_batch(
      jax.random.fold_in(key, optimizer.step[...]), batch["image"],
      max_shift=aug.max_shift, flip=aug.flip, cutout_size=aug.cutout_size,
      shift_fraction=aug.shift_fraction, fill=aug.fill)
  grad_fn = nnx.value_and_grad(
      lambda m: compute_losses(m, images, batch["label"], weights), has_aux=True)
  (loss, aux), grads = grad_fn(model)
  return loss, aux, grads


def train_step(graphdef, state, batch, key, *, weights: LossWeights, aug: AugmentSpec,
               schedule: optax.Schedule):
  """One Adam step. state: nnx.State of (model, optimizer); batch: {'image','label'}.

  The augmentation key is `fold_in(key, step)`, so a resumed run draws the same
  augmentations as an uninterrupted one.
  """
  _, aux, grads = loss_and_grads(graphdef, state, batch, key, weights=weights, aug=aug)
  model, optimizer = nnx.merge(graphdef, state)
  aux["learning_rate"] = schedule(optimizer.step[...])
  aux["grad_norm"] = optax.tree.norm(grads)
  optimizer.update(model, grads)
  return nnx.state((model, optimizer)), aux


def eval_step(graphdef, state, batch, *, weights: LossWeights):
  """Masked sums over one padded eval batch: {'correct','margin_loss','recon_loss','count'}.

  The decoder is masked by the predicted class, as at test time in the paper.
  """
  model, _ = nnx.merge(graphdef, state)
  images, labels, mask = batch["image"], batch["label"], batch["mask"]
  out = model(images)
  margin = losses.margin_loss(out["lengths"], labels, m_plus=weights.m_plus,
                              m_minus=weights.m_minus, lam=weights.lam)       # [B]
  recon = (losses.reconstruction_loss(images, out["reconstruction"], reduction="mean")
           if "reconstruction" in out else jnp.zeros_like(margin))            # [B]
  m = mask.astype(jnp.float32)
  return {"correct": jnp.sum((out["pred"] == labels) * m),
          "margin_loss": jnp.sum(margin * m), "recon_loss": jnp.sum(recon * m),
          "count": jnp.sum(m)}


def make_steps(graphdef, config, steps_per_epoch: int, mesh):
  """Jitted (train_step, eval_step) closed over the static graphdef and hyperparameters."""
  weights = LossWeights.from_config(config.loss)
  aug = AugmentSpec.from_config(config.augment)
  schedule = optim.make_schedule(config.optim, steps_per_epoch)
  train = parallel.jit_data_parallel(
      lambda state, batch, key: train_step(graphdef, state, batch, key, weights=weights,
                                           aug=aug, schedule=schedule),
      mesh, donate_argnums=0)
  evaluate = parallel.jit_data_parallel(
      lambda state, batch: eval_step(graphdef, state, batch, weights=weights), mesh)
  return train, evaluate


def evaluate(eval_fn: Callable, state, images: np.ndarray, labels: np.ndarray, *,
             batch_size: int, mesh, weights: LossWeights) -> dict[str, float]:
  """Accuracy and mean losses over every example of (images, labels) exactly once.

  Returns {'accuracy', 'margin_loss', 'recon_loss', 'loss' (margin + weighted recon),
  'count'}.
  """
  totals: dict[str, float] = {}
  batches = input_pipeline.eval_batches(images, labels, batch_size=batch_size)
  for batch in parallel.prefetch(batches, mesh):
    for k, v in jax.device_get(eval_fn(state, batch)).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  n = totals["count"]
  margin, recon = totals["margin_loss"] / n, totals["recon_loss"] / n
  return {"accuracy": totals["correct"] / n, "margin_loss": margin, "recon_loss": recon,
          "loss": margin + weights.recon_weight * recon, "count": n}


# ----------------------------------------------------------------------------------------
# The driver.
# ----------------------------------------------------------------------------------------
def _subset(images, labels, n: int):
  return (images[:n], labels[:n]) if n and n < len(labels) else (images, labels)


def _load_data(config, split: str, limit: int):
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
  images, labels = _load_data(config, "train", 0)
  train_images, train_labels, val_images, val_labels = input_pipeline.split_validation(
      images, labels, config.val_examples)
  if config.train_examples > len(train_labels):
    raise ValueError(
        f"config.train_examples={config.train_examples} exceeds the {len(train_labels)} "
        f"training examples of {config.dataset} (after holding out "
        f"config.val_examples={config.val_examples}); use 0 for all of them")
  return Splits(train=_subset(train_images, train_labels, config.train_examples),
                val=(val_images, val_labels),
                test=_load_data(config, "test", config.eval_examples))


class _StopFlag:
  """Turns SIGTERM/SIGINT into a flag the loop checks at step boundaries."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. called from a notebook worker).
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once.
    self.signal = signum
    logging.warning("received signal %d: saving a checkpoint at the next step boundary",
                    signum)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


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
    src = ckpt_lib.Checkpointer(src_dir, read_only=True)
    restored, _ = src.restore(src_step, state)
    # Only the weights: the optimizer (step count, moments) starts fresh.
    state = nnx.State({0: restored[0], 1: state[1]})
    logging.info("initialised weights from %s step %d", src.directory, src_step)
  return state, 0, {}


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains (resuming from `workdir`) and evaluates on the whole test split.

  Returns the final test metrics. In `config.mode == 'eval'` it only evaluates.
  """
  validate_config(config)
  if config.mode == "eval":
    return evaluate_checkpoint(config, workdir)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  with workdir_lock(workdir):
    check_workdir_config(config, workdir)
    return _train(config, workdir)


def _setup(config, steps_per_epoch: int):
  info = input_pipeline.dataset_info(config.dataset)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh, name="config.batch_size")
  parallel.check_batch_size(config.eval_batch_size, mesh, name="config.eval_batch_size")
  init_key, aug_key = jax.random.split(jax.random.key(config.seed))
  graphdef, state = create_model_and_optimizer(config, info, steps_per_epoch, init_key)
  logging.info("mesh: %s over %d device(s): %s", dict(mesh.shape), parallel.num_devices(mesh),
               jax.devices())
  model, _ = nnx.merge(graphdef, state)
  n_params = models.count_params(model)
  logging.info("CapsNet parameters: %s", f"{n_params:,}")
  return info, mesh, graphdef, state, aug_key, n_params


def _first_non_finite(recent: list[tuple[int, dict]]) -> tuple[int, str, float] | None:
  """(step, metric, value) of the first non-finite loss term / gradient norm, if any."""
  for step, m in jax.device_get(recent):
    for k in ("margin_loss", "recon_loss", "loss", "grad_norm", *m):
      if k in m and not np.isfinite(m[k]):
        return step, k, float(m[k])
  return None


def _train(config, workdir: str) -> dict[str, float]:
  t_start = time.time()
  data = load_splits(config)
  train_labels = data.train[1]
  steps_per_epoch = input_pipeline.steps_per_epoch(len(train_labels), config.batch_size)
  if steps_per_epoch < 1:
    raise ValueError(
        f"config.batch_size={config.batch_size} is larger than the training set "
        f"({len(train_labels)} examples)")
  info, mesh, graphdef, state, aug_key, n_params = _setup(config, steps_per_epoch)
  is_main = jax.process_index() == 0
  if is_main:
    print(f"CapsNet: {n_params:,} parameters; {info.name}: {len(train_labels)} train / "
          f"{len(data.val[1])} validation / {len(data.test[1])} test examples; "
          f"{steps_per_epoch} steps/epoch on {parallel.num_devices(mesh)} device(s) in "
          f"{jax.process_count()} process(es)", flush=True)
  total_steps = config.num_epochs * steps_per_epoch
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints,
                               best_metric=f"{_selection_split(config)}_accuracy")
  try:
    summary = _train_loop(config, workdir, ckpt, info, mesh, graphdef, state, aug_key,
                          steps_per_epoch, total_steps, is_main, data)
  except BaseException:
    # Let a save already in flight (the last good checkpoint) finish before leaving.
    try:
      ckpt.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("while stopping: %s", e)
    raise
  summary["wall_s"] = time.time() - t_start
  if is_main:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    print(metrics_lib.format_summary(summary, info.name), flush=True)
  return summary


def _selection_split(config) -> str:
  """'val' when the run holds out a validation split, else 'test' (as the references)."""
  return "val" if config.val_examples else "test"


def _train_loop(config, workdir, ckpt, info, mesh, graphdef, state, aug_key,
                steps_per_epoch, total_steps, is_main, data: Splits):
  (train_images, train_labels), (val_images, val_labels) = data.train, data.val
  test_images, test_labels = data.test
  state, step, restored_meta = restore_or_init(config, workdir, ckpt, state)
  # Per-epoch val/test accuracies, carried in every checkpoint's meta so that selection
  # and early stopping see the whole run after a resume, on every process.
  history: list[dict] = [dict(h) for h in restored_meta.get("history", [])]
  state = parallel.replicate(state, mesh)
  train_fn, eval_fn = make_steps(graphdef, config, steps_per_epoch, mesh)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main, resume_step=step)
  meta = {"dataset": config.dataset, "model": json.loads(config.model.to_json_best_effort()),
          "image_shape": list(info.image_shape), "num_classes": info.num_classes,
          "steps_per_epoch": steps_per_epoch}
  test_metrics: dict[str, float] = {}
  weights = LossWeights.from_config(config.loss)
  on = _selection_split(config)
  # Under jax.distributed the processes must agree on when to stop (a signal may reach
  # them at different steps): they compare flags at logging steps. One process: every step.
  multi = jax.process_count() > 1

  def save(step, epoch_done, epoch_metrics=None):
    ckpt.save(step, state, dict(meta, epoch=epoch_done, history=history),
              metrics=epoch_metrics)

  def early_stopped() -> bool:
    selected = metrics_lib.select(history, on)
    return bool(config.early_stop_epochs and selected is not None
                and history[-1]["epoch"] - selected["epoch"] >= config.early_stop_epochs)

  def check_finite(recent, step):
    bad = _first_non_finite(recent)
    if bad is not None:
      at, name, value = bad
      last = ckpt.latest_step()
      raise FloatingPointError(
          f"non-finite {name}={value} at step {at} (epoch {at / steps_per_epoch:.2f}); "
          "training stopped without saving. " + (
              f"The last good checkpoint is {ckpt.directory}/{last}" if last is not None
              else "No checkpoint was written yet")
          + f" (config.optim.learning_rate={config.optim.learning_rate}; try a lower one)")

  def preempt(step, signum):
    ckpt.close()
    raise Preempted(
        f"stopped by {f'signal {signum}' if signum else 'a signal to another process'} at step {step} (epoch {step / steps_per_epoch:.2f}); "
        f"checkpoint saved in {ckpt.directory}/{step}. Rerun the same command to resume "
        f"(exit code {PREEMPTED_EXIT_CODE})")

  def run_eval(images, labels):
    result = evaluate(eval_fn, state, images, labels, batch_size=config.eval_batch_size,
                      mesh=mesh, weights=weights)
    metrics_lib.finite_or_raise(result, step)
    return result

  try:
    with _StopFlag() as stop:
      while step < total_steps and not early_stopped():
        epoch, start = divmod(step, steps_per_epoch)
        avg, epoch_avg, epoch_t0 = metrics_lib.Averager(), metrics_lib.Averager(), time.time()
        recent: list[tuple[int, dict]] = []
        t0 = time.time()
        batches = input_pipeline.train_batches(
            train_images, train_labels, batch_size=config.batch_size, seed=config.seed,
            epoch=epoch, start_step=start)
        bar = _progress(steps_per_epoch, start, f"epoch {epoch + 1}/{config.num_epochs}",
                        enabled=config.progress_bar and is_main)
        in_flight = None
        for batch in parallel.prefetch(batches, mesh):
          state, m = train_fn(state, batch, aug_key)
          step += 1
          avg.add(m)
          epoch_avg.add(m)
          recent.append((step, m))
          # Dispatch is asynchronous: tick the bar when the previous step has finished,
          # keeping one step queued, so it shows computed steps, not dispatched ones.
          if in_flight is not None:
            jax.block_until_ready(in_flight)
            bar.update(1)
          in_flight = m["loss"]
          log_now = step % config.log_every_steps == 0 or step % steps_per_epoch == 0
          if log_now:
            check_finite(recent, step)
            recent = []
            values = avg.result()
            dt = time.time() - t0
            values["images_per_s"] = avg.count * config.batch_size / max(dt, 1e-9)
            writer.write(step, step / steps_per_epoch, "train", values)
            bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['accuracy']:.3f}",
                            img_s=f"{values['images_per_s']:.1f}")
            avg, t0 = metrics_lib.Averager(), time.time()
          # Mid-epoch stop; at an epoch end the epoch's evaluation and checkpoint come first.
          if step % steps_per_epoch and (log_now or not multi) and _any_process(
              stop.signal is not None):
            check_finite(recent, step)  # never checkpoint non-finite parameters.
            save(step, step / steps_per_epoch)
            preempt(step, stop.signal)
        if in_flight is not None:
          bar.update(1)
        bar.close()
        epoch_done = step // steps_per_epoch
        epoch_s = time.time() - epoch_t0
        train_epoch = epoch_avg.result()
        val_metrics = run_eval(val_images, val_labels) if len(val_labels) else None
        test_metrics = run_eval(test_images, test_labels)
        entry = {"epoch": epoch_done, "test_accuracy": test_metrics["accuracy"]}
        if val_metrics is not None:
          entry["val_accuracy"] = val_metrics["accuracy"]
          writer.write(step, epoch_done, "val", val_metrics)
        history.append(entry)
        selected = metrics_lib.select(history, on)
        writer.write(step, epoch_done, "test", test_metrics)
        writer.write_epoch(epoch_done, step, train_epoch, test_metrics, seconds=epoch_s,
                           images=epoch_avg.count * config.batch_size, val=val_metrics,
                           selected=(selected["epoch"], selected["test_accuracy"]),
                           train_steps=epoch_avg.count)
        logging.info("epoch %d step %d: test accuracy %.4f, loss %.4f", epoch_done, step,
                     test_metrics["accuracy"], test_metrics["loss"])
        if is_main:
          val_text = ("" if val_metrics is None else
                      f"validation accuracy {100 * val_metrics['accuracy']:.2f}%, ")
          print(f"epoch {epoch_done}: {val_text}test accuracy "
                f"{100 * test_metrics['accuracy']:.2f}% (loss {test_metrics['loss']:.4f})",
                flush=True)
        stopping = step < total_steps and _any_process(stop.signal is not None)
        if (epoch_done % config.checkpoint_every_epochs == 0 or step == total_steps
            or stopping or early_stopped()):
          save(step, epoch_done, entry)
        if is_main:
          metrics_lib.plot_curves(writer.path, os.path.join(workdir, "plots", "curves.png"),
                                  title=f"CapsNet on {info.name}")
        if stopping:
          preempt(step, stop.signal)
  finally:
    writer.close()
  ckpt.close()
  if early_stopped() and is_main:
    print(f"early stop: no better validation accuracy for {config.early_stop_epochs} "
          f"epochs since epoch {metrics_lib.select(history, on)['epoch']}", flush=True)
  if not test_metrics:  # Nothing left to train (a finished run rerun): evaluate once.
    test_metrics = evaluate(eval_fn, state, test_images, test_labels,
                            batch_size=config.eval_batch_size, mesh=mesh, weights=weights)
  summary = metrics_lib.summarize(
      history, dict(test_metrics, step=step, epochs=step / steps_per_epoch), on=on)
  summary["early_stopped"] = early_stopped()
  return summary


def _with_checkpoint_model(config, meta: dict, source: str):
  """A copy of `config` whose model and dataset are the checkpoint's own.

  Settings that leave parameter shapes unchanged (routing iterations, stop_gradient,
  dtype, a dataset of the same image size) cannot be caught by the shape check, so eval
  mode takes them from the checkpoint and says what differed from the command line.
  """
  config = copy.deepcopy(config)
  saved_model, saved_dataset = meta.get("model"), meta.get("dataset")
  diffs = []
  if saved_model is not None:
    saved_model = with_legacy_defaults(saved_model, "model.")
    diffs += _diff(saved_model, json.loads(config.model.to_json_best_effort()), "model.")
  if saved_dataset is not None and saved_dataset != config.dataset:
    diffs.append(f"dataset: {saved_dataset!r} (saved) vs {config.dataset!r} (now)")
  if diffs:
    print(f"capsjax: evaluating {source} with the model and dataset it was trained with; "
          "ignoring the command line's " + "; ".join(diffs), file=sys.stderr, flush=True)
    with config.unlocked():
      if saved_model is not None:
        config.model = config_dict.ConfigDict(saved_model)
      if saved_dataset is not None:
        config.dataset = saved_dataset
  return config


def selected_step(ckpt: ckpt_lib.Checkpointer, step: int) -> int:
  """The step of the epoch selected by the run whose checkpoint `step` is in `ckpt`.

  Selection is on validation accuracy if the run recorded any, else on test accuracy,
  over the per-epoch history saved with the checkpoint.
  """
  meta = ckpt.read_meta(step)
  history = meta.get("history") or []
  on = "val" if any("val_accuracy" in h for h in history) else "test"
  selected = metrics_lib.select(history, on)
  where = f"{ckpt.directory}/{step}"
  if selected is None:
    raise ValueError(
        f"checkpoint {where} records no per-epoch accuracies (saved before capsjax kept "
        "them); evaluate it with --config.eval_checkpoint=latest")
  chosen = int(selected["epoch"]) * int(meta["steps_per_epoch"])
  if chosen not in ckpt.all_steps():
    raise ValueError(
        f"the checkpoint selected on {on} accuracy (epoch {selected['epoch']}, step {chosen}) "
        f"was not kept in {ckpt.directory} (steps {ckpt.all_steps()}); with "
        "checkpoint_every_epochs > 1 the selected epoch may have had no checkpoint")
  return chosen


def evaluate_checkpoint(config, workdir: str) -> dict[str, float]:
  """`mode=eval`: evaluates a checkpoint of `workdir` (or `init_from`) on test.

  The latest one, or with `eval_checkpoint='selected'` the one of the selected epoch. The
  model and dataset come from the checkpoint's metadata (see _with_checkpoint_model).
  """
  source = config.init_from or workdir
  src_dir, src_step = ckpt_lib.find_checkpoint(source)
  src = ckpt_lib.Checkpointer(src_dir, read_only=True)
  if config.eval_checkpoint == "selected":
    src_step = selected_step(src, src_step)
  meta = src.read_meta(src_step)
  config = _with_checkpoint_model(config, meta, f"{src.directory}/{src_step}")
  test_images, test_labels = _load_data(config, "test", config.eval_examples)
  info, mesh, graphdef, state, _, _ = _setup(config, meta.get("steps_per_epoch", 1))
  state, _ = src.restore(src_step, state)
  state = parallel.replicate(state, mesh)
  _, eval_fn = make_steps(graphdef, config, meta.get("steps_per_epoch", 1), mesh)
  result = evaluate(eval_fn, state, test_images, test_labels,
                    batch_size=config.eval_batch_size, mesh=mesh,
                    weights=LossWeights.from_config(config.loss))
  result["step"] = src_step
  print(f"{info.name} test accuracy {100 * result['accuracy']:.2f}% over "
        f"{int(result['count'])} examples (checkpoint {src.directory}/{src_step})", flush=True)
  return result


class _NoBar:
  def update(self, n):
    pass

  def set_postfix(self, **kw):
    pass

  def close(self):
    pass


def _progress(total: int, initial: int, desc: str, *, enabled: bool):
  if not enabled:
    return _NoBar()
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)
