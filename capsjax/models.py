"""CapsNet (Sabour, Frosst & Hinton 2017): Conv1 -> PrimaryCaps -> DigitCaps -> decoder.

For 28x28x1 inputs and 10 classes with the paper's sizes the model has 8,215,568
parameters (6,804,224 without the decoder); `init='tf'` adds the 160 routing biases.
Every size comes from the model config; any input shape and channel count works (32x32x3
gives 2048 primary capsules).

`CapsNet`'s keyword arguments are the fields of `config.model`, so a config builds it as
`CapsNet(**config.model, image_shape=..., num_classes=..., rngs=...)`; `create_model` does
that and also resolves the config value `conv_impl='auto'` (see there).
"""

from __future__ import annotations

import inspect
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from capsjax import caps_ops
from capsjax import conv as conv_lib
# Only `create_model` uses it, to turn the config value conv_impl='auto' into a lowering;
# CapsNet and the layers take a concrete one and never read the environment.
from capsjax import cpu_runtime
from capsjax import errors
from capsjax import layers

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The positive integer sizes of `config.model`.
_SIZE_FIELDS = ("conv1_channels", "conv1_kernel", "primary_types", "primary_dim",
                "primary_kernel", "primary_stride", "digit_dim")


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise errors.ConfigError(f"config.model.{name}: must be an int >= 1, got {value!r}")
  return int(value)


def _check_bool(name: str, value) -> bool:
  if not isinstance(value, bool):
    raise errors.ConfigError(f"config.model.{name}: must be True or False, got {value!r}")
  return value


class CapsNet(nnx.Module):
  """CapsNet. Call as `model(images, labels=None)`; returns a dict of named outputs.

  Every keyword but `image_shape`, `num_classes` and `rngs` is the `config.model` field of
  the same name (configs/common.py documents them). The defaults are the paper's sizes;
  `init` and `length_eps` default to what runs saved before those fields existed used.
  A bad field value raises `errors.ConfigError` naming it ("config.model.primary_stride:
  ...") before anything is allocated.

  `conv_impl` must be a concrete lowering (one of `capsjax.conv.IMPLS`; default 'xla', the
  reference). The config value 'auto' depends on the backend and XLA's flags, so it is
  resolved at start-up (`cpu_runtime.resolve_conv_impl`, which `create_model` calls) and
  raises here.
  """

  def __init__(self, *, image_shape: Sequence[int], num_classes: int,
               conv1_channels: int = 256, conv1_kernel: int = 9, primary_types: int = 32,
               primary_dim: int = 8, primary_kernel: int = 9, primary_stride: int = 2,
               digit_dim: int = 16, routing_iterations: int = 3, stop_gradient: bool = False,
               decoder_hidden: Sequence[int] = (512, 1024), use_decoder: bool = True,
               conv_impl: str = "xla", dtype: str = "float32", init: str = "torch",
               length_eps: float = 1e-7, rngs: nnx.Rngs):
    h, w, c = (int(d) for d in image_shape)
    if min(h, w, c) < 1 or int(num_classes) < 1:
      raise ValueError(f"image_shape {tuple(image_shape)} and num_classes {num_classes} "
                       "must be positive")
    sizes = dict(conv1_channels=conv1_channels, conv1_kernel=conv1_kernel,
                 primary_types=primary_types, primary_dim=primary_dim,
                 primary_kernel=primary_kernel, primary_stride=primary_stride,
                 digit_dim=digit_dim)
    sizes = {name: _positive_int(name, sizes[name]) for name in _SIZE_FIELDS}
    try:
      decoder_hidden = tuple(decoder_hidden)   # a JSON config gives a list.
    except TypeError:
      raise errors.ConfigError(f"config.model.decoder_hidden: must be a sequence of ints "
                               f">= 1, got {decoder_hidden!r}") from None
    for i, units in enumerate(decoder_hidden):
      _positive_int(f"decoder_hidden[{i}]", units)
    decoder_hidden = tuple(int(u) for u in decoder_hidden)
    with errors.config_field("model.routing_iterations"):
      caps_ops.check_iterations(routing_iterations)   # fail at construction, not in jit.
    stop_gradient = _check_bool("stop_gradient", stop_gradient)
    use_decoder = _check_bool("use_decoder", use_decoder)
    if conv_impl == "auto":
      raise errors.ConfigError(
          "config.model.conv_impl: 'auto' must be resolved before the model is built: pass "
          "cpu_runtime.resolve_conv_impl('auto') (models.create_model does)")
    if conv_impl not in conv_lib.IMPLS:
      raise errors.ConfigError(f"config.model.conv_impl: must be 'auto' or one of "
                               f"{conv_lib.IMPLS}, got {conv_impl!r}")
    if dtype not in _DTYPES:
      raise errors.ConfigError(f"config.model.dtype: must be one of {sorted(_DTYPES)}, got "
                               f"{dtype!r}")
    if init not in layers.INITS:
      raise errors.ConfigError(f"config.model.init: must be one of {layers.INITS}, got "
                               f"{init!r}")
    if (isinstance(length_eps, bool) or not isinstance(length_eps, numbers.Real)
        or not 0 < length_eps <= 1e-3):
      raise errors.ConfigError(f"config.model.length_eps: must be in (0, 1e-3], got "
                               f"{length_eps!r}")
    k1, kp, sp = sizes["conv1_kernel"], sizes["primary_kernel"], sizes["primary_stride"]
    h1, w1 = conv_lib.out_size(h, k1, 1), conv_lib.out_size(w, k1, 1)
    h2, w2 = conv_lib.out_size(h1, kp, sp), conv_lib.out_size(w1, kp, sp)
    if min(h1, w1) < 1 or min(h2, w2) < 1:
      raise errors.ConfigError(
          f"config.model.conv1_kernel={k1}, primary_kernel={kp}, primary_stride={sp}: the "
          f"image shape {(h, w, c)} is too small for them (PrimaryCaps grid would be "
          f"{h2}x{w2})")
    dt = _DTYPES[dtype]
    self.image_shape = (h, w, c)
    self.num_classes = int(num_classes)
    self.num_primary = h2 * w2 * sizes["primary_types"]
    self.length_eps = float(length_eps)
    ch1, types, dim = sizes["conv1_channels"], sizes["primary_types"], sizes["primary_dim"]
    self.conv1 = layers.Conv2D(c, ch1, k1, impl=conv_impl, dtype=dt, init=init,
                               role="conv1", rngs=rngs)
    self.primary_caps = layers.PrimaryCaps(ch1, types, dim, kp, sp, impl=conv_impl,
                                           dtype=dt, init=init, rngs=rngs)
    self.digit_caps = layers.RoutedCaps(
        self.num_primary, dim, self.num_classes, sizes["digit_dim"],
        routing_iterations=routing_iterations, stop_gradient=stop_gradient, dtype=dt,
        init=init, rngs=rngs)
    self.decoder = (layers.Decoder(self.num_classes, sizes["digit_dim"], decoder_hidden,
                                   self.image_shape, dtype=dt, init=init, rngs=rngs)
                    if use_decoder else None)

  def check_images(self, images) -> None:
    """Raises ValueError unless images have shape [B, *image_shape] (trace-time check)."""
    if tuple(images.shape[1:]) != self.image_shape:
      raise ValueError(
          f"images must have shape [B, {', '.join(map(str, self.image_shape))}] for this "
          f"model, got {tuple(images.shape)}")

  def capsules(self, images: jax.Array, *, return_couplings: bool = False):
    """images [B, H, W, C] -> v [B, N_out, D_out] (and couplings c [B, N_in, N_out])."""
    self.check_images(images)
    x = jax.nn.relu(self.conv1(images))                                # [B, H1, W1, conv1]
    u = self.primary_caps(x)                                           # [B, N_in, D_in]
    return self.digit_caps(u, return_couplings=return_couplings)

  def __call__(self, images: jax.Array, labels: jax.Array | None = None, *,
               return_couplings: bool = False) -> dict[str, jax.Array]:
    """Runs CapsNet.

    Args:
      images: [B, H, W, C] float in [0, 1].
      labels: [B] int class ids: the decoder is masked by the true class (training);
        None masks by the predicted class (evaluation).
      return_couplings: also return the final coupling coefficients.

    Returns:
      dict with 'v' [B, N_out, D_out], 'lengths' [B, N_out] (float32), 'pred' [B] int32,
      'reconstruction' [B, H, W, C] (if the model has a decoder) and 'couplings'
      [B, N_in, N_out] (if asked for).
    """
    out = {}
    if return_couplings:
      v, out["couplings"] = self.capsules(images, return_couplings=True)
    else:
      v = self.capsules(images)
    lengths = caps_ops.capsule_lengths(v, eps=self.length_eps)         # [B, N_out]
    pred = jnp.argmax(lengths, axis=-1).astype(jnp.int32)              # [B]
    out.update(v=v, lengths=lengths, pred=pred)
    if self.decoder is not None:
      out["reconstruction"] = self.decoder(v, pred if labels is None else labels)
    return out


def create_model(model_cfg, *, image_shape: Sequence[int], num_classes: int,
                 rngs: nnx.Rngs, conv_impl: str | None = None) -> CapsNet:
  """Builds CapsNet from a `config.model` ConfigDict (or a dict with its fields).

  `CapsNet(**model_cfg, image_shape=..., num_classes=..., rngs=...)`, with the config's
  conv_impl replaced by a concrete lowering: `conv_impl` when the caller resolved it at
  start-up (the config keeps 'auto', so a saved run's config means the same on every
  machine), else `cpu_runtime.resolve_conv_impl(model_cfg.conv_impl)`, which reads the
  default backend and XLA_FLAGS (call it after `cpu_runtime.configure_cpu_runtime()`).

  Args:
    model_cfg: `config.model`; a config saved before `init`/`length_eps` existed may
      lack them (CapsNet's defaults apply).
    image_shape: (H, W, C) of the images.
    num_classes: N_out, the number of class capsules.
    rngs: nnx.Rngs with a `params` stream.
    conv_impl: a concrete lowering (one of `capsjax.conv.IMPLS`), or None.

  Returns:
    The CapsNet.

  Raises:
    errors.ConfigError: a field of `model_cfg` is unknown or has a bad value.
  """
  fields = dict(model_cfg.items())
  known = set(inspect.signature(CapsNet.__init__).parameters) - {
      "self", "image_shape", "num_classes", "rngs"}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise errors.ConfigError(f"config.model.{unknown[0]}: not a CapsNet field; expected "
                             f"one of {sorted(known)}")
  if conv_impl is None:
    with errors.config_field("model.conv_impl"):
      conv_impl = cpu_runtime.resolve_conv_impl(fields.get("conv_impl", "auto"))
  fields["conv_impl"] = conv_impl
  return CapsNet(**fields, image_shape=image_shape, num_classes=num_classes, rngs=rngs)


def count_params(model: nnx.Module) -> int:
  """Number of scalar parameters (nnx.Param leaves) of a model."""
  state = nnx.state(model, nnx.Param)
  return sum(int(x.size) for x in jax.tree.leaves(state))
