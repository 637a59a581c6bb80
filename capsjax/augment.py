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

`efficient_capsnet_example` is Efficient-CapsNet's MNIST pipeline (rotate, shift within
the margins, squish, erase), a transcription of its authors' TensorFlow code.
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


# ----------------------------------------------------------------------------------------
# Efficient-CapsNet's MNIST augmentation: EscVM/Efficient-CapsNet @4b337f5,
# utils/pre_process_mnist.py, applied in the order of generate_tf_data (L113-127).
# ----------------------------------------------------------------------------------------
def _clipped_normal(key: jax.Array, shape, *, absolute: bool) -> jax.Array:
  """N(0, 0.33) draws clipped to (-0.9999, 0.9999), or |N(0, 0.33)| capped at 0.9999."""
  r = 0.33 * jax.random.normal(key, shape, jnp.float32)
  return jnp.minimum(jnp.abs(r), 0.9999) if absolute else jnp.clip(r, -0.9999, 0.9999)


def rotate(image: jax.Array, degrees: jax.Array) -> jax.Array:
  """OpenCV's warpAffine(image, getRotationMatrix2D((W/2, H/2), degrees, 1), (W, H)):
  counter-clockwise by `degrees` about (x, y) = (W/2, H/2), bilinear, zero outside.

  image [H, W, C], degrees [] -> [H, W, C] float32. OpenCV's pixel (x, y) is column x,
  row y, and M maps a source pixel to its destination; each output pixel reads the source
  at M^-1 (x, y). OpenCV rounds those positions to 1/32 pixel; this does not, so the two
  differ by up to ~1/32 of a pixel step in value. `jax.scipy.ndimage.map_coordinates`
  rather than dm-pix: the sampling is all that is needed, and it is what dm-pix calls.
  """
  h, w, _ = image.shape
  t = jnp.deg2rad(degrees.astype(jnp.float32))
  a, b = jnp.cos(t), jnp.sin(t)
  cx, cy = w / 2, h / 2
  ys, xs = jnp.meshgrid(
    jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij"
  )
  # M = [[a, b, (1-a) cx - b cy], [-b, a, b cx + (1-a) cy]]: a rotation R about the centre,
  # so M^-1 (x, y) = R^T ((x, y) - c) + c.
  dx, dy = xs - cx, ys - cy  # [H, W]
  src_x = a * dx - b * dy + cx
  src_y = b * dx + a * dy + cy
  x = image.astype(jnp.float32)

  def channel(img):  # [H, W]
    return jax.scipy.ndimage.map_coordinates(img, [src_y, src_x], order=1, cval=0.0)

  return jnp.stack([channel(x[..., i]) for i in range(x.shape[-1])], axis=-1)  # [H, W, C]


def random_rotate(key: jax.Array, image: jax.Array) -> jax.Array:
  """`image_rotate_random` (L70-77): for half the images (a second draw > 0 keeps the
  original), a rotation by trunc(clip(N(0, 0.33)) x 30) whole degrees (OpenCV's
  `int(angle)`), so |angle| <= 29."""
  r = _clipped_normal(key, (2,), absolute=False)  # [2]
  degrees = jnp.trunc(r[0] * 30.0)
  return jnp.where(r[1] > 0, image.astype(jnp.float32), rotate(image, degrees))


def margin_shift_offset(image: jax.Array, amounts: jax.Array, directions: jax.Array) -> jax.Array:
  """`image_shift_rand`'s offset (dy, dx), int32 [2] (L31-61).

  Per axis a fraction `amounts` in [0, 1) of the empty margin on the side `directions`
  picks (0: towards row/column 0, by floor(-a x the margin there); 1: the other way, by
  floor(a x (1 + the margin there))), so the object stays on the image. amounts:
  [2] for (x, y); directions: int [2], (for y, for x), as the source indexes them.
  """
  h, w = image.shape[:2]
  mass = jnp.sum(image.astype(jnp.float32), axis=-1)  # [H, W]
  cols, rows = jnp.sum(mass, axis=0) > 0, jnp.sum(mass, axis=1) > 0  # [W], [H]
  # Empty rows/columns before the first and after the last non-zero one (an empty image
  # has margins 0 and stays put).
  left, right_margin = jnp.argmax(cols), jnp.argmax(cols[::-1])
  top, bottom_margin = jnp.argmax(rows), jnp.argmax(rows[::-1])
  ax, ay = amounts[0], amounts[1]
  x_amts = jnp.stack([jnp.floor(-ax * left), jnp.floor(ax * (1 + right_margin))])
  y_amts = jnp.stack([jnp.floor(-ay * top), jnp.floor(ay * (1 + bottom_margin))])
  return jnp.stack([y_amts[directions[0]], x_amts[directions[1]]]).astype(jnp.int32)


def random_margin_shift(key: jax.Array, image: jax.Array) -> jax.Array:
  """`image_shift_rand`: the offset of `margin_shift_offset` with amounts min(|N(0, 0.33)|,
  0.9999) and uniform directions, applied as the source's `tf.roll` (the margin keeps
  the object from wrapping)."""
  k_dir, k_amt = jax.random.split(key)
  directions = jnp.floor(jax.random.uniform(k_dir, (2,)) * 2).astype(jnp.int32)
  amounts = _clipped_normal(k_amt, (2,), absolute=True)
  dy, dx = margin_shift_offset(image, amounts, directions)
  return jnp.roll(image, (dy, dx), axis=(0, 1))


def squish(image: jax.Array, width_mod: jax.Array, offset: jax.Array) -> jax.Array:
  """`image_squish_random`'s transform (L93-108): the image resized to W - width_mod
  columns (Lanczos-3 with antialiasing, as `tf.image.resize(..., LANCZOS3,
  antialias=True)`), placed `offset` columns from the left on a zero image, cut to W.

  One `jax.image.scale_and_translate` (the op behind both libraries' resize): a resize
  is a scale with translation 0, the placement a translation by `offset`, and output
  pixels that sample outside the resized image get zero weight, as the padding does.
  """
  h, w, c = image.shape
  scale = (w - width_mod.astype(jnp.float32)) / w
  return jax.image.scale_and_translate(
    image.astype(jnp.float32),
    (h, w, c),
    spatial_dims=(1,),
    scale=scale[None],
    translation=offset.astype(jnp.float32)[None],
    method="lanczos3",
    antialias=True,
  )


def random_squish(key: jax.Array, image: jax.Array) -> jax.Array:
  """`image_squish_random`: width_mod = floor(a0 x W/4 + 1) (1 to 7 columns for W = 28),
  offset = width_mod // 2 + floor(a1 x 2), a = min(|N(0, 0.33)|, 0.9999)."""
  w = image.shape[1]
  a = _clipped_normal(key, (2,), absolute=True)
  width_mod = jnp.floor(a[0] * (w / 4) + 1).astype(jnp.int32)
  offset = width_mod // 2 + jnp.floor(a[1] * 2.0).astype(jnp.int32)
  return squish(image, width_mod, offset)


def random_erase(key: jax.Array, image: jax.Array) -> jax.Array:
  """`image_erase_random` (L79-90): a 4x4 square of zeros with its top-left corner at
  rows/columns floor(u x (size - 9)) + 4 (4 to 22 for 28 pixels)."""
  h, w, _ = image.shape
  u = jax.random.uniform(key, (2,))
  top = jnp.floor(u[0] * (h - 9)).astype(jnp.int32) + 4
  left = jnp.floor(u[1] * (w - 9)).astype(jnp.int32) + 4
  return cutout_at(image, jnp.stack([top + 2, left + 2]), size=4)


def efficient_capsnet_example(key: jax.Array, image: jax.Array) -> jax.Array:
  """Efficient-CapsNet's MNIST training augmentation of one image [H, W, C] (float32):
  rotate -> shift within the margins -> squish -> erase, each with its own subkey."""
  k_rot, k_shift, k_squish, k_erase = jax.random.split(key, 4)
  image = random_rotate(k_rot, image)
  image = random_margin_shift(k_shift, image)
  image = random_squish(k_squish, image)
  return random_erase(k_erase, image)


def augment_example(
  key: jax.Array,
  image: jax.Array,
  *,
  max_shift: int = 0,
  flip: bool = False,
  cutout_size: int = 0,
  shift_fraction: float = 0.0,
  fill: str = "zero",
  efficient_capsnet: bool = False,
) -> jax.Array:
  """[Efficient-CapsNet's pipeline ->] shift -> flip -> Cutout on one image [H, W, C],
  each with its own subkey."""
  if efficient_capsnet:
    dtype = image.dtype
    image = efficient_capsnet_example(jax.random.fold_in(key, 1), image).astype(dtype)
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
  efficient_capsnet: bool = False,
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
    efficient_capsnet: Efficient-CapsNet's MNIST pipeline first
      (`efficient_capsnet_example`).

  Returns:
    [B, H, W, C], same dtype.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}.")
  if max_shift == 0 and not shift_fraction and not flip and cutout_size == 0:
    if not efficient_capsnet:
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
      efficient_capsnet=efficient_capsnet,
    )

  return jax.vmap(fn)(keys, images)  # [B, H, W, C]
