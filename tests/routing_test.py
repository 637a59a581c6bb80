"""Tests for capsjax.routing: the four routing algorithms under one contract.

Expected values come from independent NumPy implementations written below from each
paper's equations, one example at a time with explicit loops (EM's E-step uses the
Gaussian density itself, not log space). Settings are batched into few `jax.jit`
programs, because XLA compiles dominate the runtime.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from capsjax import caps_ops
from capsjax import routing
from capsjax.routing import Routed

ALGORITHMS = ("dynamic", "em", "inverted_dot_product", "self_attention")
SHAPES = [
  (5, 3, 4),  # no batch dim: [N_in, N_out, D]
  (2, 3, 6, 4, 3),  # two batch dims: [B1, B2, N_in, N_out, D]
  (1, 8, 5, 16),  # 4x4 pose matrices, as EM routing uses
]
ITERATIONS = (1, 2, 3)
EM_FINAL_LAMBDA = 0.1  # larger than the default 0.01, so activations vary visibly
# float32 results against the float64 references. Unit roundoff u = 2^-24 ≈ 6e-8; each
# contraction (N_in <= 8 or D <= 16 terms) has a relative error <= 16 u ≈ 1e-6, and a
# softmax turns an absolute logit error δ into a relative weight error ≈ δ; with logits
# |b| <~ 10 here, δ ≈ 1e-5 per iteration, ≈ 3e-5 after three: rtol = 1e-4. atol covers
# outputs that cancel to near 0 (LayerNorm'd poses, EM means) at unit scale.
F32_RTOL, F32_ATOL = 1e-4, 2e-5


# ---------------------------------------------------------------------------------------
# Independent NumPy references (float64).
# ---------------------------------------------------------------------------------------


def np_softmax(x):
  e = np.exp(x - np.max(x))
  return e / np.sum(e)


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def per_example(fn, u_hat, *extra):
  """Applies fn(u [N_in, N_out, D], *extra_k) to every example; stacks the outputs.

  Each extra array has the batch dims of u_hat in front.
  """
  u_hat = np.asarray(u_hat, np.float64)
  batch = u_hat.shape[:-3]
  flat = u_hat.reshape((-1,) + u_hat.shape[-3:])
  extra_flat = [np.reshape(e, (len(flat),) + np.shape(e)[len(batch) :]) for e in extra]
  outs = [fn(u, *[e[k] for e in extra_flat]) for k, u in enumerate(flat)]
  return tuple(
    np.stack([o[t] for o in outs]).reshape(batch + outs[0][t].shape) for t in range(len(outs[0]))
  )


def np_squash(s, eps=1e-7):
  """|s|^2/(1+|s|^2) s/|s| with |s| = sqrt(|s|^2 + eps), as `caps_ops.squash` defines it."""
  n2 = np.sum(s * s)
  return s * n2 / ((1.0 + n2) * np.sqrt(n2 + eps))


def np_lengths(v, eps=1e-7):
  return np.sqrt(np.sum(v * v, axis=-1) + eps)


def np_dynamic_last_pass(u, c, eps=1e-7):
  """v_j = squash(sum_i c_ij u_j|i) for given couplings c [N_in, N_out]; (v, lengths)."""
  v = np.stack(
    [np_squash(sum(c[i, j] * u[i, j] for i in range(u.shape[0])), eps) for j in range(u.shape[1])]
  )  # [N_out, D]
  return v, np_lengths(v, eps)


def np_dynamic_one(u, num_iterations, eps=1e-7):
  """Sabour et al. (2017), Procedure 1."""
  n_in, n_out = u.shape[:2]
  b = np.zeros((n_in, n_out))
  for r in range(num_iterations):
    c = np.stack([np_softmax(b[i]) for i in range(n_in)])  # [N_in, N_out]
    v, lengths = np_dynamic_last_pass(u, c, eps)
    if r < num_iterations - 1:
      for i in range(n_in):
        for j in range(n_out):
          b[i, j] += np.dot(u[i, j], v[j])
  return v, lengths, c


def np_em_m_step(u, r, a_in, beta_u, beta_a, lam, eps=1e-8, cost_scale=1.0):
  """One M-step for assignments r [N_in, N_out]: (mu [N_out, D], var, a_out [N_out])."""
  n_in, n_out, d = u.shape
  beta_u = np.broadcast_to(beta_u, (n_out,))
  beta_a = np.broadcast_to(beta_a, (n_out,))
  mu = np.zeros((n_out, d))
  var = np.zeros((n_out, d))
  a_out = np.zeros(n_out)
  for j in range(n_out):
    rp = r[:, j] * a_in  # [N_in]
    total = rp.sum()
    mu[j] = sum(rp[i] * u[i, j] for i in range(n_in)) / (total + eps)
    var[j] = sum(rp[i] * (u[i, j] - mu[j]) ** 2 for i in range(n_in)) / (total + eps) + eps
    cost = cost_scale * (beta_u[j] + np.log(np.sqrt(var[j]))) * total  # [D]
    a_out[j] = np_sigmoid(lam * (beta_a[j] - cost.sum()))
  return mu, var, a_out


def np_em_one(
  u,
  a_in,
  beta_u,
  beta_a,
  lambdas,
  eps=1e-8,
  normalise_over="parents",
  cost_scale=1.0,
  final_e_step=False,
):
  """Hinton, Sabour & Frosst (2018), Procedure 1, with densities (not log densities).

  normalise_over='inputs' is a deliberately wrong E-step, to show the tests can fail.
  final_e_step: also run the E-step after the last M-step and return its R.
  """
  n_in, n_out = u.shape[:2]
  r = np.full((n_in, n_out), 1.0 / n_out)
  for t, lam in enumerate(lambdas):
    mu, var, a_out = np_em_m_step(u, r, a_in, beta_u, beta_a, lam, eps, cost_scale)
    if t == len(lambdas) - 1 and not final_e_step:
      break
    p = np.zeros((n_in, n_out))  # E-step
    for i in range(n_in):
      for j in range(n_out):
        p[i, j] = np.prod(
          np.exp(-((u[i, j] - mu[j]) ** 2) / (2 * var[j])) / np.sqrt(2 * np.pi * var[j])
        )
    ap = a_out[None, :] * p
    axis = 1 if normalise_over == "parents" else 0
    r = ap / ap.sum(axis=axis, keepdims=True)
  return mu, a_out, r


def np_layer_norm(x, scale=None, bias=None, eps=1e-5):
  """(x - mean) / sqrt(var + eps) * scale + bias, over one pose [D]."""
  y = (x - x.mean()) / np.sqrt(x.var() + eps)
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y


def np_inverted_last_pass(u, r, ln_scale=None, ln_bias=None, layer_norm=True, eps=1e-5):
  """v_j = LayerNorm(sum_i r_ij u_j|i) for given weights r [N_in, N_out]; (v, mean r)."""
  n_in, n_out, _ = u.shape
  s = [sum(r[i, j] * u[i, j] for i in range(n_in)) for j in range(n_out)]
  v = np.stack([np_layer_norm(x, ln_scale, ln_bias, eps) if layer_norm else x for x in s])
  return v, r.mean(axis=0)


def np_inverted_one(
  u,
  num_iterations,
  scale=None,
  ln_scale=None,
  ln_bias=None,
  normalise_over="parents",
  layer_norm=True,
  eps=1e-5,
):
  """Tsai et al. (2020), Procedure 1: zero-initialised parents, then attention.

  layer_norm=False: the paper's ablation, v_j = sum_i r_ij u_j|i.
  """
  n_in, n_out, d = u.shape
  scale = 1.0 / np.sqrt(d) if scale is None else scale
  r = np.full((n_in, n_out), 1.0 / n_out)
  v, _ = np_inverted_last_pass(u, r, ln_scale, ln_bias, layer_norm, eps)  # [N_out, D]
  for _ in range(num_iterations - 1):
    agree = np.array(
      [[scale * np.dot(v[j], u[i, j]) for j in range(n_out)] for i in range(n_in)]
    )  # [N_in, N_out]
    if normalise_over == "parents":
      r = np.stack([np_softmax(agree[i]) for i in range(n_in)])
    else:
      r = np.stack([np_softmax(agree[:, j]) for j in range(n_out)], axis=1)
    v, _ = np_inverted_last_pass(u, r, ln_scale, ln_bias, layer_norm, eps)
  return v, r.mean(axis=0), r


def np_efficient_squash(s, eps=1e-7):
  """(1 - 1/exp(|s|)) s/|s| with |s| = sqrt(|s|^2 + eps)."""
  n = np.sqrt(np.sum(s * s) + eps)
  return (1.0 - 1.0 / np.exp(n)) * s / n


def np_self_attention_last_pass(u, c, log_prior=None, eps=1e-7):
  """v_j = squash(sum_i u_j|i (c_ij + B_ij)) for given c [N_in, N_out]; (v, lengths)."""
  n_in, n_out, _ = u.shape
  b = np.zeros((n_in, n_out)) if log_prior is None else log_prior
  v = np.stack(
    [
      np_efficient_squash(sum(u[i, j] * (c[i, j] + b[i, j]) for i in range(n_in)), eps)
      for j in range(n_out)
    ]
  )
  return v, np_lengths(v, eps)


def np_self_attention_one(u, log_prior=None, normalise_over="parents", eps=1e-7):
  """Mazzia et al. (2021): A_j = U_j U_j^T / sqrt(d), C = softmax_j(row sums of A_j)."""
  n_in, n_out, d = u.shape
  logits = np.zeros((n_in, n_out))
  for j in range(n_out):
    uj = u[:, j, :]  # [N_in, D]
    a = uj @ uj.T / np.sqrt(d)  # [N_in, N_in]
    logits[:, j] = a.sum(axis=1)
  if normalise_over == "parents":
    c = np.stack([np_softmax(logits[i]) for i in range(n_in)])
  else:
    c = np.stack([np_softmax(logits[:, j]) for j in range(n_out)], axis=1)
  v, lengths = np_self_attention_last_pass(u, c, log_prior, eps)
  return v, lengths, c


# ---------------------------------------------------------------------------------------
# Inputs per setting and the references.
# ---------------------------------------------------------------------------------------


def make_inputs(shape, seed=0, dtype=np.float32):
  """Votes and the extra arguments each algorithm takes, deterministic per shape."""
  rng = np.random.default_rng([seed, *shape])
  n_in, n_out = shape[-3], shape[-2]
  u = rng.standard_normal(shape).astype(dtype)
  return {
    "u": u,
    "a_in": rng.uniform(0.1, 1.0, shape[:-2]).astype(dtype),
    "beta_u": rng.normal(0.0, 0.5, (n_out,)).astype(dtype),
    "beta_a": rng.normal(0.0, 0.5, (n_out,)).astype(dtype),
    "log_prior": rng.normal(0.0, 0.3, (n_in, n_out)).astype(dtype),
  }


def kwargs_for(algo, inputs):
  if algo == "em":
    return dict(
      a_in=inputs["a_in"],
      beta_u=inputs["beta_u"],
      beta_a=inputs["beta_a"],
      final_lambda=EM_FINAL_LAMBDA,
    )
  if algo == "self_attention":
    return dict(log_prior=inputs["log_prior"])
  return {}


def reference(algo, inputs, num_iterations, **overrides):
  u = inputs["u"]
  if algo == "dynamic":
    return per_example(lambda x: np_dynamic_one(x, num_iterations, **overrides), u)
  if algo == "em":
    lambdas = [EM_FINAL_LAMBDA * (1 - 0.95 ** (t + 1)) for t in range(num_iterations)]
    beta_u = np.asarray(inputs["beta_u"], np.float64)
    beta_a = np.asarray(inputs["beta_a"], np.float64)
    return per_example(
      lambda x, a: np_em_one(x, a, beta_u, beta_a, lambdas, **overrides),
      u,
      np.asarray(inputs["a_in"], np.float64),
    )
  if algo == "inverted_dot_product":
    return per_example(lambda x: np_inverted_one(x, num_iterations, **overrides), u)
  prior = np.asarray(inputs["log_prior"], np.float64)
  return per_example(lambda x: np_self_attention_one(x, prior, **overrides), u)


@pytest.fixture(scope="module")
def outputs():
  """{(algo, shape, r): (inputs, Routed)}: every setting in one jit compile."""
  inputs = [make_inputs(shape) for shape in SHAPES]

  @jax.jit
  def route_all(inputs):
    return [
      [
        [routing.get(algo)(inp["u"], r, **kwargs_for(algo, inp)) for r in ITERATIONS]
        for inp in inputs
      ]
      for algo in ALGORITHMS
    ]

  results = route_all(inputs)
  return {
    (algo, shape, r): (inp, res_r)
    for algo, res_a in zip(ALGORITHMS, results, strict=False)
    for shape, inp, res_s in zip(SHAPES, inputs, res_a, strict=False)
    for r, res_r in zip(ITERATIONS, res_s, strict=False)
  }


SETTINGS = [(a, s, r) for a in ALGORITHMS for s in SHAPES for r in ITERATIONS]
SETTING_IDS = [f"{a}-{'x'.join(map(str, s))}-r{r}" for a, s, r in SETTINGS]


# ---------------------------------------------------------------------------------------
# Values and invariants.
# ---------------------------------------------------------------------------------------


class TestAgainstNumPy:
  @pytest.mark.parametrize("algo,shape,r", SETTINGS, ids=SETTING_IDS)
  def test_matches_reference(self, outputs, algo, shape, r):
    inputs, res = outputs[(algo, shape, r)]
    assert isinstance(res, Routed)
    poses, acts, assign = reference(algo, inputs, r)
    np.testing.assert_allclose(np.asarray(res.poses), poses, rtol=F32_RTOL, atol=F32_ATOL)
    np.testing.assert_allclose(np.asarray(res.activations), acts, rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(np.asarray(res.assignments), assign, rtol=1e-4, atol=2e-6)
    if r > 1:
      first = outputs[(algo, shape, 1)][1]
      changed = np.max(np.abs(np.asarray(res.poses) - np.asarray(first.poses)))
      if algo == "self_attention":  # single pass: iterations change nothing
        assert changed == 0
      else:  # routing must do something, else the test is weak
        assert changed > 1e-3

  @pytest.mark.parametrize("algo,shape,r", SETTINGS, ids=SETTING_IDS)
  def test_invariants(self, outputs, algo, shape, r):
    _, res = outputs[(algo, shape, r)]
    batch, (n_in, n_out, d) = shape[:-3], shape[-3:]
    assert res.poses.shape == batch + (n_out, d)
    assert res.activations.shape == batch + (n_out,)
    assert res.assignments.shape == batch + (n_in, n_out)
    assert all(x.dtype == jnp.float32 for x in res)
    assign = np.asarray(res.assignments, np.float64)
    # Every algorithm here normalises each input's weights over the parents (last axis).
    np.testing.assert_allclose(assign.sum(axis=-1), 1.0, rtol=1e-5)
    assert np.all(assign >= 0)
    acts = np.asarray(res.activations)
    assert np.all(acts > 0) and np.all(acts < 1)
    if algo == "inverted_dot_product":
      # Mean routing weight per parent: sums to 1 over the parents; poses layer-normed.
      np.testing.assert_allclose(acts.sum(axis=-1), 1.0, rtol=1e-5)
      np.testing.assert_allclose(np.asarray(res.poses).mean(axis=-1), 0.0, atol=1e-5)

  @pytest.mark.parametrize("algo", ["em", "inverted_dot_product", "self_attention"])
  def test_wrong_normalisation_axis_is_caught(self, outputs, algo):
    """A reference that normalises over the inputs instead of the parents is far outside
    the tolerance used above, so a wrong softmax axis could not pass."""
    shape, r = (2, 3, 6, 4, 3), 3
    inputs, res = outputs[(algo, shape, r)]
    wrong = reference(algo, inputs, r, normalise_over="inputs")
    for got, bad in zip((res.poses, res.assignments), (wrong[0], wrong[2]), strict=False):
      assert not np.allclose(np.asarray(got), bad, rtol=F32_RTOL, atol=F32_ATOL)

  def test_dynamic_is_caps_ops_dynamic_routing(self):
    u = make_inputs((2, 6, 4, 3))["u"]
    res = jax.jit(lambda x: routing.dynamic(x, 3))(u)
    v, c = jax.jit(lambda x: caps_ops.dynamic_routing(x, 3, return_couplings=True))(u)
    # The public function is a wrapper: the same program, so the same bits.
    np.testing.assert_array_equal(np.asarray(res.poses), np.asarray(v))
    np.testing.assert_array_equal(np.asarray(res.assignments), np.asarray(c))
    np.testing.assert_allclose(
      np.asarray(res.activations), np.asarray(caps_ops.capsule_lengths(v)), rtol=1e-6
    )


# ---------------------------------------------------------------------------------------
# Transformations and dtypes.
# ---------------------------------------------------------------------------------------


def call(algo, inputs, r, **extra):
  return routing.get(algo)(inputs["u"], r, **kwargs_for(algo, inputs), **extra)


@pytest.fixture(scope="module")
def bf16_and_f64():
  """(bfloat16 inputs, {algo: bfloat16 result}, float64 inputs, {algo: float64 result}),
  one compile per dtype."""
  inputs = make_inputs((2, 6, 4, 3), seed=5)
  bf = {k: jnp.asarray(v, jnp.bfloat16) for k, v in inputs.items()}
  res_bf = jax.jit(lambda inp: {a: call(a, inp, 3) for a in ALGORITHMS})(bf)
  f64 = make_inputs((2, 6, 4, 3), seed=5, dtype=np.float64)
  with jax.enable_x64(True):
    res_64 = jax.jit(lambda inp: {a: call(a, inp, 3) for a in ALGORITHMS})(f64)
    res_64 = jax.tree.map(np.asarray, res_64)
  return bf, res_bf, f64, res_64


class TestTransformsAndDtypes:
  @pytest.mark.parametrize("algo", ALGORITHMS)
  def test_jit_equals_eager(self, outputs, algo):
    inputs, jitted = outputs[(algo, (5, 3, 4), 3)]
    eager = call(algo, inputs, 3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7), eager, jitted)

  @pytest.mark.parametrize("algo", ALGORITHMS)
  def test_vmap_equals_batched(self, outputs, algo):
    inputs, batched = outputs[(algo, (2, 3, 6, 4, 3), 2)]
    per_ex = {k: inputs[k] for k in ("u", "a_in")}
    shared = {k: v for k, v in kwargs_for(algo, inputs).items() if k != "a_in"}
    fn = functools.partial(routing.get(algo), num_iterations=2, **shared)
    if algo == "em":
      mapped = jax.jit(jax.vmap(lambda u, a: fn(u, a_in=a)))(per_ex["u"], per_ex["a_in"])
    else:
      mapped = jax.jit(jax.vmap(fn))(per_ex["u"])
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7), mapped, batched
    )

  @pytest.mark.parametrize("algo", ALGORITHMS)
  def test_bfloat16_in_bfloat16_out(self, bf16_and_f64, algo):
    bf, res_bf, _, _ = bf16_and_f64
    res = res_bf[algo]
    assert all(x.dtype == jnp.bfloat16 for x in res)
    # Reference on the bfloat16-rounded inputs: only the output rounding (~3 significant
    # digits) and float32 arithmetic separate them.
    rounded = {k: np.asarray(v, np.float64) for k, v in bf.items()}
    ref = reference(algo, rounded, 3)
    for got, want in zip(res, ref, strict=False):
      np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-2, atol=1e-2)

  @pytest.mark.parametrize("algo", ALGORITHMS)
  def test_float64(self, bf16_and_f64, algo):
    _, _, f64, res_64 = bf16_and_f64
    res = res_64[algo]
    assert all(x.dtype == np.float64 for x in res)
    ref = reference(algo, f64, 3)
    # The references share every epsilon: only float64 rounding separates them.
    for got, want in zip(res, ref, strict=False):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------
# Gradients (float64).
# ---------------------------------------------------------------------------------------


class TestGradients:
  @pytest.mark.parametrize("algo", ALGORITHMS)
  def test_check_grads_float64(self, algo):
    with jax.enable_x64(True):
      inputs = make_inputs((2, 4, 3, 4), seed=7, dtype=np.float64)
      if algo == "em":

        def f(u, a, bu, ba):
          return routing.em(u, 3, a_in=a, beta_u=bu, beta_a=ba, final_lambda=1.0)

        args = (inputs["u"], inputs["a_in"], inputs["beta_u"], inputs["beta_a"])
      elif algo == "inverted_dot_product":
        d = inputs["u"].shape[-1]

        def f(u, g, b):
          return routing.inverted_dot_product(u, 3, ln_scale=g, ln_bias=b)

        args = (inputs["u"], 1.0 + 0.1 * np.arange(d), 0.05 * np.arange(d))
      elif algo == "self_attention":

        def f(u, b):
          return routing.self_attention(u, 1, log_prior=b)

        args = (inputs["u"], inputs["log_prior"])
      else:

        def f(u):
          return routing.dynamic(u, 3)

        args = (inputs["u"],)
      args = tuple(jnp.asarray(a) for a in args)
      check_grads(jax.jit(f), args, order=1, modes=["rev"])

  @pytest.mark.parametrize("algo", ALGORITHMS)
  def test_grads_finite_for_degenerate_votes(self, algo):
    """Identical votes (EM: σ² = 0; LayerNorm: var = 0) and zero votes (squash at 0)."""
    grad = jax.jit(
      jax.vmap(jax.grad(lambda x: sum(jnp.sum(jnp.sin(t)) for t in routing.get(algo)(x, 2))))
    )
    g = np.asarray(
      grad(np.stack([np.ones((4, 3, 4), np.float32), np.zeros((4, 3, 4), np.float32)]))
    )
    assert np.all(np.isfinite(g)), algo


# ---------------------------------------------------------------------------------------
# Algorithm details.
# ---------------------------------------------------------------------------------------


class TestEM:
  def test_default_inverse_temperature_schedule(self):
    np.testing.assert_allclose(
      routing.em_inverse_temperatures(3), [0.01 * 0.05, 0.01 * 0.0975, 0.01 * 0.142625], rtol=1e-12
    )
    inputs = make_inputs((2, 6, 4, 3))
    default, explicit = jax.jit(
      lambda u, a: (
        routing.em(u, 3, a_in=a),
        routing.em(u, 3, a_in=a, inverse_temperatures=routing.em_inverse_temperatures(3)),
      )
    )(inputs["u"], inputs["a_in"])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), default, explicit)

  def test_explicit_inverse_temperatures_match_reference(self):
    inputs = make_inputs((2, 6, 4, 3), seed=3)
    lambdas = (0.3, 1.0)
    for cost_scale in (1.0, 100.0 * 3 / 6):  # the paper's; IBM's 100 N_out / N_in.
      res = jax.jit(
        lambda u, a, bu, ba, s=cost_scale: routing.em(
          u, 2, a_in=a, beta_u=bu, beta_a=ba, inverse_temperatures=lambdas, cost_scale=s
        )
      )(inputs["u"], inputs["a_in"], inputs["beta_u"], inputs["beta_a"])
      ref = per_example(
        lambda x, a, s=cost_scale: np_em_one(
          x,
          a,
          inputs["beta_u"].astype(np.float64),
          inputs["beta_a"].astype(np.float64),
          lambdas,
          cost_scale=s,
        ),
        inputs["u"],
        inputs["a_in"].astype(np.float64),
      )
      for got, want in zip(res, ref, strict=False):
        np.testing.assert_allclose(np.asarray(got), want, rtol=F32_RTOL, atol=F32_ATOL)

  def test_inactive_inputs_do_not_move_the_poses(self):
    inputs = make_inputs((2, 6, 4, 3), seed=4)
    a_in = inputs["a_in"].copy()
    a_in[:, 0] = 0.0
    u2 = inputs["u"].copy()
    u2[:, 0] += 5.0
    f = jax.jit(lambda u: routing.em(u, 3, a_in=a_in, final_lambda=1.0))
    r1, r2 = f(inputs["u"]), f(u2)
    np.testing.assert_allclose(np.asarray(r1.poses), np.asarray(r2.poses), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
      np.asarray(r1.activations), np.asarray(r2.activations), rtol=1e-5, atol=1e-6
    )

  def test_bad_arguments(self):
    u = make_inputs((2, 6, 4, 3))["u"]
    with pytest.raises(ValueError, match="inverse_temperatures must have"):
      routing.em(u, 3, inverse_temperatures=(0.1, 0.2))
    with pytest.raises(ValueError, match=r"beta_u must be a scalar or have shape \[N_out\]"):
      routing.em(u, 3, beta_u=np.zeros((3,), np.float32))
    with pytest.raises(ValueError, match=r"beta_a"):
      routing.em(u, 3, beta_a=np.zeros((4, 1), np.float32))
    with pytest.raises(ValueError, match=r"a_in of shape \(2, 5\)"):
      routing.em(u, 3, a_in=np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match="cost_scale must be a real number > 0, got 0.0"):
      routing.em(u, 3, cost_scale=0.0)

  @pytest.mark.parametrize("r", [1, 3])
  def test_final_e_step_matches_reference(self, r):
    """final_e_step=True: the assignments are the posterior of an E-step after the last
    M-step; poses and activations are unchanged."""
    inputs = make_inputs((2, 6, 4, 3), seed=16)
    posterior, default = jax.jit(
      lambda inp: (call("em", inp, r, final_e_step=True), call("em", inp, r))
    )(inputs)
    want = reference("em", inputs, r, final_e_step=True)
    for got, w in zip(posterior, want, strict=False):
      np.testing.assert_allclose(np.asarray(got), w, rtol=F32_RTOL, atol=F32_ATOL)
    for field in ("poses", "activations"):
      np.testing.assert_array_equal(getattr(posterior, field), getattr(default, field))
    np.testing.assert_allclose(np.asarray(posterior.assignments).sum(-1), 1.0, rtol=1e-5)
    if r == 1:  # without it, one iteration's assignments are the uniform start
      np.testing.assert_allclose(default.assignments, 0.25, rtol=1e-6)
      assert np.max(np.abs(np.asarray(posterior.assignments) - 0.25)) > 1e-2

  def test_initial_assignments_broadcast_and_default(self):
    """R0 given as [N_out] (or a full [..., N_in, N_out]) broadcasts; 1/N_out is the
    default, so passing it changes nothing; another R0 changes the result."""
    inputs = make_inputs((2, 6, 4, 3), seed=5)
    u, a = inputs["u"], inputs["a_in"]
    default = routing.em(u, 3, a_in=a, final_lambda=1.0)
    for r0 in (np.full(4, 0.25, np.float32), np.full((2, 6, 4), 0.25, np.float32)):
      same = routing.em(u, 3, a_in=a, final_lambda=1.0, initial_assignments=r0)
      np.testing.assert_allclose(same.activations, default.activations, rtol=1e-6)
    skewed = routing.em(
      u, 3, a_in=a, final_lambda=1.0, initial_assignments=np.array([0.7, 0.1, 0.1, 0.1])
    )
    assert np.max(np.abs(np.asarray(skewed.poses) - np.asarray(default.poses))) > 1e-3


class TestInvertedDotProduct:
  def test_paper_scale_and_layer_norm_params_match_reference(self):
    inputs = make_inputs((2, 6, 4, 3), seed=8)
    g, b = np.array([1.5, 0.5, 2.0]), np.array([0.1, -0.2, 0.3])
    res = jax.jit(
      lambda u: routing.inverted_dot_product(u, 3, agreement_scale=1.0, ln_scale=g, ln_bias=b)
    )(inputs["u"])
    ref = per_example(
      lambda x: np_inverted_one(x, 3, scale=1.0, ln_scale=g, ln_bias=b), inputs["u"]
    )
    for got, want in zip(res, ref, strict=False):
      np.testing.assert_allclose(np.asarray(got), want, rtol=F32_RTOL, atol=F32_ATOL)
    # The scale matters: the default 1/sqrt(D) result differs.
    default = routing.inverted_dot_product(inputs["u"], 3, ln_scale=g, ln_bias=b)
    assert not np.allclose(np.asarray(default.assignments), ref[2], atol=1e-3)

  def test_parent_poses_continue_the_routing(self):
    """Concurrent routing's step: one pass from given poses is one more iteration."""
    u = make_inputs((2, 6, 4, 3), seed=11)["u"]

    @jax.jit
    def run(u):
      two = routing.inverted_dot_product(u, 2)
      return (
        routing.inverted_dot_product(u, 3),
        routing.inverted_dot_product(u, 1, parent_poses=two.poses),
        routing.inverted_dot_product(u, 2, parent_poses=two.poses),
      )

    three, resumed, resumed2 = run(u)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), resumed, three
    )
    ref4 = per_example(lambda x: np_inverted_one(x, 4), u)
    for got, want in zip(resumed2, ref4, strict=False):
      np.testing.assert_allclose(np.asarray(got), want, rtol=F32_RTOL, atol=F32_ATOL)
    with pytest.raises(ValueError, match=r"parent_poses of shape \(4, 4\)"):
      routing.inverted_dot_product(u, 1, parent_poses=np.zeros((4, 4), np.float32))

  def test_bad_layer_norm_params(self):
    u = make_inputs((6, 4, 3))["u"]
    with pytest.raises(ValueError, match=r"ln_scale of shape \(4,\)"):
      routing.inverted_dot_product(u, 2, ln_scale=np.ones(4))
    with pytest.raises(ValueError, match="ln_bias .* needs layer_norm=True"):
      routing.inverted_dot_product(u, 2, layer_norm=False, ln_bias=np.zeros(3))

  def test_without_layer_norm_matches_reference(self):
    """The paper's ablation: v_j = sum_i r_ij u_j|i, no normalisation."""
    u = make_inputs((2, 6, 4, 3), seed=15)["u"]
    res = jax.jit(
      lambda x: [routing.inverted_dot_product(x, r, layer_norm=False) for r in ITERATIONS]
    )(u)
    for r, got in zip(ITERATIONS, res, strict=False):
      want = per_example(lambda x, r=r: np_inverted_one(x, r, layer_norm=False), u)
      for x, w in zip(got, want, strict=False):
        np.testing.assert_allclose(np.asarray(x), w, rtol=F32_RTOL, atol=F32_ATOL)
      # Not normalised: LayerNorm'd poses would have mean 0 over D.
      assert np.max(np.abs(np.asarray(got.poses).mean(axis=-1))) > 1e-2


class TestPredictAndRoute:
  """`routing.predict_and_route(u, w)` is `routing.dynamic(einsum(u, w))` fused."""

  @pytest.mark.parametrize("stop_gradient", [False, True])
  @pytest.mark.parametrize("eps", [1e-7, 0.3])
  def test_equals_dynamic_on_the_votes(self, stop_gradient, eps):
    with jax.enable_x64(True):
      rng = np.random.default_rng(17)
      u = jnp.asarray(rng.standard_normal((2, 5, 3)) * 0.5)  # [B, N_in, D_in]
      w = jnp.asarray(rng.standard_normal((5, 4, 3, 2)) * 0.5)  # [N_in, N_out, D_in, D_out]
      cot = [jnp.asarray(rng.standard_normal(s)) for s in ((2, 4, 2), (2, 4), (2, 5, 4))]

      def objective(fn):
        def f(u, w):
          return sum(jnp.sum(x * g) for x, g in zip(fn(u, w), cot, strict=False))

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

      kw = dict(stop_gradient=stop_gradient, eps=eps)

      def votes(u, w):
        return jnp.einsum("bni,nmio->bnmo", u, w)

      def fused(u, w):
        return routing.predict_and_route(u, w, 3, **kw)

      expected = objective(lambda u, w: routing.dynamic(votes(u, w), 3, **kw))(u, w)
      actual = objective(fused)(u, w)
      # float64, the same sums in another order: rounding ~1e-15, far below 1e-10.
      jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), actual, expected
      )
      assert isinstance(fused(u, w), Routed)


class TestSelfAttention:
  def test_efficient_squash(self):
    s = make_inputs((5, 4, 3), seed=9)["u"].reshape(-1, 3) * 2  # norms ~0.5..8
    huge = np.full((2, 4), 3e38, np.float32)
    huge[1, 1:] = 0

    @jax.jit
    def run(s, huge):
      zero = jnp.zeros_like(s[:2])
      grad_at_zero = jax.grad(lambda x: jnp.sum(routing.efficient_squash(x)))(zero)
      return (
        routing.efficient_squash(s),
        routing.efficient_squash(zero),
        grad_at_zero,
        routing.efficient_squash(huge),
      )

    v, v0, g0, vh = map(np.asarray, run(s, huge))
    np.testing.assert_allclose(
      v, np.stack([np_efficient_squash(x) for x in s.astype(np.float64)]), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_array_equal(v0, np.zeros_like(v0))
    np.testing.assert_allclose(g0, 1.0, rtol=1e-3)  # v ≈ s near 0
    assert np.all(np.isfinite(vh))
    np.testing.assert_allclose(np.linalg.norm(vh, axis=-1), 1.0, rtol=1e-6)

  def test_no_prior_matches_reference(self):
    u = make_inputs((2, 6, 4, 3), seed=10)["u"]
    res = jax.jit(lambda x: routing.self_attention(x, 1))(u)
    ref = per_example(np_self_attention_one, u)
    for got, want in zip(res, ref, strict=False):
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=2e-6)

  def test_bad_log_prior(self):
    with pytest.raises(ValueError, match=r"log_prior of shape \(4, 6\)"):
      routing.self_attention(make_inputs((6, 4, 3))["u"], 1, log_prior=np.zeros((4, 6)))


# ---------------------------------------------------------------------------------------
# Registry and argument checks.
# ---------------------------------------------------------------------------------------


class TestRegistryAndErrors:
  def test_registry(self):
    assert set(routing.ROUTINGS) == set(ALGORITHMS)
    for name in ALGORITHMS:
      assert routing.get(name) is routing.ROUTINGS[name] is getattr(routing, name)
    with pytest.raises(TypeError):
      routing.ROUTINGS["mine"] = routing.dynamic  # read-only

  @pytest.mark.parametrize("bad", ["Dynamic", "em_routing", "", None, 3])
  def test_unknown_name_is_named_with_the_valid_ones(self, bad):
    with pytest.raises(ValueError) as info:
      routing.get(bad)
    message = str(info.value)
    assert repr(bad) in message
    assert all(repr(name) in message for name in ALGORITHMS)

  @pytest.mark.parametrize("algo", ALGORITHMS)
  @pytest.mark.parametrize(
    "bad, error",
    [
      (0, ValueError),
      (-2, ValueError),
      (np.int64(0), ValueError),
      (1.5, TypeError),
      (np.float64(2.0), TypeError),
      (True, TypeError),
      (np.bool_(True), TypeError),
      (np.array(2), TypeError),
      (None, TypeError),
    ],
  )
  def test_bad_num_iterations(self, algo, bad, error):
    u = make_inputs((4, 3, 2))["u"]
    with pytest.raises(error, match="num_iterations"):
      routing.get(algo)(u, bad)

  @pytest.mark.parametrize("algo", ALGORITHMS)
  def test_traced_num_iterations_raises(self, algo):
    with pytest.raises(TypeError, match="static integer"):
      jax.jit(routing.get(algo))(make_inputs((4, 3, 2))["u"], 3)

  @pytest.mark.parametrize("algo", ALGORITHMS)
  def test_bad_votes(self, algo):
    with pytest.raises(ValueError, match="N_in, N_out, D"):
      routing.get(algo)(jnp.ones((3, 4)), 2)
    with pytest.raises(TypeError, match="floating"):
      routing.get(algo)(jnp.ones((4, 3, 2), jnp.int32), 2)


# ---------------------------------------------------------------------------------------
# The keywords every algorithm shares: num_iterations, stop_gradient, eps.
# ---------------------------------------------------------------------------------------


def np_last_pass(algo, inputs, u, weights):
  """(poses, activations) of one example's last pass from given routing weights [N_in,
  N_out]: what `stop_gradient=True` differentiates."""
  if algo == "dynamic":
    return np_dynamic_last_pass(u, weights)
  if algo == "em":
    lam = EM_FINAL_LAMBDA * (1 - 0.95**3)  # λ of the third (last) iteration
    mu, _, a_out = np_em_m_step(u, weights, inputs["a_in"], inputs["beta_u"], inputs["beta_a"], lam)
    return mu, a_out
  if algo == "inverted_dot_product":
    return np_inverted_last_pass(u, weights)
  return np_self_attention_last_pass(u, weights, inputs["log_prior"])


@pytest.fixture(scope="module")
def stop_gradient_grads():
  """(inputs, gp, ga, {(algo, stop): (Routed, d/du of sum(poses gp) + sum(activations
  ga))}) for one example of 3 iterations in float64, one jit compile."""
  with jax.enable_x64(True):
    inputs = make_inputs((4, 3, 4), seed=12, dtype=np.float64)
    rng = np.random.default_rng(13)
    gp, ga = rng.standard_normal((3, 4)), rng.standard_normal(3)

    @jax.jit
    def grads(inp):
      out = {}
      for algo in ALGORITHMS:
        for stop in (False, True):

          def f(u, algo=algo, stop=stop):
            res = call(algo, {**inp, "u": u}, 3, stop_gradient=stop)
            return jnp.sum(res.poses * gp) + jnp.sum(res.activations * ga), res

          (_, res), g = jax.value_and_grad(f, has_aux=True)(inp["u"])
          out[(algo, stop)] = (res, g)
      return out

    res = jax.tree.map(np.asarray, grads(inputs))
  return inputs, gp, ga, res


class TestSharedKeywords:
  @pytest.mark.parametrize("algo", ALGORITHMS)
  def test_signature(self, algo):
    params = inspect.signature(routing.get(algo)).parameters
    assert list(params)[:2] == ["u_hat", "num_iterations"]
    for name in ("stop_gradient", "eps"):
      assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    assert params["stop_gradient"].default is False

  @pytest.mark.parametrize("algo", ALGORITHMS)
  def test_numpy_integer_iterations(self, algo):
    """A NumPy int (np.arange's int64, np.int32, np.uint8) traces the same program as the
    Python int, and gives the reference's values."""
    inputs = make_inputs((2, 6, 4, 3), seed=11)

    def program(r):
      return str(jax.make_jaxpr(lambda inp: call(algo, inp, r))(inputs))

    expected = program(3)
    for r in (np.arange(4)[3], np.int32(3), np.uint8(3)):
      assert program(r) == expected, type(r)
    got = jax.jit(lambda inp: call(algo, inp, np.arange(4)[3]))(inputs)
    for x, want in zip(got, reference(algo, inputs, 3), strict=False):
      np.testing.assert_allclose(np.asarray(x), want, rtol=F32_RTOL, atol=F32_ATOL)
    assert routing.check_iterations(np.int64(3)) == 3
    assert type(routing.check_iterations(np.int64(3))) is int

  def test_self_attention_ignores_num_iterations(self):
    """One pass: every valid count is the same program."""
    u = make_inputs((2, 6, 4, 3), seed=12)["u"]

    def program(r):
      return str(jax.make_jaxpr(lambda x: routing.self_attention(x, r))(u))

    assert program(1) == program(5) == program(np.int64(2))
    assert inspect.signature(routing.self_attention).parameters["num_iterations"].default == 1

  @pytest.mark.parametrize("algo", ALGORITHMS)
  @pytest.mark.parametrize("stop", [False, True], ids=["full", "stopped"])
  def test_gradient_matches_numpy_finite_differences(self, stop_gradient_grads, algo, stop):
    """Full: central differences of the NumPy routing. Stopped: the routing weights are
    frozen at their NumPy values and only the last pass is differentiated."""
    inputs, gp, ga, res = stop_gradient_grads
    u0 = inputs["u"]
    frozen = reference(algo, inputs, 3)[2]  # [N_in, N_out], the last pass's weights

    def objective(u):
      if stop:
        poses, acts = np_last_pass(algo, inputs, u, frozen)
      else:
        poses, acts, _ = reference(algo, {**inputs, "u": u}, 3)
      return np.sum(poses * gp) + np.sum(acts * ga)

    h = 1e-6
    fd = np.zeros_like(u0)
    for idx in np.ndindex(u0.shape):
      e = np.zeros_like(u0)
      e[idx] = h
      fd[idx] = (objective(u0 + e) - objective(u0 - e)) / (2 * h)
    # float64 central differences: truncation ~h^2 |f'''| ≈ 1e-12, rounding
    # ~2^-53 |f| / h ≈ 1e-9 for |f| <~ 10; atol = 1e-7 bounds both with margin.
    np.testing.assert_allclose(res[(algo, stop)][1], fd, rtol=1e-6, atol=1e-7)

  @pytest.mark.parametrize("algo", ALGORITHMS)
  def test_stop_gradient_changes_grads_not_values(self, stop_gradient_grads, algo):
    _, _, _, res = stop_gradient_grads
    (full, g_full), (stopped, g_stop) = res[(algo, False)], res[(algo, True)]
    # Same forward values, up to rounding: XLA schedules the two grad programs apart.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-13), full, stopped)
    # Far above the 1e-7 finite-difference tolerance: the test above tells them apart.
    assert np.max(np.abs(g_full - g_stop)) > 1e-3

  @pytest.mark.parametrize("algo", ["dynamic", "em", "inverted_dot_product"])
  def test_stop_gradient_is_a_no_op_for_uniform_weights(self, algo):
    """One iteration from zero parents: the weights are 1/N_out, whatever the votes."""
    inputs = make_inputs((2, 6, 4, 3), seed=13)

    def grad(stop):
      def res(u):
        return call(algo, {**inputs, "u": u}, 1, stop_gradient=stop)

      return jax.grad(lambda u: sum(jnp.sum(jnp.sin(t)) for t in res(u)))(inputs["u"])

    g_full, g_stop = jax.jit(lambda: (grad(False), grad(True)))()
    np.testing.assert_array_equal(g_full, g_stop)

  @pytest.mark.parametrize(
    "algo,eps",
    [("dynamic", 0.3), ("em", 0.05), ("inverted_dot_product", 0.3), ("self_attention", 0.3)],
  )
  def test_eps_matches_reference(self, algo, eps):
    """Each algorithm's epsilon (squash and lengths, EM's variance floor, LayerNorm) is the
    keyword `eps`; a large one moves the result where the reference says."""
    inputs = make_inputs((2, 6, 4, 3), seed=14)
    res = jax.jit(lambda inp: call(algo, inp, 3, eps=eps))(inputs)
    want = reference(algo, inputs, 3, eps=eps)
    for got, w in zip(res, want, strict=False):
      np.testing.assert_allclose(np.asarray(got), w, rtol=F32_RTOL, atol=F32_ATOL)
    assert not np.allclose(want[0], reference(algo, inputs, 3)[0], atol=1e-3)
