"""Tests for capsjax.caps_ops: squash, capsule_lengths, and the public dynamic routing API
(`dynamic_routing`, `predict_and_route`, `check_iterations`, wrappers over capsjax.routing).

Expected values come from an independent NumPy implementation of Procedure 1 of
Sabour et al. (2017), written below with explicit Python loops, and from
hand-derived identities. Every JAX call goes through `jax.jit`.
"""

import functools

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from capsjax import caps_ops
from capsjax import routing
from capsjax.caps_ops import RoutingResult, capsule_lengths, dynamic_routing, squash


# ---------------------------------------------------------------------------------------
# Independent NumPy references.
# ---------------------------------------------------------------------------------------


def np_squash(s, axis=-1):
  """Textbook Eq. 1 in float64: |s|^2/(1+|s|^2) * s/|s| (0 at s = 0)."""
  s = np.asarray(s, np.float64)
  n = np.sqrt(np.sum(s * s, axis=axis, keepdims=True))  # [..., 1]
  safe = np.where(n > 0, n, 1.0)
  return s * (n * n / (1.0 + n * n)) / safe  # [..., D]


def np_softmax_parents(b_row):
  """Softmax of one input capsule's logits [N_out] over the parents."""
  e = np.exp(b_row - np.max(b_row))
  return e / np.sum(e)


def np_routing(u_hat, num_iterations, bias=None):
  """Procedure 1, one example at a time, with explicit loops.

  Args:
    u_hat: [..., N_in, N_out, D] predictions.
    num_iterations: r >= 1.
    bias: optional [N_out, D] added to each s_j (as the authors' code, Sarasra/models
      research/capsules, does).

  Returns:
    (v [..., N_out, D], c [..., N_in, N_out], b_before_last [..., N_in, N_out]) in float64.
  """
  u_hat = np.asarray(u_hat, np.float64)
  batch_shape = u_hat.shape[:-3]
  n_in, n_out, d = u_hat.shape[-3:]
  flat = u_hat.reshape((-1, n_in, n_out, d))  # [P, N_in, N_out, D]
  vs, cs, bs = [], [], []
  for u in flat:
    b = np.zeros((n_in, n_out))
    for r in range(num_iterations):
      b_used = b.copy()
      c = np.stack([np_softmax_parents(b[i]) for i in range(n_in)])  # [N_in, N_out]
      s = np.zeros((n_out, d))
      for j in range(n_out):
        for i in range(n_in):
          s[j] += c[i, j] * u[i, j]
        if bias is not None:
          s[j] += bias[j]
      v = np.stack([np_squash(s[j]) for j in range(n_out)])  # [N_out, D]
      if r < num_iterations - 1:
        for i in range(n_in):
          for j in range(n_out):
            b[i, j] += np.dot(u[i, j], v[j])
    vs.append(v)
    cs.append(c)
    bs.append(b_used)
  return (
    np.stack(vs).reshape(batch_shape + (n_out, d)),
    np.stack(cs).reshape(batch_shape + (n_in, n_out)),
    np.stack(bs).reshape(batch_shape + (n_in, n_out)),
  )


def random_u_hat(shape, seed=0, scale=1.0, dtype=np.float32):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


# ---------------------------------------------------------------------------------------
# squash
# ---------------------------------------------------------------------------------------


class TestSquash:
  @pytest.mark.parametrize("shape", [(7,), (3, 16), (2, 5, 8)])
  def test_matches_numpy_length_and_direction(self, shape):
    rng = np.random.default_rng(1)
    s = rng.standard_normal(shape)
    # Norms spread over [0.3, 30] so both the |s| < 1 and the rescaled branch are hit.
    target = np.exp(rng.uniform(np.log(0.3), np.log(30.0), shape[:-1] + (1,)))
    s = (s / np.linalg.norm(s, axis=-1, keepdims=True) * target).astype(np.float32)
    v = np.asarray(jax.jit(squash)(s), np.float64)
    np.testing.assert_allclose(v, np_squash(s), rtol=2e-5, atol=1e-7)
    norm_s = np.linalg.norm(s.astype(np.float64), axis=-1)
    np.testing.assert_allclose(np.linalg.norm(v, axis=-1), norm_s**2 / (1 + norm_s**2), rtol=2e-5)
    cosine = np.sum(v * s, axis=-1) / (np.linalg.norm(v, axis=-1) * norm_s)
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-6)

  def test_unit_vector_has_length_half(self):
    s = np.array([[1.0, 0.0, 0.0], [0.6, -0.8, 0.0], [0.0, 0.0, -1.0]], np.float32)
    v = jax.jit(squash)(s)
    np.testing.assert_allclose(np.asarray(v), 0.5 * s, rtol=1e-6)

  def test_zero_is_zero(self):
    v = jax.jit(squash)(jnp.zeros((2, 4)))
    np.testing.assert_array_equal(np.asarray(v), np.zeros((2, 4)))

  @pytest.mark.parametrize("value", [1e20, -1e20, 1e30, 1e38, 3.4e38])
  def test_huge_inputs_give_unit_length_without_nan(self, value):
    s = np.zeros((3, 16), np.float32)
    s[0, :] = value  # all components huge
    s[1, 3] = value  # one huge component, others 0
    s[2, :] = np.float32(value) * np.linspace(-1, 1, 16, dtype=np.float32)
    v = np.asarray(jax.jit(squash)(s))
    assert v.dtype == np.float32
    assert np.all(np.isfinite(v)), v
    np.testing.assert_allclose(np.linalg.norm(v.astype(np.float64), axis=-1), 1.0, rtol=1e-6)
    # Direction is still that of s.
    unit = s.astype(np.float64) / np.linalg.norm(s.astype(np.float64), axis=-1, keepdims=True)
    np.testing.assert_allclose(v, unit, rtol=1e-6, atol=1e-7)

  @pytest.mark.parametrize("axis", [0, 1, -2])
  def test_non_last_axis(self, axis):
    s = random_u_hat((4, 5, 3), seed=2, scale=0.8)
    v = jax.jit(functools.partial(squash, axis=axis))(s)
    np.testing.assert_allclose(np.asarray(v), np_squash(s, axis=axis), rtol=2e-5, atol=1e-7)
    # And differs from squashing along the last axis (the test can tell axes apart).
    assert not np.allclose(np.asarray(v), np_squash(s, axis=-1), rtol=1e-3)

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
  def test_dtype_preserved(self, dtype):
    s = random_u_hat((4, 8), seed=3)
    v = jax.jit(squash)(jnp.asarray(s, dtype))
    assert v.dtype == dtype
    np.testing.assert_allclose(
      np.asarray(v, np.float64),
      np_squash(np.asarray(jnp.asarray(s, dtype), np.float64)),
      rtol=1e-2,
      atol=1e-2,
    )

  def test_float64(self):
    with jax.enable_x64(True):
      s = random_u_hat((4, 8), seed=4, scale=2.0, dtype=np.float64)
      v = jax.jit(squash)(s)
      assert v.dtype == jnp.float64
      # Only eps = 1e-7 under the square root separates it from the textbook formula.
      np.testing.assert_allclose(np.asarray(v), np_squash(s), rtol=1e-7)

  def test_integer_input_raises(self):
    with pytest.raises(TypeError, match="floating"):
      squash(jnp.ones((3,), jnp.int32))

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
  def test_grad_at_zero_is_finite_and_zero(self, dtype):
    with jax.enable_x64(dtype == jnp.float64):
      jac = jax.jit(jax.jacrev(squash))(jnp.zeros((5,), dtype))
      assert jac.shape == (5, 5)
      assert np.all(np.isfinite(np.asarray(jac)))
      np.testing.assert_array_equal(np.asarray(jac), np.zeros((5, 5)))
      g = jax.jit(jax.grad(lambda s: jnp.sum(squash(s) ** 2 + squash(s))))(jnp.zeros((2, 3), dtype))
      np.testing.assert_array_equal(np.asarray(g), np.zeros((2, 3)))

  def test_grad_matches_finite_differences_of_numpy(self):
    with jax.enable_x64(True):
      s = random_u_hat((6,), seed=5, scale=1.5, dtype=np.float64)
      w = random_u_hat((6,), seed=6, dtype=np.float64)
      g = np.asarray(jax.jit(jax.grad(lambda x: jnp.dot(squash(x), w)))(s))
      h = 1e-6
      fd = np.array(
        [
          (np.dot(np_squash(s + h * e), w) - np.dot(np_squash(s - h * e), w)) / (2 * h)
          for e in np.eye(6)
        ]
      )
      np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)

  @pytest.mark.parametrize("scale", [0.5, 20.0])
  def test_check_grads_float64(self, scale):
    with jax.enable_x64(True):
      s = jnp.asarray(random_u_hat((3, 4), seed=7, scale=scale, dtype=np.float64))
      # Second order in forward mode, first order in reverse mode: the reverse-over-
      # reverse check compiles several extra programs and is slow on CPU.
      check_grads(jax.jit(squash), (s,), order=2, modes=["fwd"])
      check_grads(jax.jit(squash), (s,), order=1, modes=["rev"])


class TestCapsuleLengths:
  def test_values_and_grad_at_zero(self):
    v = random_u_hat((2, 10, 16), seed=8, scale=0.2)
    lengths = jax.jit(capsule_lengths)(v)
    assert lengths.shape == (2, 10)
    np.testing.assert_allclose(
      np.asarray(lengths), np.sqrt(np.sum(v.astype(np.float64) ** 2, -1) + 1e-7), rtol=1e-6
    )
    g = jax.jit(jax.grad(lambda x: jnp.sum(capsule_lengths(x))))(jnp.zeros((3, 4)))
    np.testing.assert_array_equal(np.asarray(g), np.zeros((3, 4)))

  def test_bfloat16_is_computed_in_float32(self):
    v = jnp.asarray(random_u_hat((4, 16), seed=9, scale=0.2), jnp.bfloat16)
    assert jax.jit(capsule_lengths)(v).dtype == jnp.float32


# ---------------------------------------------------------------------------------------
# dynamic_routing
# ---------------------------------------------------------------------------------------

ROUTING_SHAPES = [
  (5, 3, 4),  # no batch dim: [N_in, N_out, D]
  (2, 6, 4, 3),  # [B, N_in, N_out, D]
  (2, 3, 4, 3, 2),  # two batch dims
  (1, 8, 10, 16),  # CapsNet-like parents and pose size
]
ROUTING_ITERATIONS = (1, 2, 3, 4, 5)


@functools.lru_cache(maxsize=None)
def jit_routing(num_iterations, stop_gradient=False, return_couplings=False):
  """One jitted routing per static setting, shared by all tests (compiles are slow)."""
  return jax.jit(
    functools.partial(
      dynamic_routing,
      num_iterations=num_iterations,
      stop_gradient=stop_gradient,
      return_couplings=return_couplings,
    )
  )


@pytest.fixture(scope="module")
def routing_outputs():
  """{(shape, r): (u_hat, RoutingResult)} for all shapes and r = 1..5.

  Everything goes through one `jax.jit` (num_iterations is a static Python int in each
  call), so the 20 settings cost one XLA compile instead of 20.
  """
  u_hats = [random_u_hat(shape, seed=sum(shape)) for shape in ROUTING_SHAPES]

  @jax.jit
  def route_all(us):
    return [[dynamic_routing(u, r, return_couplings=True) for r in ROUTING_ITERATIONS] for u in us]

  results = route_all(u_hats)
  return {
    (shape, r): (u, res_r)
    for shape, u, res in zip(ROUTING_SHAPES, u_hats, results, strict=False)
    for r, res_r in zip(ROUTING_ITERATIONS, res, strict=False)
  }


@pytest.fixture(scope="module")
def grads64():
  """{(r, stop_gradient): (value, v, grad)} at u0 for r in (1, 3), one jit compile."""
  with jax.enable_x64(True):
    u0 = random_u_hat((4, 3, 2), seed=23, dtype=np.float64)  # [N_in, N_out, D]
    w = random_u_hat((3, 2), seed=24, dtype=np.float64)  # [N_out, D]

    @jax.jit
    def all_grads(u):
      out = {}
      for r in (1, 3):
        for stop in (False, True):

          def objective(x, r=r, stop=stop):
            v = dynamic_routing(x, r, stop_gradient=stop)
            return jnp.sum(v * w), v

          (value, v), g = jax.value_and_grad(objective, has_aux=True)(u)
          out[(r, stop)] = (value, v, g)
      return out

    res = jax.tree.map(np.asarray, all_grads(u0))
    assert all(leaf.dtype == np.float64 for leaf in jax.tree.leaves(res))
  return u0, w, res


class TestDynamicRouting:
  @pytest.mark.parametrize("num_iterations", ROUTING_ITERATIONS)
  @pytest.mark.parametrize("shape", ROUTING_SHAPES)
  def test_matches_numpy_reference(self, routing_outputs, shape, num_iterations):
    u_hat, res = routing_outputs[(shape, num_iterations)]
    assert isinstance(res, RoutingResult)
    v_ref, c_ref, _ = np_routing(u_hat, num_iterations)
    assert res.v.shape == shape[:-3] + shape[-2:]
    assert res.c.shape == shape[:-1]
    assert res.v.dtype == jnp.float32 and res.c.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(res.v), v_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(res.c), c_ref, rtol=1e-4, atol=1e-6)
    if num_iterations > 1:
      # Routing must actually change the result, else this test could not fail on a
      # routing that skips the agreement update.
      v1, _, _ = np_routing(u_hat, 1)
      assert np.max(np.abs(v_ref - v1)) > 1e-3

  def test_plain_call_returns_v(self):
    u_hat = random_u_hat((2, 6, 4, 3), seed=9)
    v = jit_routing(3)(u_hat)
    assert isinstance(v, jax.Array) and v.shape == (2, 4, 3)
    np.testing.assert_allclose(np.asarray(v), np_routing(u_hat, 3)[0], rtol=1e-4, atol=1e-6)

  @pytest.mark.parametrize("num_iterations", ROUTING_ITERATIONS)
  @pytest.mark.parametrize("shape", ROUTING_SHAPES)
  def test_couplings_sum_to_one_over_parents(self, routing_outputs, shape, num_iterations):
    _, res = routing_outputs[(shape, num_iterations)]
    c = np.asarray(res.c)  # [..., N_in, N_out]
    n_out = shape[-2]
    np.testing.assert_allclose(c.sum(axis=-1), 1.0, rtol=1e-6)
    assert np.all(c >= 0)
    if num_iterations == 1:
      np.testing.assert_allclose(c, 1.0 / n_out, rtol=1e-6)
    else:
      assert np.max(np.abs(c - 1.0 / n_out)) > 1e-2

  def test_one_iteration_is_squash_of_uniform_average(self, routing_outputs):
    shape = (2, 6, 4, 3)
    u_hat, res = routing_outputs[(shape, 1)]
    np.testing.assert_allclose(
      np.asarray(res.v), np_squash(u_hat.sum(axis=-3) / 4), rtol=1e-5, atol=1e-7
    )

  def test_logits_restart_at_zero_each_call(self):
    route = jit_routing(3)
    a = random_u_hat((2, 6, 4, 3), seed=12)
    b = random_u_hat((2, 6, 4, 3), seed=13)
    first = np.asarray(route(a))
    route(b)
    np.testing.assert_array_equal(np.asarray(route(a)), first)

  def test_vmap(self):
    u_hat = random_u_hat((2, 3, 6, 4, 5), seed=15)
    vmapped = jax.jit(
      jax.vmap(functools.partial(dynamic_routing, num_iterations=3, return_couplings=True))
    )
    res = vmapped(u_hat)
    v_ref, c_ref, _ = np_routing(u_hat, 3)
    np.testing.assert_allclose(np.asarray(res.v), v_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(res.c), c_ref, rtol=1e-4, atol=1e-6)

  def test_bfloat16_preserved(self):
    # float32 is checked in test_matches_numpy_reference, float64 below.
    u_hat = jnp.asarray(random_u_hat((2, 6, 4, 3), seed=16), jnp.bfloat16)
    res = jit_routing(3, return_couplings=True)(u_hat)
    assert res.v.dtype == jnp.bfloat16 and res.c.dtype == jnp.bfloat16
    v_ref, c_ref, _ = np_routing(np.asarray(u_hat, np.float64), 3)
    np.testing.assert_allclose(np.asarray(res.v, np.float64), v_ref, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(res.c, np.float64), c_ref, rtol=2e-2, atol=2e-2)

  def test_float64(self):
    with jax.enable_x64(True):
      u_hat = random_u_hat((2, 6, 4, 3), seed=17, dtype=np.float64)
      res = jit_routing(4, return_couplings=True)(u_hat)
      assert res.v.dtype == jnp.float64 and res.c.dtype == jnp.float64
      v_ref, c_ref, _ = np_routing(u_hat, 4)
      # Only squash's eps = 1e-7 under the square root separates it from the float64
      # reference; it moves |v| = |s|^2/(1+|s|^2) by at most ~eps/2 in absolute terms.
      np.testing.assert_allclose(np.asarray(res.v), v_ref, rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(np.asarray(res.c), c_ref, rtol=1e-6, atol=1e-7)

  @pytest.mark.parametrize(
    "bad, error",
    [
      (0, ValueError),
      (-1, ValueError),
      (1.5, TypeError),
      (True, TypeError),
      (3.0, TypeError),
      (np.float32(2.0), TypeError),
      (np.bool_(True), TypeError),
      (np.int64(0), ValueError),
      (None, TypeError),
    ],
  )
  def test_bad_num_iterations(self, bad, error):
    u_hat = random_u_hat((4, 3, 2), seed=18)
    with pytest.raises(error, match="num_iterations"):
      dynamic_routing(u_hat, bad)
    with pytest.raises(error, match="num_iterations"):
      jax.jit(dynamic_routing, static_argnums=1)(u_hat, bad)

  def test_traced_num_iterations_raises(self):
    with pytest.raises(TypeError, match="static integer"):
      jax.jit(dynamic_routing)(random_u_hat((4, 3, 2)), 3)

  def test_numpy_integer_iterations(self):
    """Counts from np.arange (int64) or any NumPy int route as the Python int does."""
    u_hat = random_u_hat((2, 6, 4, 3), seed=20)
    counts = np.arange(1, 4)  # int64
    for r in counts:
      res = jax.jit(dynamic_routing, static_argnums=1, static_argnames="return_couplings")(
        u_hat, r, return_couplings=True
      )
      v_ref, c_ref, _ = np_routing(u_hat, int(r))
      np.testing.assert_allclose(np.asarray(res.v), v_ref, rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(np.asarray(res.c), c_ref, rtol=1e-4, atol=1e-6)
    assert caps_ops.check_iterations(np.uint8(2)) == 2
    assert type(caps_ops.check_iterations(np.int32(2))) is int

  @pytest.mark.parametrize("num_iterations", [1, 3])
  def test_is_routing_dynamic(self, num_iterations):
    """The wrapper runs `routing.dynamic`'s program: the same bits, bias included."""
    u_hat = random_u_hat((2, 6, 4, 3), seed=21)
    bias = random_u_hat((4, 3), seed=22, scale=0.3)
    for b in (None, bias):
      res = jax.jit(
        lambda u, b=b: dynamic_routing(u, num_iterations, bias=b, return_couplings=True)
      )(u_hat)
      want = jax.jit(lambda u, b=b: routing.dynamic(u, num_iterations, bias=b))(u_hat)
      np.testing.assert_array_equal(np.asarray(res.v), np.asarray(want.poses))
      np.testing.assert_array_equal(np.asarray(res.c), np.asarray(want.assignments))

  def test_bad_u_hat(self):
    with pytest.raises(ValueError, match="N_in, N_out, D"):
      dynamic_routing(jnp.ones((3, 4)), 2)
    with pytest.raises(TypeError, match="floating"):
      dynamic_routing(jnp.ones((4, 3, 2), jnp.int32), 2)

  # --- gradients (float64, objective sum(v * w)) -----------------------------------------

  def test_stop_gradient_changes_grads_not_values(self, grads64):
    _, _, res = grads64
    val_full, v_full, g_full = res[(3, False)]
    val_stop, v_stop, g_stop = res[(3, True)]
    # Same forward values (up to rounding: XLA schedules the two grad programs apart).
    np.testing.assert_allclose(v_full, v_stop, rtol=1e-13)
    np.testing.assert_allclose(val_full, val_stop, rtol=1e-13)
    assert np.all(np.isfinite(g_full)) and np.all(np.isfinite(g_stop))
    assert np.max(np.abs(g_full - g_stop)) > 1e-3

  def test_stop_gradient_forward_is_bit_identical(self):
    u_hat = random_u_hat((2, 6, 4, 3), seed=19)
    np.testing.assert_array_equal(
      np.asarray(jit_routing(3)(u_hat)), np.asarray(jit_routing(3, stop_gradient=True)(u_hat))
    )

  def test_one_iteration_same_grads_for_both_variants(self, grads64):
    _, _, res = grads64
    np.testing.assert_allclose(res[(1, False)][2], res[(1, True)][2], rtol=1e-12, atol=1e-14)

  @pytest.mark.parametrize("num_iterations", [1, 3])
  @pytest.mark.parametrize("stop_gradient", [False, True])
  def test_grads_match_numpy_finite_differences(self, grads64, num_iterations, stop_gradient):
    """Full variant: central differences of the NumPy routing. Stopped variant: the
    logits before the last iteration are frozen at their NumPy value, and only the last
    pass s = sum_i c_ij u_hat_j|i, v = squash(s) is differentiated."""
    u0, w, res = grads64
    g = res[(num_iterations, stop_gradient)][2]
    _, _, b_frozen = np_routing(u0, num_iterations)
    c_frozen = np.stack([np_softmax_parents(row) for row in b_frozen])  # [N_in, N_out]

    def np_objective(u):
      if stop_gradient:
        v = np.stack(
          [np_squash(np.sum(c_frozen[:, j, None] * u[:, j], axis=0)) for j in range(u.shape[1])]
        )  # [N_out, D]
      else:
        v, _, _ = np_routing(u, num_iterations)
      return np.sum(v * w)

    h = 1e-6
    fd = np.zeros_like(u0)
    for idx in np.ndindex(u0.shape):
      e = np.zeros_like(u0)
      e[idx] = h
      fd[idx] = (np_objective(u0 + e) - np_objective(u0 - e)) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-7)

  @pytest.mark.parametrize("num_iterations", [1, 3])
  def test_check_grads_float64(self, num_iterations):
    with jax.enable_x64(True):
      u_hat = jnp.asarray(random_u_hat((4, 3, 2), seed=25, dtype=np.float64))
      check_grads(jit_routing(num_iterations), (u_hat,), order=1, modes=["fwd", "rev"])


class TestPredictAndRoute:
  """`predict_and_route(u, w)` equals `dynamic_routing(einsum(u, w))`: values and grads."""

  @pytest.mark.parametrize("num_iterations", [1, 2, 3, 4])
  @pytest.mark.parametrize("stop_gradient", [False, True])
  def test_matches_dynamic_routing_values_and_grads(self, num_iterations, stop_gradient):
    with jax.enable_x64(True):
      rng = np.random.default_rng(7)
      u = jnp.asarray(rng.standard_normal((3, 7, 5)) * 0.5)  # [B, N_in, D_in]
      w = jnp.asarray(rng.standard_normal((7, 4, 5, 6)) * 0.5)  # [N_in, N_out, D_in, D_out]
      gv = jnp.asarray(rng.standard_normal((3, 4, 6)))
      gc = jnp.asarray(rng.standard_normal((3, 7, 4)))

      def objective(fn):
        def f(u, w):
          r = fn(u, w)
          return jnp.sum(r.v * gv) + jnp.sum(r.c * gc)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

      kw = dict(stop_gradient=stop_gradient, return_couplings=True)
      expected = objective(
        lambda u, w: caps_ops.dynamic_routing(
          jnp.einsum("bni,nmio->bnmo", u, w), num_iterations, **kw
        )
      )(u, w)
      actual = objective(lambda u, w: caps_ops.predict_and_route(u, w, num_iterations, **kw))(u, w)
      jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), actual, expected
      )

  def test_float32_plain_call_and_finite_grads(self):
    rng = np.random.default_rng(8)
    u = jnp.asarray(rng.standard_normal((2, 6, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((6, 3, 4, 5)) * 0.1, jnp.float32)
    v = jax.jit(lambda u, w: caps_ops.predict_and_route(u, w, 3))(u, w)
    np.testing.assert_allclose(
      v, caps_ops.dynamic_routing(jnp.einsum("bni,nmio->bnmo", u, w), 3), rtol=1e-5, atol=1e-6
    )
    grads = jax.jit(
      jax.grad(lambda u, w: jnp.sum(caps_ops.predict_and_route(u, w, 3)), argnums=(0, 1))
    )(u, w)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)

  def test_bad_shapes_raise(self):
    with pytest.raises(ValueError, match="N_in"):
      caps_ops.predict_and_route(jnp.ones((2, 6, 4)), jnp.ones((5, 3, 4, 5)), 2)

  def test_is_routing_predict_and_route(self):
    """The wrapper runs `routing.predict_and_route`'s program: the same bits, forward and
    backward."""
    rng = np.random.default_rng(9)
    u = jnp.asarray(rng.standard_normal((2, 6, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((6, 3, 4, 5)) * 0.1, jnp.float32)

    def value_and_grads(fn):
      def f(u, w):
        return jnp.sum(jnp.sin(fn(u, w)[0])) + jnp.sum(jnp.cos(fn(u, w)[1]))

      return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(u, w)

    got = value_and_grads(lambda u, w: caps_ops.predict_and_route(u, w, 3, return_couplings=True))

    def r(u, w):
      return routing.predict_and_route(u, w, 3)

    want = value_and_grads(lambda u, w: (r(u, w).poses, r(u, w).assignments))
    jax.tree.map(np.testing.assert_array_equal, got, want)


class TestRoutingBias:
  """`bias`: the b_j of the authors' code (Sarasra/models research/capsules), added to s_j
  before the squash in every iteration."""

  @pytest.mark.parametrize(
    "shape,num_iterations",
    [((2, 6, 3, 4), 1), ((2, 6, 3, 4), 3), ((3, 5, 4, 2), 2), ((7, 2, 5), 4)],
  )
  @pytest.mark.parametrize("stop_gradient", [False, True])
  def test_matches_numpy_reference(self, shape, num_iterations, stop_gradient):
    u_hat = random_u_hat(shape, seed=3)
    bias = random_u_hat(shape[-2:], seed=4, scale=0.5)
    fn = jax.jit(
      functools.partial(
        dynamic_routing,
        num_iterations=num_iterations,
        stop_gradient=stop_gradient,
        return_couplings=True,
      )
    )
    v, c = fn(u_hat, bias=bias)
    v_ref, c_ref, _ = np_routing(u_hat, num_iterations, bias=bias)
    np.testing.assert_allclose(v, v_ref, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(c, c_ref, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.sum(c, axis=-1), 1.0, rtol=1e-6)
    # The bias changes the result (it is not silently dropped).
    assert not np.allclose(v, np_routing(u_hat, num_iterations)[0], atol=1e-3)

  def test_check_grads_float64(self):
    with jax.enable_x64(True):
      u_hat = jnp.asarray(random_u_hat((2, 4, 3, 2), seed=5, dtype=np.float64))
      bias = jnp.asarray(random_u_hat((3, 2), seed=6, scale=0.3, dtype=np.float64))

      def f(u, b):
        return jnp.sum(jnp.sin(dynamic_routing(u, 3, bias=b)))

      check_grads(f, (u_hat, bias), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)
      # The bias gradient through the 3 iterations equals central differences of NumPy.
      g = jax.grad(f, argnums=1)(u_hat, bias)
      eps = 1e-6
      for j, d in [(0, 0), (2, 1)]:
        e = np.zeros((3, 2))
        e[j, d] = eps
        num = (
          np.sum(np.sin(np_routing(u_hat, 3, bias=bias + e)[0]))
          - np.sum(np.sin(np_routing(u_hat, 3, bias=bias - e)[0]))
        ) / (2 * eps)
        np.testing.assert_allclose(g[j, d], num, rtol=1e-6, atol=1e-9)

  def test_bad_bias_shape(self):
    with pytest.raises(ValueError, match=r"bias of shape \(4, 2\) does not broadcast"):
      dynamic_routing(random_u_hat((2, 5, 3, 2)), 2, bias=np.zeros((4, 2), np.float32))


@pytest.mark.parametrize(
  "dtype,expected",
  [
    (jnp.bfloat16, jnp.float32),
    (jnp.float16, jnp.float32),
    (jnp.int32, jnp.float32),
    (jnp.float32, jnp.float32),
    (np.float64, np.float64),
  ],
)
def test_compute_dtype(dtype, expected):
  """Narrow inputs compute in float32 (squash, routing and the convs); wide ones stay wide."""
  assert caps_ops.compute_dtype(dtype) == jnp.dtype(expected)
