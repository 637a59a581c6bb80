"""The routing zoo inside models: layers against `capsjax.routing` on NumPy votes, class
scores against NumPy, hand-counted parameters, config errors, and a `:smoke` training run
(with a resume) per routing and per paper architecture."""

import collections
import csv
import json
import math
import os

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from capsjax import analysis
from capsjax import errors
from capsjax.data import input_pipeline
from capsjax import layers
from capsjax import matrix_layers
from capsjax import models
from capsjax import parallel
from capsjax import routing
from capsjax.run import config as run_config
from capsjax import steps as steps_lib
from capsjax import train
from capsjax import visualize
from capsjax.run import workdir as workdir_lib
from configs import efficient_capsnet
from configs import fashion
from configs import matrix_capsules_em
from tests import helpers

ROUTINGS = tuple(routing.ROUTINGS)


def _set(param, value):
  param[...] = jnp.asarray(value, jnp.float32)


def _jit_call(module, fn, *args):
  graphdef, state = nnx.split(module)
  return jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a))(state, *args)


# ----------------------------------------------------------------------------------------
# RoutedCaps == routing.<name> on votes computed in NumPy
# ----------------------------------------------------------------------------------------


def _random_routed_caps(name, *, iterations=3, seed=0, num_in=5, in_dim=3, num_out=4, out_dim=6):
  rng = np.random.default_rng(seed)
  layer = layers.RoutedCaps(
    num_in,
    in_dim,
    num_out,
    out_dim,
    routing_iterations=iterations,
    routing=name,
    em_final_lambda=0.05,
    rngs=nnx.Rngs(seed),
  )
  params = {"w": rng.normal(0, 0.5, (num_in, num_out, in_dim, out_dim))}
  if name == "em":
    params.update(beta_u=rng.normal(0, 1, num_out), beta_a=rng.normal(0, 1, num_out))
  if name == "inverted_dot_product":
    params.update(ln_scale=rng.uniform(0.5, 1.5, out_dim), ln_bias=rng.normal(0, 0.3, out_dim))
  if name == "self_attention":
    params.update(log_prior=rng.normal(0, 0.2, (num_in, num_out)))
  for k, v in params.items():
    _set(getattr(layer, k), v)
  return layer, {k: np.asarray(v, np.float32) for k, v in params.items()}


@pytest.mark.parametrize("name", ROUTINGS)
@pytest.mark.parametrize("iterations", [1, 3])
def test_routed_caps_equals_routing_of_numpy_votes(name, iterations):
  layer, p = _random_routed_caps(name, iterations=iterations)
  rng = np.random.default_rng(1)
  u = rng.normal(0, 1, (2, 5, 3)).astype(np.float32)  # [B, N_in, D_in]
  a_in = rng.uniform(0.1, 0.9, (2, 5)).astype(np.float32)  # [B, N_in]
  votes = np.einsum("bni,nmio->bnmo", u.astype(np.float64), p["w"])  # [B, N_in, N_out, D]
  kwargs = {
    "dynamic": {},
    "em": dict(a_in=a_in, beta_u=p.get("beta_u"), beta_a=p.get("beta_a"), final_lambda=0.05),
    "inverted_dot_product": dict(ln_scale=p.get("ln_scale"), ln_bias=p.get("ln_bias")),
    "self_attention": dict(log_prior=p.get("log_prior")),
  }[name]
  expected = routing.get(name)(jnp.asarray(votes, jnp.float32), iterations, **kwargs)
  got = _jit_call(layer, lambda m, x, a: m.route(x, a_in=a if name == "em" else None), u, a_in)
  for field in routing.Routed._fields:
    np.testing.assert_allclose(
      getattr(got, field), getattr(expected, field), rtol=2e-5, atol=2e-6, err_msg=f"{name} {field}"
    )
  np.testing.assert_allclose(np.sum(got.assignments, -1), 1.0, rtol=1e-5)
  # The layer call gives the poses of `route` (predict_and_route for dynamic routing).
  called = _jit_call(layer, lambda m, x, a: m(x, a_in=a if name == "em" else None), u, a_in)
  np.testing.assert_array_equal(called, got.poses)
  # `route_votes` on the layer's own predictions gives the same (the autodiff path).
  slow = _jit_call(
    layer,
    lambda m, x, a: m.route_votes(m.predictions(x), a_in=a if name == "em" else None),
    u,
    a_in,
  )
  for field in routing.Routed._fields:
    np.testing.assert_allclose(
      getattr(got, field), getattr(slow, field), rtol=2e-5, atol=2e-6, err_msg=f"{name} {field}"
    )


def test_each_routing_holds_exactly_its_own_parameters():
  expected = {
    "dynamic": {"w"},
    "em": {"w", "beta_u", "beta_a"},
    "inverted_dot_product": {"w", "ln_scale", "ln_bias"},
    "self_attention": {"w", "log_prior"},
  }
  for name in ROUTINGS:
    layer = layers.RoutedCaps(5, 3, 4, 6, routing_iterations=2, routing=name, rngs=nnx.Rngs(0))
    assert set(nnx.state(layer, nnx.Param).keys()) == expected[name], name
  with pytest.raises(ValueError, match="unknown routing 'fast'; valid routings: 'dynamic'"):
    layers.RoutedCaps(5, 3, 4, 6, routing_iterations=2, routing="fast", rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------------------
# CapsNet: the class scores each routing gives, recomputed in NumPy
# ----------------------------------------------------------------------------------------


def _np_squash(s):
  sq = np.sum(s * s, -1, keepdims=True)
  return s * sq / (1 + sq) / np.sqrt(sq + 1e-7)


def _np_efficient_squash(s):
  n = np.sqrt(np.sum(s * s, -1, keepdims=True) + 1e-7)
  return (1 - np.exp(-n)) * s / n


def _np_layer_norm(x, scale, bias):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * scale + bias


def _small_capsnet(name, seed=0):
  return models.CapsNet(
    image_shape=(12, 12, 1),
    num_classes=3,
    conv1_channels=4,
    conv1_kernel=5,
    primary_types=2,
    primary_dim=4,
    primary_kernel=3,
    primary_stride=2,
    digit_dim=4,
    routing_iterations=2,
    decoder_hidden=(8,),
    routing=name,
    em_final_lambda=0.05,
    conv_impl="xla",
    rngs=nnx.Rngs(seed),
  )


@pytest.mark.parametrize("name", ROUTINGS)
def test_capsnet_class_scores_against_numpy(name):
  model = _small_capsnet(name)
  rng = np.random.default_rng(2)
  if name == "inverted_dot_product":  # not the identity init.
    _set(model.primary_caps.ln_scale, rng.uniform(0.5, 1.5, 4))
    _set(model.primary_caps.ln_bias, rng.normal(0, 0.3, 4))
  images = rng.uniform(0, 1, (3, 12, 12, 1)).astype(np.float32)
  out = _jit_call(model, lambda m, x: m(x), images)
  routed = _jit_call(model, lambda m, x: m.routed(x), images)
  np.testing.assert_array_equal(routed.poses, out["v"])  # one routing behind both

  # The conv trunk (tested in models_test/conv_test) from the model; the rest in NumPy.
  x = jax.nn.relu(model.conv1(images))
  y = np.asarray(model.primary_caps.conv(x), np.float64)  # [B, 4, 4, 8]
  raw = y.reshape(3, -1, 4)  # [B, N_in=32, 4]
  prim = {
    "dynamic": _np_squash,
    "em": lambda s: s,
    "self_attention": _np_efficient_squash,
    "inverted_dot_product": lambda s: _np_layer_norm(
      s, np.asarray(model.primary_caps.ln_scale[...]), np.asarray(model.primary_caps.ln_bias[...])
    ),
  }[name](raw)
  w = np.asarray(model.digit_caps.w[...], np.float64)
  votes = np.einsum("bni,nmio->bnmo", prim, w)  # [B, 32, 3, 4]
  caps = model.digit_caps
  if name == "em":
    a_in = 1 / (1 + np.exp(-np.asarray(model.primary_caps.activation_conv(x), np.float64)))
    r = routing.em(
      jnp.asarray(votes, jnp.float32),
      2,
      a_in=a_in.reshape(3, -1),
      beta_u=caps.beta_u[...],
      beta_a=caps.beta_a[...],
      final_lambda=0.05,
    )
    scores = np.asarray(r.activations)
  elif name == "inverted_dot_product":
    r = routing.inverted_dot_product(
      jnp.asarray(votes, jnp.float32), 2, ln_scale=caps.ln_scale[...], ln_bias=caps.ln_bias[...]
    )
    fc_w = np.asarray(model.class_fc.kernel[...])[:, 0]
    fc_b = float(np.asarray(model.class_fc.bias[...])[0])
    scores = 1 / (1 + np.exp(-(np.asarray(r.poses) @ fc_w + fc_b)))
  else:
    r = routing.get(name)(
      jnp.asarray(votes, jnp.float32),
      2,
      **({"log_prior": caps.log_prior[...]} if name == "self_attention" else {}),
    )
    scores = np.sqrt(np.sum(np.asarray(r.poses, np.float64) ** 2, -1) + 1e-7)
  np.testing.assert_allclose(out["v"], r.poses, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(routed.assignments, r.assignments, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out["class_scores"], scores, rtol=1e-4, atol=1e-6)
  assert np.all((out["class_scores"] > 0) & (out["class_scores"] < 1))
  np.testing.assert_array_equal(out["pred"], np.argmax(scores, -1))


def test_matrix_votes_and_coordinate_addition_against_numpy():
  rng = np.random.default_rng(3)
  caps = matrix_layers.MatrixClassCaps(2, 3, routing_iterations=2, rngs=nnx.Rngs(0))
  poses = rng.normal(0, 1, (2, 3, 4, 2, 16)).astype(np.float32)  # [B, H, W, T, 16]
  w = np.asarray(caps.w[...], np.float64)  # [T, N_out, 4, 4]
  got = np.asarray(_jit_call(caps, lambda m, p: m.votes(p), poses))  # [B, 24, 3, 16]
  expected = np.zeros((2, 3, 4, 2, 3, 16))
  for yy in range(3):
    for xx in range(4):
      for t in range(2):
        for j in range(3):
          v = poses[:, yy, xx, t].reshape(2, 4, 4).astype(np.float64) @ w[t, j]  # [B, 4, 4]
          v[:, 0, 3] += (yy + 0.5) / 3  # row, right column
          v[:, 1, 3] += (xx + 0.5) / 4  # column
          expected[:, yy, xx, t, j] = v.reshape(2, 16)
  np.testing.assert_allclose(got, expected.reshape(2, 24, 3, 16), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# BatchNorm (Efficient-CapsNet): batch statistics in training, running ones in evaluation
# ----------------------------------------------------------------------------------------


def test_batch_norm_train_and_eval_against_numpy():
  rng = np.random.default_rng(6)
  bn = layers.BatchNorm(3)
  _set(bn.scale, [1.5, 0.5, 2.0])
  _set(bn.bias, [0.1, -0.2, 0.0])
  x1 = rng.normal(2.0, 3.0, (4, 5, 3)).astype(np.float32)
  x2 = rng.normal(-1.0, 0.5, (6, 5, 3)).astype(np.float32)
  scale, bias = np.array([1.5, 0.5, 2.0]), np.array([0.1, -0.2, 0.0])
  run_mean, run_var = np.zeros(3), np.ones(3)
  graphdef, state = nnx.split(bn)
  step = jax.jit(lambda s, x: (lambda m: (m(x), nnx.state(m)))(nnx.merge(graphdef, s)))
  for x in (x1, x2):  # training: the batch's own statistics, then the running update
    y, state = step(state, x)
    mean, var = x.mean((0, 1)), x.var((0, 1))
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-3) * scale + bias, rtol=1e-4)
    run_mean = 0.99 * run_mean + 0.01 * mean
    run_var = 0.99 * run_var + 0.01 * var
  bn = nnx.merge(graphdef, state)
  np.testing.assert_allclose(bn.mean[...], run_mean, rtol=1e-5)
  np.testing.assert_allclose(bn.var[...], run_var, rtol=1e-5)
  bn.eval()  # evaluation: the running statistics; each row on its own
  expected = (x1 - run_mean) / np.sqrt(run_var + 1e-3) * scale + bias
  np.testing.assert_allclose(bn(x1), expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(bn(x1[:1]), expected[:1], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(bn.mean[...], run_mean, rtol=1e-5)  # unchanged by eval


def test_efficient_capsnet_train_step_updates_running_stats_and_eval_ignores_padding():
  config = efficient_capsnet.get_config("smoke")
  config.augment.update(
    max_shift=0, shift_fraction=0.0, flip=False, cutout_size=0, efficient_capsnet=False
  )
  info = input_pipeline.dataset_info("mnist")
  graphdef, state = steps_lib.create_model_and_optimizer(config, info, 4, jax.random.key(0))
  train_fn, eval_fn = steps_lib.make_steps(graphdef, config, 4, parallel.make_mesh(1))
  batch = helpers.synthetic_batch(8, seed=2)
  model0, _ = nnx.merge(graphdef, state)
  conv0 = np.asarray(jax.nn.relu(model0.convs[0](batch["image"])))  # the first BN's input
  state, _ = train_fn(state, batch, jax.random.key(1))
  model, _ = nnx.merge(graphdef, state)
  np.testing.assert_allclose(model.norms[0].mean[...], 0.01 * conv0.mean((0, 1, 2)), rtol=1e-3)
  # Evaluation normalises with the running statistics: padding a batch with zero images
  # (masked out) changes nothing for the real rows.
  images, labels = batch["image"][:5], batch["label"][:5]
  sums = []
  for pad in (0, 3):
    padded = {
      "image": np.concatenate([images, np.zeros((pad, 28, 28, 1), np.float32)]),
      "label": np.concatenate([labels, np.zeros(pad, np.int32)]),
      "mask": np.concatenate([np.ones(5, bool), np.zeros(pad, bool)]),
    }
    sums.append(jax.device_get(eval_fn(state, padded)))
  for k in ("correct", "class_loss", "recon_loss", "count"):
    np.testing.assert_allclose(sums[0][k], sums[1][k], rtol=1e-5, err_msg=k)


# ----------------------------------------------------------------------------------------
# Parameter counts, by hand
# ----------------------------------------------------------------------------------------


def _count(config):
  model = nnx.eval_shape(
    lambda: models.create_model(
      config.model, image_shape=(28, 28, 1), num_classes=10, rngs=nnx.Rngs(0), conv_impl="xla"
    )
  )
  decoder = 0 if model.decoder is None else models.count_params(model.decoder)
  return models.count_params(model), decoder


def test_parameter_counts_per_routing_in_the_smoke_capsnet():
  # :smoke: conv1 9x9x1->16, PrimaryCaps 9x9x16->4 types x 4D stride 2 (6x6 grid, 144
  # capsules), W [144, 10, 4, 8], decoder 80->32->64->784.
  conv1, primary, w = 9 * 9 * 16 + 16, 9 * 9 * 16 * 16 + 16, 144 * 10 * 4 * 8
  decoder = (80 * 32 + 32) + (32 * 64 + 64) + (64 * 784 + 784)
  base = conv1 + primary + w + decoder
  extra = {
    "dynamic": 0,
    "em": (9 * 9 * 16 * 4 + 4) + 10 + 10,  # activation conv, beta_u, beta_a
    "inverted_dot_product": 4 + 4 + 8 + 8 + 8 + 1,  # primary LN, routing LN, final_fc
    "self_attention": 144 * 10,
  }  # log prior
  for name in ROUTINGS:
    total, dec = _count(helpers.smoke_config(**{"model.routing": name}))
    assert (total, dec) == (base + extra[name], decoder), name


def test_paper_capsnet_count_is_unchanged():
  assert _count(fashion.get_config()) == (8_215_568, 8_215_568 - 6_804_224)


def test_efficient_capsnet_has_the_published_161k_parameters():
  # EscVM/Efficient-CapsNet models/efficient_capsnet_graph_mnist.py: four convs (+ bias)
  # each followed by BatchNorm (scale, bias), depthwise 9x9 PrimaryCaps (+ bias), FCCaps
  # W [10, 16, 8, 16] and b [10, 16, 1].
  convs = (
    (5 * 5 * 1 * 32 + 32)
    + (3 * 3 * 32 * 64 + 64)
    + (3 * 3 * 64 * 64 + 64)
    + (3 * 3 * 64 * 128 + 128)
  )
  norms = 2 * (32 + 64 + 64 + 128)
  primary = 9 * 9 * 128 + 128
  fccaps = 16 * 10 * 8 * 16 + 16 * 10
  total, decoder = _count(efficient_capsnet.get_config())
  assert total - decoder == convs + norms + primary + fccaps == 161_824
  assert (total - decoder) // 1000 == 161  # the paper's "161K"
  assert decoder == (160 * 512 + 512) + (512 * 1024 + 1024) + (1024 * 784 + 784)


def test_matrix_capsnet_has_the_papers_68k_parameters():
  # Conv1 5x5x1->64; 1x1 pose conv 64->8x16 and activation conv 64->8; ConvCaps1 W
  # [3*3*8, 16, 4, 4], ConvCaps2 W [3*3*16, 16, 4, 4], class W [16, 10, 4, 4], each with
  # beta_u and beta_a per output type; no decoder. The paper (Sec. 5): "a smaller capsule
  # network (A=64, B=8, C=D=16) with only 68K trainable parameters".
  conv = (5 * 5 * 64 + 64) + (64 * 128 + 128) + (64 * 8 + 8)
  caps = (9 * 8 * 16 * 16 + 32) + (9 * 16 * 16 * 16 + 32) + (16 * 10 * 16 + 20)
  total = _count(matrix_capsules_em.get_config())
  assert total == (conv + caps, 0) == (68_444, 0)
  assert total[0] // 1000 == 68


def test_capsule_patches_against_numpy():
  x = np.random.default_rng(4).normal(size=(2, 7, 6, 3, 5)).astype(np.float32)
  for k, st in ((3, 2), (2, 1), (3, 3)):
    ho, wo = (7 - k) // st + 1, (6 - k) // st + 1
    expected = np.zeros((2, ho, wo, k * k * 3, 5), np.float32)
    for oy in range(ho):
      for ox in range(wo):
        n = 0
        for ky in range(k):
          for kx in range(k):
            for t in range(3):
              expected[:, oy, ox, n] = x[:, oy * st + ky, ox * st + kx, t]
              n += 1
    got = jax.jit(matrix_layers.capsule_patches, static_argnums=(1, 2))(x, k, st)
    np.testing.assert_array_equal(got, expected)
  with pytest.raises(ValueError, match="a 8x8 kernel does not fit the 7x6 capsule grid"):
    matrix_layers.capsule_patches(x, 8, 1)


def test_matrix_capsnet_standardises_and_pads_as_yl_1993():
  """Normalize((0.1307,), (0.3081,)) then nn.Conv2d(kernel 5, stride 2, padding=2): a
  14x14 Conv1 grid from 28x28 images, and class capsules routing from 4x4x16 = 256."""
  config = matrix_capsules_em.get_config().model
  model = models.create_model(
    config, image_shape=(28, 28, 1), num_classes=10, rngs=nnx.Rngs(params=0), conv_impl="xla"
  )
  assert model.primary_grid == (4, 4, 16) and model.num_primary == 256
  x = np.asarray(jax.random.uniform(jax.random.key(1), (2, 28, 28, 1)))
  z = np.pad((x - 0.1307) / 0.3081, ((0, 0), (2, 2), (2, 2), (0, 0)))  # zeros after Normalize
  want = helpers.numpy_conv(z, model.conv1.kernel[...], 2) + np.asarray(model.conv1.bias[...])
  assert want.shape == (2, 14, 14, 64)
  # The model on x is the same parameters without either step on the prepared 32x32 z.
  plain = dict(config.items(), conv1_padding=0, input_mean=0.0, input_std=1.0)
  other = models.create_model(
    plain, image_shape=(32, 32, 1), num_classes=10, rngs=nnx.Rngs(params=1), conv_impl="xla"
  )
  nnx.update(other, nnx.state(model))
  np.testing.assert_allclose(other.conv1(z), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
    other(z)["class_scores"], model(x)["class_scores"], rtol=1e-5, atol=1e-6
  )
  with pytest.raises(errors.ConfigError, match="config.model.conv1_padding: must be an int >= 0"):
    models.create_model(
      dict(config.items(), conv1_padding=-1),
      image_shape=(28, 28, 1),
      num_classes=10,
      rngs=nnx.Rngs(params=0),
      conv_impl="xla",
    )


def test_matrix_conv_caps_per_cell_routes_each_cell_by_em_on_numpy_votes():
  """Votes M_i W_(ky,kx,t),j built in NumPy; with per_cell, each output cell routed by
  `routing.em` alone, though the 3x3 receptive fields (stride 1) overlap."""
  rng = np.random.default_rng(5)
  caps = matrix_layers.MatrixConvCaps(
    2, 3, kernel=3, stride=1, routing_iterations=2, per_cell=True, rngs=nnx.Rngs(1)
  )
  _set(caps.beta_u, rng.normal(0, 0.5, 3))
  _set(caps.beta_a, rng.normal(0, 0.5, 3))
  poses = rng.normal(0, 1, (2, 4, 5, 2, 16)).astype(np.float32)  # [B, H, W, T, 16]
  a = rng.uniform(0.05, 0.95, (2, 4, 5, 2)).astype(np.float32)
  w = np.asarray(caps.w[...], np.float64)  # [K*K*T, 3, 4, 4]
  got_poses, got_act = _jit_call(caps, lambda m, p, a: m(p, a), poses, a)
  assert got_poses.shape == (2, 2, 3, 3, 16) and got_act.shape == (2, 2, 3, 3)
  for oy in range(2):
    for ox in range(3):
      votes, a_in = [], []
      for ky in range(3):
        for kx in range(3):
          for t in range(2):
            m = poses[:, oy + ky, ox + kx, t].reshape(2, 4, 4).astype(np.float64)
            n = (ky * 3 + kx) * 2 + t
            votes.append(np.stack([(m @ w[n, j]).reshape(2, 16) for j in range(3)], 1))
            a_in.append(a[:, oy + ky, ox + kx, t])
      r = routing.em(
        jnp.asarray(np.stack(votes, 1), jnp.float32),  # [B, 18, 3, 16]
        2,
        a_in=jnp.asarray(np.stack(a_in, 1)),
        beta_u=caps.beta_u[...],
        beta_a=caps.beta_a[...],
      )
      np.testing.assert_allclose(got_poses[:, oy, ox], r.poses, rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(got_act[:, oy, ox], r.activations, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Config errors and legacy configs
# ----------------------------------------------------------------------------------------


def _build(config):
  return nnx.eval_shape(
    lambda: models.create_model(
      config.model, image_shape=(28, 28, 1), num_classes=10, rngs=nnx.Rngs(0), conv_impl="xla"
    )
  )


@pytest.mark.parametrize(
  "field, value, match",
  [
    (
      "model.routing",
      "fast",
      r"^config.model.routing: unknown routing 'fast'; valid "
      r"routings: 'dynamic', 'em', 'inverted_dot_product', "
      r"'self_attention'",
    ),
    (
      "model.architecture",
      "resnet",
      r"^config.model.architecture: must be one of "
      r"\['capsnet', 'efficient_capsnet', 'matrix_capsnet'\]",
    ),
    ("model.em_final_lambda", 0.0, r"^config.model.em_final_lambda: must be a number > 0"),
  ],
)
def test_bad_routing_fields_are_config_errors(field, value, match):
  with pytest.raises(errors.ConfigError, match=match):
    _build(helpers.smoke_config(**{field: value}))


def test_paper_architectures_refuse_routings_they_do_not_build():
  config = efficient_capsnet.get_config("smoke")
  config.model.routing = "em"
  with pytest.raises(
    errors.ConfigError,
    match=r"^config.model.routing: this architecture "
    r"supports 'self_attention', got 'em'",
  ):
    _build(config)
  config = matrix_capsules_em.get_config("smoke")
  config.model.primary_types = 0
  with pytest.raises(errors.ConfigError, match=r"^config.model.primary_types: must be"):
    _build(config)


def _np_conv_em(poses, a, w, beta_u, beta_a, kernel, stride, lambdas):
  """EM routing of a ConvCaps layer with the paper's normalisation, by explicit loops:
  a child's assignments sum to 1 over every parent, in every cell, that sees it."""
  b, h, wd, t_in, _ = poses.shape
  t_out = w.shape[1]
  ho, wo = (h - kernel) // stride + 1, (wd - kernel) // stride + 1
  cells = [(y, x) for y in range(ho) for x in range(wo)]
  entries = [(ky, kx, t) for ky in range(kernel) for kx in range(kernel) for t in range(t_in)]
  child = {
    (c, n): ((y * stride + ky) * wd + x * stride + kx) * t_in + t
    for c, (y, x) in enumerate(cells)
    for n, (ky, kx, t) in enumerate(entries)
  }
  seen = collections.Counter(child.values())
  mus = np.zeros((b, len(cells), t_out, 16))
  acts = np.zeros((b, len(cells), t_out))
  for e in range(b):
    votes = np.zeros((len(cells), len(entries), t_out, 16))
    a_in = np.zeros((len(cells), len(entries)))
    for c, (y, x) in enumerate(cells):
      for n, (ky, kx, t) in enumerate(entries):
        m = poses[e, y * stride + ky, x * stride + kx, t].reshape(4, 4)
        for j in range(t_out):
          votes[c, n, j] = (m @ w[n, j]).reshape(16)
        a_in[c, n] = a[e, y * stride + ky, x * stride + kx, t]
    r = np.array(
      [
        [[1.0 / (seen[child[c, n]] * t_out)] * t_out for n in range(len(entries))]
        for c in range(len(cells))
      ]
    )
    for it, lam in enumerate(lambdas):
      mu = np.zeros((len(cells), t_out, 16))
      var = np.zeros((len(cells), t_out, 16))
      act = np.zeros((len(cells), t_out))
      for c in range(len(cells)):  # M-step, cell by cell
        for j in range(t_out):
          rp = r[c, :, j] * a_in[c]
          total = rp.sum()
          mu[c, j] = (rp[:, None] * votes[c, :, j]).sum(0) / (total + 1e-8)
          var[c, j] = (rp[:, None] * (votes[c, :, j] - mu[c, j]) ** 2).sum(0) / (total + 1e-8)
          var[c, j] += 1e-8
          cost = (beta_u[j] + 0.5 * np.log(var[c, j])) * total
          act[c, j] = 1 / (1 + np.exp(-lam * (beta_a[j] - cost.sum())))
      if it == len(lambdas) - 1:
        break
      num = np.zeros_like(r)  # E-step: a_j p_ij, normalised per child
      for c in range(len(cells)):
        for n in range(len(entries)):
          for j in range(t_out):
            d = votes[c, n, j] - mu[c, j]
            p = np.prod(np.exp(-(d**2) / (2 * var[c, j])) / np.sqrt(2 * np.pi * var[c, j]))
            num[c, n, j] = act[c, j] * p
      per_child = collections.defaultdict(float)
      for (c, n), i in child.items():
        per_child[i] += num[c, n].sum()
      r = np.array(
        [
          [num[c, n] / per_child[child[c, n]] for n in range(len(entries))]
          for c in range(len(cells))
        ]
      )
    mus[e], acts[e] = mu, act
  return mus.reshape(b, ho, wo, t_out, 16), acts.reshape(b, ho, wo, t_out)


@pytest.mark.parametrize("kernel, stride", [(2, 1), (3, 2)])
def test_matrix_conv_caps_shares_children_between_cells_as_the_paper(kernel, stride):
  rng = np.random.default_rng(7)
  caps = matrix_layers.MatrixConvCaps(
    2, 3, kernel=kernel, stride=stride, routing_iterations=3, final_lambda=0.5, rngs=nnx.Rngs(2)
  )
  _set(caps.w, np.asarray(caps.w[...]) * 0.5)
  _set(caps.beta_u, rng.normal(0, 0.5, 3))
  _set(caps.beta_a, rng.normal(0, 0.5, 3))
  poses = rng.normal(0, 0.5, (2, 5, 5, 2, 16)).astype(np.float32)
  a = rng.uniform(0.05, 0.95, (2, 5, 5, 2)).astype(np.float32)
  got = _jit_call(caps, lambda m, p, a: m(p, a), poses, a)
  want = _np_conv_em(
    poses.astype(np.float64),
    a.astype(np.float64),
    np.asarray(caps.w[...], np.float64).reshape(-1, 3, 4, 4),
    np.asarray(caps.beta_u[...], np.float64),
    np.asarray(caps.beta_a[...], np.float64),
    kernel,
    stride,
    routing.em_inverse_temperatures(3, 0.5),
  )
  np.testing.assert_allclose(got[0], want[0], rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=2e-4, atol=2e-5)
  # Routing each cell alone gives other activations once cells share children.
  caps.per_cell = True
  alone = _jit_call(caps, lambda m, p, a: m(p, a), poses, a)
  assert np.max(np.abs(np.asarray(alone[1]) - want[1])) > 1e-3


def test_shared_children_routing_check_grads_float64():
  """EM with the paper's ConvCaps normaliser (per-child shift, segment sums) against
  finite differences: votes of 2x2 cells, 2x2 kernels, stride 1 on a 3x3x2 grid."""
  caps = matrix_layers.MatrixConvCaps(
    2, 3, kernel=2, stride=1, routing_iterations=3, rngs=nnx.Rngs(0)
  )
  normalise, r0 = caps._shared_children((3, 3, 2), 3)
  rng = np.random.default_rng(8)
  with jax.enable_x64(True):
    votes = jnp.asarray(rng.normal(0, 0.5, (2, 2, 2, 8, 3, 4)))  # [B, H', W', N, T_out, D]
    a_in = jnp.asarray(rng.uniform(0.1, 0.9, (2, 2, 2, 8)))

    def f(v, a, bu):
      return routing.em(
        v, 3, a_in=a, beta_u=bu, final_lambda=1.0, normalise=normalise, initial_assignments=r0
      )

    check_grads(jax.jit(f), (votes, a_in, jnp.asarray([0.1, -0.2, 0.3])), order=1, modes=["rev"])
    # Each child's assignments, over all cells and parents that see it, sum to 1.
    r = np.asarray(f(votes, a_in, jnp.zeros(3)).assignments)  # [B, 2, 2, 8, 3]
    ids = matrix_layers._child_ids((3, 3, 2), 2, 1)
    sums = np.zeros((2, 18))
    for b in range(2):
      np.add.at(sums[b], ids, r[b].sum(-1).reshape(-1))
    np.testing.assert_allclose(sums, 1.0, rtol=1e-10)


@pytest.mark.parametrize(
  "fields, match",
  [
    (
      {"convcaps_types": (4, 4)},
      r"^config.model.convcaps_types=\(4, 4\), convcaps_kernels=\(3,\) and "
      r"convcaps_strides=\(2,\) must have one entry per ConvCaps layer",
    ),
    (
      {"convcaps_types": (4, 4), "convcaps_kernels": (3, 7), "convcaps_strides": (2, 1)},
      r"^config.model.convcaps_kernels\[1\]=7, convcaps_strides\[1\]=1: the capsule grid "
      r"before it is too small",
    ),
  ],
)
def test_bad_convcaps_fields_are_config_errors(fields, match):
  config = matrix_capsules_em.get_config("smoke")  # 12x12 primary grid, then 5x5
  for k, v in fields.items():
    config.model[k] = v
  with pytest.raises(errors.ConfigError, match=match):
    _build(config)


@pytest.mark.parametrize("module", [efficient_capsnet, matrix_capsules_em])
@pytest.mark.parametrize("variant", [None, "quick", "smoke"])
def test_paper_configs_load_and_declare_exactly_their_model_fields(module, variant):
  from configs import common  # pylint: disable=g-import-not-at-top

  config = module.get_config(variant)
  assert set(config.to_dict()) == set(common.get_base_config().to_dict())
  assert set(config.model) == models.model_fields(config.model.architecture)
  if variant == "smoke":
    assert config.batch_size % 4 == 0  # divides the 4 forced test devices.
  run_config.validate_config(config)


def test_old_workdirs_without_the_routing_fields_still_resume(tmp_path):
  config = helpers.smoke_config()
  saved = json.loads(config.to_json_best_effort())
  for leaf in ("architecture", "routing", "em_final_lambda"):
    del saved["model"][leaf]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  os.makedirs(tmp_path / "checkpoints" / "4")  # it trained: its config binds the workdir.
  workdir_lib.check_config(config, str(tmp_path))  # the legacy values: accepted.
  model = nnx.eval_shape(
    lambda: models.create_model(
      saved["model"] | {"conv_impl": "xla"},
      image_shape=(28, 28, 1),
      num_classes=10,
      rngs=nnx.Rngs(0),
    )
  )
  assert model.routing == "dynamic"
  (tmp_path / "config.json").write_text(json.dumps(saved))
  config.model.routing = "em"  # another routing: refused.
  with pytest.raises(ValueError, match=r"model.routing: 'dynamic' \(saved\) vs 'em' \(now\)"):
    workdir_lib.check_config(config, str(tmp_path))


def test_old_matrix_workdirs_without_convcaps_fields_resume_without_them(tmp_path):
  """A matrix-capsule config without the ConvCaps fields routes PrimaryCaps -> classes."""
  config = matrix_capsules_em.get_config("smoke")
  saved = json.loads(config.to_json_best_effort())
  for leaf in ("convcaps_types", "convcaps_kernels", "convcaps_strides", "convcaps_per_cell"):
    del saved["model"][leaf]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  os.makedirs(tmp_path / "checkpoints" / "4")
  with pytest.raises(ValueError, match=r"model.convcaps_types: \[\] \(saved\) vs \[3\] \(now\)"):
    workdir_lib.check_config(config, str(tmp_path))
  for leaf in ("convcaps_types", "convcaps_kernels", "convcaps_strides"):
    config.model[leaf] = ()
  workdir_lib.check_config(config, str(tmp_path))  # the saved network: accepted.
  # The capsnet skeleton's saved configs get no matrix-only field.
  capsnet = json.loads(helpers.smoke_config().to_json_best_effort())
  assert run_config.with_legacy_defaults(capsnet) == capsnet


# ----------------------------------------------------------------------------------------
# :smoke training per routing and architecture, with a resume
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mock_mnist():
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


# Each case: (config, the parameters of its routing with their initial values).
def _case(case):
  if case == "efficient_capsnet":
    config = efficient_capsnet.get_config("smoke")
    return config, {"digit_caps.log_prior": 0.0, "norms.0.scale": 1.0}
  if case == "matrix_capsnet":
    config = matrix_capsules_em.get_config("smoke")
    return config, {"digit_caps.beta_u": 0.0, "digit_caps.beta_a": 0.0}
  config = helpers.smoke_config(**{"model.routing": case})
  return config, {
    "dynamic": {},
    "em": {"digit_caps.beta_u": 0.0, "digit_caps.beta_a": 0.0},
    "inverted_dot_product": {
      "digit_caps.ln_scale": 1.0,
      "digit_caps.ln_bias": 0.0,
      "primary_caps.ln_scale": 1.0,
    },
    "self_attention": {"digit_caps.log_prior": 0.0},
  }[case]


def _param(model, dotted):
  node = model
  for part in dotted.split("."):
    node = node[int(part)] if part.isdigit() else getattr(node, part)
  return np.asarray(node[...])


@pytest.mark.parametrize("case", ROUTINGS + ("efficient_capsnet", "matrix_capsnet"))
def test_smoke_training_resume_and_assignments(case, tmp_path, mock_mnist):
  config, own = _case(case)
  for key, value in {
    "dataset": "mnist",
    "train_examples": 32,
    "eval_examples": 24,
    "data_dir": str(tmp_path / "tfds"),
  }.items():
    run_config.set_field(config, key, value)
  workdir = str(tmp_path / "run")
  summary = train.train_and_evaluate(config, workdir)
  assert summary["step"] == 8  # 32 / 8 x 2 epochs
  with open(os.path.join(workdir, "metrics.csv")) as f:
    rows = list(csv.DictReader(f))
  losses = [float(r["loss"]) for r in rows]
  assert losses and all(math.isfinite(x) for x in losses)
  run = analysis.load_run(workdir)
  for dotted, init in own.items():  # the routing's parameters learned.
    value = _param(run.model, dotted)
    assert np.all(np.isfinite(value)) and np.max(np.abs(value - init)) > 1e-6, dotted
  # The model's couplings are its routing's assignments: [B, N_in, 10], rows sum to 1.
  images = helpers.synthetic_batch(4)["image"]
  c = analysis.couplings(run.model, images)
  assert c.shape == (4, run.model.num_primary, 10)
  np.testing.assert_allclose(c.sum(-1), 1.0, rtol=1e-5)
  # visualize draws the routing's assignments on its primary-capsule grid.
  paths = visualize.make_figures(
    workdir, num_examples=2, num_routing=2, eval_examples=8, data_dir=config.data_dir
  )
  assert os.path.getsize(paths["routing.png"]) > 5000
  # Resuming with one more epoch continues from step 8.
  config.num_epochs = 3
  assert train.train_and_evaluate(config, workdir)["step"] == 12
  assert analysis.load_run(workdir).step == 12


def test_readme_routing_example_runs_and_prints_what_it_says(capsys):
  """The README's routing-zoo example: every routing, and EM with its learned betas, on
  votes from outside CapsNet."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "README.md")) as f:
    readme = f.read()
  section = readme[readme.index("## The routing zoo") :]
  code = section[section.index("```python\n") + 10 :]
  code = code[: code.index("```")]
  assert "routing.em(" in code and "CapsNet" not in code
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)  # pylint: disable=exec-used
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines == [f"{name} (2, 5, 16) (2, 5) (2, 32, 5)" for name in routing.ROUTINGS]
  out = scope["out"]  # the EM call's result, as the comment above it says.
  assert (out.poses.shape, out.activations.shape, out.assignments.shape) == (
    (2, 5, 16),
    (2, 5),
    (2, 32, 5),
  )
