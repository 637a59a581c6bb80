"""Command-line entry point: train or evaluate CapsNet.

  python -m capsjax.main --config=configs/fashion.py --workdir=/tmp/caps_fmnist
  python -m capsjax.main --config=configs/fashion.py:quick --workdir=/tmp/caps_quick
  python -m capsjax.main --config=configs/fashion.py --workdir=... --config.model.routing_iterations=1
  python -m capsjax.main --config=configs/fashion.py --workdir=... --config.mode=eval

Rerunning the same command resumes from the latest checkpoint in --workdir.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and plots.")
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/fashion.py or configs/fashion.py:quick.",
    lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])

# User mistakes (a bad config value, missing data, a wrong checkpoint) end with one line
# naming the problem instead of a traceback.
_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, RuntimeError, FloatingPointError)


class _QuietLibraries:
  """Drops INFO records of Orbax/TFDS/JAX internals (dozens per checkpoint save).

  Warnings and errors still pass; `--verbosity=1` shows everything.
  """

  _NOISY = ("/orbax/", "/tensorflow_datasets/", "/jax/", "/etils/")

  def filter(self, record) -> bool:
    return (record.levelno >= 30 or flags.FLAGS.verbosity >= 1
            or not any(p in record.pathname for p in self._NOISY))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Imported here so that `--help` and flag errors do not pay for the JAX import.
  import jax  # pylint: disable=g-import-not-at-top
  from capsjax import train  # pylint: disable=g-import-not-at-top

  config = flags.FLAGS.config
  logging.info("config:\n%s", config)
  logging.info("JAX %s, backend %s, devices: %s", jax.__version__, jax.default_backend(),
               jax.devices())
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except train.Preempted as e:
    print(f"capsjax: {e}", file=sys.stderr, flush=True)
    sys.exit(train.PREEMPTED_EXIT_CODE)
  except _USER_ERRORS as e:
    if os.environ.get("CAPSJAX_TRACEBACK"):
      raise
    print(f"capsjax: error: {e}", file=sys.stderr, flush=True)
    logging.info("traceback (set CAPSJAX_TRACEBACK=1 to raise it)", exc_info=True)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
