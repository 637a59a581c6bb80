"""Start-up settings of the host runtime: XLA:CPU's conv library, glibc's malloc, 'auto' convs.

The entry points (`capsjax.main`, `capsjax.visualize`, the benchmarks, the experiments and
the tests) call `configure_cpu_runtime()` first, before JAX starts its backends. The config
value conv_impl='auto' is then turned into a lowering once, after the backends started:

  impl = cpu_runtime.resolve_conv_impl(config.model.conv_impl)
  model = models.create_model(config.model, ..., conv_impl=impl)

(`models.create_model` calls `resolve_conv_impl` itself when not given `conv_impl`.)
This is the only module that reads or writes XLA_FLAGS or calls `mallopt`; the model, the
layers and `capsjax.conv` never read the environment.

Why the settings exist: jaxlib's XLA:CPU hands convolutions to the YNNPACK library by
default, whose kernel for CapsNet's strided 9x9 PrimaryCaps conv is several times slower
than XLA's own conv (`benchmarks/conv.py` times both). `use_xla_cpu_convs` takes
convolutions off YNNPACK and leaves the other YNNPACK fusions (dots) as they are. glibc's
malloc unmaps XLA's large per-step buffers on free, so every step page-faults its memory
again; `keep_host_memory` keeps freed memory for reuse.
"""

from __future__ import annotations

import os
import re

from absl import logging

import jax

from capsjax import conv

XLA_CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
_YNN_FLAG_RE = re.compile(r"--xla_cpu_experimental_ynn_fusion_type=(\S*)")
# XLA's default list of YNNPACK fusion types (a convolution and a dot compile to YNNPACK
# calls without the flag; tests/parallel_test.py checks the parser against the HLO).
_YNN_DEFAULT_TYPES = frozenset({"individual_dot", "individual_convolution"})
# jaxlib minors whose XLA registers --xla_cpu_experimental_ynn_fusion_type with the
# 'individual_convolution' type: 0.10.x (the pinned one) and 0.11.0-0.11.2 (the flag name
# and LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION are in their libjax_common.so). XLA
# aborts the process on a flag it does not know, so other versions are left alone.
FLAG_JAXLIB_MINORS = ("0.10", "0.11")
# The values config.model.conv_impl may take: a lowering of `capsjax.conv.IMPLS`, or 'auto'.
CONV_IMPLS = (*conv.IMPLS, "auto")


def ynn_fusion_types(xla_flags: str | None = None) -> frozenset[str]:
  """The YNNPACK fusion types XLA:CPU uses under `xla_flags` (default: $XLA_FLAGS).

  XLA's rules: each occurrence of --xla_cpu_experimental_ynn_fusion_type either replaces
  the list (plain names, '' for none) or edits it ('+name' / '-name'); names are
  lower-case here.

  Args:
    xla_flags: an XLA_FLAGS string; None reads the environment.

  Returns:
    The set of fusion type names, e.g. {'individual_dot'}.
  """
  flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
  types = set(_YNN_DEFAULT_TYPES)
  for value in _YNN_FLAG_RE.findall(flags):
    items = [t.strip().lower() for t in value.split(",") if t.strip()]
    if items and all(t[0] in "+-" for t in items):
      for t in items:
        (types.add if t[0] == "+" else types.discard)(t[1:])
    else:
      types = set(items)
  return frozenset(types)


def cpu_convs_on_ynnpack() -> bool:
  """Whether XLA:CPU sends convolutions to YNNPACK (the slow path for CapsNet's convs).

  Reads XLA_FLAGS as it is now; XLA read it when its backend started, so change it only
  before that (as `use_xla_cpu_convs` does).
  """
  return "individual_convolution" in ynn_fusion_types()


def _accelerator_plugin_installed() -> bool:
  """Whether a GPU/TPU PJRT plugin is installed (it carries its own XLA, own flags)."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top

  return (
    bool(importlib.metadata.entry_points(group="jax_plugins"))
    or importlib.util.find_spec("libtpu") is not None
  )


def flag_known(jaxlib_version: str) -> bool:
  """Whether this jaxlib version's XLA is known to accept XLA_CPU_CONV_FLAG."""
  return jaxlib_version.startswith(tuple(m + "." for m in FLAG_JAXLIB_MINORS))


def use_xla_cpu_convs() -> bool:
  """Adds XLA_CPU_CONV_FLAG to XLA_FLAGS so XLA:CPU runs convolutions itself.

  Must run before JAX starts its backends (the first `jax.devices()` or computation):
  XLA reads XLA_FLAGS once. Leaves XLA_FLAGS alone when the user set
  --xla_cpu_experimental_ynn_fusion_type already (their choice wins), when the backends
  already run, when the jaxlib is not one of FLAG_JAXLIB_MINORS (one warning: XLA aborts
  on a flag it does not know), and when a GPU/TPU plugin is installed (plugins carry their
  own XLA, which parses XLA_FLAGS too). Convolutions then stay on YNNPACK, and
  `resolve_conv_impl('auto')` picks 'im2col', the fastest lowering there.

  Returns:
    Whether XLA:CPU runs convolutions itself.
  """
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top

  flags = os.environ.get("XLA_FLAGS", "")
  if _YNN_FLAG_RE.search(flags):  # the user's own choice wins.
    return not cpu_convs_on_ynnpack()
  if not flag_known(jaxlib.__version__):
    logging.warning(
      "capsjax: not setting %s: known to exist in jaxlib %s.x, found %s; "
      "CPU convs stay on YNNPACK and conv_impl='auto' uses 'im2col'",
      XLA_CPU_CONV_FLAG,
      ".x / ".join(FLAG_JAXLIB_MINORS),
      jaxlib.__version__,
    )
    return False
  if _accelerator_plugin_installed():
    logging.info("capsjax: a GPU/TPU plugin is installed; leaving XLA:CPU's convs on YNNPACK")
    return False
  if xla_bridge.backends_are_initialized():
    logging.warning(
      "capsjax: JAX backends already started; call "
      "cpu_runtime.use_xla_cpu_convs() before any JAX computation"
    )
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {XLA_CPU_CONV_FLAG}".strip()
  return True


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8


def keep_host_memory() -> bool:
  """Makes glibc's malloc keep freed memory in the process instead of unmapping it.

  XLA:CPU allocates every buffer of a step (Winograd tiles, u_hat, gradients: tens to
  hundreds of MB each) with malloc. By default glibc serves such sizes with a fresh mmap
  and unmaps them on free, so every step page-faults all of its memory again. This sets
  one malloc arena (other threads' arenas would mmap large blocks anyway), no mmap for
  large blocks and a 2 GiB trim threshold, so freed buffers are reused.

  Costs: resident memory stays near the run's peak (it is not given back to the OS while
  the process runs), and all threads allocate from one arena. Call it at start-up, before
  JAX starts its thread pools (`configure_cpu_runtime` does;
  CAPSJAX_KEEP_HOST_MEMORY=0 turns it off).

  Returns:
    Whether the settings are in place: False where the C library is not glibc, with a
    GPU/TPU plugin installed (device memory is not malloc's), or when a setting is
    refused (logged).
  """
  import ctypes  # pylint: disable=g-import-not-at-top
  import platform  # pylint: disable=g-import-not-at-top

  if os.environ.get("CAPSJAX_KEEP_HOST_MEMORY", "1") == "0":
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  if _accelerator_plugin_installed():
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  settings = {
    "M_ARENA_MAX": (_M_ARENA_MAX, 1),
    "M_MMAP_MAX": (_M_MMAP_MAX, 0),
    "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, 2**31 - 1),
    "M_TOP_PAD": (_M_TOP_PAD, 64 << 20),
  }
  refused = [name for name, (param, value) in settings.items() if libc.mallopt(param, value) != 1]
  if refused:
    logging.warning("capsjax: glibc refused mallopt %s", ", ".join(refused))
  return not refused


def configure_cpu_runtime() -> None:
  """What capsjax's entry points do first: `use_xla_cpu_convs()` and `keep_host_memory()`.

  Call it before any JAX computation (XLA reads XLA_FLAGS when its backend starts, and
  malloc's settings should be in place before XLA's threads allocate).
  """
  use_xla_cpu_convs()
  keep_host_memory()


def resolve_conv_impl(impl: str) -> str:
  """Maps a `config.model.conv_impl` value to a concrete lowering of `capsjax.conv`.

  'auto' is the fastest lowering for the default backend: on CPU 'winograd' when XLA:CPU
  runs convolutions itself (`use_xla_cpu_convs`), else 'im2col'; 'xla' (cuDNN, TPU convs)
  on other backends. Other names are returned as they are. Asks JAX for its default
  backend, which starts the backends: call it after `configure_cpu_runtime()` and after
  `jax.distributed.initialize`.

  Args:
    impl: one of CONV_IMPLS.

  Returns:
    One of `capsjax.conv.IMPLS`.

  Raises:
    ValueError: for a name not in CONV_IMPLS.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  if jax.default_backend() != "cpu":
    return "xla"
  return "im2col" if cpu_convs_on_ynnpack() else "winograd"
