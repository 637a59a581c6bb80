"""2-D convolutions for CapsNet (VALID padding, square stride), with selectable lowering.

`conv2d(x, w, stride=..., impl=...)` with impl 'xla' is `lax.conv_general_dilated`.
Other lowerings are added for speed on backends where XLA's own conv is slow.
"""

from __future__ import annotations

import jax
from jax import lax

IMPLS = ("xla",)


def conv2d(x: jax.Array, w: jax.Array, *, stride: int = 1, impl: str = "xla") -> jax.Array:
  """VALID 2-D convolution.

  Args:
    x: [B, H, W, C_in] images.
    w: [kh, kw, C_in, C_out] kernel.
    stride: the same stride along both spatial axes.
    impl: one of IMPLS.

  Returns:
    [B, (H - kh) // stride + 1, (W - kw) // stride + 1, C_out].
  """
  if impl not in IMPLS:
    raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}")
  return lax.conv_general_dilated(
      x, w, window_strides=(stride, stride), padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def resolve_impl(impl: str) -> str:
  """Maps 'auto' to the lowering used on the default backend; validates names."""
  if impl == "auto":
    return "xla"
  if impl not in IMPLS:
    raise ValueError(f"conv impl must be 'auto' or one of {IMPLS}, got {impl!r}")
  return impl
