"""Command-line entry point: train or evaluate CapsNet.

  python -m capsjax.main --config=configs/fashion.py --workdir=/tmp/caps_fmnist
  python -m capsjax.main --config=configs/fashion.py:quick --workdir=/tmp/caps_quick
  python -m capsjax.main --config=configs/fashion.py --workdir=... \
      --config.model.routing_iterations=1
  python -m capsjax.main --config=configs/fashion.py --workdir=... --config.mode=eval
  python -m capsjax.main --config=configs/capsnet_fashion_mnist.py --workdir=... \
      --config.seeds=0,1,2

Rerunning the same command resumes from the latest checkpoint in --workdir.

Multi-process (one process per GPU, or per host): `jax.distributed.initialize()` runs
when --distributed=on, when --coordinator_address/--num_processes/--process_id are
given, or (--distributed=auto, the default) under a SLURM step with more than one task,
where JAX reads the coordinator, process count and id from SLURM's environment.
  python -m capsjax.main ... --coordinator_address=host0:12345 --num_processes=2 --process_id=0

Exit codes:
  0   finished
  1   a bug (Python traceback)
  2   a user error (bad flag/config value, missing data, wrong checkpoint, non-finite
      loss, disk full, workdir in use): one line `capsjax: error: ...` on stderr, on a
      line of its own (`grep '^capsjax: error'` finds it in a log)
  75  preempted: SIGTERM/SIGINT received, a checkpoint was saved at the next step
      boundary (or, for a step still running 120 s later, nothing was saved); rerun the
      same command to resume (EX_TEMPFAIL; see experiments/slurm/)
  130 SIGINT (Ctrl-C) outside the training loop (start-up, data, model set-up,
      evaluation), or a second Ctrl-C during training: stopped at once without saving
  143 SIGTERM outside the training loop: stopped at once, nothing new to save
  Rerun the same command after 75, 130 or 143: it resumes from the last complete
  checkpoint, if any.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and plots.")
config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file, e.g. configs/fashion.py or configs/fashion.py:quick.",
  lock_config=True,
)
flags.mark_flags_as_required(["config", "workdir"])
_DISTRIBUTED = flags.DEFINE_enum(
  "distributed",
  "auto",
  ["auto", "on", "off"],
  "Call jax.distributed.initialize(): 'auto' = when the flags below are given or under a "
  "multi-task SLURM step (JAX then reads SLURM_* variables); 'on' = always (JAX "
  "auto-detects SLURM/Open MPI/cloud TPU settings the flags leave unset); 'off' = never.",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  None,
  "host:port of process 0's coordinator service (also JAX_COORDINATOR_ADDRESS).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "Total number of processes.", lower_bound=1
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "This process's index, 0-based.", lower_bound=0
)


class _QuietLibraries:
  """Drops INFO records of Orbax/TFDS/JAX internals (dozens per checkpoint save).

  Warnings and errors still pass; `--verbosity=1` shows everything.
  """

  _NOISY = ("/orbax/", "/tensorflow_datasets/", "/jax/", "/etils/")

  def filter(self, record) -> bool:
    return (
      record.levelno >= 30
      or flags.FLAGS.verbosity >= 1
      or not any(p in record.pathname for p in self._NOISY)
    )


def _slurm_tasks() -> int:
  return int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")))


def _maybe_init_distributed(jax) -> None:
  """Starts JAX's distributed runtime; must run before any JAX computation."""
  explicit = (
    _COORDINATOR.value is not None
    or _NUM_PROCESSES.value is not None
    or _PROCESS_ID.value is not None
  )
  mode = _DISTRIBUTED.value
  if mode == "off" or (
    mode == "auto"
    and not explicit
    and _slurm_tasks() <= 1
    and "JAX_COORDINATOR_ADDRESS" not in os.environ
  ):
    return
  # Cross-process collectives on CPU hosts (tests, CPU clusters); GPUs use NCCL.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  except (ValueError, RuntimeError) as e:
    from capsjax import errors  # pylint: disable=g-import-not-at-top

    raise errors.DistributedInitError(
      f"jax.distributed.initialize(coordinator_address={_COORDINATOR.value!r}, "
      f"num_processes={_NUM_PROCESSES.value}, process_id={_PROCESS_ID.value}) failed: "
      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
    ) from e
  logging.info(
    "jax.distributed: process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def _parse_flags(argv):
  """The process's start: signals handled, then flags parsed, mistakes as one line.

  Signals come first so that a Ctrl-C or SIGTERM at any later moment (imports, model
  set-up, the first compile) ends the process cleanly (see `capsjax.run.processes`).
  """
  from capsjax import errors  # pylint: disable=g-import-not-at-top
  from capsjax.run import processes  # pylint: disable=g-import-not-at-top

  processes.handle_signals()
  return errors.parse_flags(argv)


def main(argv):
  # Imported here: flag errors are reported before JAX backends start (a config file
  # that imports capsjax.losses imports jax, but starts no backend).
  from capsjax import errors  # pylint: disable=g-import-not-at-top

  # User mistakes (capsjax.errors) end with one line naming the problem; anything else
  # (a bug in capsjax, JAX or NumPy, an XLA runtime failure) keeps its traceback.
  with errors.exit_on_user_error():
    if len(argv) > 1:
      raise errors.ConfigError(
        f"unexpected command-line arguments {argv[1:]}; capsjax.main "
        "takes only flags, e.g. --config=FILE --workdir=DIR"
      )
    _run()


def _run():
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import jax  # pylint: disable=g-import-not-at-top
  from capsjax import errors  # pylint: disable=g-import-not-at-top
  from capsjax.run import cpu_runtime  # pylint: disable=g-import-not-at-top
  from capsjax.run import processes  # pylint: disable=g-import-not-at-top

  config = flags.FLAGS.config
  cpu_runtime.configure_cpu_runtime()  # before JAX starts its backends.
  try:
    _maybe_init_distributed(jax)
    logging.info("config:\n%s", config)
    logging.info(
      "JAX %s, backend %s, devices: %s", jax.__version__, jax.default_backend(), jax.devices()
    )
    run(config, _WORKDIR.value)
  except processes.Preempted as e:
    errors.print_fresh_line(f"capsjax: {e}")
    sys.exit(processes.PREEMPTED_EXIT_CODE)


def run(config, workdir: str):
  """Trains (`config.mode='train'`; with `config.seeds`, one member per seed) or evaluates
  checkpoints ('eval'); returns the summary or the test metrics. Each validates the whole
  config before touching `workdir`."""
  # Imported here: a flag error is reported before JAX backends start.
  from capsjax import errors  # pylint: disable=g-import-not-at-top
  from capsjax import evaluate  # pylint: disable=g-import-not-at-top
  from capsjax import train  # pylint: disable=g-import-not-at-top
  from capsjax import train_ensemble  # pylint: disable=g-import-not-at-top

  if config.seeds and config.mode == "eval":  # each member's checkpoint, as a run's.
    if config.init_from:
      raise errors.ConfigError(
        "config.init_from names one checkpoint; with config.seeds, mode=eval evaluates each "
        "member's own: leave init_from empty, or drop seeds to evaluate init_from"
      )
    return [
      evaluate.evaluate_checkpoint(c, os.path.join(workdir, train_ensemble.member_name(c.seed)))
      for c in train_ensemble.member_configs(config)
    ]
  if config.mode == "eval":
    return evaluate.evaluate_checkpoint(config, workdir)
  if config.seeds:
    return train_ensemble.train_seeds(config, workdir)
  return train.train_and_evaluate(config, workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
