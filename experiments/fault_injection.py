"""Fault injection: SIGKILL a `:smoke` run at random moments, resume it, compare.

  python -m experiments.fault_injection --n=5
  python -m experiments.fault_injection --n=3 --mock_examples=96   # TFDS mock data, no files

Runs one uninterrupted reference run, then N runs that are each killed with SIGKILL at
a random moment of their training phase (mid-step, mid-epoch, mid-save, or after the
end) and rerun with the same command until they finish. The final parameters of every
resumed run must be bit-identical (CPU) to the reference. Prints
"N resumes, 0 divergences"; exits 1 on any divergence.

The module is also the test harness's child process:
  python -m experiments.fault_injection child <capsjax.main flags>
runs `capsjax.main` with optional hooks set through environment variables (test
plumbing only; capsjax itself has no hooks):
  CAPSJAX_MOCK_EXAMPLES=n    run under `tfds.testing.mock_data(num_examples=n)` (use 'mnist')
  CAPSJAX_DUMP_DIR=dir       after every checkpoint save, write this process's copy of the
                             parameters to dir/step_<step>.p<process>.npz
  CAPSJAX_HOLD_AFTER_SAVE=k  once the checkpoint of a step >= k is complete, touch
                             CAPSJAX_MARKER and hang (to be killed)
  CAPSJAX_HOLD_IN_SAVE=k     hang inside the save of step >= k, before Orbax renames the
                             temporary directory (an async save in flight)
  CAPSJAX_HOLD_AT_STEP=k     after train step k, touch CAPSJAX_MARKER and wait (up to 60 s)
                             for SIGTERM/SIGINT before finishing the step (with
                             config.loop='scan': before finishing the chunk holding step k)
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------
# Child: capsjax.main with test hooks.
# ----------------------------------------------------------------------------------------
def _touch(path):
  if path:
    with open(path, "w") as f:
      f.write(str(os.getpid()))


def _install_hooks():
  import jax  # pylint: disable=g-import-not-at-top
  from capsjax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from capsjax import steps as steps_lib  # pylint: disable=g-import-not-at-top

  env = os.environ
  marker = env.get("CAPSJAX_MARKER")
  dump_dir = env.get("CAPSJAX_DUMP_DIR")
  hold_after = int(env.get("CAPSJAX_HOLD_AFTER_SAVE", "0") or 0)
  hold_in = int(env.get("CAPSJAX_HOLD_IN_SAVE", "0") or 0)
  hold_step = int(env.get("CAPSJAX_HOLD_AT_STEP", "0") or 0)

  orig_save = ckpt_lib.Checkpointer.save

  def save(self, step, state, meta, metrics=None):
    if dump_dir:
      os.makedirs(dump_dir, exist_ok=True)
      leaves = jax.tree_util.tree_flatten_with_path(state)[0]
      arrays = {jax.tree_util.keystr(p): np.asarray(x.addressable_data(0))
                for p, x in leaves if hasattr(x, "addressable_data")}
      np.savez(os.path.join(dump_dir, f"step_{step}.p{jax.process_index()}.npz"), **arrays)
    out = orig_save(self, step, state, meta, metrics)
    if hold_after and step >= hold_after:
      self.wait()
      _touch(marker)
      time.sleep(3600)
    return out

  ckpt_lib.Checkpointer.save = save

  if hold_in:
    import asyncio  # pylint: disable=g-import-not-at-top
    from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
    orig_finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self):
      name = self._final_path.name  # pylint: disable=protected-access
      if name.isdigit() and int(name) >= hold_in:
        _touch(marker)
        await asyncio.sleep(3600)
      return await orig_finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize

  if hold_step:
    orig_make_steps = steps_lib.make_steps
    orig_make_train_chunk = steps_lib.make_train_chunk

    def hold():
      _touch(marker)
      handler = signal.getsignal(signal.SIGTERM)
      for _ in range(600):
        if getattr(getattr(handler, "__self__", None), "signal", None) is not None:
          break
        time.sleep(0.1)

    def make_steps(*args, **kwargs):
      train_fn, eval_fn = orig_make_steps(*args, **kwargs)
      calls = [0]

      def train_hooked(state, batch, key):
        out = train_fn(state, batch, key)
        calls[0] += 1
        if calls[0] == hold_step:
          hold()
        return out

      return train_hooked, eval_fn

    def make_train_chunk(*args, **kwargs):
      chunk_fn = orig_make_train_chunk(*args, **kwargs)
      steps_run = [0]

      def chunk_hooked(state, data, indices, start, num_steps, key):
        out = chunk_fn(state, data, indices, start, num_steps, key)
        steps_run[0] += int(num_steps)
        if steps_run[0] - int(num_steps) < hold_step <= steps_run[0]:
          hold()
        return out

      return chunk_hooked

    steps_lib.make_steps = make_steps
    steps_lib.make_train_chunk = make_train_chunk


def child_main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from capsjax import main as main_lib  # pylint: disable=g-import-not-at-top
  _install_hooks()
  n = int(os.environ.get("CAPSJAX_MOCK_EXAMPLES", "0") or 0)
  data = contextlib.nullcontext()
  if n:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    data = tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE)
  with data:
    app.run(main_lib.main, argv=argv, flags_parser=main_lib._parse_flags)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------------------
# Driver helpers (also used by tests/reliability_test.py and tests/distributed_test.py).
# ----------------------------------------------------------------------------------------
def child_env(*, devices: int | None = None, cache_dir: str | None = None, **hooks) -> dict:
  """Environment for a child: CPU, `devices` host devices, a shared compilation cache."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("CAPSJAX_TRACEBACK", None)
  if devices is not None:
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env.pop("JAX_NUM_CPU_DEVICES", None)
  if cache_dir:  # Compiled programs are reused across the many short runs.
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  for k, v in hooks.items():
    env[f"CAPSJAX_{k.upper()}"] = str(v)
  return env


def child_cmd(config: str, workdir: str, *overrides: str) -> list[str]:
  return [sys.executable, "-m", "experiments.fault_injection", "child", f"--config={config}",
          f"--workdir={workdir}", *overrides]


def start(cmd, env, log_path):
  log = open(log_path, "ab")
  return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def wait_for(path: str, proc, timeout: float = 300.0) -> bool:
  """Waits until `path` exists; False if `proc` ended first."""
  t0 = time.time()
  while not os.path.exists(path):
    if proc.poll() is not None:
      return False
    if time.time() - t0 > timeout:
      raise TimeoutError(f"{path} did not appear within {timeout:.0f} s")
    time.sleep(0.05)
  return True


def final_params(dump_dir: str, process: int = 0) -> dict[str, np.ndarray]:
  """The parameters of the highest-step dump in `dump_dir`."""
  names = [n for n in os.listdir(dump_dir) if n.endswith(f".p{process}.npz")]
  last = max(names, key=lambda n: int(n.split("_")[1].split(".")[0]))
  with np.load(os.path.join(dump_dir, last)) as f:
    return {k: f[k] for k in f.files}


def diverges(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> str | None:
  if sorted(a) != sorted(b):
    return f"different parameter names: {sorted(set(a) ^ set(b))[:3]}"
  for k in a:
    if a[k].shape != b[k].shape or not np.array_equal(a[k], b[k]):
      return f"{k} differs (max |diff| {np.max(np.abs(a[k] - b[k])):.3g})"
  return None


# ----------------------------------------------------------------------------------------
# The experiment.
# ----------------------------------------------------------------------------------------
def run(n: int, *, seed: int = 0, config: str = "configs/fashion.py:smoke",
        overrides: tuple[str, ...] = (), mock_examples: int = 0, root: str | None = None,
        verbose: bool = True) -> int:
  """Returns the number of divergences among `n` killed-and-resumed runs."""
  rng = random.Random(seed)
  root = root or tempfile.mkdtemp(prefix="capsjax_faults_")
  os.makedirs(root, exist_ok=True)
  cache = os.path.join(root, "jax_cache")
  hooks = {"mock_examples": mock_examples} if mock_examples else {}
  say = print if verbose else (lambda *a, **k: None)

  def launch(name, dump):
    env = child_env(devices=1, cache_dir=cache, dump_dir=dump, **hooks)
    return start(child_cmd(config, os.path.join(root, name), *overrides), env,
                 os.path.join(root, f"{name}.log"))

  ref_dump = os.path.join(root, "ref_params")
  proc = launch("ref", ref_dump)
  # The training phase starts when the run opens its metrics.csv (after start-up).
  wait_for(os.path.join(root, "ref", "metrics.csv"), proc)
  t0 = time.time()
  if proc.wait() != 0:
    raise RuntimeError(f"reference run failed; see {root}/ref.log")
  # Later runs reuse the compiled programs, so their training phase is shorter.
  duration = 0.7 * (time.time() - t0)
  reference = final_params(ref_dump)
  say(f"reference run: training phase {duration / 0.7:.1f} s")
  divergences = 0
  for i in range(n):
    name, dump = f"run{i}", os.path.join(root, f"run{i}_params")
    proc = launch(name, dump)
    wait_for(os.path.join(root, name, "metrics.csv"), proc)
    delay = rng.uniform(0.0, duration)
    try:
      proc.wait(timeout=delay)
      what = "finished before the kill"
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      what = f"SIGKILL {delay:.2f} s into training"
    ckpts = sorted(os.listdir(os.path.join(root, name, "checkpoints"))) if os.path.isdir(
        os.path.join(root, name, "checkpoints")) else []
    rc = launch(name, dump).wait()
    if rc != 0:
      raise RuntimeError(f"resumed run {i} exited with {rc}; see {root}/{name}.log")
    problem = diverges(final_params(dump), reference)
    divergences += problem is not None
    say(f"run {i}: {what}; on disk then: {ckpts}; resumed -> "
        f"{'DIVERGED: ' + problem if problem else 'identical'}")
  print(f"{n} resumes, {divergences} divergences", flush=True)
  return divergences


def main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--n", type=int, default=3, help="number of random kill points")
  p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
  p.add_argument("--config", default="configs/fashion.py:smoke")
  p.add_argument("--mock_examples", type=int, default=0,
                 help="> 0: TFDS mock data with this many examples (pass "
                      "--override=--config.dataset=mnist)")
  p.add_argument("--override", action="append", default=[],
                 help="extra capsjax.main flag, e.g. --override=--config.num_epochs=3")
  p.add_argument("--root", default=None, help="where runs go (default: a new temp dir)")
  p.add_argument("--keep", action="store_true", help="keep the run directories")
  args = p.parse_args(argv)
  root = args.root or tempfile.mkdtemp(prefix="capsjax_faults_")
  try:
    bad = run(args.n, seed=args.seed, config=args.config, overrides=tuple(args.override),
              mock_examples=args.mock_examples, root=root)
  finally:
    if not args.keep and not args.root:
      shutil.rmtree(root, ignore_errors=True)
  sys.exit(1 if bad else 0)


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "child":
    child_main([sys.argv[0]] + sys.argv[2:])
  else:
    main()
