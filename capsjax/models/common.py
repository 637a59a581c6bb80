"""What the capsule architectures share: config-field checks, the fields every architecture
accepts, the output dict with its masked decoder, and parameter counting.

Every architecture is a `CapsuleModel`: it defines `routed(images) -> routing.Routed` (its
class capsules' routing) and inherits `__call__`, which turns that into the output dict the
steps, analysis and checkpoints rely on.
"""

from __future__ import annotations

import abc
import math
import dataclasses
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from capsjax import caps_ops
from capsjax import conv as conv_lib
from capsjax import errors
from capsjax import layers
from capsjax import routing as routing_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def positive_int(name: str, value) -> int:
  """`value` as an int if it is an int >= 1; else a ConfigError naming config.model.<name>."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise errors.ConfigError(f"config.model.{name}: must be an int >= 1, got {value!r}")
  return int(value)


def check_bool(name: str, value) -> bool:
  """`value` if it is True or False; else a ConfigError naming config.model.<name>."""
  if not isinstance(value, bool):
    raise errors.ConfigError(f"config.model.{name}: must be True or False, got {value!r}")
  return value


def positive_float(name: str, value) -> float:
  """`value` as a float if it is a number > 0; else a ConfigError naming the field."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
    raise errors.ConfigError(f"config.model.{name}: must be a number > 0, got {value!r}")
  return float(value)


def non_negative_int(name: str, value) -> int:
  """`value` as an int if it is an int >= 0; else a ConfigError naming config.model.<name>."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
    raise errors.ConfigError(f"config.model.{name}: must be an int >= 0, got {value!r}")
  return int(value)


def finite_float(name: str, value) -> float:
  """`value` as a float if it is a finite number; else a ConfigError naming the field."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not abs(value) < math.inf:
    raise errors.ConfigError(f"config.model.{name}: must be a finite number, got {value!r}")
  return float(value)


def check_sizes(name: str, values) -> tuple[int, ...]:
  """A sequence of ints >= 1 (a JSON config gives a list) as a tuple; else a ConfigError
  naming the field, or its bad entry as config.model.<name>[i]."""
  try:
    values = tuple(values)
  except TypeError:
    raise errors.ConfigError(
      f"config.model.{name}: must be a sequence of ints >= 1, got {values!r}"
    ) from None
  return tuple(positive_int(f"{name}[{i}]", v) for i, v in enumerate(values))


def check_routing(routing, allowed: Sequence[str] | None = None) -> str:
  """`routing` if it names a routing of `capsjax.routing` (and is in `allowed`).

  Raises:
    errors.ConfigError: naming config.model.routing and the valid names.
  """
  with errors.config_field("model.routing"):
    routing_lib.get(routing)
  if allowed is not None and routing not in allowed:
    raise errors.ConfigError(
      f"config.model.routing: this architecture supports "
      f"{', '.join(map(repr, allowed))}, got {routing!r}"
    )
  return routing


def check_conv_impl(conv_impl) -> str:
  """`conv_impl` if it is a concrete lowering (one of `capsjax.conv.IMPLS`).

  The config value 'auto' depends on the backend and XLA's flags, which model code never
  reads: the entry point resolves it (`cpu_runtime.resolve_conv_impl`) and passes the
  lowering to `create_model`.
  """
  if conv_impl == "auto":
    raise errors.ConfigError(
      "config.model.conv_impl: 'auto' must be resolved before the model is built: pass "
      "create_model(..., conv_impl=cpu_runtime.resolve_conv_impl('auto'))"
    )
  if conv_impl not in conv_lib.IMPLS:
    raise errors.ConfigError(
      f"config.model.conv_impl: must be 'auto' (resolved at start-up by "
      f"cpu_runtime.resolve_conv_impl) or one of {conv_lib.IMPLS}, got {conv_impl!r}"
    )
  return conv_impl


@dataclasses.dataclass(frozen=True)
class SharedFields:
  """The checked values of the fields every architecture takes (see `check_shared`)."""

  routing: str
  em_final_lambda: float
  conv_impl: str
  dtype: jnp.dtype  # the matmul/conv dtype: jnp.float32 or jnp.bfloat16
  decoder_hidden: tuple[int, ...]
  use_decoder: bool


def check_shared(
  *,
  architecture,
  expected: str,
  routing,
  allowed: Sequence[str] | None,
  routing_iterations,
  init,
  length_eps,
  em_final_lambda,
  conv_impl,
  dtype,
  decoder_hidden,
  use_decoder,
) -> SharedFields:
  """Validates the fields every architecture takes, used or not.

  Every class accepts all of them because `run.config.LEGACY_DEFAULTS` fills them into
  saved configs that lack them: a saved config of any architecture must build again on
  resume and in evaluation.

  Args:
    architecture: config.model.architecture; must be `expected`.
    routing: config.model.routing; must be in `allowed` (None: any routing).
    Others: the config.model fields of the same names.

  Raises:
    errors.ConfigError: naming the first bad field, what it must be and what it was.
  """
  if architecture != expected:
    raise errors.ConfigError(
      f"config.model.architecture: this class builds {expected!r}, "
      f"got {architecture!r}; models.create_model picks the class from it"
    )
  routing = check_routing(routing, allowed)
  with errors.config_field("model.routing_iterations"):
    routing_lib.check_iterations(routing_iterations)  # fail at construction, not in jit.
  if init not in layers.INITS:
    raise errors.ConfigError(f"config.model.init: must be one of {layers.INITS}, got {init!r}")
  if (
    isinstance(length_eps, bool)
    or not isinstance(length_eps, numbers.Real)
    or not 0 < length_eps <= 1e-3
  ):
    raise errors.ConfigError(f"config.model.length_eps: must be in (0, 1e-3], got {length_eps!r}")
  em_final_lambda = positive_float("em_final_lambda", em_final_lambda)
  conv_impl = check_conv_impl(conv_impl)
  if dtype not in DTYPES:
    raise errors.ConfigError(f"config.model.dtype: must be one of {sorted(DTYPES)}, got {dtype!r}")
  return SharedFields(
    routing=routing,
    em_final_lambda=em_final_lambda,
    conv_impl=conv_impl,
    dtype=DTYPES[dtype],
    decoder_hidden=check_sizes("decoder_hidden", decoder_hidden),
    use_decoder=check_bool("use_decoder", use_decoder),
  )


def check_image_shape(image_shape: Sequence[int], num_classes: int) -> tuple[int, int, int]:
  """(H, W, C) of `image_shape` as ints; ValueError unless they and num_classes are >= 1."""
  h, w, c = (int(d) for d in image_shape)
  if min(h, w, c) < 1 or int(num_classes) < 1:
    raise ValueError(
      f"image_shape {tuple(image_shape)} and num_classes {num_classes} must be positive"
    )
  return h, w, c


def grid_after(size: tuple[int, int], kernels: Sequence[int], strides: Sequence[int]):
  """(H', W') after VALID convs of the given kernels and strides; < 1 where they do not fit."""
  h, w = size
  for k, s in zip(kernels, strides, strict=False):
    h, w = conv_lib.out_size(h, k, s), conv_lib.out_size(w, k, s)
  return h, w


def make_decoder(
  fields: SharedFields,
  num_classes: int,
  caps_dim: int,
  image_shape: Sequence[int],
  *,
  init: str,
  rngs: nnx.Rngs,
) -> layers.Decoder | None:
  """The reconstruction decoder of the fields (None when `use_decoder` is False)."""
  if not fields.use_decoder:
    return None
  return layers.Decoder(
    num_classes,
    caps_dim,
    fields.decoder_hidden,
    image_shape,
    dtype=fields.dtype,
    init=init,
    rngs=rngs,
  )


class CapsuleModel(nnx.Module, metaclass=abc.ABCMeta):
  """Base of every architecture. Call as `model(images, labels=None)`.

  A subclass sets `image_shape` (H, W, C), `routing`, `decoder` (a `layers.Decoder` or
  None) and, for the capsule-length scores, `length_eps`, and defines `routed`.
  """

  def check_images(self, images) -> None:
    """Raises ValueError unless images have shape [B, *image_shape] (trace-time check)."""
    if tuple(images.shape[1:]) != self.image_shape:
      raise ValueError(
        f"images must have shape [B, {', '.join(map(str, self.image_shape))}] for this "
        f"model, got {tuple(images.shape)}"
      )

  @abc.abstractmethod
  def routed(self, images: jax.Array) -> routing_lib.Routed:
    """images [B, H, W, C] -> the class capsules' `routing.Routed`: poses
    [B, N_out, D_out], activations [B, N_out], assignments [B, N_in, N_out]."""

  def class_scores(self, routed: routing_lib.Routed) -> jax.Array:
    """The [B, N_out] float32 class scores in (0, 1) the class loss reads.

    EM's activations a_j; for the other routings the capsule lengths
    sqrt(|v_j|^2 + length_eps), what their papers classify with.
    """
    if self.routing == "em":
      return routed.activations.astype(jnp.float32)
    return caps_ops.capsule_lengths(routed.poses, eps=self.length_eps)  # [B, N_out]

  def __call__(self, images: jax.Array, labels: jax.Array | None = None) -> dict[str, jax.Array]:
    """Runs the model.

    Args:
      images: [B, H, W, C] float in [0, 1].
      labels: [B] int class ids: the decoder is masked by the true class (training);
        None masks by the predicted class (evaluation).

    Returns:
      dict with 'v' [B, N_out, D_out] (the class capsules' poses), 'class_scores'
      [B, N_out] (float32, `class_scores`), 'pred' [B] int32 and 'reconstruction'
      [B, H, W, C] (if the model has a decoder). The routing's assignments are
      `routed(images).assignments`.
    """
    r = self.routed(images)
    scores = self.class_scores(r)  # [B, N_out]
    pred = jnp.argmax(scores, axis=-1).astype(jnp.int32)  # [B]
    out = {"v": r.poses, "class_scores": scores, "pred": pred}
    if self.decoder is not None:
      out["reconstruction"] = self.decoder(r.poses, pred if labels is None else labels)
    return out


def count_params(model: nnx.Module) -> int:
  """Number of scalar parameters (nnx.Param leaves) of a model."""
  state = nnx.state(model, nnx.Param)
  return sum(int(x.size) for x in jax.tree.leaves(state))
