"""Pure-JAX generators of the paper's robustness sets from any 28x28 dataset, run on device.

Sabour, Frosst & Hinton (2017) test two kinds of robustness:
  - Sec. 5.2, affine transformations: train on "expanded MNIST", each 28x28 digit placed at
    a random position on a 40x40 black background (`random_translate`), and test on
    affNIST, the same digits under random affine transformations on the 40x40 canvas
    (`random_affine`, from `AffineRanges`, `random_affine_matrices` and `affine_warp`).
  - Sec. 6, MultiMNIST: two digits of different classes, each shifted by up to 4 pixels in
    each direction on a 36x36 canvas, overlaid (`overlapping_pairs`); `mean_overlap`
    measures how much the two overlap.

Every function is deterministic in its key (same key, same bits), works under `jax.jit`
and `jax.vmap`, and takes static Python hyperparameters (changing one recompiles). Images
are [B, H, W, C] with H, W the source size (28) and `canvas` the output side; offsets and
coordinates are (row, column) = (dy, dx), rows pointing down.
"""

from __future__ import annotations

import dataclasses
import math

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np


def _check_images(images: jax.Array, canvas: int, name: str = "images") -> tuple[int, int, int]:
  """(h, w, C) of [B, h, w, C] `images`; ValueError unless they fit a canvas x canvas."""
  if images.ndim != 4:
    raise ValueError(f"{name} must be [B, H, W, C], got shape {images.shape}.")
  if isinstance(canvas, bool) or not isinstance(canvas, int) or canvas < 1:
    raise ValueError(f"canvas must be a Python int >= 1, got {canvas!r}.")
  _, h, w, c = images.shape
  if h > canvas or w > canvas:
    raise ValueError(f"{name} of size {h}x{w} do not fit on a {canvas}x{canvas} canvas.")
  return h, w, c


def place(images: jax.Array, offsets: jax.Array, *, canvas: int) -> jax.Array:
  """Pastes each image on a zero canvas with its top-left corner at `offsets`.

  Args:
    images: [B, h, w, C].
    offsets: int [B, 2], (dy, dx) of each image's top-left pixel on the canvas, in
      [0, canvas - h] x [0, canvas - w]. Out-of-range offsets are clamped into that
      range, so the image always lies wholly on the canvas.
    canvas: side of the square output (static).

  Returns:
    [B, canvas, canvas, C], dtype of `images`, zero outside the pasted image.
  """
  h, w, c = _check_images(images, canvas)
  if offsets.shape != (images.shape[0], 2):
    raise ValueError(
      f"offsets must be [B, 2] = {(images.shape[0], 2)} for images {images.shape}, "
      f"got {offsets.shape}."
    )
  if not jnp.issubdtype(offsets.dtype, jnp.integer):
    raise TypeError(f"offsets must be integer pixel offsets, got dtype {offsets.dtype}.")
  # Clamped here: dynamic_update_slice would first wrap negative offsets Python-style.
  high = jnp.array([canvas - h, canvas - w], jnp.int32)  # [2]
  offsets = jnp.clip(offsets.astype(jnp.int32), 0, high)  # [B, 2]

  def one(image, offset):
    blank = jnp.zeros((canvas, canvas, c), images.dtype)  # [canvas, canvas, C]
    return jax.lax.dynamic_update_slice(blank, image, (offset[0], offset[1], jnp.int32(0)))

  return jax.vmap(one)(images, offsets)  # [B, canvas, canvas, C]


def random_translate(key: jax.Array, images: jax.Array, *, canvas: int = 40) -> jax.Array:
  """The paper's expanded MNIST: each image at a uniformly random position on the canvas.

  The offsets are uniform integers in [0, canvas - h] x [0, canvas - w], so the image may
  lie anywhere on the canvas as long as it stays on it. With 28x28 images on 40x40 this is
  the authors' `--shift=6 --pad=6` set (Sarasra/models research/capsules, README and
  `input_data/mnist/mnist_shift.py`): a 6-pixel zero border and shifts in [-6, 6]. Their
  script writes all 13 x 13 shifts of each digit; this draws one per call.

  Args:
    key: PRNG key.
    images: [B, h, w, C].
    canvas: side of the square output (static).

  Returns:
    [B, canvas, canvas, C], dtype of `images`.
  """
  h, w, _ = _check_images(images, canvas)
  high = jnp.array([canvas - h + 1, canvas - w + 1], jnp.int32)  # [2]
  offsets = jax.random.randint(key, (images.shape[0], 2), 0, high, dtype=jnp.int32)  # [B, 2]
  return place(images, offsets, canvas=canvas)


@dataclasses.dataclass(frozen=True)
class AffineRanges:
  """Ranges of the random affine transformations of affNIST, each drawn uniformly.

  affNIST (Tieleman, https://www.cs.toronto.edu/~tijmen/affNIST/) is MNIST digits under
  "various reasonable affine transformations" on a 40x40 canvas, where the untransformed
  version centres the digit with a 6-pixel border; that much of the page was checked. Its
  generation ranges could not be read, so the defaults are the ranges attributed to it,
  assumed rather than verified: rotation up to 20 degrees either way, shear up to 0.2,
  scaling of each axis between 0.8 and 1.2, and a translation that places the digit
  anywhere on the canvas as long as it stays on it. An independent description of the
  same distribution (google-parfait/tensorflow-federated,
  `tensorflow_federated/python/simulation/datasets/emnist.py`, `get_infinite`:
  "approximately equivalent to the one described at" the affNIST page) agrees on rotation
  (+-20 degrees) and shear (+-0.2, adding shear x column to the row, after centring), and
  applies rotation, shear, scaling, translation in that order, as `random_affine_matrices`
  does. It draws the scale log-uniformly in [0.8, 1.25] and the translation in +-5 pixels;
  here the scale is uniform in [scale_min, scale_max] per axis.

  Fields:
    max_rotation_deg: the rotation angle is uniform in +-max_rotation_deg degrees.
    max_shear: the shear s is uniform in +-max_shear; it adds s x (column) to the row.
    scale_min, scale_max: the row and column scale factors, each uniform in this range.
    max_translation: each axis' translation is at most this many pixels. The default
      (infinite) leaves only the canvas bound: `random_affine` keeps each digit's ink on
      the canvas, as affNIST does; `random_affine_matrices` without `boxes` needs a finite
      value.
  """

  max_rotation_deg: float = 20.0
  max_shear: float = 0.2
  scale_min: float = 0.8
  scale_max: float = 1.2
  max_translation: float = math.inf

  def __post_init__(self):
    for name in ("max_rotation_deg", "max_shear", "max_translation"):
      value = getattr(self, name)
      if not value >= 0:
        raise ValueError(f"AffineRanges.{name} must be >= 0, got {value!r}.")
    if not 0 < self.scale_min <= self.scale_max < math.inf:
      raise ValueError(
        f"AffineRanges needs 0 < scale_min <= scale_max < inf, got scale_min="
        f"{self.scale_min!r}, scale_max={self.scale_max!r}."
      )


# The defaults: affNIST's ranges as `AffineRanges` states them.
AFFNIST_RANGES = AffineRanges()


def ink_boxes(images: jax.Array, *, canvas: int = 40, threshold: float = 0.0) -> jax.Array:
  """Bounding boxes of each image's ink once `affine_warp` has centred it on the canvas.

  A pixel is ink when any channel exceeds `threshold`. Coordinates are relative to the
  canvas centre ((canvas - 1) / 2, (canvas - 1) / 2), the point `affine_warp` transforms
  about, and name pixel centres. An image without ink gets the zero-size box at its centre.

  Args:
    images: [B, h, w, C].
    canvas: side of the canvas (static).
    threshold: ink threshold.

  Returns:
    float32 [B, 4]: (top, left, bottom, right).
  """
  h, w, _ = _check_images(images, canvas)
  ink = jnp.max(images, axis=-1) > threshold  # [B, h, w]
  rows = jnp.any(ink, axis=2)  # [B, h]
  cols = jnp.any(ink, axis=1)  # [B, w]
  has_ink = jnp.any(rows, axis=1)  # [B]
  top = jnp.argmax(rows, axis=1)  # [B]
  bottom = h - 1 - jnp.argmax(rows[:, ::-1], axis=1)
  left = jnp.argmax(cols, axis=1)
  right = w - 1 - jnp.argmax(cols[:, ::-1], axis=1)
  box = jnp.stack([top, left, bottom, right], axis=1).astype(jnp.float32)  # [B, 4]
  empty = jnp.array([(h - 1) / 2, (w - 1) / 2] * 2, jnp.float32)  # [4]
  box = jnp.where(has_ink[:, None], box, empty)  # [B, 4]
  # Image pixel (r, c) lands on canvas pixel (r + oy, c + ox) under the centred placement.
  oy, ox = (canvas - h) // 2, (canvas - w) // 2
  centre = (canvas - 1) / 2
  shift = jnp.array([oy - centre, ox - centre] * 2, jnp.float32)  # [4]
  return box + shift  # [B, 4]


def random_affine_matrices(
  key: jax.Array,
  n: int,
  ranges: AffineRanges = AFFNIST_RANGES,
  *,
  boxes: jax.Array | None = None,
  canvas: int = 40,
) -> jax.Array:
  """n random affine transformations, in the convention `affine_warp` takes.

  Each is A = T(t) Sc(s_row, s_col) Sh(s) R(theta): rotate, then shear, then scale, then
  translate, all about the canvas centre (see `affine_warp`):
    R = [[cos, -sin], [sin, cos]] on (row, col): theta > 0 turns the image
      counter-clockwise as displayed (theta = 90 degrees is `np.rot90`);
    Sh = [[1, s], [0, 1]]: row += s x col;  Sc = diag(s_row, s_col).
  theta, s, s_row, s_col are uniform in `ranges`. Translation per axis: with `boxes`,
  uniform over the shifts that keep the transformed box's corners on the canvas (pixel
  centres in [0, canvas - 1]) and within +-max_translation; where no shift can (the box
  has grown larger than the canvas) the box is centred instead, as near as the bound
  allows. Without `boxes`, uniform in +-max_translation, which must then be finite.

  Args:
    key: PRNG key.
    n: number of matrices (static).
    ranges: the parameter ranges.
    boxes: float [n, 4] (top, left, bottom, right) of what must stay on the canvas, in
      centred canvas coordinates (`ink_boxes`), or None.
    canvas: side of the canvas (static; used with `boxes`).

  Returns:
    float32 [n, 3, 3], forward (push) maps on homogeneous centred (row, col, 1)
    coordinates: content at centred position p moves to A p.
  """
  if boxes is None and not math.isfinite(ranges.max_translation):
    raise ValueError(
      "random_affine_matrices needs boxes (ink_boxes(images)) or a finite "
      f"ranges.max_translation, got max_translation={ranges.max_translation!r} and no boxes."
    )
  if boxes is not None and boxes.shape != (n, 4):
    raise ValueError(f"boxes must be [n, 4] = {(n, 4)}, got {boxes.shape}.")
  k_rot, k_shear, k_scale, k_shift = jax.random.split(key, 4)
  limit = math.radians(ranges.max_rotation_deg)
  theta = jax.random.uniform(k_rot, (n,), jnp.float32, -limit, limit)  # [n]
  shear = jax.random.uniform(k_shear, (n,), jnp.float32, -ranges.max_shear, ranges.max_shear)
  scale = jax.random.uniform(k_scale, (n, 2), jnp.float32, ranges.scale_min, ranges.scale_max)
  u = jax.random.uniform(k_shift, (n, 2), jnp.float32)  # [n, 2] in [0, 1)
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  zeros, ones = jnp.zeros_like(theta), jnp.ones_like(theta)
  rot = jnp.stack([jnp.stack([cos, -sin], -1), jnp.stack([sin, cos], -1)], -2)  # [n, 2, 2]
  shr = jnp.stack([jnp.stack([ones, shear], -1), jnp.stack([zeros, ones], -1)], -2)
  linear = scale[:, :, None] * (shr @ rot)  # [n, 2, 2]: diag(scale) @ Sh @ R
  bound = jnp.float32(ranges.max_translation)
  if boxes is None:
    t = (2.0 * u - 1.0) * bound  # [n, 2]
  else:
    boxes = boxes.astype(jnp.float32)
    corners = jnp.stack(
      [boxes[:, [0, 1]], boxes[:, [0, 3]], boxes[:, [2, 1]], boxes[:, [2, 3]]], axis=1
    )  # [n, 4 corners, 2]
    moved = jnp.einsum("nij,nkj->nki", linear, corners)  # [n, 4, 2]
    half = (canvas - 1) / 2
    low = jnp.maximum(-half - jnp.min(moved, axis=1), -bound)  # [n, 2]
    high = jnp.minimum(half - jnp.max(moved, axis=1), bound)  # [n, 2]
    centred = jnp.clip((low + high) / 2, -bound, bound)
    t = jnp.where(low <= high, low + u * (high - low), centred)  # [n, 2]
  top = jnp.concatenate([linear, t[:, :, None]], axis=2)  # [n, 2, 3]
  last = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0], jnp.float32), (n, 1, 3))
  return jnp.concatenate([top, last], axis=1)  # [n, 3, 3]


def _pull_matrix(forward: jax.Array, centre: float) -> jax.Array:
  """The [4, 4] output->input map of dm-pix on (row, col, channel, 1) for one forward
  [3, 3] centred map A: input = c + L^-1 (output - c - t), channels untouched."""
  a, b, c, d = forward[0, 0], forward[0, 1], forward[1, 0], forward[1, 1]
  det = a * d - b * c
  # The closed-form inverse is exact for integer matrices (a 90-degree turn, a pure shift),
  # so those warps land on pixel centres exactly.
  inv = jnp.stack([jnp.stack([d, -b]), jnp.stack([-c, a])]) / det  # [2, 2]
  cvec = jnp.full((2,), centre, jnp.float32)
  offset = cvec - inv @ (cvec + forward[:2, 2])  # [2]
  m = jnp.zeros((4, 4), jnp.float32)
  m = m.at[:2, :2].set(inv).at[:2, 3].set(offset)
  return m.at[2, 2].set(1.0).at[3, 3].set(1.0)  # [4, 4]


def affine_warp(images: jax.Array, matrices: jax.Array, *, canvas: int = 40) -> jax.Array:
  """Centres each image on the canvas, then applies its affine map about the canvas centre.

  Matrix convention: `matrices` are forward (push) maps A on homogeneous centred
  coordinates p = (row - c, col - c, 1), c = (canvas - 1) / 2: content at centred position
  p moves to A p (`random_affine_matrices` documents the rotation and shear signs). The
  identity gives the centred placement (`place` at ((canvas - h) // 2, (canvas - w) // 2))
  exactly; A = [[1, 0, dy], [0, 1, dx], [0, 0, 1]] moves every pixel by (dy, dx).

  dm-pix, like `scipy.ndimage.affine_transform`, pulls: output pixel o reads the input at
  `matrix @ o + offset`, and its 3x3 form is a linear map on (row, col, channel) of an HWC
  image, not a homogeneous 2-D map. So each A is inverted (closed form, exact for integer
  matrices) and embedded in dm-pix's 4x4 homogeneous form, channel axis untouched, before
  `dm_pix.affine_transform` resamples with order=1 (bilinear) and mode='constant' (zero
  where the sample point leaves the canvas).

  Args:
    images: float [B, h, w, C].
    matrices: [B, 3, 3] forward maps as above.
    canvas: side of the square output (static).

  Returns:
    [B, canvas, canvas, C], dtype of `images`.
  """
  h, w, _ = _check_images(images, canvas)
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"images must be floating point to be resampled, got {images.dtype}.")
  if matrices.shape != (images.shape[0], 3, 3):
    raise ValueError(
      f"matrices must be [B, 3, 3] = {(images.shape[0], 3, 3)}, got {matrices.shape}."
    )
  offsets = jnp.broadcast_to(
    jnp.array([(canvas - h) // 2, (canvas - w) // 2], jnp.int32), (images.shape[0], 2)
  )
  centred = place(images, offsets, canvas=canvas)  # [B, canvas, canvas, C]
  pulls = jax.vmap(lambda a: _pull_matrix(a, (canvas - 1) / 2))(
    matrices.astype(jnp.float32)
  )  # [B, 4, 4]

  def one(image, pull):
    return dm_pix.affine_transform(image, pull, order=1, mode="constant", cval=0.0)

  return jax.vmap(one)(centred, pulls).astype(images.dtype)  # [B, canvas, canvas, C]


def random_affine(
  key: jax.Array,
  images: jax.Array,
  *,
  ranges: AffineRanges = AFFNIST_RANGES,
  canvas: int = 40,
) -> dict[str, jax.Array]:
  """An affNIST-like set: each image under its own random affine map on the canvas.

  `random_affine_matrices` with each image's ink box (`ink_boxes`), so the translation
  places the digit anywhere its ink stays on the canvas, then `affine_warp`.

  Args:
    key: PRNG key.
    images: float [B, h, w, C].
    ranges: the parameter ranges (affNIST's by default, see `AffineRanges`).
    canvas: side of the square output (static).

  Returns:
    dict with 'image' [B, canvas, canvas, C] (dtype of `images`) and 'matrix' float32
    [B, 3, 3] (the forward maps, as affNIST ships the transformation of each image).
  """
  boxes = ink_boxes(images, canvas=canvas)  # [B, 4]
  matrices = random_affine_matrices(key, images.shape[0], ranges, boxes=boxes, canvas=canvas)
  return {"image": affine_warp(images, matrices, canvas=canvas), "matrix": matrices}


def _concrete(x) -> np.ndarray | None:
  """x as a NumPy array when its value is known at trace time, else None."""
  try:
    return np.asarray(x)
  except jax.errors.TracerArrayConversionError:
    return None


def sample_partners(key: jax.Array, labels: jax.Array) -> jax.Array:
  """For each example, the index of a uniformly random example of a different class.

  Exact and O(B log B): sort the labels, draw r uniform over the B - n_y examples whose
  label differs from this one's y, and skip the block of y's in the sorted order.

  A batch with a single class has no valid partner. With concrete labels (outside `jit`)
  that raises ValueError; under `jit` the value is unknown, and an example whose class
  fills the batch is paired with the next example, (i + 1) mod B, of the same class: its
  two labels are then equal, which callers can detect.

  Args:
    key: PRNG key.
    labels: int [B].

  Returns:
    int32 [B] partner indices.
  """
  if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be int [B], got shape {labels.shape} dtype {labels.dtype}.")
  known = _concrete(labels)
  if known is not None and np.unique(known).size < 2:
    raise ValueError(
      f"labels must hold at least 2 classes to pair examples of different classes, got "
      f"only {np.unique(known).tolist()} in a batch of {known.size}."
    )
  b = labels.shape[0]
  order = jnp.argsort(labels, stable=True)  # [B]
  ordered = labels[order]  # [B]
  start = jnp.searchsorted(ordered, labels, side="left")  # [B]
  count = jnp.searchsorted(ordered, labels, side="right") - start  # [B]
  others = b - count  # [B]
  r = jax.random.randint(key, (b,), 0, jnp.maximum(others, 1), dtype=jnp.int32)  # [B]
  pos = jnp.where(r < start, r, r + count)  # [B]
  fallback = (jnp.arange(b, dtype=jnp.int32) + 1) % b
  return jnp.where(others > 0, order[pos], fallback).astype(jnp.int32)  # [B]


def _overlay(a: jax.Array, b: jax.Array) -> jax.Array:
  """Pixelwise a + b clipped to the dtype's white (1 for floats, the max for ints)."""
  if jnp.issubdtype(a.dtype, jnp.integer):
    top = jnp.iinfo(a.dtype).max
    return jnp.minimum(a.astype(jnp.int32) + b.astype(jnp.int32), top).astype(a.dtype)
  return jnp.minimum(a + b, jnp.ones((), a.dtype))


def overlapping_pairs(
  key: jax.Array,
  images: jax.Array,
  labels: jax.Array,
  *,
  canvas: int = 36,
  max_shift: int = 4,
) -> dict[str, jax.Array]:
  """MultiMNIST (Sec. 6): each image overlaid with one of a different class of the batch.

  Each image and its partner (`sample_partners`) are placed on the canvas independently
  at offset (canvas - h) // 2 + U[-max_shift, max_shift] per axis (28x28 on 36x36 with
  max_shift 4: "shifted up to 4 pixels in each direction resulting in a 36x36 image").
  The overlay is the pixelwise sum clipped to white (1 for float images in [0, 1]), the
  rule of the authors' generator (Sarasra/models research/capsules,
  `input_data/mnist/mnist_shift.py`, `shift_write_multi_mnist`: np.minimum(base + top,
  255)); it equals a pixelwise max wherever the strokes do not cross, and where they do
  the crossing is at least as bright as either stroke.

  Args:
    key: PRNG key.
    images: [B, h, w, C], float in [0, 1] (or an integer dtype, clipped at its max).
    labels: int [B], at least two classes (see `sample_partners`).
    canvas: side of the square output (static).
    max_shift: largest shift in pixels along each axis (static).

  Returns:
    dict with 'image' [B, canvas, canvas, C] the overlay; 'labels' int32 [B, 2] (the
    example's class, then its partner's); 'first' and 'second' [B, canvas, canvas, C], each
    object alone where it was placed (the paper reconstructs each digit from its own
    capsule); 'partner' int32 [B], the partner's index in the batch.
  """
  h, w, _ = _check_images(images, canvas)
  if labels.shape != images.shape[:1]:
    raise ValueError(f"labels must be [B] = {images.shape[:1]}, got {labels.shape}.")
  if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
    raise ValueError(f"max_shift must be a Python int >= 0, got {max_shift!r}.")
  base = jnp.array([(canvas - h) // 2, (canvas - w) // 2], jnp.int32)  # [2]
  # Both borders of the centred image must be at least max_shift wide.
  if min((canvas - h) // 2, (canvas - w) // 2) < max_shift:
    raise ValueError(
      f"a {canvas}x{canvas} canvas leaves images of {h}x{w} less than max_shift={max_shift} "
      f"pixels on some side; use canvas >= {max(h, w) + 2 * max_shift}."
    )
  k_partner, k_first, k_second = jax.random.split(key, 3)
  b = images.shape[0]
  partner = sample_partners(k_partner, labels)  # [B]
  shift1 = jax.random.randint(k_first, (b, 2), -max_shift, max_shift + 1, dtype=jnp.int32)
  shift2 = jax.random.randint(k_second, (b, 2), -max_shift, max_shift + 1, dtype=jnp.int32)
  first = place(images, base + shift1, canvas=canvas)  # [B, canvas, canvas, C]
  second = place(images[partner], base + shift2, canvas=canvas)
  return {
    "image": _overlay(first, second),
    "labels": jnp.stack([labels, labels[partner]], axis=1).astype(jnp.int32),  # [B, 2]
    "first": first,
    "second": second,
    "partner": partner,
  }


def overlap_fraction(first: jax.Array, second: jax.Array, *, threshold: float = 0.5) -> jax.Array:
  """Per example, the fraction of the smaller object's "on" pixels that are on in the other.

  A pixel is on when any of its channels exceeds `threshold`. With A, B the on-pixel sets
  of `first` and `second`: |A and B| / min(|A|, |B|), and 0 when either is empty. 1 means
  the smaller object lies wholly inside the other, 0 that they share no on pixel.

  Args:
    first, second: [B, H, W, C], each object alone on the canvas (`overlapping_pairs`).
    threshold: the on threshold (0.5 for images in [0, 1]).

  Returns:
    float32 [B].
  """
  if first.shape != second.shape or first.ndim != 4:
    raise ValueError(
      f"first and second must be [B, H, W, C] of one shape, got {first.shape} and {second.shape}."
    )
  a = jnp.max(first, axis=-1) > threshold  # [B, H, W]
  b = jnp.max(second, axis=-1) > threshold
  both = jnp.sum(a & b, axis=(1, 2)).astype(jnp.float32)  # [B]
  smaller = jnp.minimum(jnp.sum(a, axis=(1, 2)), jnp.sum(b, axis=(1, 2))).astype(jnp.float32)
  return jnp.where(smaller > 0, both / jnp.maximum(smaller, 1.0), 0.0)  # [B]


def mean_overlap(first: jax.Array, second: jax.Array, *, threshold: float = 0.5) -> jax.Array:
  """The batch mean of `overlap_fraction`: a float32 scalar in [0, 1].

  Args:
    first, second: [B, H, W, C].
    threshold: the on threshold.

  Returns:
    float32 [].
  """
  return jnp.mean(overlap_fraction(first, second, threshold=threshold))
