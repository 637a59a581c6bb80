"""`mode=eval`: evaluating a saved checkpoint on the test split.

The latest checkpoint of a workdir (or of `init_from`), or with
`eval_checkpoint='selected'` the one of the epoch the run selected. The model and dataset
come from the checkpoint's own metadata, so a command line that differs in a setting the
parameter shapes cannot reveal (routing iterations, dtype) does not silently change what
is evaluated.

A latest checkpoint that cannot be read, or fails its content digest, falls back with a
warning to the newest readable one before it (`Checkpointer.first_readable`, as a
resumed training run does); nothing is moved aside, eval being read-only. A checkpoint
named by its step (`init_from=.../checkpoints/<step>`) or the selected one is evaluated
as it is or refused with `CheckpointReadError`.
"""

from __future__ import annotations

import copy
import json
import sys

import jax
from ml_collections import config_dict

from capsjax.run import checkpoint as ckpt_lib
from capsjax import errors
from capsjax import metrics as metrics_lib
from capsjax import parallel
from capsjax.run import config as run_config
from capsjax.run import workdir as workdir_lib
from capsjax import setup
from capsjax import steps as steps_lib


# ----------------------------------------------------------------------------------------
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
    saved_model = run_config.with_legacy_defaults(saved_model, "model.")
    diffs += run_config.diff(saved_model, json.loads(config.model.to_json_best_effort()), "model.")
  if saved_dataset is not None and saved_dataset != config.dataset:
    diffs.append(f"dataset: {saved_dataset!r} (saved) vs {config.dataset!r} (now)")
  if diffs:
    print(
      f"capsjax: evaluating {source} with the model and dataset it was trained with; "
      "ignoring the command line's " + "; ".join(diffs),
      file=sys.stderr,
      flush=True,
    )
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
    raise errors.CheckpointNotFoundError(
      f"checkpoint {where} records no per-epoch accuracies (saved before capsjax kept "
      "them); evaluate it with --config.eval_checkpoint=latest"
    )
  chosen = int(selected["epoch"]) * int(meta["steps_per_epoch"])
  if chosen not in ckpt.all_steps():
    raise errors.CheckpointNotFoundError(
      f"the checkpoint selected on {on} accuracy (epoch {selected['epoch']}, step {chosen}) "
      f"was not kept in {ckpt.directory} (steps {ckpt.all_steps()}); with "
      "checkpoint_every_epochs > 1 the selected epoch may have had no checkpoint"
    )
  return chosen


def evaluate_checkpoint(config, workdir: str) -> dict[str, float]:
  """`mode=eval`: evaluates a checkpoint of `workdir` (or `init_from`) on test.

  The latest one, or with `eval_checkpoint='selected'` the one of the selected epoch. The
  model and dataset come from the checkpoint's metadata (see _with_checkpoint_model).
  The latest checkpoint falls back, with a warning, to the newest one before it that
  can be read and passes its content digest, as a resumed training run does; a
  checkpoint named by its step, or the selected one, is evaluated or refused as it is.

  Raises:
    CheckpointNotFoundError: no checkpoint there (or the selected one was not kept).
    CheckpointReadError: the checkpoint (every candidate) cannot be read or is corrupt.
  """
  run_config.validate_config(config, num_devices=jax.device_count())
  # An empty --workdir is refused (`workdir.resolve`), not read as the current directory.
  source = config.init_from or workdir_lib.resolve(workdir)
  src_dir, src_step = ckpt_lib.find_checkpoint(source)
  # Closed on every path: an open Orbax manager can leave a thread that prints a
  # traceback at interpreter exit, after the one-line error.
  with ckpt_lib.Checkpointer(src_dir, read_only=True) as src:
    if config.eval_checkpoint == "selected":
      candidates = [selected_step(src, src_step)]
    elif ckpt_lib.names_a_step(source):
      candidates = [src_step]
    else:
      candidates = [s for s in src.all_steps() if s <= src_step]

    def restore(step):
      meta = src.read_meta(step)
      step_config = _with_checkpoint_model(config, meta, f"{src.directory}/{step}")
      spe = meta.get("steps_per_epoch", 1)
      start = setup.build(step_config, spe)
      state, _ = src.restore(step, start.state)
      return step_config, meta, start.info, start.mesh, start.graphdef, state

    src_step, (config, meta, info, mesh, graphdef, state) = src.first_readable(
      candidates, restore, advice=""
    )
  test_images, test_labels = setup.load_data(config, "test", config.eval_examples)
  state = parallel.replicate(state, mesh)
  _, eval_fn = steps_lib.make_steps(graphdef, config, meta.get("steps_per_epoch", 1), mesh)
  result = steps_lib.evaluate_split(
    eval_fn,
    state,
    test_images,
    test_labels,
    batch_size=config.eval_batch_size,
    mesh=mesh,
    weights=steps_lib.LossWeights.from_config(config.loss),
  )
  result["step"] = src_step
  print(
    f"{info.name} test accuracy {100 * result['accuracy']:.2f}% over "
    f"{int(result['count'])} examples (checkpoint {src.directory}/{src_step})",
    flush=True,
  )
  return result
