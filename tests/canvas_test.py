"""Tests for capsjax.canvas: placements checked pixel by pixel in NumPy, warps against exact
integer cases and scipy.ndimage.affine_transform, pairs and overlap against hand counts."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from capsjax import canvas as cv

# Jitted once per module: eager dispatch of these small ops would dominate the test time.
_MATRICES = jax.jit(cv.random_affine_matrices, static_argnums=(1, 2), static_argnames="canvas")


def _images(b, h=28, w=28, c=1, seed=0):
  """float32 [b, h, w, c], every value distinct and in (0.01, 1]: a placement is unique."""
  rng = np.random.default_rng(seed)
  x = rng.permutation(b * h * w * c).reshape(b, h, w, c).astype(np.float32)
  return 0.01 + 0.99 * (x + 1) / x.size


def _find_offset(canvas_image, image):
  """The (dy, dx) at which `image` alone sits on `canvas_image` (both NumPy), else None."""
  n = canvas_image.shape[0]
  h, w = image.shape[:2]
  for dy in range(n - h + 1):
    for dx in range(n - w + 1):
      expected = np.zeros_like(canvas_image)
      expected[dy : dy + h, dx : dx + w] = image
      if np.array_equal(canvas_image, expected):
        return dy, dx
  return None


# ---------------------------------------------------------------------------------------
# place / random_translate
# ---------------------------------------------------------------------------------------


def test_place_matches_numpy_and_keeps_dtype():
  x = (np.arange(2 * 3 * 4 * 2).reshape(2, 3, 4, 2) + 1).astype(np.uint8)
  offsets = np.array([[0, 5], [4, 1]], np.int32)
  y = np.asarray(jax.jit(functools.partial(cv.place, canvas=9))(x, offsets))
  assert y.dtype == np.uint8
  expected = np.zeros((2, 9, 9, 2), np.uint8)
  expected[0, 0:3, 5:9] = x[0]
  expected[1, 4:7, 1:5] = x[1]
  np.testing.assert_array_equal(y, expected)


def test_place_clamps_offsets_onto_the_canvas():
  x = np.ones((2, 3, 3, 1), np.float32)
  y = np.asarray(jax.jit(functools.partial(cv.place, canvas=6))(x, jnp.array([[-2, 7], [9, -1]])))
  assert _find_offset(y[0], x[0]) == (0, 3)
  assert _find_offset(y[1], x[1]) == (3, 0)


def test_place_rejects_bad_input():
  x = jnp.zeros((2, 28, 28, 1))
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    cv.place(x[0], jnp.zeros((2, 2), jnp.int32), canvas=40)
  with pytest.raises(ValueError, match="do not fit"):
    cv.place(x, jnp.zeros((2, 2), jnp.int32), canvas=27)
  with pytest.raises(ValueError, match=r"offsets must be \[B, 2\]"):
    cv.place(x, jnp.zeros((3, 2), jnp.int32), canvas=40)
  with pytest.raises(TypeError, match="integer"):
    cv.place(x, jnp.zeros((2, 2), jnp.float32), canvas=40)


_TRANSLATE = jax.jit(functools.partial(cv.random_translate, canvas=40))


def test_random_translate_places_each_image_whole_anywhere_on_the_canvas():
  x = _images(16)
  key = jax.random.key(0)
  y = np.asarray(_TRANSLATE(key, x))
  assert y.shape == (16, 40, 40, 1) and y.dtype == np.float32
  for i in range(16):
    dy, dx = _find_offset(y[i], x[i])
    assert 0 <= dy <= 12 and 0 <= dx <= 12
  np.testing.assert_array_equal(y, np.asarray(_TRANSLATE(key, x)))  # same key, same bits
  assert not np.array_equal(y, np.asarray(_TRANSLATE(jax.random.key(1), x)))


def test_random_translate_offsets_are_uniform_over_every_position():
  # One pixel on a 1x1 image: its position on a 5x5 canvas is the offset, 5 values per axis.
  x = jnp.ones((4000, 1, 1, 1), jnp.float32)
  y = np.asarray(jax.jit(functools.partial(cv.random_translate, canvas=5))(jax.random.key(3), x))
  assert np.all(y.sum(axis=(1, 2, 3)) == 1)
  rows, cols = np.nonzero(y[..., 0])[1:]
  for axis in (rows, cols):
    np.testing.assert_allclose(np.bincount(axis, minlength=5) / 4000, 0.2, atol=0.03)


# ---------------------------------------------------------------------------------------
# affine_warp
# ---------------------------------------------------------------------------------------

_WARP = jax.jit(functools.partial(cv.affine_warp, canvas=40))


def _centred(x, canvas=40):
  b, h, w, c = x.shape
  out = np.zeros((b, canvas, canvas, c), x.dtype)
  oy, ox = (canvas - h) // 2, (canvas - w) // 2
  out[:, oy : oy + h, ox : ox + w] = x
  return out


def _batch(m, b):
  return jnp.asarray(np.broadcast_to(np.asarray(m, np.float32), (b, 3, 3)))


def test_identity_reproduces_the_centred_placement_exactly():
  x = _images(3, c=2)
  y = np.asarray(_WARP(x, _batch(np.eye(3), 3)))
  np.testing.assert_array_equal(y, _centred(x))
  # A 28x28 image on 40x40 has the 6-pixel border of affNIST's "just centred" version.
  np.testing.assert_array_equal(y[:, 6:34, 6:34], x)


def test_integer_translation_moves_a_known_pixel_exactly():
  x = np.zeros((1, 28, 28, 1), np.float32)
  x[0, 3, 20, 0] = 1.0  # canvas pixel (9, 26) once centred
  y = np.asarray(_WARP(x, _batch([[1, 0, 5], [0, 1, -7], [0, 0, 1]], 1)))
  expected = np.zeros((1, 40, 40, 1), np.float32)
  expected[0, 9 + 5, 26 - 7, 0] = 1.0
  np.testing.assert_array_equal(y, expected)


def test_half_pixel_translation_is_bilinear():
  x = np.zeros((1, 28, 28, 1), np.float32)
  x[0, 10, 10, 0] = 1.0  # canvas (16, 16)
  y = np.asarray(_WARP(x, _batch([[1, 0, 0], [0, 1, 0.5], [0, 0, 1]], 1)))[0, ..., 0]
  expected = np.zeros((40, 40), np.float32)
  expected[16, 16] = expected[16, 17] = 0.5  # the pixel's mass split between two columns
  np.testing.assert_allclose(y, expected, atol=1e-6)


def test_quarter_turn_of_an_asymmetric_pattern_is_np_rot90():
  x = _images(2, c=3)
  turn = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]  # theta = +90 degrees in the documented form
  y = np.asarray(_WARP(x, _batch(turn, 2)))
  np.testing.assert_array_equal(y, np.rot90(_centred(x), k=1, axes=(1, 2)))
  # The rotation matrix of random_affine_matrices at +90 degrees is this one (cos, sin).
  theta = math.pi / 2
  np.testing.assert_allclose(
    [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]],
    np.asarray(turn)[:2, :2],
    atol=1e-12,
  )


def test_random_warps_match_scipy_affine_transform():
  x = _images(4, c=2)
  ranges = cv.AffineRanges(max_translation=5.0)
  a = np.asarray(_MATRICES(jax.random.key(7), 4, ranges), np.float64)
  y = np.asarray(_WARP(x, jnp.asarray(a, jnp.float32)))
  c = 19.5
  to_pixels = np.array([[1, 0, c], [0, 1, c], [0, 0, 1]])
  to_centred = np.array([[1, 0, -c], [0, 1, -c], [0, 0, 1]])
  placed = _centred(x).astype(np.float64)
  for i in range(4):
    # scipy pulls too: output pixel o reads input pull @ o, pull = the inverse push map.
    pull = np.linalg.inv(to_pixels @ a[i] @ to_centred)
    for ch in range(2):
      ref = ndimage.affine_transform(placed[i, ..., ch], pull, order=1, mode="constant")
      np.testing.assert_allclose(y[i, ..., ch], ref, atol=2e-5)


def test_affine_warp_rejects_bad_input():
  x = jnp.zeros((2, 28, 28, 1))
  with pytest.raises(ValueError, match=r"\[B, 3, 3\]"):
    cv.affine_warp(x, jnp.zeros((2, 2, 3)))
  with pytest.raises(TypeError, match="floating"):
    cv.affine_warp(x.astype(jnp.uint8), jnp.zeros((2, 3, 3)))


# ---------------------------------------------------------------------------------------
# random_affine_matrices / ink_boxes / random_affine
# ---------------------------------------------------------------------------------------


def _decompose(a):
  """(theta, shear, s_row, s_col, t) of A = [[diag(s) Sh(shear) R(theta), t], [0, 1]]."""
  lin = a[:2, :2]
  s_col = np.hypot(*lin[1])  # row 1 of Sh R is row 1 of R, (sin, cos)
  theta = math.atan2(lin[1, 0], lin[1, 1])
  r0 = np.array([math.cos(theta), -math.sin(theta)])
  r1 = np.array([math.sin(theta), math.cos(theta)])
  s_row = lin[0] @ r0  # row 0 of Sh R is r0 + shear r1, and r0 is orthogonal to r1
  shear = (lin[0] @ r1) / s_row
  return theta, shear, s_row, s_col, a[:2, 2]


def test_matrix_parameters_cover_the_ranges():
  ranges = cv.AffineRanges(max_translation=6.0)
  n = 2000
  a = np.asarray(
    jax.jit(cv.random_affine_matrices, static_argnums=(1, 2))(jax.random.key(0), n, ranges),
    np.float64,
  )
  np.testing.assert_array_equal(a[:, 2], np.broadcast_to([0.0, 0.0, 1.0], (n, 3)))
  params = [_decompose(m) for m in a]
  theta = np.degrees([p[0] for p in params])
  shear = np.array([p[1] for p in params])
  scales = np.array([[p[2], p[3]] for p in params])
  t = np.array([p[4] for p in params])
  for values, low, high in [
    (theta, -20.0, 20.0),
    (shear, -0.2, 0.2),
    (scales, 0.8, 1.2),
    (t, -6.0, 6.0),
  ]:
    assert values.min() >= low - 1e-4 and values.max() <= high + 1e-4
    span = high - low  # uniform: the extremes are nearly reached and the mean is central
    assert values.min() < low + 0.01 * span and values.max() > high - 0.01 * span
    np.testing.assert_allclose(values.mean(), (low + high) / 2, atol=0.03 * span)


def test_matrices_are_deterministic_in_the_key():
  ranges = cv.AffineRanges(max_translation=6.0)
  a = _MATRICES(jax.random.key(5), 8, ranges)
  np.testing.assert_array_equal(a, _MATRICES(jax.random.key(5), 8, ranges))
  assert not np.array_equal(a, _MATRICES(jax.random.key(6), 8, ranges))


def test_ink_boxes_by_hand():
  x = np.zeros((3, 28, 28, 2), np.float32)
  x[0, 5, 7, 1] = 0.3  # ink only in the second channel
  x[0, 20, 3, 0] = 1.0
  x[1] = 1.0  # full image
  # x[2] empty: the zero-size box at the image centre (13.5, 13.5).
  boxes = np.asarray(jax.jit(cv.ink_boxes)(jnp.asarray(x)))
  # Canvas-centred coordinates: image pixel p -> p + 6 - 19.5 = p - 13.5.
  np.testing.assert_array_equal(
    boxes,
    np.array([[5, 3, 20, 7], [0, 0, 27, 27], [13.5, 13.5, 13.5, 13.5]], np.float32) - 13.5,
  )
  # An odd border: 28 on 41 sits at offset 6, so p -> p + 6 - 20.
  boxes = np.asarray(jax.jit(functools.partial(cv.ink_boxes, canvas=41))(jnp.asarray(x[:1])))
  np.testing.assert_array_equal(boxes, np.array([[5, 3, 20, 7]], np.float32) - 14)


def test_boxes_keep_the_transformed_ink_on_the_canvas():
  rng = np.random.default_rng(0)
  n = 500
  top = rng.uniform(-13.5, 0, (n, 2))
  size = rng.uniform(0, 27, (n, 2))
  boxes = np.concatenate([top, np.minimum(top + size, 13.5)], axis=1).astype(np.float32)
  a = np.asarray(
    _MATRICES(jax.random.key(1), n, cv.AFFNIST_RANGES, boxes=jnp.asarray(boxes)),
    np.float64,
  )
  fitted = 0
  for m, (t0, l0, b0, r0) in zip(a, boxes.astype(np.float64), strict=True):
    corners = np.array([[t0, l0, 1], [t0, r0, 1], [b0, l0, 1], [b0, r0, 1]])
    moved = corners @ m.T  # [4, 3]
    lin_extent = np.ptp(corners[:, :2] @ m[:2, :2].T, axis=0)  # [2]
    if np.all(lin_extent <= 39):  # a shift exists that fits the box
      fitted += 1
      assert np.all(moved[:, :2] >= -19.5 - 1e-3) and np.all(moved[:, :2] <= 19.5 + 1e-3)
    else:  # centred as well as it can be
      np.testing.assert_allclose(moved[:, :2].min(0), -moved[:, :2].max(0), atol=1e-3)
  assert fitted > 0.9 * n


def test_translation_spans_the_free_room():
  # A 4x4 box at the centre, no scaling, rotation or shear: t is uniform in +-(19.5 - 1.5).
  ranges = cv.AffineRanges(max_rotation_deg=0.0, max_shear=0.0, scale_min=1.0, scale_max=1.0)
  n = 3000
  boxes = jnp.broadcast_to(jnp.array([-1.5, -1.5, 1.5, 1.5]), (n, 4))
  a = np.asarray(_MATRICES(jax.random.key(2), n, ranges, boxes=boxes))
  np.testing.assert_array_equal(a[:, :2, :2], np.broadcast_to(np.eye(2), (n, 2, 2)))
  t = a[:, :2, 2]
  assert t.min() >= -18.0 and t.max() <= 18.0
  assert t.min() < -17.5 and t.max() > 17.5
  np.testing.assert_allclose(t.mean(0), 0.0, atol=0.6)
  # A finite max_translation bounds the same draws.
  bounded = cv.AffineRanges(
    max_rotation_deg=0.0, max_shear=0.0, scale_min=1.0, scale_max=1.0, max_translation=3.0
  )
  t = np.asarray(_MATRICES(jax.random.key(2), n, bounded, boxes=boxes))[:, :2, 2]
  assert t.min() >= -3.0 and t.max() <= 3.0 and t.min() < -2.9 and t.max() > 2.9


_AFFINE = jax.jit(cv.random_affine)


def test_random_affine_is_deterministic_and_keeps_the_ink_on_the_canvas():
  x = np.zeros((6, 28, 28, 1), np.float32)
  x[:, 4:24, 8:20] = _images(6, 20, 12)  # MNIST-like: ink in the middle of the frame
  fn = _AFFINE
  out = fn(jax.random.key(0), x)
  again = fn(jax.random.key(0), x)
  np.testing.assert_array_equal(out["image"], again["image"])
  np.testing.assert_array_equal(out["matrix"], again["matrix"])
  assert not np.array_equal(out["image"], fn(jax.random.key(1), x)["image"])
  np.testing.assert_array_equal(out["image"], _WARP(x, out["matrix"]))
  # Bilinear resampling keeps the ink's mass up to the area change det(A); nothing is
  # lost off the canvas.
  det = np.linalg.det(np.asarray(out["matrix"], np.float64)[:, :2, :2])
  mass = np.asarray(out["image"], np.float64).sum(axis=(1, 2, 3))
  np.testing.assert_allclose(mass, x.sum(axis=(1, 2, 3)) * det, rtol=0.03)


def test_affine_ranges_are_checked():
  with pytest.raises(ValueError, match="max_shear"):
    cv.AffineRanges(max_shear=-0.1)
  with pytest.raises(ValueError, match="scale_min"):
    cv.AffineRanges(scale_min=1.3)
  with pytest.raises(ValueError, match="boxes"):
    cv.random_affine_matrices(jax.random.key(0), 2, cv.AFFNIST_RANGES)


# ---------------------------------------------------------------------------------------
# overlapping_pairs / sample_partners
# ---------------------------------------------------------------------------------------

_PAIRS = jax.jit(cv.overlapping_pairs)


def test_pairs_are_two_shifted_images_of_different_classes_clipped_sum():
  b = 8
  x = _images(b)
  labels = np.array([0, 1, 2, 3, 0, 1, 2, 3], np.int32)
  out = jax.tree.map(np.asarray, _PAIRS(jax.random.key(0), x, labels))
  assert out["image"].shape == (b, 36, 36, 1) and out["labels"].dtype == np.int32
  np.testing.assert_array_equal(out["labels"][:, 0], labels)
  np.testing.assert_array_equal(out["labels"][:, 1], labels[out["partner"]])
  assert np.all(out["labels"][:, 0] != out["labels"][:, 1])
  for i in range(b):
    # Each object sits whole at 4 + U[-4, 4] per axis, i.e. anywhere in [0, 8].
    for name, source in (("first", x[i]), ("second", x[out["partner"][i]])):
      dy, dx = _find_offset(out[name][i], source)
      assert 0 <= dy <= 8 and 0 <= dx <= 8
  np.testing.assert_allclose(out["image"], np.minimum(out["first"] + out["second"], 1.0))
  assert out["image"].max() == 1.0  # overlapping strokes were clipped
  again = jax.tree.map(np.asarray, _PAIRS(jax.random.key(0), x, labels))
  jax.tree.map(np.testing.assert_array_equal, out, again)
  other = _PAIRS(jax.random.key(1), x, labels)
  assert not np.array_equal(out["image"], other["image"])


def test_generators_under_vmap_match_per_batch_calls():
  # Inner batch sizes as in the tests above, so the per-batch calls reuse their compilations.
  keys = jax.random.split(jax.random.key(0), 2)
  x = jnp.stack([_images(8), _images(8, seed=1)])  # [2, 8, 28, 28, 1]
  labels = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3], [5, 5, 6, 6, 5, 5, 6, 6]], jnp.int32)
  pairs = jax.jit(jax.vmap(cv.overlapping_pairs))(keys, x, labels)
  x16 = jnp.stack([_images(16), _images(16, seed=1)])  # [2, 16, 28, 28, 1]
  moved = jax.jit(jax.vmap(cv.random_translate))(keys, x16)
  warped = jax.jit(jax.vmap(cv.random_affine))(keys, x[:, :6])
  for i in range(2):
    jax.tree.map(
      np.testing.assert_array_equal,
      jax.tree.map(lambda v, i=i: v[i], pairs),
      _PAIRS(keys[i], x[i], labels[i]),
    )
    np.testing.assert_array_equal(moved[i], _TRANSLATE(keys[i], x16[i]))
    # Batched trig and matmuls round differently at float32, hence a tolerance.
    single = _AFFINE(keys[i], x[i, :6])
    np.testing.assert_allclose(warped["matrix"][i], single["matrix"], atol=1e-6)
    np.testing.assert_allclose(warped["image"][i], single["image"], atol=1e-4)


def test_pairs_of_uint8_images_clip_at_255():
  x = np.full((2, 2, 2, 1), 200, np.uint8)
  pairs = jax.jit(functools.partial(cv.overlapping_pairs, canvas=2, max_shift=0))
  out = pairs(jax.random.key(0), jnp.asarray(x), jnp.array([3, 5]))
  np.testing.assert_array_equal(out["image"], np.full((2, 2, 2, 1), 255, np.uint8))
  np.testing.assert_array_equal(out["labels"], [[3, 5], [5, 3]])


def test_partners_are_uniform_over_the_other_classes():
  labels = jnp.array([0, 0, 1, 1, 1, 2], jnp.int32)
  keys = jax.random.split(jax.random.key(0), 6000)
  partners = np.asarray(jax.jit(jax.vmap(cv.sample_partners, in_axes=(0, None)))(keys, labels))
  lab = np.asarray(labels)
  assert np.all(lab[partners] != lab[None, :])
  for i, valid in [(0, [2, 3, 4, 5]), (2, [0, 1, 5]), (5, [0, 1, 2, 3, 4])]:
    counts = np.bincount(partners[:, i], minlength=6)[valid] / 6000
    np.testing.assert_allclose(counts, 1 / len(valid), atol=0.025)


def test_single_class_batch_raises_outside_jit_and_falls_back_inside():
  labels = jnp.array([4, 4, 4], jnp.int32)
  with pytest.raises(ValueError, match="at least 2 classes"):
    cv.sample_partners(jax.random.key(0), labels)
  partners = jax.jit(cv.sample_partners)(jax.random.key(0), labels)
  np.testing.assert_array_equal(partners, [1, 2, 0])  # (i + 1) mod B, labels repeat


def test_pairs_reject_a_canvas_without_room_for_the_shift():
  x = jnp.zeros((2, 28, 28, 1))
  with pytest.raises(ValueError, match="canvas >= 36"):
    cv.overlapping_pairs(jax.random.key(0), x, jnp.array([0, 1]), canvas=35, max_shift=4)
  with pytest.raises(ValueError, match=r"labels must be \[B\]"):
    cv.overlapping_pairs(jax.random.key(0), x, jnp.array([0, 1, 2]))


# ---------------------------------------------------------------------------------------
# overlap
# ---------------------------------------------------------------------------------------


def test_overlap_fraction_by_hand():
  a = np.zeros((4, 4, 4, 1), np.float32)
  b = np.zeros_like(a)
  # ex 0: A = 4 pixels (a 2x2 block), B = 6 pixels, 2 shared -> 2 / min(4, 6) = 0.5
  a[0, 0:2, 0:2] = 1.0
  b[0, 1:3, 0:2] = 0.9
  b[0, 3, 0:2] = 0.8
  # ex 1: B inside A -> 1
  a[1, :, :] = 1.0
  b[1, 2, 2] = 0.6
  # ex 2: disjoint -> 0; values at or below the threshold are off
  a[2, 0, 0] = 1.0
  b[2, 0, 0] = 0.5
  b[2, 3, 3] = 1.0
  # ex 3: empty second object -> 0
  a[3, 1, 1] = 1.0
  frac = np.asarray(jax.jit(cv.overlap_fraction)(a, b))
  np.testing.assert_allclose(frac, [0.5, 1.0, 0.0, 0.0])
  np.testing.assert_allclose(float(jax.jit(cv.mean_overlap)(a, b)), 0.375)
  # A lower threshold turns b[2, 0, 0] on: 1 / min(1, 2) = 1.
  low = jax.jit(functools.partial(cv.overlap_fraction, threshold=0.4))
  np.testing.assert_allclose(np.asarray(low(a, b))[2], 1.0)


def test_overlap_of_generated_pairs_matches_numpy():
  x = _images(6)
  out = _PAIRS(jax.random.key(2), x, jnp.array([0, 1, 2, 0, 1, 2]))
  on1 = np.asarray(out["first"])[..., 0] > 0.5
  on2 = np.asarray(out["second"])[..., 0] > 0.5
  expected = np.mean([(p & q).sum() / min(p.sum(), q.sum()) for p, q in zip(on1, on2, strict=True)])
  got = float(jax.jit(cv.mean_overlap)(out["first"], out["second"]))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert 0.0 < got <= 1.0


def test_overlap_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="one shape"):
    cv.overlap_fraction(jnp.zeros((2, 4, 4, 1)), jnp.zeros((2, 4, 5, 1)))
