"""capsjax.run.cpu_runtime: the YNNPACK flag per jaxlib version, 'auto' convs, glibc malloc.

The flag parser is checked against XLA's own rules and against the HLO XLA:CPU compiles
(in fresh processes, since XLA reads XLA_FLAGS once); the jaxlib version gate with a
patched `jaxlib.__version__`; `keep_host_memory` by counting page faults.
"""

import logging
import os
import subprocess
import sys

import jax
import jaxlib
import pytest

from capsjax.run import cpu_runtime

_F = "--xla_cpu_experimental_ynn_fusion_type="


@pytest.mark.parametrize(
  "flags,expected",
  [
    ("", {"individual_dot", "individual_convolution"}),  # jaxlib 0.10 default
    (_F + "-individual_convolution", {"individual_dot"}),
    ("--xla_force_host_platform_device_count=4 " + _F + "dot", {"dot"}),  # replaces the list
    (_F, set()),  # none
    (_F + "dot " + _F + "+eltwise", {"dot", "eltwise"}),  # later edits apply
    (_F + "+reduce," + "-individual_dot", {"individual_convolution", "reduce"}),
    (_F + "-individual_convolution " + _F + "individual_convolution", {"individual_convolution"}),
  ],
)
def test_ynn_fusion_types_follow_xlas_rules(flags, expected):
  assert cpu_runtime.ynn_fusion_types(flags) == expected


_CONV_HLO_USES_YNN = """
import jax
from capsjax.run import cpu_runtime
x, w = jax.numpy.ones((2, 20, 20, 32)), jax.numpy.ones((9, 9, 32, 32))
hlo = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
    x, w, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))).lower(
        x, w).compile().as_text()
print('"__ynn_fusion"' in hlo, cpu_runtime.cpu_convs_on_ynnpack())
"""


@pytest.mark.parametrize("flags,on_ynn", [("", True), (_F + "-individual_convolution", False)])
def test_cpu_convs_on_ynnpack_agrees_with_the_compiled_hlo(flags, on_ynn):
  """What the flag parser says is what XLA:CPU compiles (a PrimaryCaps-like conv)."""
  if flags and not cpu_runtime.flag_known(jaxlib.__version__):
    pytest.skip(f"XLA of jaxlib {jaxlib.__version__} may not know the flag (it would abort)")
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", _CONV_HLO_USES_YNN],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  ).stdout
  assert out.split() == [str(on_ynn), str(on_ynn)]


def test_use_xla_cpu_convs_keeps_the_users_flag_and_a_started_backend(monkeypatch):
  jax.devices()  # backends are running here.
  monkeypatch.setenv("XLA_FLAGS", _F)  # the user: no YNNPACK at all.
  assert cpu_runtime.use_xla_cpu_convs() is True  # convs are XLA's then too.
  assert os.environ["XLA_FLAGS"] == _F
  monkeypatch.setenv("XLA_FLAGS", _F + "+individual_convolution")
  assert cpu_runtime.use_xla_cpu_convs() is False
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  assert cpu_runtime.use_xla_cpu_convs() is False  # too late: not set.
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"


def test_use_xla_cpu_convs_in_a_fresh_process():
  """Before the backend starts it adds the flag (on the jaxlib versions whose XLA has it);
  'auto' then picks 'winograd' on CPU, and 'im2col' where convs stay on YNNPACK."""
  code = (
    "import os; from capsjax.run import cpu_runtime; import jax; "
    "print(cpu_runtime.use_xla_cpu_convs(), os.environ['XLA_FLAGS'], "
    "jax.default_backend(), cpu_runtime.resolve_conv_impl('auto'))"
  )
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True
  ).stdout.split()
  if cpu_runtime.flag_known(jaxlib.__version__) and not cpu_runtime._accelerator_plugin_installed():
    assert out == [
      "True",
      "--xla_force_host_platform_device_count=2",
      cpu_runtime.XLA_CPU_CONV_FLAG,
      "cpu",
      "winograd",
    ]
  else:
    assert out == ["False", "--xla_force_host_platform_device_count=2", "cpu", "im2col"]


@pytest.mark.parametrize(
  "version,known",
  [
    ("0.10.0", True),
    ("0.10.2", True),
    ("0.11.0", True),
    ("0.11.2", True),
    ("0.9.2", False),
    ("0.12.0", False),
    ("0.1.10", False),
    ("1.0.0", False),
  ],
)
def test_flag_known_per_jaxlib_version(version, known):
  assert cpu_runtime.flag_known(version) is known


@pytest.mark.parametrize("version", ["0.11.2", "0.12.0"])
def test_use_xla_cpu_convs_gates_on_the_jaxlib_version(version, monkeypatch, caplog):
  """On a jaxlib whose XLA has the flag it is added; on another, XLA_FLAGS is left alone
  (XLA would abort on an unknown flag) with one warning naming the version."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(jaxlib, "__version__", version)
  monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
  monkeypatch.setattr(cpu_runtime, "_accelerator_plugin_installed", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  with caplog.at_level(logging.INFO):
    result = cpu_runtime.use_xla_cpu_convs()
  warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
  if version == "0.11.2":
    assert result is True and not warnings
    assert os.environ["XLA_FLAGS"] == (
      "--xla_force_host_platform_device_count=4 " + cpu_runtime.XLA_CPU_CONV_FLAG
    )
  else:
    assert result is False
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
    assert len(warnings) == 1 and "0.12.0" in warnings[0].getMessage()
    assert "im2col" in warnings[0].getMessage()


def test_resolve_conv_impl_on_other_backends(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert cpu_runtime.resolve_conv_impl("auto") == "xla"
  assert cpu_runtime.resolve_conv_impl("winograd") == "winograd"
  with pytest.raises(ValueError, match=r"must be one of .*got 'Auto'"):
    cpu_runtime.resolve_conv_impl("Auto")


_TOUCH_TWICE = """
import ctypes, resource, sys
from capsjax.run import cpu_runtime
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
  assert cpu_runtime.keep_host_memory()
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
@pytest.mark.skipif(
  _transparent_huge_pages_always(), reason="huge pages make the default fault count small too"
)
def test_keep_host_memory_reuses_freed_blocks_without_page_faults():
  """A freed 200 MB block is faulted in again by default, reused after keep_host_memory."""
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "CAPSJAX_KEEP"))
  }
  faults = {}
  for mode in ("default", "keep"):
    out = subprocess.run(
      [sys.executable, "-c", _TOUCH_TWICE, mode],
      capture_output=True,
      text=True,
      timeout=120,
      check=True,
      env=env,
    )
    faults[mode] = int(out.stdout.split()[-1])
  pages = (200 << 20) // 4096
  assert faults["default"] > pages // 2, faults  # unmapped on free, faulted again
  assert faults["keep"] < pages // 20, faults  # kept and reused


def test_keep_host_memory_can_be_turned_off(monkeypatch):
  monkeypatch.setenv("CAPSJAX_KEEP_HOST_MEMORY", "0")
  assert cpu_runtime.keep_host_memory() is False
