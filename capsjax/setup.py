"""What a run starts from: its data splits, its mesh, model and optimizer state.

Training (`capsjax.train`) and checkpoint evaluation (`capsjax.evaluate`) both build on
these, so neither imports the other.

Model selection: with `config.val_examples > 0` a fixed part of the training split is held
out (`input_pipeline.split_validation`), and the kept "best" checkpoint, the selected epoch
and early stopping use validation accuracy only. With `val_examples = 0` (the reference
recipes, to train on what they trained on) selection falls back to test accuracy, as in the
references, which used the test set as their validation data, and every report says so.
"""

from __future__ import annotations

import dataclasses
import json

from absl import logging
from flax import nnx
import jax
import numpy as np

from capsjax import errors
from capsjax import models
from capsjax import parallel
from capsjax import steps as steps_lib
from capsjax.data import input_pipeline
from capsjax.run import checkpoint as ckpt_lib
from capsjax.run import config as run_config


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
  subsets it, so it is the same for every `train_examples` and seed. The checks that need
  the data (sizes against the dataset's) happen here; the others ran in
  `run.config.validate_config`.
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
  train = _subset(train_images, train_labels, config.train_examples)
  if config.batch_size > len(train[1]):
    raise errors.ConfigError(
      f"config.batch_size={config.batch_size} is larger than the training set "
      f"({len(train[1])} examples)"
    )
  return Splits(train=train, val=(val_images, val_labels), test=test)


def selection_split(config) -> str:
  """'val' when the run holds out a validation split, else 'test' (as the references)."""
  return "val" if config.val_examples else "test"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Start:
  """A run's starting point: dataset info, mesh, model graph and state, keys."""

  info: input_pipeline.DatasetInfo
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  state: nnx.State  # (model, optimizer), not yet placed on the mesh.
  aug_key: jax.Array
  num_params: int


def build(config, steps_per_epoch: int) -> Start:
  """The model and optimizer of `config`, initialised from `config.seed`, and the mesh."""
  info = input_pipeline.dataset_info(config.dataset)
  mesh = parallel.make_mesh()
  init_key, aug_key = jax.random.split(jax.random.key(config.seed))
  graphdef, state = steps_lib.create_model_and_optimizer(config, info, steps_per_epoch, init_key)
  logging.info(
    "mesh: %s over %d device(s): %s", dict(mesh.shape), parallel.num_devices(mesh), jax.devices()
  )
  model, _ = nnx.merge(graphdef, state)
  num_params = models.count_params(model)
  logging.info("CapsNet parameters: %s", f"{num_params:,}")
  return Start(
    info=info, mesh=mesh, graphdef=graphdef, state=state, aug_key=aug_key, num_params=num_params
  )


def restore_or_init(config, ckpt: ckpt_lib.Checkpointer, state, *, steps_per_epoch: int):
  """Restores the latest checkpoint of `ckpt`, or `init_from` weights, or keeps `state`.

  A checkpoint is resumed only by the run that wrote it (`check_same_run`), at the same
  number of steps per epoch (`check_steps_per_epoch`). Returns (state, step, meta of the
  restored checkpoint or {}).
  """
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state, meta, step = restored
    check_same_run(config, meta, f"{ckpt.directory}/{step}")
    check_steps_per_epoch(meta, steps_per_epoch, f"{ckpt.directory}/{step}")
    logging.info("resumed from %s at step %d", ckpt.directory, step)
    return state, step, meta
  return initial_state(config, state), 0, {}


def check_same_run(config, meta: dict, source: str) -> None:
  """Refuses to resume a checkpoint trained with other run-defining values than `config`.

  The workdir's config.json guards a rerun's config; this guards the checkpoints beside it,
  which may have been copied in from another run of the same shapes (another number of
  routing iterations, another seed), where the parameter-shape check sees nothing. Fields
  that `config.resume_with_changes` names are allowed to differ. Checkpoints saved before
  the run-defining fields were recorded carry only the model and dataset, and only those
  are compared.
  """
  if "run" in meta:
    saved = run_config.with_legacy_defaults(meta["run"])
  else:
    saved = {"dataset": meta.get("dataset")}
    if isinstance(meta.get("model"), dict):
      saved["model"] = run_config.with_legacy_defaults(meta["model"], "model.")
  saved = {k: v for k, v in saved.items() if k in run_config.RUN_DEFINING_FIELDS and v is not None}
  now = run_config.run_defining_view(config)
  allowed = run_config.resume_changes(config)
  refused = [
    c
    for c in run_config.changes(saved, {k: now.get(k) for k in saved})
    if not run_config.change_allowed(c[0], allowed)
  ]
  if refused:
    raise errors.CheckpointMismatchError(
      f"checkpoint {source} was trained with a different config ("
      + "; ".join(f"{f}: {a!r} (checkpoint) vs {b!r} (now)" for f, a, b in refused[:5])
      + "): it belongs to another run. Move it aside or use its own workdir; or pass "
      "--config.resume_with_changes="
      + ",".join(f for f, _, _ in refused[:5])
      + " to continue it with the new values"
    )


def check_steps_per_epoch(meta: dict, steps_per_epoch: int, source: str) -> None:
  """Refuses a checkpoint whose run made another number of steps per epoch.

  A run's progress is its step count: with another batch size or training-set size
  (`resume_with_changes` may allow either) the same step would be another epoch, and
  epochs would be skipped or counted twice.
  """
  saved = meta.get("steps_per_epoch")
  if saved is not None and saved != steps_per_epoch:
    raise errors.CheckpointMismatchError(
      f"checkpoint {source} was trained at {saved} steps per epoch, this config makes "
      f"{steps_per_epoch} (config.batch_size, train_examples or val_examples changed): "
      "its step would be another epoch here. Resume with the values it was trained with; "
      "or start a new --workdir with --config.init_from=<this checkpoint> (weights only)"
    )


def initial_state(config, state):
  """The state a run starts from: `state` with the weights of `config.init_from`, if set."""
  if not config.init_from:
    return state
  src_dir, src_step = ckpt_lib.find_checkpoint(config.init_from)
  with ckpt_lib.Checkpointer(src_dir, read_only=True) as src:
    restored, _ = src.restore(src_step, state)
  logging.info("initialised weights from %s step %d", src.directory, src_step)
  # Only the weights: the optimizer (step count, moments) starts fresh.
  return nnx.State({0: restored[0], 1: state[1]})


def checkpoint_meta(config, info: input_pipeline.DatasetInfo, steps_per_epoch: int) -> dict:
  """What every checkpoint of a run records besides its arrays (mode=eval reads it)."""
  return {
    "run": run_config.run_defining_view(config),
    "dataset": config.dataset,
    "model": json.loads(config.model.to_json_best_effort()),
    "image_shape": list(info.image_shape),
    "num_classes": info.num_classes,
    "steps_per_epoch": steps_per_epoch,
  }
