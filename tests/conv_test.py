"""Tests for capsjax.conv: every lowering equals `lax.conv_general_dilated`.

The reference is `lax.conv_general_dilated` itself (impl 'xla' is a thin wrapper), and
each lowering is compared with it in the output and in both gradients (w.r.t. x and w,
through `jax.vjp` with a random cotangent), all under `jax.jit`. Shapes are tiny.
"""

import os

import jax
import jax.numpy as jnp
from jax import lax
import jaxlib
import numpy as np
import pytest

from capsjax import conv
from capsjax.run import cpu_runtime
from capsjax import parallel
from tests import helpers

LOWERINGS = list(conv.IMPLS)


def conv_fn(impl, stride):
  """(x, w) -> conv output for an impl name."""
  return lambda x, w: conv.conv2d(x, w, stride=stride, impl=impl)


# (x shape [B, H, W, C_in], w shape [kh, kw, C_in, C_out], stride)
CASES = [
  ((2, 12, 12, 1), (9, 9, 1, 4), 1),  # Conv1-like, 1 input channel
  ((2, 20, 20, 6), (9, 9, 6, 8), 2),  # PrimaryCaps-like
  ((3, 11, 14, 3), (3, 5, 3, 5), 2),  # non-square image and kernel, 3 channels
  ((2, 10, 13, 3), (4, 2, 3, 2), 3),  # stride 3, odd sizes
  ((2, 7, 9, 2), (1, 1, 2, 3), 3),  # kernel smaller than the stride
  ((1, 5, 5, 2), (5, 5, 2, 2), 2),  # kernel == image, 1x1 output
  ((2, 9, 8, 3), (2, 3, 3, 4), 1),  # small kernel, stride 1
]


def tolerance(impl, expected):
  """allclose tolerances. Winograd rounds in the transformed domain, so its error scales
  with the magnitude of the whole output rather than of each element (bounded against
  float64 in test_winograd_error_vs_float64)."""
  if impl == "winograd":
    return dict(rtol=1e-5, atol=max(1e-4, 1e-5 * float(np.max(np.abs(expected)))))
  return dict(rtol=1e-5, atol=1e-4)


def reference(x, w, stride):
  return lax.conv_general_dilated(
    x, w, (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def value_and_grads(fn, x, w, g):
  y, vjp = jax.vjp(fn, x, w)
  return (y, *vjp(g))  # y, dx, dw


def random_case(x_shape, w_shape, stride, seed=0, dtype=jnp.float32):
  """NumPy random x, w and output cotangent g (no per-shape compiles of jax.random)."""
  rng = np.random.default_rng(seed)
  ho = (x_shape[1] - w_shape[0]) // stride + 1
  wo = (x_shape[2] - w_shape[1]) // stride + 1
  g_shape = (x_shape[0], ho, wo, w_shape[3])
  return tuple(jnp.asarray(rng.standard_normal(s), dtype) for s in (x_shape, w_shape, g_shape))


@pytest.mark.parametrize("impl", LOWERINGS)
@pytest.mark.parametrize("x_shape,w_shape,stride", CASES)
def test_matches_reference_values_and_grads(impl, x_shape, w_shape, stride):
  x, w, g = random_case(x_shape, w_shape, stride)
  expected = jax.jit(
    lambda x, w, g: value_and_grads(lambda x, w: reference(x, w, stride), x, w, g)
  )(x, w, g)
  actual = jax.jit(lambda x, w, g: value_and_grads(conv_fn(impl, stride), x, w, g))(x, w, g)
  for name, a, e in zip(("y", "dx", "dw"), actual, expected, strict=False):
    assert a.shape == e.shape and a.dtype == e.dtype, name
    np.testing.assert_allclose(a, e, err_msg=name, **tolerance(impl, e))


@pytest.mark.parametrize("impl", LOWERINGS)
def test_bfloat16(impl):
  x, w, g = random_case((2, 11, 11, 4), (5, 5, 4, 8), 2)
  xb, wb, gb = (a.astype(jnp.bfloat16) for a in (x, w, g))
  y, dx, dw = jax.jit(lambda x, w, g: value_and_grads(conv_fn(impl, 2), x, w, g))(xb, wb, gb)
  assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16,) * 3
  # Compared with float32 maths on the same (bf16-rounded) inputs: only the output
  # rounding to bfloat16 differs, since accumulation is in float32.
  xf, wf, gf = (a.astype(jnp.float32) for a in (xb, wb, gb))
  expected = value_and_grads(lambda x, w: reference(x, w, 2), xf, wf, gf)
  for name, a, e in zip(("y", "dx", "dw"), (y, dx, dw), expected, strict=False):
    np.testing.assert_allclose(
      np.asarray(a, np.float32), e, rtol=2e-2, atol=2e-2 * float(jnp.max(jnp.abs(e))), err_msg=name
    )


@pytest.mark.parametrize("impl", LOWERINGS)
def test_vmap_and_grad(impl):
  x, w, _ = random_case((6, 10, 10, 2), (3, 3, 2, 3), 2)

  def loss(w, x):
    return jnp.sum(jnp.square(conv_fn(impl, 2)(x, w)))

  # vmap over an extra leading axis == the flat batch.
  xs = x.reshape(2, 3, 10, 10, 2)
  per_group = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(w, xs)
  flat = jax.jit(jax.grad(loss))(w, x)
  np.testing.assert_allclose(per_group.sum(0), flat, rtol=1e-5, atol=1e-4)
  expected = jax.grad(lambda w, x: jnp.sum(jnp.square(reference(x, w, 2))))(w, x)
  np.testing.assert_allclose(flat, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", LOWERINGS)
def test_batch_sharded_on_the_trainers_mesh(impl):
  """On the trainer's 4-device Auto mesh, with no sharding annotations in the lowering, a
  jitted grad step equals the one-device step and keeps the batch sharded."""
  if jax.device_count() < 4:
    pytest.skip("needs 4 CPU devices (tests/conftest.py)")
  mesh = parallel.make_mesh(4)
  x, w, _ = random_case((8, 13, 13, 3), (5, 5, 3, 4), 2)

  def loss(w, x):
    y = conv_fn(impl, 2)(x, w)  # [B, 5, 5, 4]
    return jnp.mean(jnp.square(y)), y

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (l_ref, y_ref), (gw_ref, gx_ref) = step(w, x)
  xs = parallel.shard_batch({"x": np.asarray(x)}, mesh)["x"]
  wr = parallel.replicate(w, mesh)
  (loss, y), (gw, gx) = step(wr, xs)
  assert y.sharding.spec[0] == "data" and gx.sharding.spec[0] == "data"
  assert all(a is None for a in (*y.sharding.spec[1:], *gx.sharding.spec[1:]))
  assert gw.sharding.is_fully_replicated
  np.testing.assert_allclose(loss, l_ref, rtol=1e-5)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, gw_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape,w_shape,stride", CASES[:4])
def test_reference_matches_numpy(x_shape, w_shape, stride):
  """The reference itself (XLA's conv, as configured for these tests) vs float64 NumPy."""
  x, w, _ = random_case(x_shape, w_shape, stride)
  np.testing.assert_allclose(
    jax.jit(reference, static_argnums=2)(x, w, stride),
    helpers.numpy_conv(x, w, stride),
    rtol=1e-5,
    atol=1e-4,
  )


@pytest.mark.parametrize("m,r", [(1, 3), (2, 3), (3, 3), (3, 5), (2, 5), (3, 2), (4, 3)])
def test_winograd_matrices_compute_correlation(m, r):
  """A^T ((G g) * (B^T d)) is the 1-D correlation y[i] = sum_k d[i + k] g[k], in float64."""
  at, g_mat, bt = conv.winograd_matrices(m, r)
  n = m + r - 1
  assert at.shape == (m, n) and g_mat.shape == (n, r) and bt.shape == (n, n)
  assert np.abs(bt).max(axis=1) == pytest.approx(np.ones(n))  # rows scaled to max 1
  rng = np.random.default_rng(m * 10 + r)
  for _ in range(5):
    d, g = rng.standard_normal(n), rng.standard_normal(r)
    expected = np.array([d[i : i + r] @ g for i in range(m)])
    np.testing.assert_allclose(at @ ((g_mat @ g) * (bt @ d)), expected, rtol=1e-12, atol=1e-12)


def test_winograd_matrices_reject_too_many_points():
  with pytest.raises(ValueError, match="F\\(3, 7\\) needs 8 points"):
    conv.winograd_matrices(3, 7)


def test_winograd_error_vs_float64():
  """On a PrimaryCaps-like conv with many channels, Winograd is exact up to rounding, and
  its float32 rounding stays within 1e-5 of the output scale.

  Two bounds that follow from the algorithm, not from another lowering's accuracy on one
  CPU (XLA's own conv rounds differently with AVX-512 and with AVX2 only): in float64 the
  error is float64 rounding alone (~1e-14 of the scale; a wrong transform or a dropped
  term would be O(1)), and in float32 the same computation rounds ~2^29 times more
  coarsely (float32 epsilon 6e-8), amplified by the F(3x3, 5x5) transforms, whose entries
  reach 5: 1e-5 of the scale is the budget `tolerance` gives this lowering everywhere in
  this file (measured 2.9e-6 on an AVX-512 EPYC, 4.5e-6 on an AVX2-only one).
  """
  x, w, g = random_case((2, 20, 20, 64), (9, 9, 64, 16), 2, seed=3)
  exact = helpers.numpy_conv(x, w, 2)
  scale = np.abs(exact).max()
  with jax.enable_x64(True):
    y64 = conv.conv2d(
      np.asarray(x, np.float64), np.asarray(w, np.float64), stride=2, impl="winograd"
    )
    assert y64.dtype == np.float64
    err64 = np.abs(np.asarray(y64) - exact).max() / scale
  assert err64 < 1e-12, err64
  y = jax.jit(lambda x, w: conv.conv2d(x, w, stride=2, impl="winograd"))(x, w)
  err32 = np.abs(np.asarray(y, np.float64) - exact).max() / scale
  assert err32 < 1e-5, err32


@pytest.mark.parametrize(
  "x_shape,w_shape,stride",
  [
    ((2, 20, 20, 3), (9, 9, 3, 4), 2),  # PrimaryCaps: 5x5 folded, 6x6 out = 2x2 tiles
    ((1, 9, 10, 2), (3, 3, 2, 3), 1),  # 7x8 output: partial tiles on both axes
    ((2, 6, 7, 2), (2, 5, 2, 2), 1),  # 5x3 output, 2x5 kernel
    ((1, 16, 15, 2), (10, 7, 2, 2), 2),  # folded 5x4 kernel, 4x5 output
    ((1, 16, 14, 2), (7, 9, 2, 3), 3),  # stride 3: folded 3x3 kernel, 4x2 output
  ],
)
def test_winograd_core_on_partial_tiles(x_shape, w_shape, stride):
  """The Winograd lowering itself (no fallback) on outputs that are not a whole number of
  3x3 tiles, against float64 NumPy: values, dx and dw."""
  assert conv._winograd_applies(w_shape, stride)
  x, w, g = random_case(x_shape, w_shape, stride, seed=5)
  y, dx, dw = jax.jit(
    lambda x, w, g: value_and_grads(
      lambda x, w: conv.conv2d(x, w, stride=stride, impl="winograd"), x, w, g
    )
  )(x, w, g)
  np.testing.assert_allclose(
    y, helpers.numpy_conv(x, w, stride), rtol=1e-5, atol=1e-5 * np.abs(y).max()
  )
  # dx and dw by the adjoint identities (the conv is bilinear), both sides in float64:
  # <dx, ex> = <g, conv(ex, w)> and <dw, ew> = <g, conv(x, ew)> for random ex, ew.
  xn, wn, gn = (np.asarray(a, np.float64) for a in (x, w, g))
  rng = np.random.default_rng(7)
  for _ in range(3):
    ex, ew = rng.standard_normal(xn.shape), rng.standard_normal(wn.shape)
    np.testing.assert_allclose(
      np.sum(np.asarray(dx, np.float64) * ex),
      np.sum(gn * helpers.numpy_conv(ex, wn, stride)),
      rtol=1e-4,
    )
    np.testing.assert_allclose(
      np.sum(np.asarray(dw, np.float64) * ew),
      np.sum(gn * helpers.numpy_conv(xn, ew, stride)),
      rtol=1e-4,
    )


def test_winograd_falls_back_for_large_and_1x1_folded_kernels_and_integers():
  assert not conv._winograd_applies((9, 9, 1, 256), 1)  # Conv1: folded 9x9
  assert not conv._winograd_applies((3, 3, 4, 4), 3)  # folded 1x1
  assert conv._winograd_applies((9, 9, 256, 256), 2)  # PrimaryCaps: folded 5x5
  assert not conv._winograd_applies((9, 9, 256, 256), 2, jnp.int32)
  x, w, _ = random_case((2, 12, 12, 1), (9, 9, 1, 4), 1)
  jaxpr = str(jax.make_jaxpr(lambda x, w: conv.conv2d(x, w, impl="winograd"))(x, w))
  assert "conv_general_dilated" in jaxpr  # the 'hybrid' fallback
  # Integers stay exact (Winograd's fractional transforms would truncate).
  rng = np.random.default_rng(0)
  xi = jnp.asarray(rng.integers(-3, 4, (1, 9, 9, 2)), jnp.int32)
  wi = jnp.asarray(rng.integers(-3, 4, (5, 5, 2, 2)), jnp.int32)
  np.testing.assert_array_equal(
    conv.conv2d(xi, wi, stride=2, impl="winograd"), reference(xi, wi, 2)
  )


def _user_sets_ynn_types() -> bool:
  """Whether XLA_FLAGS holds a YNNPACK fusion-type setting other than capsjax's own."""
  flags = os.environ.get("XLA_FLAGS", "").replace(cpu_runtime.XLA_CPU_CONV_FLAG, "")
  return "--xla_cpu_experimental_ynn_fusion_type" in flags


def test_impls_and_auto():
  """'auto' resolves to the lowering this jaxlib and backend should get.

  tests/conftest.py calls `cpu_runtime.use_xla_cpu_convs()` as `capsjax.main` does. On the
  jaxlib minors whose XLA has the flag (0.10, 0.11) and without a GPU/TPU plugin it takes
  convs off YNNPACK, so 'auto' is 'winograd' on CPU; elsewhere convs stay on YNNPACK and
  'auto' falls back to 'im2col' (one logged warning for an unknown jaxlib).
  """
  assert conv.IMPLS == ("xla", "im2col", "s2d", "hybrid", "winograd")
  assert cpu_runtime.CONV_IMPLS == (*conv.IMPLS, "auto")
  for impl in LOWERINGS:
    assert cpu_runtime.resolve_conv_impl(impl) == impl
  auto = cpu_runtime.resolve_conv_impl("auto")
  assert auto in LOWERINGS
  if jax.default_backend() != "cpu":
    assert auto == "xla"
  else:
    assert auto == ("im2col" if cpu_runtime.cpu_convs_on_ynnpack() else "winograd")
    if not _user_sets_ynn_types():
      sets_flag = (
        cpu_runtime.flag_known(jaxlib.__version__)
        and not cpu_runtime._accelerator_plugin_installed()
      )
      assert (cpu_runtime.XLA_CPU_CONV_FLAG in os.environ["XLA_FLAGS"]) == sets_flag, (
        jaxlib.__version__
      )
      assert auto == ("winograd" if sets_flag else "im2col"), jaxlib.__version__
  x, w, _ = random_case((2, 9, 9, 2), (3, 3, 2, 2), 2)
  np.testing.assert_allclose(
    conv.conv2d(x, w, stride=2, impl=auto), reference(x, w, 2), rtol=1e-5, atol=1e-5
  )


def test_bad_impl_raises_naming_it():
  x, w, _ = random_case((1, 5, 5, 1), (3, 3, 1, 1), 1)
  with pytest.raises(ValueError, match="'cudnn'"):
    conv.conv2d(x, w, impl="cudnn")
  # 'auto' is a config value, resolved at start-up: conv2d itself never sees it.
  with pytest.raises(ValueError, match="got 'auto'"):
    conv.conv2d(x, w, impl="auto")
  with pytest.raises(ValueError, match="'fast'"):
    cpu_runtime.resolve_conv_impl("fast")


def test_out_size():
  assert [
    conv.out_size(n, k, s)
    for n, k, s in [(28, 9, 1), (20, 9, 2), (11, 3, 2), (5, 5, 2), (10, 4, 3)]
  ] == [20, 6, 5, 1, 3]


@pytest.mark.parametrize(
  "x_shape,w_shape,stride,match",
  [
    ((5, 5, 1), (3, 3, 1, 1), 1, "x must have shape"),
    ((1, 5, 5, 2), (3, 3, 1, 1), 1, "C_in"),
    ((1, 3, 5, 1), (4, 3, 1, 1), 1, "larger than the image"),
    ((1, 5, 5, 1), (3, 3, 1, 1), 0, "stride"),
  ],
)
def test_bad_shapes_raise(x_shape, w_shape, stride, match):
  with pytest.raises(ValueError, match=match):
    conv.conv2d(jnp.zeros(x_shape), jnp.zeros(w_shape), stride=stride, impl="im2col")
