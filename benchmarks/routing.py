r"""Routing throughput: jitted `capsjax.dynamic_routing` vs a vectorised NumPy baseline.

Shapes are the CapsNet DigitCaps layer: u_hat [B, 1152, 10, 16] float32 (1152 primary
capsules routed to 10 class capsules of 16D). For each iteration count the JAX function is
compiled once (compile time reported, not counted), then timed with `block_until_ready`;
throughput is B / median wall time over `--repeats` runs. The NumPy baseline is the
straightforward vectorised Procedure 1 (einsum + softmax over the parents axis).

Run from the repo root:

  python -m benchmarks.routing
  python -m benchmarks.routing --batch=32 --repeats=3 --iterations=1,3

Prints a table, then one JSON line (the last line) with all numbers.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time

import jax
import numpy as np

from capsjax.run import cpu_runtime
from capsjax.caps_ops import dynamic_routing

N_IN, N_OUT, D_OUT = 1152, 10, 16


def numpy_routing(u_hat: np.ndarray, num_iterations: int) -> np.ndarray:
  """Procedure 1 of Sabour et al. (2017) in plain vectorised NumPy.

  Args:
    u_hat: [B, N_in, N_out, D] predictions.
    num_iterations: r >= 1.

  Returns:
    v: [B, N_out, D] output capsules, dtype of `u_hat`.
  """
  b = np.zeros(u_hat.shape[:-1], u_hat.dtype)  # [B, N_in, N_out]
  for r in range(num_iterations):
    e = np.exp(b - b.max(axis=-1, keepdims=True))  # [B, N_in, N_out]
    c = e / e.sum(axis=-1, keepdims=True)  # softmax over parents
    s = np.einsum("bnm,bnmo->bmo", c, u_hat)  # [B, N_out, D]
    sq = np.sum(s * s, axis=-1, keepdims=True)  # [B, N_out, 1]
    v = s * (sq / (1.0 + sq) / np.sqrt(sq + 1e-7))  # [B, N_out, D]
    if r < num_iterations - 1:
      b = b + np.einsum("bnmo,bmo->bnm", u_hat, v)  # [B, N_in, N_out]
  return v


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run(batch: int, repeats: int, iterations: list[int], seed: int) -> dict:
  """Times both implementations; returns a JSON-serialisable dict."""
  rng = np.random.default_rng(seed)
  # Small predictions (|u_hat| ~ 0.05 per entry) as after a freshly initialised W.
  u_np = (0.05 * rng.standard_normal((batch, N_IN, N_OUT, D_OUT))).astype(np.float32)
  u_dev = jax.device_put(u_np)  # [B, N_in, N_out, D]
  u_dev.block_until_ready()
  rows = []
  for r in iterations:
    route = jax.jit(functools.partial(dynamic_routing, num_iterations=r))
    start = time.perf_counter()
    v_jax = route(u_dev).block_until_ready()  # compile + first run
    compile_s = time.perf_counter() - start
    jax_s = _median_seconds(lambda: route(u_dev).block_until_ready(), repeats)  # noqa: B023 (timed now)
    v_np = numpy_routing(u_np, r)  # warm-up + check
    numpy_s = _median_seconds(lambda: numpy_routing(u_np, r), repeats)  # noqa: B023 (timed now)
    rows.append(
      {
        "iterations": r,
        "jax_ms": 1e3 * jax_s,
        "numpy_ms": 1e3 * numpy_s,
        "jax_examples_per_s": batch / jax_s,
        "numpy_examples_per_s": batch / numpy_s,
        "speedup": numpy_s / jax_s,
        "jax_compile_s": compile_s,
        "max_abs_diff": float(np.max(np.abs(np.asarray(v_jax) - v_np))),
      }
    )
  return {
    "benchmark": "routing",
    "u_hat_shape": [batch, N_IN, N_OUT, D_OUT],
    "dtype": "float32",
    "repeats": repeats,
    "jax_version": jax.__version__,
    "numpy_version": np.__version__,
    "device": str(jax.devices()[0]),
    "device_kind": jax.devices()[0].device_kind,
    "cpu": platform.processor() or platform.machine(),
    "results": rows,
  }


def format_table(result: dict) -> str:
  header = (
    f"{'iters':>5} | {'JAX ms':>9} | {'JAX ex/s':>10} | {'NumPy ms':>9} | "
    f"{'NumPy ex/s':>10} | {'speedup':>7} | {'compile s':>9} | {'max|dv|':>8}"
  )
  lines = [
    f"dynamic_routing, u_hat {result['u_hat_shape']} {result['dtype']}, "
    f"median of {result['repeats']}, JAX {result['jax_version']} on "
    f"{result['device']} ({result['device_kind']}), NumPy {result['numpy_version']}",
    header,
    "-" * len(header),
  ]
  for row in result["results"]:
    lines.append(
      f"{row['iterations']:>5} | {row['jax_ms']:>9.2f} | {row['jax_examples_per_s']:>10.0f}"
      f" | {row['numpy_ms']:>9.2f} | {row['numpy_examples_per_s']:>10.0f}"
      f" | {row['speedup']:>6.1f}x | {row['jax_compile_s']:>9.2f}"
      f" | {row['max_abs_diff']:>8.1e}"
    )
  return "\n".join(lines)


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
  return value


def _iteration_list(text: str) -> list[int]:
  try:
    values = [int(x) for x in text.split(",") if x.strip()]
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from e
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"iterations must be ints >= 1, got {text!r}")
  return values


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=_positive_int, default=128, help="examples per call")
  parser.add_argument(
    "--repeats", type=_positive_int, default=5, help="timed runs per setting (median reported)"
  )
  parser.add_argument(
    "--iterations",
    type=_iteration_list,
    default=[1, 3, 5],
    help="comma-separated routing iteration counts",
  )
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  cpu_runtime.configure_cpu_runtime()  # as capsjax.main does, before JAX starts.
  result = run(args.batch, args.repeats, args.iterations, args.seed)
  print(format_table(result))
  print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  main()
