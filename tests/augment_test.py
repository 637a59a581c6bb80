"""Tests for capsjax.augment: exact pixel semantics, determinism, jit and vmap."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capsjax import augment

H, W = 28, 28


def _unique_image(c=1):
  """float32 [H, W, c] with every value distinct and non-zero."""
  return jnp.arange(1, H * W * c + 1, dtype=jnp.float32).reshape(H, W, c)


@pytest.mark.parametrize("seed", range(8))
def test_shift_moves_every_surviving_pixel_by_the_sampled_offset(seed):
  key = jax.random.key(seed)
  x = np.asarray(_unique_image())
  y = np.asarray(jax.jit(lambda k, v: augment.random_shift(k, v, max_shift=2))(key, x))
  dy, dx = np.asarray(augment.sample_shift(key, max_shift=2))
  assert -2 <= dy <= 2 and -2 <= dx <= 2
  expected = np.zeros_like(x)
  for r in range(H):
    for c in range(W):
      if 0 <= r + dy < H and 0 <= c + dx < W:
        expected[r + dy, c + dx] = x[r, c]
  np.testing.assert_array_equal(y, expected)
  # Recover the offset from the image alone: where did each value go?
  for v in np.unique(y[y > 0])[:5]:
    ((r0, c0, _),) = np.argwhere(x == v)
    ((r1, c1, _),) = np.argwhere(y == v)
    assert (r1 - r0, c1 - c0) == (dy, dx)


def test_shift_offsets_cover_the_range_uniformly():
  keys = jax.random.split(jax.random.key(0), 4000)
  offs = np.asarray(jax.vmap(lambda k: augment.sample_shift(k, max_shift=2))(keys))  # [4000, 2]
  for axis in range(2):
    counts = np.bincount(offs[:, axis] + 2, minlength=5)
    assert counts.shape == (5,)
    np.testing.assert_allclose(counts / len(offs), 0.2, atol=0.03)


def test_shift_zero_is_identity_and_keeps_dtype():
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (H, W, 1)), jnp.uint8)
  np.testing.assert_array_equal(augment.random_shift(jax.random.key(1), x, max_shift=0), x)
  y = jax.jit(lambda k, v: augment.random_shift(k, v, max_shift=3))(jax.random.key(1), x)
  assert y.dtype == jnp.uint8


def test_flip_twice_is_identity_and_flips_half_the_time():
  x = _unique_image(3)
  keys = jax.random.split(jax.random.key(0), 1000)
  flip = jax.jit(augment.random_flip)
  once = jax.vmap(flip)(keys, jnp.broadcast_to(x, (1000, H, W, 3)))
  twice = jax.vmap(flip)(keys, once)
  np.testing.assert_array_equal(twice, np.broadcast_to(x, twice.shape))
  flipped = np.all(np.asarray(once) == np.asarray(x)[:, ::-1, :], axis=(1, 2, 3))
  unchanged = np.all(np.asarray(once) == np.asarray(x), axis=(1, 2, 3))
  np.testing.assert_array_equal(flipped, ~unchanged)  # each is exactly one of the two
  assert 0.45 < flipped.mean() < 0.55


@pytest.mark.parametrize("size", [1, 8, 9])
def test_cutout_zeroes_exactly_the_clipped_square(size):
  keys = jax.random.split(jax.random.key(size), 64)
  x = jnp.ones((H, W, 2), jnp.float32)
  ys = np.asarray(jax.jit(jax.vmap(lambda k: augment.cutout(k, x, size=size)))(keys))
  centers = np.asarray(jax.vmap(lambda k: augment.sample_cutout_center(k, height=H, width=W))(keys))
  saw_border = False
  for y, (cy, cx) in zip(ys, centers, strict=False):
    y0, x0 = cy - size // 2, cx - size // 2
    r0, r1 = max(y0, 0), min(y0 + size, H)
    c0, c1 = max(x0, 0), min(x0 + size, W)
    saw_border |= (r1 - r0, c1 - c0) != (size, size)
    expected = np.ones((H, W, 2), np.float32)
    expected[r0:r1, c0:c1] = 0
    np.testing.assert_array_equal(y, expected)
  if size >= 8:
    assert saw_border  # the clipped case was exercised


def test_cutout_at_explicit_corner_is_clipped():
  x = jnp.full((H, W, 1), 7, jnp.uint8)
  y = np.asarray(augment.cutout_at(x, jnp.array([0, 27]), size=6))
  assert y.dtype == np.uint8
  expected = np.full((H, W, 1), 7, np.uint8)
  expected[0:3, 24:28] = 0
  np.testing.assert_array_equal(y, expected)


AUG = dict(max_shift=2, flip=True, cutout_size=8)
# One jitted function shared by the batch tests: same shapes -> compiled once.
_AUG_JIT = jax.jit(functools.partial(augment.augment_batch, **AUG))


def _batch(b=4, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(0).integers(1, 256, (b, H, W, 1)), dtype)


def test_augment_batch_same_key_same_output_different_keys_differ():
  fn = _AUG_JIT
  x = _batch()
  a = fn(jax.random.key(0), x)
  np.testing.assert_array_equal(a, fn(jax.random.key(0), x))
  assert not np.array_equal(a, fn(jax.random.key(1), x))
  # Examples get independent keys: identical inputs are augmented differently.
  same = jnp.broadcast_to(x[:1], x.shape)
  out = np.asarray(fn(jax.random.key(0), same))
  assert len({o.tobytes() for o in out}) > 1


def test_augment_batch_matches_per_example_calls():
  x = _batch(4)
  key = jax.random.key(3)
  out = _AUG_JIT(key, x)
  keys = jax.random.split(key, 4)
  one = jax.jit(lambda k, v: augment.augment_example(k, v, **AUG))
  for i in range(4):
    np.testing.assert_array_equal(out[i], one(keys[i], x[i]))


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.bfloat16])
def test_augment_batch_keeps_dtype_and_shape(dtype):
  x = _batch(4, dtype)
  y = _AUG_JIT(jax.random.key(0), x)
  assert y.dtype == dtype and y.shape == x.shape


def test_augment_batch_disabled_is_identity():
  x = _batch(4)
  y = jax.jit(lambda k, v: augment.augment_batch(k, v))(jax.random.key(0), x)
  np.testing.assert_array_equal(y, x)


def test_augment_batch_under_vmap():
  xs = jnp.stack([_batch(), _batch() + 1])  # [2, 4, H, W, 1]
  keys = jax.random.split(jax.random.key(0), 2)
  ys = jax.jit(jax.vmap(functools.partial(augment.augment_batch, **AUG)))(keys, xs)
  assert ys.shape == xs.shape
  np.testing.assert_array_equal(ys[1], _AUG_JIT(keys[1], xs[1]))


def test_augment_batch_rejects_unbatched_input():
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    augment.augment_batch(jax.random.key(0), jnp.zeros((H, W, 1)), max_shift=2)


# Keras ImageDataGenerator(width_shift_range=0.1, height_shift_range=0.1) as CapsNet-Keras
# and CapsNet-Fashion-MNIST use it: t ~ U(-2.8, 2.8) px, order-0 resampling (round(t)),
# fill_mode='nearest'.
def test_fraction_shift_offsets_follow_the_rounded_uniform():
  keys = jax.random.split(jax.random.key(3), 20000)
  offs = np.asarray(
    jax.vmap(lambda k: augment.sample_fraction_shift(k, fraction=0.1, height=H, width=W))(keys)
  )  # [20000, 2]
  # P(round(t) = k) for t ~ U(-2.8, 2.8): |k| <= 2 covers a width-1 interval, |k| = 3
  # the 0.3 between 2.5 and 2.8.
  expected = np.array([0.3, 1, 1, 1, 1, 1, 0.3]) / 5.6  # k = -3..3
  for axis in range(2):
    counts = np.bincount(offs[:, axis] + 3, minlength=7)
    assert counts.shape == (7,)  # never beyond +-3
    np.testing.assert_allclose(counts / len(offs), expected, atol=0.012)
  assert augment.fraction_bound(0.1, 28) == 3 and augment.fraction_bound(0.05, 28) == 1


@pytest.mark.parametrize("offset", [(2, -3), (-1, 0), (3, 3), (0, -2)])
def test_nearest_fill_repeats_the_edge_pixels_of_a_ramp(offset):
  # A ramp with distinct rows and columns: value = 100 r + c.
  ramp = (100 * np.arange(H)[:, None] + np.arange(W)[None, :]).astype(np.float32)[..., None]
  y = np.asarray(
    augment.shift(jnp.asarray(ramp), jnp.asarray(offset, jnp.int32), max_shift=3, fill="nearest")
  )
  dy, dx = offset
  # Output pixel (r, c) reads input (r - dy, c - dx) clamped into the image.
  rows = np.clip(np.arange(H) - dy, 0, H - 1)
  cols = np.clip(np.arange(W) - dx, 0, W - 1)
  np.testing.assert_array_equal(y[..., 0], ramp[rows][:, cols][..., 0])
  z = np.asarray(
    augment.shift(jnp.asarray(ramp), jnp.asarray(offset, jnp.int32), max_shift=3, fill="zero")
  )
  inside = ((np.arange(H) - dy >= 0) & (np.arange(H) - dy < H))[:, None] & (
    (np.arange(W) - dx >= 0) & (np.arange(W) - dx < W)
  )[None, :]
  np.testing.assert_array_equal(z[..., 0], np.where(inside, y[..., 0], 0))


def test_fraction_shift_in_the_batch_path_matches_the_sampled_offsets():
  x = _unique_image()
  keys = jax.random.split(jax.random.key(5), 8)
  images = jnp.broadcast_to(x, (8, H, W, 1))
  out = np.asarray(
    jax.jit(jax.vmap(lambda k, v: augment.random_shift(k, v, shift_fraction=0.1, fill="nearest")))(
      keys, images
    )
  )
  for k, y in zip(keys, out, strict=False):
    off = augment.sample_fraction_shift(k, fraction=0.1, height=H, width=W)
    np.testing.assert_array_equal(y, augment.shift(x, off, max_shift=3, fill="nearest"))


def test_shift_arguments_are_checked():
  x = _unique_image()
  with pytest.raises(ValueError, match="not both"):
    augment.random_shift(jax.random.key(0), x, max_shift=2, shift_fraction=0.1)
  with pytest.raises(ValueError, match=r"shift_fraction must be in \[0, 0.5\), got 0.7"):
    augment.random_shift(jax.random.key(0), x, shift_fraction=0.7)
  with pytest.raises(ValueError, match="fill must be one of .* got 'wrap'"):
    augment.shift(x, jnp.zeros(2, jnp.int32), max_shift=1, fill="wrap")


# ----------------------------------------------------------------------------------------
# Efficient-CapsNet's MNIST pipeline (EscVM/Efficient-CapsNet utils/pre_process_mnist.py).
# ----------------------------------------------------------------------------------------
def _np_warp_affine(img, m):
  """OpenCV's warpAffine in float64 NumPy: dst(x, y) = bilinear src at M^-1 (x, y), 0
  outside (pixel (x, y) = column x, row y)."""
  inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
  out = np.zeros_like(img, np.float64)
  h, w = img.shape
  for y in range(h):
    for x in range(w):
      sx, sy, _ = inv @ [x, y, 1]
      x0, y0 = int(np.floor(sx)), int(np.floor(sy))
      fx, fy = sx - x0, sy - y0
      for yy, xx, wt in ((y0, x0, (1 - fx) * (1 - fy)), (y0, x0 + 1, fx * (1 - fy)),
                         (y0 + 1, x0, (1 - fx) * fy), (y0 + 1, x0 + 1, fx * fy)):  # fmt: skip
        if 0 <= yy < h and 0 <= xx < w:
          out[y, x] += wt * img[yy, xx]
  return out


def _rotation_matrix(cx, cy, degrees):
  """OpenCV's getRotationMatrix2D((cx, cy), degrees, 1.0)."""
  a, b = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
  return np.array([[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]])


@pytest.mark.parametrize("degrees", [0.0, 17.0, -29.0, 90.0])
def test_rotate_is_opencvs_warp_affine(degrees):
  img = np.asarray(jax.random.uniform(jax.random.key(0), (H, W)))
  want = _np_warp_affine(img, _rotation_matrix(W / 2, H / 2, degrees))
  got = jax.jit(augment.rotate)(jnp.asarray(img)[..., None], jnp.float32(degrees))[..., 0]
  np.testing.assert_allclose(got, want, atol=1e-5)
  if degrees == 90.0:  # counter-clockwise about (14, 14): dst[y, x] = src[x, 28 - y]
    np.testing.assert_allclose(got[1:], np.rot90(img)[:-1], atol=1e-5)
    np.testing.assert_array_equal(got[0], 0.0)


def test_random_rotate_rotates_about_half_the_images():
  """A second draw > 0 keeps the image: half of them, plus those whose angle truncates to
  0 (|N(0, 0.33)| x 30 < 1: P = 0.080), so 0.54 unchanged."""
  img = jnp.asarray(_unique_image()) / (H * W)
  keys = jax.random.split(jax.random.key(1), 2000)
  out = jax.jit(jax.vmap(augment.random_rotate, in_axes=(0, None)))(keys, img)
  unchanged = np.mean(np.all(np.asarray(out) == np.asarray(img), axis=(1, 2, 3)))
  assert 0.50 < unchanged < 0.58


def test_margin_shift_offset_by_hand():
  img = np.zeros((H, W, 1), np.float32)
  img[5:21, 3:25] = 1.0  # margins: left 3, right 3, top 5, bottom 7
  offset = augment.margin_shift_offset(
    jnp.asarray(img), jnp.array([0.5, 0.9999]), jnp.array([1, 0], jnp.int32)
  )
  # x: floor(-0.5 * 3) = -2 (towards column 0); y: floor(0.9999 * (1 + 7)) = 7 (down).
  np.testing.assert_array_equal(offset, [7, -2])
  offset = augment.margin_shift_offset(
    jnp.asarray(img), jnp.array([0.9999, 0.5]), jnp.array([0, 1], jnp.int32)
  )
  np.testing.assert_array_equal(offset, [-3, 3])  # floor(-0.5*5), floor(0.9999*4)


@pytest.mark.parametrize("seed", range(4))
def test_random_margin_shift_keeps_the_object_whole(seed):
  img = np.zeros((H, W, 1), np.float32)
  img[5:21, 3:25] = np.arange(16 * 22).reshape(16, 22, 1) + 1.0
  keys = jax.random.split(jax.random.key(seed), 200)
  out = np.asarray(jax.vmap(augment.random_margin_shift, in_axes=(0, None))(keys, img))
  for o in out:
    rows, cols = np.nonzero(o[..., 0])
    dy, dx = rows.min() - 5, cols.min() - 3
    assert -5 <= dy <= 7 and -3 <= dx <= 3
    np.testing.assert_array_equal(np.roll(img, (dy, dx), axis=(0, 1)), o)


@pytest.mark.parametrize("width_mod,offset", [(1, 0), (3, 2), (7, 4)])
def test_squish_is_a_lanczos_resize_placed_at_the_offset(width_mod, offset):
  img = jax.random.uniform(jax.random.key(2), (H, W, 1))
  resized = jax.image.resize(img, (H, W - width_mod, 1), "lanczos3", antialias=True)
  want = np.zeros((H, W + offset, 1), np.float32)  # tf.image.pad_to_bounding_box
  want[:, offset : offset + W - width_mod] = resized
  got = augment.squish(img, jnp.int32(width_mod), jnp.int32(offset))
  np.testing.assert_allclose(got, want[:, :W], atol=1e-5)


def test_random_squish_and_erase_ranges():
  ones = jnp.ones((H, W, 1), jnp.float32)
  keys = jax.random.split(jax.random.key(3), 3000)
  squished = np.asarray(jax.vmap(augment.random_squish, in_axes=(0, None))(keys, ones))
  # Columns left of the offset are empty: offset = width_mod // 2 + {0, 1}, width_mod 1-7.
  left = np.argmax(squished[:, H // 2, :, 0] > 0.5, axis=1)
  assert set(left) == {0, 1, 2, 3, 4}
  erased = np.asarray(jax.vmap(augment.random_erase, in_axes=(0, None))(keys, ones))
  for e in erased[:300]:
    rows, cols = np.nonzero(e[..., 0] == 0)
    assert len(rows) == 16 and rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3
  corners = [np.argwhere(e[..., 0] == 0).min(axis=0) for e in erased]
  assert {int(c[0]) for c in corners} == set(range(4, 23))
  assert {int(c[1]) for c in corners} == set(range(4, 23))


def test_efficient_capsnet_batch_is_deterministic_and_per_example():
  images = jax.random.uniform(jax.random.key(4), (3, H, W, 1))
  fn = jax.jit(lambda k, x: augment.augment_batch(k, x, efficient_capsnet=True))
  a, b = fn(jax.random.key(5), images), fn(jax.random.key(5), images)
  np.testing.assert_array_equal(a, b)
  assert a.shape == images.shape and a.dtype == images.dtype
  keys = jax.random.split(jax.random.key(5), 3)
  one = augment.augment_example(keys[1], images[1], efficient_capsnet=True)
  np.testing.assert_allclose(a[1], one, atol=1e-5)
  assert not np.allclose(a, images)
