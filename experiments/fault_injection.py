"""Fault injection: SIGKILL a `:smoke` run at random moments, resume it, compare; or
damage its checkpoint files and check that no resume uses the damaged data (--corrupt).

  python -m experiments.fault_injection --n=5
  python -m experiments.fault_injection --n=3 --mock_examples=96   # TFDS mock data, no files
  python -m experiments.fault_injection --corrupt --trials=50
  python -m experiments.fault_injection --guards --n=9
  python -m experiments.fault_injection --corrupt --trials=50 --mock_examples=48 \
      --override=--config.dataset=mnist --override=--config.train_examples=32

Runs one uninterrupted reference run, then N runs that are each killed with SIGKILL at
a random moment of their training phase (mid-step, mid-epoch, mid-save, or after the
end) and rerun with the same command until they finish. The final parameters of every
resumed run must be bit-identical (CPU) to the reference, and its epochs.csv rows equal
but for their timings. Prints
"N resumes, 0 divergences"; exits 1 on any divergence.

--corrupt trains one reference run of the config (or takes a finished one,
--workdir), then in each of N trials XORs 1 to 5 random bytes of one random checkpoint
file (array data, tree metadata, the meta JSON, manifests) in a copy, and restores the
copy as a resumed run does (`Checkpointer.restore_latest`). It prints "N trials, 0
silent resumes from corrupt data" with the count of each outcome (unaffected, detected
and fell back to an earlier step, refused, other errors); it exits 1 on a silent resume
(restored arrays or meta that differ from those saved at that step, without a warning)
or a deleted step.

--guards runs N trials against one reference run, cycling through three kinds: a SIGTERM
after a random mid-epoch step (the resumed run must end with the reference's parameters
and epochs.csv rows), a change that cannot go on (another model shape or batch size, a
diverging learning rate: refused, the workdir unchanged, the original command resuming
it), and the reference's checkpoints beside another run's config.json of the same shapes
(refused in one line naming the field). It prints "N trials: ... as expected" and exits 1
on any failure.

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
import fnmatch
import json
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
  from capsjax.run import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
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
      arrays = {
        jax.tree_util.keystr(p): np.asarray(x.addressable_data(0))
        for p, x in leaves
        if hasattr(x, "addressable_data")
      }
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
# Driver helpers (also used by tests/train_resume_test.py and tests/main_distributed_test.py).
# ----------------------------------------------------------------------------------------
def child_env(*, devices: int | None = None, cache_dir: str | None = None, **hooks) -> dict:
  """Environment for a child: CPU, `devices` host devices, a shared compilation cache."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("CAPSJAX_TRACEBACK", None)
  if devices is not None:
    flags = [
      f
      for f in env.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env.pop("JAX_NUM_CPU_DEVICES", None)
  if cache_dir:  # Compiled programs are reused across the many short runs.
    env.update(
      JAX_COMPILATION_CACHE_DIR=cache_dir,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
  for k, v in hooks.items():
    env[f"CAPSJAX_{k.upper()}"] = str(v)
  return env


def child_cmd(config: str, workdir: str, *overrides: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "experiments.fault_injection",
    "child",
    f"--config={config}",
    f"--workdir={workdir}",
    *overrides,
  ]


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
def run(
  n: int,
  *,
  seed: int = 0,
  config: str = "configs/fashion.py:smoke",
  overrides: tuple[str, ...] = (),
  mock_examples: int = 0,
  root: str | None = None,
  verbose: bool = True,
) -> int:
  """Returns the number of divergences among `n` killed-and-resumed runs."""
  rng = random.Random(seed)
  root = root or tempfile.mkdtemp(prefix="capsjax_faults_")
  os.makedirs(root, exist_ok=True)
  cache = os.path.join(root, "jax_cache")
  hooks = {"mock_examples": mock_examples} if mock_examples else {}
  say = print if verbose else (lambda *a, **k: None)

  def launch(name, dump):
    env = child_env(devices=1, cache_dir=cache, dump_dir=dump, **hooks)
    return start(
      child_cmd(config, os.path.join(root, name), *overrides),
      env,
      os.path.join(root, f"{name}.log"),
    )

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
    ckpts = (
      sorted(os.listdir(os.path.join(root, name, "checkpoints")))
      if os.path.isdir(os.path.join(root, name, "checkpoints"))
      else []
    )
    rc = launch(name, dump).wait()
    if rc != 0:
      raise RuntimeError(f"resumed run {i} exited with {rc}; see {root}/{name}.log")
    problem = diverges(final_params(dump), reference) or (
      "epochs.csv rows differ"
      if epoch_rows(os.path.join(root, name)) != epoch_rows(os.path.join(root, "ref"))
      else None
    )
    divergences += problem is not None
    say(
      f"run {i}: {what}; on disk then: {ckpts}; resumed -> "
      f"{'DIVERGED: ' + problem if problem else 'identical'}"
    )
  print(f"{n} resumes, {divergences} divergences", flush=True)
  return divergences


# ----------------------------------------------------------------------------------------
# Workdir guards (--guards): a SIGTERM mid-epoch, a refused change, another run's checkpoints.
# ----------------------------------------------------------------------------------------
# epochs.csv columns that time the run; every other column of a resumed run must match.
TIMING_COLUMNS = ("seconds", "images_per_s", "wall_s")


def epoch_rows(workdir: str) -> list[dict]:
  """The rows of `workdir/epochs.csv` without their timing columns."""
  import csv  # pylint: disable=g-import-not-at-top

  with open(os.path.join(workdir, "epochs.csv"), newline="") as f:
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(f)]


def _snapshot(workdir: str) -> tuple[bytes, list[str], list[str]]:
  """config.json's bytes, the config.json.previous-* names and the checkpoint steps."""
  with open(os.path.join(workdir, "config.json"), "rb") as f:
    config_bytes = f.read()
  kept = sorted(n for n in os.listdir(workdir) if n.startswith("config.json.previous-"))
  return config_bytes, kept, sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def guard_trials(
  n: int,
  *,
  seed: int = 0,
  config: str = "configs/fashion.py:smoke",
  overrides: tuple[str, ...] = (),
  mock_examples: int = 0,
  root: str | None = None,
  verbose: bool = True,
) -> dict[str, list[int]]:
  """`--guards`: `n` trials, cycling through three kinds, against one reference run.

  sigterm  SIGTERM after a random mid-epoch step, rerun: the final parameters and every
           epochs.csv row but its timings must equal the reference's.
  refused  a copy of the reference rerun with a change that cannot go on (another model
           shape, another batch size, a learning rate that diverges): the run must fail
           and leave config.json and the checkpoints as they were, and the original
           command must then resume it.
  foreign  the reference's checkpoints beside a config.json that differs in a field of
           the same shapes (routing iterations, seed, learning rate): the run must be
           refused with one line naming the field, and change nothing.

  Returns {kind: [passed, trials]}.
  """
  rng = random.Random(seed)
  root = root or tempfile.mkdtemp(prefix="capsjax_guards_")
  os.makedirs(root, exist_ok=True)
  hooks = {"mock_examples": mock_examples} if mock_examples else {}
  say = print if verbose else (lambda *a, **k: None)

  def launch(name, *extra, **more_hooks):
    env = child_env(devices=1, cache_dir=os.path.join(root, "jax_cache"), **hooks, **more_hooks)
    log = os.path.join(root, f"{name}.log")
    return start(child_cmd(config, os.path.join(root, name), *overrides, *extra), env, log)

  def log_tail(name) -> str:
    with open(os.path.join(root, f"{name}.log"), errors="replace") as f:
      return f.read()[-2000:]

  ref_dump = os.path.join(root, "ref_params")
  if launch("ref", dump_dir=ref_dump).wait() != 0:
    raise RuntimeError(f"reference run failed; see {root}/ref.log")
  ref_dir = os.path.join(root, "ref")
  reference, ref_rows = final_params(ref_dump), epoch_rows(ref_dir)
  with open(os.path.join(ref_dir, "config.json")) as f:
    saved = json.load(f)
  spe, epochs = int(ref_rows[0]["train_steps"]), int(saved["num_epochs"])
  total = spe * epochs
  results = {"sigterm": [0, 0], "refused": [0, 0], "foreign": [0, 0]}
  for i in range(n):
    kind, name = ("sigterm", "refused", "foreign")[i % 3], f"trial{i}"
    wdir = os.path.join(root, name)
    if kind == "sigterm":
      step = rng.choice([s for s in range(1, total) if s % spe])
      marker, dump = os.path.join(root, f"{name}.marker"), os.path.join(root, f"{name}_params")
      proc = launch(name, dump_dir=dump, hold_at_step=step, marker=marker)
      if not wait_for(marker, proc):
        raise RuntimeError(f"trial {i} ended before step {step}:\n{log_tail(name)}")
      proc.send_signal(signal.SIGTERM)
      rc = proc.wait()
      rc2 = launch(name, dump_dir=dump).wait()
      problem = (
        f"exit codes {rc}, {rc2} (expected 75, 0)"
        if (rc, rc2) != (75, 0)
        else diverges(final_params(dump), reference)
        or ("epochs.csv rows differ" if epoch_rows(wdir) != ref_rows else None)
      )
      what = f"SIGTERM after step {step} (epoch {step / spe:.2f}), resumed"
    elif kind == "refused":
      shutil.copytree(ref_dir, wdir)
      field, value = rng.choice(
        [
          ("model.conv1_channels", int(saved["model"]["conv1_channels"]) * 2),
          ("batch_size", int(saved["batch_size"]) * 2),
          ("optim.learning_rate", 1e30),
        ]
      )
      before = _snapshot(wdir)
      rc = launch(
        name,
        f"--config.{field}={value}",
        f"--config.resume_with_changes={field}",
        f"--config.num_epochs={epochs + 1}",
      ).wait()
      after = _snapshot(wdir)
      rc2 = launch(name, f"--config.num_epochs={epochs + 1}").wait()
      problem = (
        f"the change was not refused (exit code {rc})"
        if rc == 0
        else "config.json or the checkpoints changed"
        if after != before
        else f"the original command then failed (exit code {rc2})"
        if rc2 != 0
        else None
      )
      what = f"--config.{field}={value} refused (exit {rc}), original command resumed"
    else:
      shutil.copytree(ref_dir, wdir)
      field, value = rng.choice(
        [
          ("model.routing_iterations", int(saved["model"]["routing_iterations"]) + 1),
          ("seed", int(saved["seed"]) + 1),
          ("optim.learning_rate", float(saved["optim"]["learning_rate"]) * 2),
        ]
      )
      other = json.loads(json.dumps(saved))
      node = other
      *parents, leaf = field.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
      with open(os.path.join(wdir, "config.json"), "w") as f:
        json.dump(other, f, indent=2, sort_keys=True)  # as capsjax writes it.
      before = _snapshot(wdir)
      rc = launch(name, f"--config.{field}={value}").wait()
      lines = [ln for ln in log_tail(name).splitlines() if ln.startswith("capsjax: error:")]
      problem = (
        f"resumed silently (exit code {rc})"
        if rc == 0
        else f"not one error line naming {field}: {lines}"
        if len(lines) != 1 or field not in lines[0]
        else "the workdir changed"
        if _snapshot(wdir) != before
        else None
      )
      what = f"checkpoints beside a config.json with {field}={value} refused"
    results[kind][1] += 1
    results[kind][0] += problem is None
    say(f"trial {i} ({kind}): {what}: {'FAILED: ' + problem if problem else 'ok'}")
  summary = ", ".join(f"{k} {ok}/{t}" for k, (ok, t) in results.items() if t)
  print(f"{n} trials: {summary} as expected", flush=True)
  return results


# ----------------------------------------------------------------------------------------
# Corruption trials (--corrupt).
# ----------------------------------------------------------------------------------------
def flip_bytes(path: str, rng: random.Random, count: int) -> list[int]:
  """XORs `count` random bytes of the file at `path` with random non-zero masks."""
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    if not data:
      return []
    offsets = sorted(rng.randrange(len(data)) for _ in range(count))
    for o in offsets:
      data[o] ^= rng.randrange(1, 256)
    f.seek(0)
    f.write(data)
  return offsets


def _checkpoint_files(workdir: str) -> list[str]:
  ckpt_dir = os.path.join(workdir, "checkpoints")
  return sorted(
    os.path.join(r, n)
    for r, _, names in os.walk(ckpt_dir)
    for n in names
    if n != "commit_success.txt" and os.path.getsize(os.path.join(r, n))
  )


def _step_dirs(workdir: str) -> list[str]:
  """'checkpoints/8', 'checkpoints-unreadable/8', ...: every step directory, wherever."""
  out = []
  for sub in ("checkpoints", "checkpoints-unreadable"):
    d = os.path.join(workdir, sub)
    if os.path.isdir(d):
      out += [f"{sub}/{n}" for n in os.listdir(d) if n.split("-")[0].isdigit()]
  return sorted(out)


class _Warnings:
  """Collects the WARNING records of absl logging while it is active."""

  def __enter__(self):
    import logging as std_logging  # pylint: disable=g-import-not-at-top

    self.records = []
    self._handler = std_logging.Handler(level=std_logging.WARNING)
    self._handler.emit = lambda r: self.records.append(r.getMessage())
    self._logger = std_logging.getLogger("absl")
    self._logger.addHandler(self._handler)
    return self

  def __exit__(self, *exc):
    self._logger.removeHandler(self._handler)


def corrupt_trials(
  workdir: str,
  trials: int,
  *,
  seed: int = 0,
  root: str | None = None,
  files: str = "*",
  verbose: bool = True,
) -> dict[str, int]:
  """Damages copies of a finished run's checkpoints and restores them as a resume does.

  Each trial copies `workdir`, XORs 1 to 5 random bytes of one random checkpoint file
  (array data, tree metadata, the meta JSON, manifests: every non-empty file of every
  step) and calls `Checkpointer.restore_latest`, which training and `mode=eval` use. The
  restored state and meta are compared with those saved at the step it reports.

  Outcomes: 'unaffected' (restored and identical: the bytes were not read, or not from
  the newest step), 'fell_back' (a warning, then an identical earlier step), 'refused'
  (CheckpointReadError: no readable step left), 'silent' (restored, different from what
  was saved at that step: the failure this guards against), 'crash' (any other
  exception), 'deleted' (a step directory vanished instead of being set aside).

  Args:
    workdir: a finished run (with its config.json), left untouched.
    trials: how many damaged copies to restore.
    seed: of the file and byte choices.
    root: where the copies go (each is removed after its trial).
    files: only damage files whose path under `workdir` matches this glob.
    verbose: print one line per trial.

  Returns:
    {outcome: count}.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  from capsjax.run import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from capsjax import errors  # pylint: disable=g-import-not-at-top
  from capsjax import setup  # pylint: disable=g-import-not-at-top

  rng = random.Random(seed)
  say = print if verbose else (lambda *a, **k: None)
  with open(os.path.join(workdir, "config.json")) as f:
    config = config_dict.ConfigDict(json.load(f))
  clean = ckpt_lib.Checkpointer(workdir, read_only=True)
  with clean:
    steps = clean.all_steps()
    meta = clean.read_meta(steps[-1])
    target = setup.build(config, meta["steps_per_epoch"]).state
    saved = {}
    for step in steps:
      state, step_meta = clean.restore(step, target)
      saved[step] = (jax.device_get(state), step_meta)
  root = root or tempfile.mkdtemp(prefix="capsjax_corrupt_")
  files = [
    n
    for n in (os.path.relpath(p, workdir) for p in _checkpoint_files(workdir))
    if fnmatch.fnmatch(n, files)
  ]
  counts = {k: 0 for k in ("unaffected", "fell_back", "refused", "silent", "crash", "deleted")}
  for i in range(trials):
    copy = os.path.join(root, f"trial{i}")
    shutil.copytree(workdir, copy)
    name = rng.choice(files)
    offsets = flip_bytes(os.path.join(copy, name), rng, rng.randint(1, 5))
    before = len(_step_dirs(copy))
    with _Warnings() as warned:
      try:
        with ckpt_lib.Checkpointer(copy) as ckpt:
          state, step_meta, step = ckpt.restore_latest(target)
        state = jax.device_get(state)
        ref_state, ref_meta = saved[step]
        same = step_meta == ref_meta and all(
          np.array_equal(np.asarray(a), np.asarray(b))
          for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=False)
        )
        outcome = "silent" if not same else "fell_back" if step != steps[-1] else "unaffected"
        detail = f"restored step {step}"
      except errors.CheckpointReadError as e:
        outcome, detail = "refused", str(e)[:120]
      except Exception as e:  # pylint: disable=broad-except
        outcome, detail = "crash", f"{type(e).__name__}: {str(e)[:120]}"
    if outcome == "fell_back" and not warned.records:
      outcome = "silent"  # an earlier step, without saying so.
    if outcome != "silent" and len(_step_dirs(copy)) != before:
      outcome = "deleted"
    counts[outcome] += 1
    say(
      f"trial {i}: {name} bytes {offsets} -> {outcome} ({detail}; {len(warned.records)} warning(s))"
    )
    shutil.rmtree(copy, ignore_errors=True)
  print(
    f"{trials} trials, {counts['silent']} silent resumes from corrupt data "
    f"(unaffected {counts['unaffected']}, detected and fell back {counts['fell_back']}, "
    f"refused {counts['refused']}, other errors {counts['crash']}, "
    f"deleted {counts['deleted']})",
    flush=True,
  )
  return counts


def run_corrupt(
  trials: int,
  *,
  seed: int = 0,
  config: str = "configs/fashion.py:smoke",
  overrides: tuple[str, ...] = (),
  mock_examples: int = 0,
  root: str | None = None,
  workdir: str | None = None,
  files: str = "*",
  verbose: bool = True,
) -> dict[str, int]:
  """`--corrupt`: trains a reference run (unless `workdir` is given), then corrupt_trials."""
  root = root or tempfile.mkdtemp(prefix="capsjax_corrupt_")
  os.makedirs(root, exist_ok=True)
  if workdir is None:
    workdir = os.path.join(root, "ref")
    env = child_env(
      devices=1,
      cache_dir=os.path.join(root, "jax_cache"),
      **({"mock_examples": mock_examples} if mock_examples else {}),
    )
    if (
      start(child_cmd(config, workdir, *overrides), env, os.path.join(root, "ref.log")).wait() != 0
    ):
      raise RuntimeError(f"reference run failed; see {root}/ref.log")
  data = contextlib.nullcontext()
  if mock_examples:  # the target is built from the dataset's info, as in the run.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    data = tfds.testing.mock_data(
      num_examples=mock_examples, policy=tfds.testing.MockPolicy.USE_CODE
    )
  with data:
    return corrupt_trials(
      workdir, trials, seed=seed, root=os.path.join(root, "trials"), files=files, verbose=verbose
    )


def main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--n", type=int, default=3, help="number of random kill points")
  p.add_argument(
    "--corrupt",
    action="store_true",
    help="flip random bytes in random checkpoint files instead of killing runs",
  )
  p.add_argument(
    "--guards",
    action="store_true",
    help="SIGTERM mid-epoch, refused changes and another run's checkpoints (--n trials)",
  )
  p.add_argument("--trials", type=int, default=20, help="--corrupt: number of trials")
  p.add_argument(
    "--files",
    default="*",
    help="--corrupt: damage only files matching this glob, e.g. "
    "'checkpoints/*/state/ocdbt.process_0/d/*' (the arrays)",
  )
  p.add_argument(
    "--workdir",
    default=None,
    help="--corrupt: a finished run to damage copies of (default: train one)",
  )
  p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
  p.add_argument("--config", default="configs/fashion.py:smoke")
  p.add_argument(
    "--mock_examples",
    type=int,
    default=0,
    help="> 0: TFDS mock data with this many examples (pass --override=--config.dataset=mnist)",
  )
  p.add_argument(
    "--override",
    action="append",
    default=[],
    help="extra capsjax.main flag, e.g. --override=--config.num_epochs=3",
  )
  p.add_argument("--root", default=None, help="where runs go (default: a new temp dir)")
  p.add_argument("--keep", action="store_true", help="keep the run directories")
  args = p.parse_args(argv)
  root = args.root or tempfile.mkdtemp(prefix="capsjax_faults_")
  try:
    if args.corrupt:
      counts = run_corrupt(
        args.trials,
        seed=args.seed,
        config=args.config,
        overrides=tuple(args.override),
        mock_examples=args.mock_examples,
        root=root,
        workdir=args.workdir,
        files=args.files,
      )
      bad = counts["silent"] + counts["deleted"]
    elif args.guards:
      results = guard_trials(
        args.n,
        seed=args.seed,
        config=args.config,
        overrides=tuple(args.override),
        mock_examples=args.mock_examples,
        root=root,
      )
      bad = sum(t - ok for ok, t in results.values())
    else:
      bad = run(
        args.n,
        seed=args.seed,
        config=args.config,
        overrides=tuple(args.override),
        mock_examples=args.mock_examples,
        root=root,
      )
  finally:
    if not args.keep and not args.root:
      shutil.rmtree(root, ignore_errors=True)
  sys.exit(1 if bad else 0)


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "child":
    child_main([sys.argv[0]] + sys.argv[2:])
  else:
    main()
