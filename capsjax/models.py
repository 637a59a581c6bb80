"""CapsNet (Sabour, Frosst & Hinton 2017): Conv1 -> PrimaryCaps -> DigitCaps -> decoder.

For 28x28x1 inputs and 10 classes with the paper's sizes the model has 8,215,568
parameters (6,804,224 without the decoder); `init='tf'` adds the 160 routing biases. Every size comes from the model config;
any input shape and channel count works (32x32x3 gives 2048 primary capsules).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from capsjax import caps_ops
from capsjax import conv as conv_lib
from capsjax import layers

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _out_size(size: int, kernel: int, stride: int) -> int:
  return (size - kernel) // stride + 1


class CapsNet(nnx.Module):
  """CapsNet. Call as `model(images, labels=None)`; returns a dict of named outputs."""

  def __init__(self, *, image_shape: Sequence[int], num_classes: int,
               conv1_channels: int = 256, conv1_kernel: int = 9, primary_types: int = 32,
               primary_dim: int = 8, primary_kernel: int = 9, primary_stride: int = 2,
               digit_dim: int = 16, routing_iterations: int = 3, stop_gradient: bool = False,
               decoder_hidden: Sequence[int] = (512, 1024), use_decoder: bool = True,
               conv_impl: str = "auto", dtype: str = "float32", init: str = "torch",
               length_eps: float = 1e-7, rngs: nnx.Rngs):
    h, w, c = (int(d) for d in image_shape)
    if dtype not in _DTYPES:
      raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    h1, w1 = _out_size(h, conv1_kernel, 1), _out_size(w, conv1_kernel, 1)
    h2, w2 = _out_size(h1, primary_kernel, primary_stride), _out_size(w1, primary_kernel,
                                                                       primary_stride)
    if min(h2, w2) < 1:
      raise ValueError(
          f"image shape {tuple(image_shape)} is too small for conv1_kernel={conv1_kernel} "
          f"and primary_kernel={primary_kernel} (stride {primary_stride}): PrimaryCaps "
          f"grid would be {h2}x{w2}")
    impl = conv_lib.resolve_impl(conv_impl)
    dt = _DTYPES[dtype]
    self.image_shape = (h, w, c)
    self.num_classes = num_classes
    self.num_primary = h2 * w2 * primary_types
    if not 0 < length_eps <= 1e-3:
      raise ValueError(f"model.length_eps must be in (0, 1e-3], got {length_eps}")
    self.length_eps = float(length_eps)
    self.conv1 = layers.Conv2D(c, conv1_channels, conv1_kernel, impl=impl, dtype=dt,
                               init=init, role="conv1", rngs=rngs)
    self.primary_caps = layers.PrimaryCaps(
        conv1_channels, primary_types, primary_dim, primary_kernel, primary_stride,
        impl=impl, dtype=dt, init=init, rngs=rngs)
    self.digit_caps = layers.RoutedCaps(
        self.num_primary, primary_dim, num_classes, digit_dim,
        routing_iterations=routing_iterations, stop_gradient=stop_gradient, dtype=dt,
        init=init, rngs=rngs)
    self.decoder = (layers.Decoder(num_classes, digit_dim, decoder_hidden, self.image_shape,
                                   dtype=dt, init=init, rngs=rngs) if use_decoder else None)

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
                 rngs: nnx.Rngs) -> CapsNet:
  """Builds CapsNet from a `config.model` ConfigDict (or any object with its fields)."""
  return CapsNet(
      image_shape=image_shape, num_classes=num_classes,
      conv1_channels=model_cfg.conv1_channels, conv1_kernel=model_cfg.conv1_kernel,
      primary_types=model_cfg.primary_types, primary_dim=model_cfg.primary_dim,
      primary_kernel=model_cfg.primary_kernel, primary_stride=model_cfg.primary_stride,
      digit_dim=model_cfg.digit_dim, routing_iterations=model_cfg.routing_iterations,
      stop_gradient=model_cfg.stop_gradient, decoder_hidden=tuple(model_cfg.decoder_hidden),
      use_decoder=model_cfg.use_decoder, conv_impl=model_cfg.conv_impl,
      dtype=model_cfg.dtype, init=model_cfg.get("init", "torch"),
      length_eps=model_cfg.get("length_eps", 1e-7), rngs=rngs)


def count_params(model: nnx.Module) -> int:
  """Number of scalar parameters (nnx.Param leaves) of a model."""
  state = nnx.state(model, nnx.Param)
  return sum(int(x.size) for x in jax.tree.leaves(state))
