"""The data-parallel step on 1, 2 and 4 forced host devices equals the unsharded step.

conftest.py forces 4 CPU devices. The reference is a plain `jax.jit` on one device
with the same global batch; loss, gradients (not only Adam-updated parameters, since
Adam hides a constant gradient scale) and updated parameters must match.
"""

import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from capsjax import input_pipeline
from capsjax import optim
from capsjax import parallel
from capsjax import train
from tests import helpers


def _setup():
  config = helpers.smoke_config()
  info = input_pipeline.dataset_info("fashion_mnist")
  graphdef, state = train.create_model_and_optimizer(config, info, 10, jax.random.key(0))
  batch = helpers.synthetic_batch(8, seed=3)
  weights = train.LossWeights.from_config(config.loss)
  aug = train.AugmentSpec.from_config(config.augment)
  return config, graphdef, state, batch, weights, aug


def _close(a, b, rtol=2e-5, atol=1e-6):
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=rtol, atol=atol),
               jax.device_get(a), jax.device_get(b))


def test_four_devices_forced():
  assert jax.device_count() == 4


@pytest.mark.parametrize("n", [1, 2, 4])
def test_sharded_step_matches_single_device(n):
  config, graphdef, state, batch, weights, aug = _setup()
  key = jax.random.key(7)
  schedule = optim.make_schedule(config.optim, 10)

  def grads_fn(state, batch, key):
    loss, aux, grads = train.loss_and_grads(graphdef, state, batch, key, weights=weights,
                                            aug=aug)
    return loss, grads

  def step_fn(state, batch, key):
    return train.train_step(graphdef, state, batch, key, weights=weights, aug=aug,
                            schedule=schedule)

  ref_loss, ref_grads = jax.jit(grads_fn)(state, batch, key)
  ref_state, ref_metrics = jax.jit(step_fn)(state, batch, key)

  mesh = parallel.make_mesh(n)
  sh_state = parallel.replicate(state, mesh)
  sh_batch = parallel.shard_batch(batch, mesh)
  assert sh_batch["image"].sharding.num_devices == n
  loss, grads = parallel.jit_data_parallel(grads_fn, mesh)(sh_state, sh_batch, key)
  new_state, metrics = parallel.jit_data_parallel(step_fn, mesh)(sh_state, sh_batch, key)

  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  _close(grads, ref_grads)
  _close(metrics, ref_metrics)
  _close(new_state, ref_state)
  # The step really changed the parameters (so the comparison above is not vacuous).
  w_old = state[0]["digit_caps"]["w"][...]
  w_new = jax.device_get(new_state[0]["digit_caps"]["w"][...])
  assert np.abs(w_new - w_old).max() > 1e-5
  # Replicated outputs: every device holds the whole new state.
  leaf = jax.tree.leaves(new_state)[0]
  assert leaf.sharding.is_fully_replicated


def test_gradient_is_the_mean_not_the_sum():
  # Averaging over 4 devices must give the gradient of the mean loss, not 4x it: compare
  # with a finite difference of the unsharded loss along the gradient direction.
  config, graphdef, state, batch, weights, aug = _setup()
  mesh = parallel.make_mesh(4)
  key = jax.random.key(1)

  def loss_fn(state):
    return train.loss_and_grads(graphdef, state, batch, key, weights=weights, aug=aug)[0]

  def grads_fn(state, batch):
    return train.loss_and_grads(graphdef, state, batch, key, weights=weights, aug=aug)[2]

  grads = jax.device_get(parallel.jit_data_parallel(grads_fn, mesh)(
      parallel.replicate(state, mesh), parallel.shard_batch(batch, mesh)))
  # Directional derivative along the whole (normalised) gradient: analytic = |g|.
  norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
  d = jax.tree.map(lambda g: g / norm, grads)
  eps = 3e-3
  def shift(sign):
    model = jax.tree.map(lambda x, di: x + sign * eps * di, state[0], d)
    return nnx.State({0: model, 1: state[1]})

  loss = jax.jit(loss_fn)
  fd = (loss(shift(1.0)) - loss(shift(-1.0))) / (2 * eps)
  # float32 central differences are good to a few %; a summed gradient would be 4x off.
  np.testing.assert_allclose(norm, fd, rtol=0.1)


def test_indivisible_batch_is_a_clear_error():
  mesh = parallel.make_mesh(4)
  with pytest.raises(ValueError, match=r"must be a positive multiple of the number of devices \(4\)"):
    parallel.shard_batch(helpers.synthetic_batch(6), mesh)
  with pytest.raises(ValueError, match=r"config.batch_size=10 must be a positive multiple"):
    parallel.check_batch_size(10, mesh, name="config.batch_size")
  with pytest.raises(ValueError, match=r"num_devices must be in \[1, 4\], got 5"):
    parallel.make_mesh(5)


_F = "--xla_cpu_experimental_ynn_fusion_type="


@pytest.mark.parametrize("flags,expected", [
    ("", {"individual_dot", "individual_convolution"}),                 # jaxlib 0.10 default
    (_F + "-individual_convolution", {"individual_dot"}),
    ("--xla_force_host_platform_device_count=4 " + _F + "dot", {"dot"}),  # replaces the list
    (_F, set()),                                                          # none
    (_F + "dot " + _F + "+eltwise", {"dot", "eltwise"}),                  # later edits apply
    (_F + "+reduce," + "-individual_dot", {"individual_convolution", "reduce"}),
    (_F + "-individual_convolution " + _F + "individual_convolution",
     {"individual_convolution"}),
])
def test_ynn_fusion_types_follow_xlas_rules(flags, expected):
  assert parallel.ynn_fusion_types(flags) == expected


_CONV_HLO_USES_YNN = """
import jax
from capsjax import parallel
x, w = jax.numpy.ones((2, 20, 20, 32)), jax.numpy.ones((9, 9, 32, 32))
hlo = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
    x, w, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))).lower(
        x, w).compile().as_text()
print('"__ynn_fusion"' in hlo, parallel.cpu_convs_on_ynnpack())
"""


@pytest.mark.parametrize("flags,on_ynn", [("", True), (_F + "-individual_convolution", False)])
def test_cpu_convs_on_ynnpack_agrees_with_the_compiled_hlo(flags, on_ynn):
  """What the flag parser says is what XLA:CPU compiles (a PrimaryCaps-like conv)."""
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _CONV_HLO_USES_YNN], env=env,
                       capture_output=True, text=True, timeout=300, check=True).stdout
  assert out.split() == [str(on_ynn), str(on_ynn)]


def test_use_xla_cpu_convs_keeps_the_users_flag_and_a_started_backend(monkeypatch):
  jax.devices()                                            # backends are running here.
  monkeypatch.setenv("XLA_FLAGS", _F)                      # the user: no YNNPACK at all.
  assert parallel.use_xla_cpu_convs() is True              # convs are XLA's then too.
  assert os.environ["XLA_FLAGS"] == _F
  monkeypatch.setenv("XLA_FLAGS", _F + "+individual_convolution")
  assert parallel.use_xla_cpu_convs() is False
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  assert parallel.use_xla_cpu_convs() is False             # too late: not set.
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"


def test_use_xla_cpu_convs_in_a_fresh_process():
  """Before the backend starts it adds the flag; 'auto' then picks 'winograd' on CPU."""
  code = ("import os; from capsjax import parallel, conv; import jax; "
          "print(parallel.use_xla_cpu_convs(), os.environ['XLA_FLAGS'], "
          "jax.default_backend(), conv.resolve_impl('auto'))")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, timeout=300, check=True).stdout.split()
  assert out == ["True", "--xla_force_host_platform_device_count=2",
                 parallel.XLA_CPU_CONV_FLAG, "cpu", "winograd"]


_TOUCH_TWICE = """
import ctypes, resource, sys
from capsjax import parallel
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
  assert parallel.keep_host_memory()
n = 200 << 20
def touch():
  p = libc.malloc(n)
  ctypes.memset(p, 1, n)
  libc.free(p)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _transparent_huge_pages_always() -> bool:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[always]" in f.read()
  except OSError:
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
@pytest.mark.skipif(_transparent_huge_pages_always(),
                    reason="huge pages make the default fault count small too")
def test_keep_host_memory_reuses_freed_blocks_without_page_faults():
  """A freed 200 MB block is faulted in again by default, reused after keep_host_memory."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "CAPSJAX_KEEP"))}
  faults = {}
  for mode in ("default", "keep"):
    out = subprocess.run([sys.executable, "-c", _TOUCH_TWICE, mode], capture_output=True,
                         text=True, timeout=120, check=True, env=env)
    faults[mode] = int(out.stdout.split()[-1])
  pages = (200 << 20) // 4096
  assert faults["default"] > pages // 2, faults           # unmapped on free, faulted again
  assert faults["keep"] < pages // 20, faults             # kept and reused


def test_keep_host_memory_can_be_turned_off(monkeypatch):
  monkeypatch.setenv("CAPSJAX_KEEP_HOST_MEMORY", "0")
  assert parallel.keep_host_memory() is False
