"""Capsule network architectures, one module each, and `create_model`, which builds the one
`config.model.architecture` names:

  'capsnet'            `CapsNet` (Sabour et al. 2017), with any routing of `capsjax.routing`;
  'efficient_capsnet'  `EfficientCapsNet` (Mazzia et al. 2021);
  'matrix_capsnet'     `MatrixCapsNet` (a matrix-capsule network with EM, Hinton et al. 2018).

Every model is called as `model(images, labels=None) -> dict` and exposes its class
capsules' routing as `model.routed(images) -> routing.Routed` (`common.CapsuleModel`).

`BaselineCNN`, the paper's baseline CNN, is not an architecture of the training driver:
`experiments.robustness` compares it with CapsNet.
"""

from __future__ import annotations

import inspect
from typing import Sequence

from flax import nnx

from capsjax import errors
from capsjax.models import common
from capsjax.models.baseline_cnn import BaselineCNN
from capsjax.models.capsnet import CapsNet
from capsjax.models.common import CapsuleModel, check_routing, count_params
from capsjax.models.efficient_capsnet import EfficientCapsNet
from capsjax.models.matrix_capsnet import MatrixCapsNet

__all__ = [
  "ARCHITECTURES",
  "BaselineCNN",
  "CapsNet",
  "CapsuleModel",
  "EfficientCapsNet",
  "MatrixCapsNet",
  "check_routing",
  "count_params",
  "create_model",
  "model_fields",
]

# `config.model.architecture` -> the class `create_model` builds; each class's keywords
# (but image_shape, num_classes, rngs) are that architecture's config.model fields.
ARCHITECTURES = {
  "capsnet": CapsNet,
  "efficient_capsnet": EfficientCapsNet,
  "matrix_capsnet": MatrixCapsNet,
}


def model_fields(architecture: str = "capsnet") -> set[str]:
  """The config.model fields of an architecture: its class's keywords."""
  return set(inspect.signature(ARCHITECTURES[architecture].__init__).parameters) - {
    "self",
    "image_shape",
    "num_classes",
    "rngs",
  }


def create_model(
  model_cfg,
  *,
  image_shape: Sequence[int],
  num_classes: int,
  rngs: nnx.Rngs,
  conv_impl: str | None = None,
) -> CapsuleModel:
  """Builds the model of a `config.model` ConfigDict (or a dict with its fields).

  `ARCHITECTURES[model_cfg.architecture](**model_cfg, image_shape=..., num_classes=...,
  rngs=...)`, CapsNet when the field is absent (configs that predate it).

  The conv lowering: `conv_impl` when given, else the config's. The config value 'auto'
  names the fastest lowering of the machine a run starts on, which depends on the backend
  and XLA's flags; model code never reads those, so a caller whose config may say 'auto'
  resolves it at start-up (`conv_impl=cpu_runtime.resolve_conv_impl(model_cfg.conv_impl)`,
  as `steps.create_model_and_optimizer` and `analysis.load_run` do) and passes the
  lowering here, while the config keeps 'auto' (a saved run's config means the same on
  every machine).

  Args:
    model_cfg: `config.model`; a config without `init`/`length_eps`/`conv_impl` (older
      runs) gets CapsNet's defaults for the first two and 'auto' for the last.
    image_shape: (H, W, C) of the images.
    num_classes: N_out, the number of class capsules.
    rngs: nnx.Rngs with a `params` stream.
    conv_impl: a concrete lowering (one of `capsjax.conv.IMPLS`), or None.

  Returns:
    The model (CapsNet, EfficientCapsNet or MatrixCapsNet).

  Raises:
    errors.ConfigError: a field of `model_cfg` is unknown or has a bad value, or the
      lowering is 'auto' (not resolved).
  """
  fields = dict(model_cfg.items())
  architecture = fields.get("architecture", "capsnet")
  if architecture not in ARCHITECTURES:
    raise errors.ConfigError(
      f"config.model.architecture: must be one of {sorted(ARCHITECTURES)}, got {architecture!r}"
    )
  cls = ARCHITECTURES[architecture]
  known = model_fields(architecture)
  unknown = sorted(set(fields) - known)
  if unknown:
    raise errors.ConfigError(
      f"config.model.{unknown[0]}: not a {cls.__name__} field; expected one of {sorted(known)}"
    )
  configured = fields.get("conv_impl", "auto")
  if configured != "auto":
    common.check_conv_impl(configured)  # a bad config value is named even when overridden.
  fields["conv_impl"] = configured if conv_impl is None else conv_impl
  return cls(**fields, image_shape=image_shape, num_classes=num_classes, rngs=rngs)
