"""Pure-JAX data augmentation, run per example inside the jitted train step.

Every function takes an explicit PRNG key (typed `jax.random.key` or raw), keeps the
image dtype, and works under `jax.jit` and `jax.vmap`. Hyperparameters are static Python
values: changing them recompiles. Per-example functions take one image [H, W, C];
`augment_batch` splits the key and vmaps them over [B, H, W, C].

Seeds: Fashion-MNIST uses shift 2 + horizontal flip; K-MNIST uses shift 2 + Cutout (never
flip characters or digits).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_shift(key: jax.Array, *, max_shift: int) -> jax.Array:
  """Offsets (dy, dx): int32 [2], each uniform in [-max_shift, max_shift]."""
  return jax.random.randint(key, (2,), -max_shift, max_shift + 1, dtype=jnp.int32)


def shift(image: jax.Array, offset: jax.Array, *, max_shift: int) -> jax.Array:
  """Moves pixel (r, c) to (r + dy, c + dx), zero fill; |dy|, |dx| <= max_shift.

  Args:
    image: [H, W, C].
    offset: int [2], (dy, dx).
    max_shift: static bound on |offset| (the padding width).

  Returns:
    [H, W, C], same dtype.
  """
  h, w, c = image.shape
  m = max_shift
  padded = jnp.pad(image, ((m, m), (m, m), (0, 0)))                  # [H+2m, W+2m, C]
  start = (m - offset[0], m - offset[1], jnp.zeros((), offset.dtype))
  return jax.lax.dynamic_slice(padded, start, (h, w, c))             # [H, W, C]


def random_shift(key: jax.Array, image: jax.Array, *, max_shift: int) -> jax.Array:
  """Shifts [H, W, C] by `sample_shift(key, max_shift=max_shift)` with zero fill."""
  if max_shift < 0:
    raise ValueError(f'max_shift must be >= 0, got {max_shift}.')
  if max_shift == 0:
    return image
  return shift(image, sample_shift(key, max_shift=max_shift), max_shift=max_shift)


def random_flip(key: jax.Array, image: jax.Array) -> jax.Array:
  """Flips [H, W, C] left-right with probability 0.5."""
  flip = jax.random.bernoulli(key, 0.5)                              # []
  return jnp.where(flip, image[:, ::-1, :], image)                   # [H, W, C]


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
  rows = jnp.arange(h)[:, None]                                      # [H, 1]
  cols = jnp.arange(w)[None, :]                                      # [1, W]
  inside = (rows >= y0) & (rows < y0 + size) & (cols >= x0) & (cols < x0 + size)  # [H, W]
  return jnp.where(inside[..., None], jnp.zeros((), image.dtype), image)  # [H, W, C]


def cutout(key: jax.Array, image: jax.Array, *, size: int) -> jax.Array:
  """Cutout: zeroes a size x size square at a random centre (clipped at the borders)."""
  if size < 0:
    raise ValueError(f'size must be >= 0, got {size}.')
  if size == 0:
    return image
  h, w, _ = image.shape
  return cutout_at(image, sample_cutout_center(key, height=h, width=w), size=size)


def augment_example(key: jax.Array, image: jax.Array, *, max_shift: int = 0,
                    flip: bool = False, cutout_size: int = 0) -> jax.Array:
  """shift -> flip -> Cutout on one image [H, W, C], each with its own subkey."""
  k_shift, k_flip, k_cut = jax.random.split(key, 3)
  image = random_shift(k_shift, image, max_shift=max_shift)
  if flip:
    image = random_flip(k_flip, image)
  return cutout(k_cut, image, size=cutout_size)


def augment_batch(key: jax.Array, images: jax.Array, *, max_shift: int = 0,
                  flip: bool = False, cutout_size: int = 0) -> jax.Array:
  """Augments every example of [B, H, W, C] independently; identity when all disabled.

  Args:
    key: PRNG key for the whole batch (e.g. `fold_in(aug_key, step)`).
    images: [B, H, W, C].
    max_shift: random shift bound in pixels (0 = off).
    flip: random horizontal flip (Fashion-MNIST only).
    cutout_size: Cutout square side (0 = off).

  Returns:
    [B, H, W, C], same dtype.
  """
  if images.ndim != 4:
    raise ValueError(f'images must be [B, H, W, C], got shape {images.shape}.')
  if max_shift == 0 and not flip and cutout_size == 0:
    return images
  keys = jax.random.split(key, images.shape[0])                     # [B] keys
  fn = lambda k, x: augment_example(k, x, max_shift=max_shift, flip=flip,
                                    cutout_size=cutout_size)
  return jax.vmap(fn)(keys, images)                                  # [B, H, W, C]
