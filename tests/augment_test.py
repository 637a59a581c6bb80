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
