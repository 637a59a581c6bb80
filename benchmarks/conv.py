"""Times every `capsjax.conv` lowering on the CapsNet conv shapes.

For PrimaryCaps (9x9 stride 2, 256 -> 256 channels on [B, 20, 20, 256]) and Conv1
(9x9 stride 1, 1 -> 256 channels on [B, 28, 28, 1]) it times, for each lowering, four
jitted functions (compile excluded): the forward pass, forward + weight gradient,
forward + input gradient and forward + both gradients (each returns the output and the
gradients, so nothing is dead code). A float32 2048^3 matmul is timed in the same run
and in the same rounds, interleaved with the convs, so its GFLOP/s is the peak the
lowerings are compared with on a shared machine.

XLA:CPU's convolutions are taken off YNNPACK first (`cpu_runtime.use_xla_cpu_convs`, as
`capsjax.main` does) unless XLA_FLAGS sets the YNNPACK fusion types or `--ynn-convs` is
given, and freed host memory is kept for reuse (`cpu_runtime.keep_host_memory`).

Run: `python -m benchmarks.conv [--batch 100] [--repeats 5]
[--impls xla,im2col,s2d,hybrid,winograd]`.
Prints a table, then one JSON line as the last line.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from capsjax import conv
from capsjax.run import cpu_runtime

# name: (image [H, W, C_in], kernel [kh, kw, C_in, C_out], stride)
SHAPES = {
  "primarycaps": ((20, 20, 256), (9, 9, 256, 256), 2),
  "conv1": ((28, 28, 1), (9, 9, 1, 256), 1),
}
MODES = ("fwd", "fwd+dw", "fwd+dx", "fwd+both")
# A lowering whose first timed call exceeds this is timed only once more.
SLOW_S = 20.0


def _conv_fns(impl: str, stride: int):
  """Jitted (x, w, g) -> outputs for each mode; g is the output cotangent."""

  def f(x, w):
    return conv.conv2d(x, w, stride=stride, impl=impl)

  def fwd(x, w, g):
    del g
    return f(x, w)

  def fwd_dw(x, w, g):
    y, vjp = jax.vjp(lambda w: f(x, w), w)
    return y, vjp(g)

  def fwd_dx(x, w, g):
    y, vjp = jax.vjp(lambda x: f(x, w), x)
    return y, vjp(g)

  def fwd_both(x, w, g):
    y, vjp = jax.vjp(f, x, w)
    return y, vjp(g)

  return dict(
    zip(MODES, (jax.jit(fwd), jax.jit(fwd_dw), jax.jit(fwd_dx), jax.jit(fwd_both)), strict=False)
  )


def _time(fn, *args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def conv_flops(batch: int, image, kernel, stride: int) -> float:
  """Multiply-add FLOPs (2 per MAC) of one forward conv; each gradient costs the same."""
  h, w, _ = image
  kh, kw, c_in, c_out = kernel
  ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
  return 2.0 * batch * ho * wo * kh * kw * c_in * c_out


def run(
  batch: int = 100,
  repeats: int = 5,
  impls=("xla", "im2col", "s2d", "hybrid", "winograd"),
  shapes=tuple(SHAPES),
) -> dict:
  """Returns {'matmul_gflops': ..., 'results': [{shape, impl, mode, s, gflops}, ...]}."""
  key = jax.random.key(0)
  a = jax.random.normal(key, (2048, 2048), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  jax.block_until_ready(matmul(a))
  mm_times = []

  cases = []  # (shape, impl, mode, fn, args, flops)
  for name in shapes:
    image, kernel, stride = SHAPES[name]
    kx, kw_, kg = jax.random.split(jax.random.fold_in(key, len(cases)), 3)
    x = jax.random.normal(kx, (batch, *image), jnp.float32)
    w = jax.random.normal(kw_, kernel, jnp.float32) * 0.01
    ho = (image[0] - kernel[0]) // stride + 1
    wo = (image[1] - kernel[1]) // stride + 1
    g = jax.random.normal(kg, (batch, ho, wo, kernel[3]), jnp.float32)
    f1 = conv_flops(batch, image, kernel, stride)
    for impl in impls:
      for mode, fn in _conv_fns(impl, stride).items():
        n_dots = {"fwd": 1, "fwd+dw": 2, "fwd+dx": 2, "fwd+both": 3}[mode]
        cases.append(
          dict(shape=name, impl=impl, mode=mode, fn=fn, args=(x, w, g), flops=n_dots * f1, times=[])
        )

  for c in cases:  # compile ahead of time (not timed), then one timed call
    c["fn"] = c["fn"].lower(*c["args"]).compile()
    c["times"].append(_time(c["fn"], *c["args"]))
  # Interleave the repeats over all cases, so that load from other processes on a
  # shared machine hits every lowering (and the matmul peak) alike.
  for _ in range(repeats - 1):
    mm_times.append(_time(matmul, a))
    for c in cases:
      if c["times"][0] < SLOW_S:
        c["times"].append(_time(c["fn"], *c["args"]))
  mm_times.append(_time(matmul, a))

  mm_gflops = 2.0 * 2048**3 / float(np.median(mm_times)) / 1e9
  results = []
  for c in cases:
    t = float(np.median(c["times"]))
    results.append(
      dict(
        shape=c["shape"],
        impl=c["impl"],
        mode=c["mode"],
        s=round(t, 4),
        n=len(c["times"]),
        gflops=round(c["flops"] / t / 1e9, 1),
      )
    )
  return dict(
    matmul_gflops=round(mm_gflops, 1),
    matmul_gflops_best=round(2.0 * 2048**3 / min(mm_times) / 1e9, 1),
    results=results,
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=100)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--impls", default="xla,im2col,s2d,hybrid,winograd")
  parser.add_argument("--shapes", default=",".join(SHAPES))
  parser.add_argument(
    "--ynn-convs",
    action="store_true",
    help="leave XLA:CPU's convs on YNNPACK (skip cpu_runtime.use_xla_cpu_convs)",
  )
  args = parser.parse_args(argv)
  if not args.ynn_convs:
    cpu_runtime.use_xla_cpu_convs()
  cpu_runtime.keep_host_memory()
  impls = tuple(args.impls.split(","))
  for impl in impls:
    if impl not in conv.IMPLS:  # fail early on a bad name
      parser.error(f"--impls: {impl!r} is not one of {conv.IMPLS}")
  auto = cpu_runtime.resolve_conv_impl("auto")
  out = run(args.batch, args.repeats, impls, tuple(args.shapes.split(",")))

  peak = out["matmul_gflops"]
  print(
    f"backend {jax.default_backend()}, {jax.device_count()} device(s), "
    f"batch {args.batch}; 'auto' -> {auto}; convs on "
    f"{'YNNPACK' if cpu_runtime.cpu_convs_on_ynnpack() else 'XLA'}"
  )
  print(
    f"f32 matmul 2048^3: {peak:.1f} GFLOP/s median "
    f"({out['matmul_gflops_best']:.1f} best), timed interleaved with the convs"
  )
  print(f"{'shape':<12}{'impl':<10}" + "".join(f"{m:>17}" for m in MODES))
  rows = {}
  for r in out["results"]:
    rows.setdefault((r["shape"], r["impl"]), {})[r["mode"]] = r
  for (shape, impl), by_mode in rows.items():
    cells = "".join(
      f"{by_mode[m]['s']:>7.3f}s {by_mode[m]['gflops']:>5.0f}GF"
      + ("*" if by_mode[m]["n"] == 1 else " ")
      for m in MODES
    )
    print(f"{shape:<12}{impl:<10}{cells}")
  print(
    "median seconds over repeats and GFLOP/s of the direct conv (2 FLOPs/MAC; each "
    "gradient = one forward); * timed once. 'winograd' does ~3.7x fewer multiplies "
    "than the direct conv on PrimaryCaps, so its figure can exceed the matmul peak"
  )
  print(json.dumps(dict(batch=args.batch, backend=jax.default_backend(), auto=auto, **out)))


if __name__ == "__main__":
  main()
