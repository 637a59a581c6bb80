"""A run's config: validating it, the fields that define a run, dotted field names.

Every check that needs no data runs here, before anything touches the workdir, so such a
rejected config leaves no trace there. (Checks against the data, e.g. `train_examples`
beyond the dataset, come later; a workdir without checkpoints then takes the corrected
config, see `workdir.check_config`.) The model is built abstractly (`nnx.eval_shape`) to
let `CapsNet` reject
impossible sizes with its own message, without paying for the parameters.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from flax import nnx
import jax

from capsjax import augment
from capsjax import caps_ops
from capsjax import errors
from capsjax.data import input_pipeline
from capsjax import losses
from capsjax import models
from capsjax import optim
from capsjax import parallel

MODES = ("train", "eval")
EVAL_CHECKPOINTS = ("latest", "selected")

# Config fields that define a run: resuming with different values would silently mix
# two experiments, so a workdir keeps its values unless `overwrite` is set.
RUN_DEFINING_FIELDS = (
  "seed",
  "seeds",
  "dataset",
  "train_examples",
  "val_examples",
  "batch_size",
  "model",
  "optim",
  "loss",
  "augment",
)

# Run-defining fields a saved config.json may lack (one written by an earlier capsjax), with
# the values such runs trained with: the file compares as if it had these, so the run still
# resumes. (Those runs initialised 'torch' biases to zero rather than PyTorch's uniform draw;
# a resumed run is past initialisation, so the comparison can ignore it.)
LEGACY_DEFAULTS = {
  "seeds": "",
  "val_examples": 0,
  "model.init": "torch",
  "model.length_eps": 1e-7,
  "augment.shift_fraction": 0.0,
  "augment.fill": "zero",
  "augment.efficient_capsnet": False,
  "optim.min_learning_rate": 0.0,
  "optim.adam_epsilon": 1e-8,
  "optim.adam_epsilon_convention": "optax",
  "optim.plateau_patience": 0,
  "optim.plateau_factor": 0.1,
  "optim.plateau_min_scale": 0.0,
  "model.architecture": "capsnet",
  "model.routing": "dynamic",
  "model.em_final_lambda": 0.01,
  "loss.class_loss": "margin",
  "loss.spread_margin_start": 0.2,
  "loss.spread_margin_end": 0.9,
  "loss.spread_ramp_fraction": 1.0,
  "loss.class_weight": 1.0,
}

# As LEGACY_DEFAULTS, for the model fields of one architecture: a saved
# `model.architecture` picks the entries (JSON values: tuples are lists).
LEGACY_MODEL_DEFAULTS = {
  "capsnet": {"primary_scale": 1.0},
  "matrix_capsnet": {
    "convcaps_types": [],
    "convcaps_kernels": [],
    "convcaps_strides": [],
    "convcaps_per_cell": True,  # no ConvCaps layer then: either value builds that network.
    "conv1_padding": 0,
    "input_mean": 0.0,
    "input_std": 1.0,
  },
}


def _parent(node, field: str):
  """(the node holding the last part of a dotted `field`, that part)."""
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  return node, leaf


def get_field(config, field: str) -> Any:
  """config.<field> for a dotted name ('optim.decay_rate'); KeyError if it has none."""
  node, leaf = _parent(config, field)
  return node[leaf]


def set_field(config, field: str, value: Any) -> None:
  """config.<field> = value for a dotted name ('optim.decay_rate')."""
  node, leaf = _parent(config, field)
  node[leaf] = value


# Each iteration is a pass over every vote of every example: the papers use 1 to 3, sweeps go
# to ~10, and a mistyped count (10**9) would hang the first step rather than fail.
MAX_ROUTING_ITERATIONS = 100


def _check(ok: bool, field: str, message: str) -> None:
  if not ok:
    sep = "" if message.startswith("=") else " "
    raise errors.ConfigError(f"config.{field}{sep}{message}")


def _check_choice(config, field: str, choices) -> None:
  value = get_field(config, field)
  _check(value in choices, field, f"must be one of {tuple(choices)}, got {value!r}")


def validate_config(config, *, num_devices: int | None = None) -> None:
  """Raises `errors.ConfigError` naming the first field a run could not use.

  The one pass over every check that needs no data, run before the workdir is touched:
  mode, sizes, counts, the training loop, augmentation, optimizer, the model's own sizes,
  and with `num_devices` (the global device count) the batch sizes' divisibility.
  """
  _check_choice(config, "mode", MODES)
  _check_choice(config, "eval_checkpoint", EVAL_CHECKPOINTS)
  with errors.config_field("dataset"):
    info = input_pipeline.dataset_info(config.dataset)
  with errors.config_field("model.routing_iterations"):
    caps_ops.check_iterations(config.model.routing_iterations)
  _check(
    config.model.routing_iterations <= MAX_ROUTING_ITERATIONS,
    "model.routing_iterations",
    f"must be <= {MAX_ROUTING_ITERATIONS}, got {config.model.routing_iterations}",
  )
  for name in (
    "seed",
    "batch_size",
    "eval_batch_size",
    "log_every_steps",
    "checkpoint_every_epochs",
    "keep_checkpoints",
    "num_epochs",
    "train_examples",
    "eval_examples",
    "val_examples",
    "early_stop_epochs",
  ):
    value = config[name]
    _check(
      isinstance(value, int) and not isinstance(value, bool),
      name,
      f"must be an integer, got {value!r}",
    )
  for name in (
    "batch_size",
    "eval_batch_size",
    "log_every_steps",
    "checkpoint_every_epochs",
    "keep_checkpoints",
  ):
    _check(config[name] >= 1, name, f"must be >= 1, got {config[name]}")
  for name, zero in (
    ("seed", ""),
    ("num_epochs", ""),
    ("train_examples", " (0 = all)"),
    ("eval_examples", " (0 = all)"),
    ("val_examples", " (0 = no validation split)"),
    ("early_stop_epochs", " (0 = off)"),
  ):
    _check(config[name] >= 0, name, f"must be >= 0{zero}, got {config[name]}")
  # jax.random.key wraps seeds modulo 2**32 (and overflows from 2**63): two seeds would
  # share their initialisation and augmentation keys.
  _check(config.seed < 2**32, "seed", f"must be < 2**32, got {config.seed}")
  seeds(config)
  _check(
    not config.early_stop_epochs or config.val_examples,
    "early_stop_epochs",
    f"={config.early_stop_epochs} needs a validation split (config.val_examples > 0): "
    "capsjax never stops early on test accuracy",
  )
  aug = config.augment
  _check(aug.max_shift >= 0, "augment.max_shift", f"must be >= 0, got {aug.max_shift}")
  _check(aug.cutout_size >= 0, "augment.cutout_size", f"must be >= 0, got {aug.cutout_size}")
  _check(
    0.0 <= aug.shift_fraction < 0.5,
    "augment.shift_fraction",
    f"must be in [0, 0.5), got {aug.shift_fraction}",
  )
  _check(
    not (aug.max_shift and aug.shift_fraction),
    "augment.max_shift",
    f"={aug.max_shift} and shift_fraction={aug.shift_fraction} are two kinds of shift: "
    "set the other to 0",
  )
  _check_choice(config, "loop", parallel.LOOPS)
  steps = config.scan_chunk_steps
  _check(
    isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0,
    "scan_chunk_steps",
    f"must be an integer >= 0 (0 = no limit), got {steps!r}",
  )
  _check(
    config.scan_chunk_seconds > 0,
    "scan_chunk_seconds",
    f"must be > 0, got {config.scan_chunk_seconds!r}",
  )
  if num_devices is not None:
    for name in ("batch_size", "eval_batch_size"):
      try:
        parallel.check_batch_size(config[name], num_devices, name=f"config.{name}")
      except ValueError as e:  # the message names the field and the device count.
        raise errors.ConfigError(str(e)) from e
  _check_choice(config, "augment.fill", augment.FILLS)
  _check_choice(config, "loss.class_loss", losses.CLASS_LOSSES)
  for name in (
    "m_plus",
    "m_minus",
    "lam",
    "recon_weight",
    "class_weight",
    "spread_margin_start",
    "spread_margin_end",
    "spread_ramp_fraction",
  ):
    value = config.loss[name]
    _check(
      isinstance(value, (int, float)) and value == value and value >= 0,
      f"loss.{name}",
      f"must be a number >= 0, got {value!r}",
    )
  optim.validate(config.optim)
  _check_resume_changes(config)
  # The model's own checks (sizes, dtype, length_eps), before any parameter exists.
  jax.eval_shape(
    lambda: nnx.split(
      models.create_model(
        config.model,
        image_shape=info.image_shape,
        num_classes=info.num_classes,
        rngs=nnx.Rngs(params=0),
        conv_impl="xla",  # shapes only: every lowering builds the same parameters.
      )
    )
  )


def seeds(config) -> tuple[int, ...]:
  """The member seeds of `config.seeds` ("0,1,2" -> (0, 1, 2)); () for a single run.

  Raises ConfigError unless they are distinct integers in [0, 2**32).
  """
  text = str(config.get("seeds") or "").strip()
  if not text:
    return ()
  try:
    values = tuple(int(s) for s in text.replace(" ", "").split(","))
  except ValueError:
    raise errors.ConfigError(
      f"config.seeds must be comma-separated integers such as 0,1,2, got {text!r}"
    ) from None
  bad = [s for s in values if not 0 <= s < 2**32]
  _check(not bad, "seeds", f"must lie in [0, 2**32), got {bad[0] if bad else None}")
  _check(len(set(values)) == len(values), "seeds", f"must be distinct, got {text!r}")
  return values


def with_legacy_defaults(saved: dict, prefix: str = "") -> dict:
  """A copy of a saved config dict (or its `prefix` sub-dict) with LEGACY_DEFAULTS filled in."""
  saved = copy.deepcopy(saved)
  for dotted, value in LEGACY_DEFAULTS.items():
    if not dotted.startswith(prefix):
      continue
    try:
      node, leaf = _parent(saved, dotted[len(prefix) :])
    except (KeyError, TypeError):
      continue
    if isinstance(node, dict):
      node.setdefault(leaf, value)
  model = saved if prefix == "model." else saved.get("model") if not prefix else None
  # A hand-edited file may hold any JSON there (a list is unhashable): such a value has no
  # legacy defaults, and the comparison with the config then names it.
  if isinstance(model, dict) and isinstance(model.get("architecture"), (str, type(None))):
    for leaf, value in LEGACY_MODEL_DEFAULTS.get(model.get("architecture"), {}).items():
      model.setdefault(leaf, value)
  return saved


def run_defining_view(config) -> dict:
  """The run-defining fields of `config` as plain JSON values."""
  d = json.loads(config.to_json_best_effort())
  return {k: d[k] for k in RUN_DEFINING_FIELDS if k in d}


def changes(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
  """(dotted field, value in a, value in b) for every leaf where nested dicts differ."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += changes(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [] if a == b else [(prefix.rstrip("."), a, b)]


def diff(a: Any, b: Any, prefix: str = "") -> list[str]:
  """'field: a (saved) vs b (now)' for every leaf where nested dicts `a` and `b` differ."""
  return [f"{field}: {x!r} (saved) vs {y!r} (now)" for field, x, y in changes(a, b, prefix)]


ANY_CHANGE = "*"


def resume_changes(config) -> tuple[str, ...]:
  """The fields or prefixes of `config.resume_with_changes`, e.g. ('optim.learning_rate',)."""
  return tuple(
    f.strip() for f in str(config.get("resume_with_changes") or "").split(",") if f.strip()
  )


def change_allowed(field: str, allowed: tuple[str, ...]) -> bool:
  """Whether dotted `field` is one of `allowed`, lies under one of them, or '*' is given."""
  return any(a == ANY_CHANGE or field == a or field.startswith(a + ".") for a in allowed)


def _check_resume_changes(config) -> None:
  allowed = resume_changes(config)
  for name in allowed:
    if name == ANY_CHANGE:
      continue
    try:
      get_field(config, name)
    except (KeyError, AttributeError, TypeError):
      raise errors.ConfigError(
        f"config.resume_with_changes: {name!r} is not a config field"
      ) from None
    _check(
      name.split(".")[0] in RUN_DEFINING_FIELDS,
      "resume_with_changes",
      f"lists {name!r}, which is not run-defining (it may change on any resume); "
      f"run-defining fields lie under {RUN_DEFINING_FIELDS}",
    )
  _check(
    not (allowed and config.overwrite),
    "resume_with_changes",
    f"={config.resume_with_changes!r} (continue this run's checkpoints) contradicts "
    "overwrite=True (move them aside and start fresh): give one of them",
  )
