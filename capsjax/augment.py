"""Pure-JAX data augmentation, run per example inside the jitted train step.

Every function takes an explicit PRNG key (typed `jax.random.key` or raw), keeps the
image dtype, and works under `jax.jit` and `jax.vmap`. Hyperparameters are static Python
values: changing them recompiles. Per-example functions take one image [H, W, C];
`augment_batch` splits the key and vmaps them over [B, H, W, C].

Two shifts, one per reference family:
  - integer offsets uniform in [-max_shift, max_shift] with zero fill (the paper's "shifted by
    up to 2 pixels in each direction with zero padding");
  - Keras ImageDataGenerator's `width/height_shift_range=f` (CapsNet-Keras,
    CapsNet-Fashion-MNIST): an offset drawn uniform(-f * size, f * size) per axis, applied
    with order-0 interpolation (so rounded to whole pixels) and `fill_mode='nearest'`
    (edge pixels repeated).
Both take a `fill` of 'zero' or 'nearest'. Never flip characters or digits (K-MNIST, MNIST).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


FILLS = ("zero", "nearest")


def sample_shift(key: jax.Array, *, max_shift: int) -> jax.Array:
  """Offsets (dy, dx): int32 [2], each uniform in [-max_shift, max_shift]."""
  return jax.random.randint(key, (2,), -max_shift, max_shift + 1, dtype=jnp.int32)


def fraction_bound(fraction: float, size: int) -> int:
  """Largest |offset| `sample_fraction_shift` can draw along an axis of `size` pixels."""
  return int(math.floor(fraction * size + 0.5))


def sample_fraction_shift(key: jax.Array, *, fraction: float, height: int, width: int) -> jax.Array:
  """Keras-style offsets (dy, dx): int32 [2], round(uniform(-f * size, f * size)).

  With f = 0.1 on 28 pixels the draw is uniform on [-2.8, 2.8], so 0, +-1 and +-2 each have
  probability 1/5.6 and +-3 has 0.3/5.6.
  """
  bound = jnp.array([fraction * height, fraction * width], jnp.float32)  # [2]
  u = jax.random.uniform(key, (2,), jnp.float32, -1.0, 1.0)  # [2]
  return jnp.round(u * bound).astype(jnp.int32)  # [2]


def shift(image: jax.Array, offset: jax.Array, *, max_shift: int, fill: str = "zero") -> jax.Array:
  """Moves pixel (r, c) to (r + dy, c + dx); |dy|, |dx| <= max_shift.

  Args:
    image: [H, W, C].
    offset: int [2], (dy, dx).
    max_shift: static bound on |offset| (the padding width).
    fill: 'zero' (pixels shifted in are 0) or 'nearest' (they repeat the edge pixel,
      Keras's `fill_mode='nearest'`).

  Returns:
    [H, W, C], same dtype.
  """
  if fill not in FILLS:
    raise ValueError(f"fill must be one of {FILLS}, got {fill!r}.")
  h, w, c = image.shape
  m = max_shift
  mode = "constant" if fill == "zero" else "edge"
  padded = jnp.pad(image, ((m, m), (m, m), (0, 0)), mode=mode)  # [H+2m, W+2m, C]
  start = (m - offset[0], m - offset[1], jnp.zeros((), offset.dtype))
  return jax.lax.dynamic_slice(padded, start, (h, w, c))  # [H, W, C]


def random_shift(
  key: jax.Array,
  image: jax.Array,
  *,
  max_shift: int = 0,
  shift_fraction: float = 0.0,
  fill: str = "zero",
) -> jax.Array:
  """Shifts [H, W, C] by a random offset; identity when both bounds are 0.

  Args:
    key: PRNG key.
    image: [H, W, C].
    max_shift: > 0: integer offsets uniform in [-max_shift, max_shift] (`sample_shift`).
    shift_fraction: > 0: Keras-style offsets (`sample_fraction_shift`). Not with max_shift.
    fill: 'zero' or 'nearest', see `shift`.

  Returns:
    [H, W, C], same dtype.
  """
  if max_shift < 0:
    raise ValueError(f"max_shift must be >= 0, got {max_shift}.")
  if not 0.0 <= shift_fraction < 0.5:
    raise ValueError(f"shift_fraction must be in [0, 0.5), got {shift_fraction}.")
  if max_shift and shift_fraction:
    raise ValueError(
      f"give max_shift ({max_shift}) or shift_fraction ({shift_fraction}), not both."
    )
  if shift_fraction:
    h, w, _ = image.shape
    offset = sample_fraction_shift(key, fraction=shift_fraction, height=h, width=w)
    bound = max(fraction_bound(shift_fraction, h), fraction_bound(shift_fraction, w))
    return shift(image, offset, max_shift=bound, fill=fill)
  if max_shift == 0:
    return image
  return shift(image, sample_shift(key, max_shift=max_shift), max_shift=max_shift, fill=fill)


def random_flip(key: jax.Array, image: jax.Array) -> jax.Array:
  """Flips [H, W, C] left-right with probability 0.5."""
  flip = jax.random.bernoulli(key, 0.5)  # []
  return jnp.where(flip, image[:, ::-1, :], image)  # [H, W, C]


def sample_cutout_center(key: jax.Array, *, height: int, width: int) -> jax.Array:
  """Cutout centre (cy, cx): int32 [2], uniform over the pixel grid."""
  ky, kx = jax.random.split(key)
  cy = jax.random.randint(ky, (), 0, height, dtype=jnp.int32)
  cx = jax.random.randint(kx, (), 0, width, dtype=jnp.int32)
  return jnp.stack([cy, cx])


def cutout_at(image: jax.Array, center: jax.Array, *, size: int) -> jax.Array:
  """Zeroes rows [cy - size//2, cy - size//2 + size) x the same for columns, clipped.

  Args:
    image: [H, W, C].
    center: int [2], (cy, cx).
    size: side of the square (static).

  Returns:
    [H, W, C], same dtype.
  """
  h, w, _ = image.shape
  y0 = center[0] - size // 2
  x0 = center[1] - size // 2
  rows = jnp.arange(h)[:, None]  # [H, 1]
  cols = jnp.arange(w)[None, :]  # [1, W]
  inside = (rows >= y0) & (rows < y0 + size) & (cols >= x0) & (cols < x0 + size)  # [H, W]
  return jnp.where(inside[..., None], jnp.zeros((), image.dtype), image)  # [H, W, C]


def cutout(key: jax.Array, image: jax.Array, *, size: int) -> jax.Array:
  """Cutout: zeroes a size x size square at a random centre (clipped at the borders)."""
  if size < 0:
    raise ValueError(f"size must be >= 0, got {size}.")
  if size == 0:
    return image
  h, w, _ = image.shape
  return cutout_at(image, sample_cutout_center(key, height=h, width=w), size=size)


def augment_example(
  key: jax.Array,
  image: jax.Array,
  *,
  max_shift: int = 0,
  flip: bool = False,
  cutout_size: int = 0,
  shift_fraction: float = 0.0,
  fill: str = "zero",
) -> jax.Array:
  """shift -> flip -> Cutout on one image [H, W, C], each with its own subkey."""
  k_shift, k_flip, k_cut = jax.random.split(key, 3)
  image = random_shift(
    k_shift, image, max_shift=max_shift, shift_fraction=shift_fraction, fill=fill
  )
  if flip:
    image = random_flip(k_flip, image)
  return cutout(k_cut, image, size=cutout_size)


def augment_batch(
  key: jax.Array,
  images: jax.Array,
  *,
  max_shift: int = 0,
  flip: bool = False,
  cutout_size: int = 0,
  shift_fraction: float = 0.0,
  fill: str = "zero",
) -> jax.Array:
  """Augments every example of [B, H, W, C] independently; identity when all disabled.

  Args:
    key: PRNG key for the whole batch (e.g. `fold_in(aug_key, step)`).
    images: [B, H, W, C].
    max_shift: random integer shift bound in pixels (0 = off).
    flip: random horizontal flip (Fashion-MNIST only).
    cutout_size: Cutout square side (0 = off).
    shift_fraction: Keras-style shift range as a fraction of the size (0 = off).
    fill: how shifted-in pixels are filled: 'zero' or 'nearest'.

  Returns:
    [B, H, W, C], same dtype.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}.")
  if max_shift == 0 and not shift_fraction and not flip and cutout_size == 0:
    return images
  keys = jax.random.split(key, images.shape[0])  # [B] keys

  def fn(k, x):
    return augment_example(
      k,
      x,
      max_shift=max_shift,
      flip=flip,
      cutout_size=cutout_size,
      shift_fraction=shift_fraction,
      fill=fill,
    )

  return jax.vmap(fn)(keys, images)  # [B, H, W, C]
