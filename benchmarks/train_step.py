"""Train/eval throughput of the full CapsNet, against the machine's matmul peak and a peer.

  python -m benchmarks.train_step                      # batch 100 and 128
  python -m benchmarks.train_step --batch=100 --peer   # + the PyTorch peer, same threads
  python -m benchmarks.train_step --batch=100 --peer --peer_compile   # + torch.compile
  python -m benchmarks.train_step --dtype=bfloat16 --conv_impl=xla

Full model (decoder, 3 routing iterations, Adam), one device. Prints a table, then one JSON
line (last line) with train_img_s, eval_img_s, batch, backend, peak_mem_mb, and
peer_train_img_s / peer_eval_img_s with --peer (the peer in this process, so under the same
glibc malloc settings, `cpu_runtime.keep_host_memory`), and peer_own_process_* (the same peer
in a fresh process with default malloc, as PyTorch users run it).

The f32 matmul peak is measured repeatedly, interleaved with the timed steps (before and
after each measurement), since load from other processes on a shared machine changes during
the run; MFU is reported against the best peak seen in the run, and the peak range is
printed.

Model FLOPs are counted analytically (2 x multiply-adds of the convs, the u_hat einsum,
routing and decoder; a train step counts 3 x forward), the usual MFU convention, so
different conv lowerings are compared on the same work. The 'winograd' conv (what 'auto'
picks on CPU) computes PrimaryCaps with ~3.7x fewer multiplies than the direct conv, so
its MFU can pass 100%: it then says how fast the model trains against the matmul peak,
not how busy the hardware is.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time

from absl import app
from absl import flags

_BATCH = flags.DEFINE_list("batch", ["100", "128"], "Batch sizes.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per measurement (after a warm-up).")
_PEER = flags.DEFINE_bool("peer", False, "Also time the PyTorch peer (benchmarks/torch_peer.py).")
_PEER_COMPILE = flags.DEFINE_bool(
  "peer_compile", False, "With --peer, also time the peer under torch.compile."
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_CONV = flags.DEFINE_string(
  "conv_impl", "auto", "capsjax.conv lowering, or 'auto' (cpu_runtime.resolve_conv_impl)."
)
_XLA_CONVS = flags.DEFINE_bool(
  "xla_cpu_convs",
  True,
  "cpu_runtime.use_xla_cpu_convs() as capsjax.main does (convs off "
  "YNNPACK) unless XLA_FLAGS sets the YNNPACK fusion types; --noxla_cpu_convs leaves "
  "jaxlib's default (convs on YNNPACK).",
)
_KEEP_MEMORY = flags.DEFINE_bool(
  "keep_host_memory",
  True,
  "cpu_runtime.keep_host_memory() as capsjax.main does; "
  "--nokeep_host_memory leaves glibc's malloc defaults.",
)
_LAYERS = flags.DEFINE_bool("layers", True, "Per-layer forward/backward breakdown.")


def _timeit(fn, steps: int) -> float:
  """Median seconds per call of `fn` (already compiled), blocking on its result."""
  import jax  # pylint: disable=g-import-not-at-top

  jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def matmul_peak_gflops(n: int = 2048, steps: int = 5) -> float:
  """Measured float32 n^3 matmul GFLOP/s on the default device."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  return 2 * n**3 / _timeit(lambda: f(a), steps) / 1e9


class PeakTracker:
  """Measures the matmul peak on demand and keeps every reading (GFLOP/s)."""

  def __init__(self):
    self.readings: list[float] = []

  def sample(self) -> float:
    self.readings.append(matmul_peak_gflops(steps=3))
    return self.readings[-1]

  @property
  def best(self) -> float:
    return max(self.readings)


def forward_flops(model_cfg, image_shape=(28, 28, 1), num_classes=10) -> dict[str, float]:
  """Analytic forward FLOPs per image, by layer."""
  h, w, c = image_shape
  k1, ch1 = model_cfg.conv1_kernel, model_cfg.conv1_channels
  h1, w1 = h - k1 + 1, w - k1 + 1
  kp, sp = model_cfg.primary_kernel, model_cfg.primary_stride
  cp = model_cfg.primary_types * model_cfg.primary_dim
  h2, w2 = (h1 - kp) // sp + 1, (w1 - kp) // sp + 1
  n_in = h2 * w2 * model_cfg.primary_types
  d_in, d_out, it = model_cfg.primary_dim, model_cfg.digit_dim, model_cfg.routing_iterations
  sizes = [num_classes * d_out, *model_cfg.decoder_hidden, h * w * c]
  return {
    "conv1": 2 * h1 * w1 * k1 * k1 * c * ch1,
    "primary_caps": 2 * h2 * w2 * kp * kp * ch1 * cp,
    # u_hat, then per iteration s (weighted sum) and, but for the last, the agreement.
    "routing": 2 * n_in * num_classes * d_in * d_out
    + (2 * it - 1) * 2 * n_in * num_classes * d_out,
    "decoder": sum(2 * a * b for a, b in zip(sizes[:-1], sizes[1:], strict=False)),
  }


def peak_mem_mb() -> float:
  import jax  # pylint: disable=g-import-not-at-top

  dev = jax.devices()[0]
  stats = dev.memory_stats() if dev.platform != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB.


def _layer_breakdown(model, batch_size: int, steps: int) -> list[tuple[str, float, float]]:
  """[(layer, forward s, forward+backward s)] per batch for each stage of the model.

  The backward pass computes what a train step needs: the parameter gradients and, but
  for Conv1 (whose input is the image), the input gradient.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  x = jax.random.uniform(jax.random.key(1), (batch_size, *model.image_shape))
  h1 = jax.nn.relu(model.conv1(x))
  u = model.primary_caps(h1)
  v = model.digit_caps(u)
  labels = jnp.arange(batch_size) % model.num_classes
  stages = [
    ("conv1", model.conv1, x, lambda m, a: jax.nn.relu(m(a)), False),
    ("primary_caps", model.primary_caps, h1, lambda m, a: m(a), True),
    ("routing", model.digit_caps, u, lambda m, a: m(a), True),
    ("decoder", model.decoder, v, lambda m, a: m(a, labels), True),
  ]
  rows = []
  for name, module, inp, apply, input_grad in stages:
    graphdef, params = nnx.split(module)

    def fwd(params, inp, graphdef=graphdef, apply=apply):
      return apply(nnx.merge(graphdef, params), inp)

    def fwd_bwd(params, inp, fwd=fwd, input_grad=input_grad):
      if input_grad:
        out, vjp = jax.vjp(fwd, params, inp)
      else:
        out, vjp = jax.vjp(lambda p: fwd(p, inp), params)
      return vjp(jnp.ones_like(out))

    f, g = jax.jit(fwd), jax.jit(fwd_bwd)
    rows.append(
      # Each lambda is timed within this iteration: the loop variables are current.
      (
        name,
        _timeit(lambda: f(params, inp), steps),  # noqa: B023
        _timeit(lambda: g(params, inp), steps),  # noqa: B023
      )
    )
  return rows


def measure(
  batch_size: int, steps: int, dtype: str, conv_impl: str, layers: bool, peaks: PeakTracker
) -> dict:
  """Times the jitted train and eval steps of the full model at one batch size."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from capsjax.run import cpu_runtime  # pylint: disable=g-import-not-at-top
  from capsjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from capsjax import parallel  # pylint: disable=g-import-not-at-top
  from capsjax import steps as steps_lib  # pylint: disable=g-import-not-at-top
  from configs import fashion  # pylint: disable=g-import-not-at-top

  config = fashion.get_config()
  config.model.dtype = dtype
  config.model.conv_impl = conv_impl
  conv_impl = cpu_runtime.resolve_conv_impl(conv_impl)  # what create_model builds
  config.batch_size = config.eval_batch_size = batch_size
  info = input_pipeline.dataset_info("fashion_mnist")
  mesh = parallel.make_mesh(1)
  graphdef, state = steps_lib.create_model_and_optimizer(config, info, 100, jax.random.key(0))
  state = parallel.replicate(state, mesh)
  train_fn, eval_fn = steps_lib.make_steps(graphdef, config, 100, mesh)
  rng = np.random.default_rng(0)
  batch = parallel.shard_batch(
    {
      "image": rng.random((batch_size, 28, 28, 1), np.float32),
      "label": rng.integers(0, 10, batch_size).astype(np.int32),
    },
    mesh,
  )
  eval_batch = dict(batch, mask=np.ones(batch_size, bool))
  eval_batch = parallel.shard_batch(eval_batch, mesh)
  key = jax.random.key(0)

  t = time.perf_counter()
  state, m = train_fn(state, batch, key)
  jax.block_until_ready(m)
  compile_train = time.perf_counter() - t
  t = time.perf_counter()
  jax.block_until_ready(eval_fn(state, eval_batch))
  compile_eval = time.perf_counter() - t

  holder = {"state": state}

  def one_train_step():
    holder["state"], metrics = train_fn(holder["state"], batch, key)
    return metrics

  peaks.sample()
  train_s = _timeit(one_train_step, steps)
  peaks.sample()
  eval_s = _timeit(lambda: eval_fn(holder["state"], eval_batch), steps)
  peaks.sample()
  flops = forward_flops(config.model)
  result = {
    "batch": batch_size,
    "conv_impl": conv_impl,
    "dtype": dtype,
    "train_img_s": batch_size / train_s,
    "eval_img_s": batch_size / eval_s,
    "train_step_s": train_s,
    "eval_step_s": eval_s,
    "compile_train_s": compile_train,
    "compile_eval_s": compile_eval,
    "model_gflop_per_img_train": 3 * sum(flops.values()) / 1e9,
    "train_gflops": 3 * sum(flops.values()) * batch_size / train_s / 1e9,
    "eval_gflops": sum(flops.values()) * batch_size / eval_s / 1e9,
  }
  if layers:
    model, _ = nnx.merge(graphdef, holder["state"])
    result["layers"] = [
      {
        "layer": name,
        "fwd_s": f,
        "fwd_bwd_s": fb,
        "bwd_s": max(fb - f, 0.0),
        "fwd_gflops": flops[name] * batch_size / f / 1e9,
      }
      for name, f, fb in _layer_breakdown(model, batch_size, steps)
    ]
    peaks.sample()
  return result


def _vs(summary: dict, train: float, evl: float) -> str:
  """'capsjax/PyTorch: train xA, eval xB' for peer figures train, evl (img/s)."""
  return (
    f"capsjax/PyTorch: train x{summary['train_img_s'] / train:.2f}, "
    f"eval x{summary['eval_img_s'] / evl:.2f}"
  )


def _peer_subprocess(batch: int, steps: int, threads: int, compile_too: bool) -> dict:
  """benchmarks/torch_peer.py in a child process; its JSON line as a dict."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  cmd = [
    sys.executable,
    "-m",
    "benchmarks.torch_peer",
    f"--batch={batch}",
    f"--steps={steps}",
    f"--threads={threads}",
  ] + (["--compile"] if compile_too else [])
  env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
  out = subprocess.run(
    cmd,
    capture_output=True,
    text=True,
    check=True,
    env=env,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from capsjax.run import cpu_runtime  # pylint: disable=g-import-not-at-top

  if _XLA_CONVS.value:
    cpu_runtime.use_xla_cpu_convs()
  if _KEEP_MEMORY.value:
    cpu_runtime.keep_host_memory()
  backend = jax.default_backend()
  threads = os.cpu_count()
  peaks = PeakTracker()
  peaks.sample()
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
  except (OSError, StopIteration):
    pass
  print(
    f"backend {backend}, device {jax.devices()[0].device_kind}, CPU {cpu}, "
    f"{threads} cores; dtype {_DTYPE.value}"
  )
  results = [
    measure(int(b), _STEPS.value, _DTYPE.value, _CONV.value, _LAYERS.value, peaks)
    for b in _BATCH.value
  ]
  peak = peaks.best
  print(
    f"f32 matmul 2048^3 peak, {len(peaks.readings)} readings interleaved with the "
    f"timed steps: {min(peaks.readings):.1f} .. {peak:.1f} GFLOP/s "
    f"(median {statistics.median(peaks.readings):.1f}); MFU is against the best"
  )
  print(
    f"\n{'batch':>5} {'conv':>9} {'train img/s':>12} {'eval img/s':>11} "
    f"{'train GFLOP/s':>14} {'MFU %':>6} {'compile s':>10}"
  )
  for r in results:
    print(
      f"{r['batch']:>5} {r['conv_impl']:>9} {r['train_img_s']:>12.1f} "
      f"{r['eval_img_s']:>11.1f} {r['train_gflops']:>14.1f} "
      f"{100 * r['train_gflops'] / peak:>6.1f} {r['compile_train_s']:>10.1f}"
    )
  if any(r["conv_impl"] == "winograd" for r in results):
    print(
      "(MFU counts the direct conv's FLOPs; 'winograd' does ~3.7x fewer multiplies in "
      "PrimaryCaps, so MFU can exceed 100%)"
    )
  for r in results:
    if "layers" in r:
      print(f"\nper layer, batch {r['batch']} (seconds per batch):")
      print(f"{'layer':>14} {'fwd':>8} {'bwd':>8} {'fwd GFLOP/s':>12}")
      for row in r["layers"]:
        print(
          f"{row['layer']:>14} {row['fwd_s']:>8.4f} {row['bwd_s']:>8.4f} {row['fwd_gflops']:>12.1f}"
        )
  summary = {
    "train_img_s": results[0]["train_img_s"],
    "eval_img_s": results[0]["eval_img_s"],
    "batch": results[0]["batch"],
    "backend": backend,
    "peak_mem_mb": peak_mem_mb(),
    "matmul_peak_gflops": peak,
    "matmul_peak_gflops_min": min(peaks.readings),
    "matmul_peak_gflops_readings": [round(p, 1) for p in peaks.readings],
    "mfu": results[0]["train_gflops"] / peak,
    "conv_impl": results[0]["conv_impl"],
    "dtype": _DTYPE.value,
    "cpu": cpu,
    "results": [{k: v for k, v in r.items() if k != "layers"} for r in results],
  }
  if _PEER.value:
    from benchmarks import torch_peer  # pylint: disable=g-import-not-at-top

    b = results[0]["batch"]
    summary["peer_train_img_s"] = torch_peer.train_images_per_s(b, _STEPS.value, threads)
    summary["peer_eval_img_s"] = torch_peer.eval_images_per_s(b, _STEPS.value, threads)
    print(
      f"\nPyTorch peer (eager, {threads} threads, batch {b}): train "
      f"{summary['peer_train_img_s']:.1f} img/s, eval {summary['peer_eval_img_s']:.1f} "
      f"img/s; {_vs(summary, summary['peer_train_img_s'], summary['peer_eval_img_s'])}"
    )
    # The same peer in a fresh process: PyTorch as its users run it, with glibc's default
    # malloc (keep_host_memory above speeds the in-process peer up too).
    own = _peer_subprocess(b, _STEPS.value, threads, _PEER_COMPILE.value)
    summary.update({f"peer_own_process_{k}": v for k, v in own.items() if k.endswith("img_s")})
    print(
      f"PyTorch peer in its own process (default malloc): train "
      f"{own['train_img_s']:.1f} img/s, eval {own['eval_img_s']:.1f} img/s; "
      f"{_vs(summary, own['train_img_s'], own['eval_img_s'])}"
      + (
        f"; torch.compile train {own['compile_train_img_s']:.1f}, eval "
        f"{own['compile_eval_img_s']:.1f}"
        if "compile_train_img_s" in own
        else ""
      )
    )
    if _PEER_COMPILE.value:
      summary["peer_compile_train_img_s"] = torch_peer.train_images_per_s(
        b, _STEPS.value, threads, compile=True
      )
      summary["peer_compile_eval_img_s"] = torch_peer.eval_images_per_s(
        b, _STEPS.value, threads, compile=True
      )
      print(
        f"PyTorch peer (torch.compile): train {summary['peer_compile_train_img_s']:.1f} "
        f"img/s, eval {summary['peer_compile_eval_img_s']:.1f} img/s; "
        + _vs(summary, summary["peer_compile_train_img_s"], summary["peer_compile_eval_img_s"])
      )
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
