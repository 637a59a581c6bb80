r"""The reproduction table: every published figure a reference config targets, beside ours.

One row per reference config (`REFERENCES`): the source, its published test accuracy and
how that figure was chosen (from the config's `published` fields), our measured number
under the same protocol, and under capsjax's own (the epoch selected on a 5,000-image
validation split), each the mean over seeds of an `experiments.sweep` results.csv. A
cell without a run says "not run yet". The commands:

  python -m experiments.sweep --parallel --seeds=0,1,2 --workdir=runs/reproduction \
      --recipes=configs/mnist.py,configs/capsnet_fashion_mnist.py,configs/fashion.py,\
configs/kmnist.py,configs/kmnist.py:augment,configs/efficient_capsnet.py,\
configs/matrix_capsules_em.py --sweep=val_examples=0,5000
  python -m experiments.reproduction --results=runs/reproduction/results.csv

prints the table as Markdown (RESULTS.md opens with it). Several --results files merge;
a later file's row replaces an earlier one's.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Iterable, Mapping, Sequence

from absl import app
from absl import flags

from experiments import sweep


@dataclasses.dataclass(frozen=True)
class Reference:
  """A published row: the config that targets it and how its figure was chosen.

  protocol: which of our numbers compares with it: 'final' (the last epoch, mean over
    seeds), 'best_test' (the epoch with the best test accuracy: the reference kept the
    best-on-test checkpoint or reported the maximum over evaluations).
  """

  recipe: str
  dataset: str
  protocol: str


REFERENCES = (
  Reference("configs/mnist.py", "MNIST", "final"),
  Reference("configs/capsnet_fashion_mnist.py", "Fashion-MNIST", "best_test"),
  Reference("configs/fashion.py", "Fashion-MNIST", "final"),
  Reference("configs/kmnist.py", "K-MNIST", "best_test"),
  Reference("configs/kmnist.py:augment", "K-MNIST", "best_test"),
  Reference("configs/efficient_capsnet.py", "MNIST", "best_test"),
  Reference("configs/matrix_capsules_em.py", "MNIST", "best_test"),
)
# The sweep values of the reference's own protocol (all 60,000 training images, no
# validation split: the config's default or the sweep's val_examples=0) and of ours.
REFERENCE_VALUES = ("", "val_examples=0")
VALIDATION_VALUES = "val_examples=5000"


def read_results(paths: Iterable[str]) -> dict[tuple[str, str], dict]:
  """{(recipe name, sweep values): results.csv row} of the files, later files winning."""
  rows = {}
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"--results: no file {path!r} (an experiments.sweep results.csv)")
    with open(path, newline="") as f:
      for row in csv.DictReader(f):
        rows[(row["recipe"], row.get("values", ""))] = row
  return rows


def _number(value) -> float | None:
  try:
    x = float(value)
  except (TypeError, ValueError):
    return None
  return None if x != x else x  # NaN: no value


NOT_RUN = "not run yet (needs a GPU)"


def measured(row: Mapping[str, str] | None, column: str, protocol: str = "") -> str:
  """'93.12% ± 0.10 (3 seeds, <protocol>)' from a results.csv row's `<column>_mean` and
  `_std`, or NOT_RUN."""
  mean = _number(row.get(f"{column}_mean")) if row else None
  if mean is None:
    return NOT_RUN
  n = int(float(row.get("num_seeds") or 1))
  std = _number(row.get(f"{column}_std")) or 0.0
  spread = f" ± {100 * std:.2f}" if n > 1 else ""
  return f"{100 * mean:.2f}%{spread} ({n} seed{'s' if n > 1 else ''}{protocol})"


def table_rows(results: Mapping[tuple[str, str], dict]) -> list[dict[str, str]]:
  """One dict per reference: the Markdown table's cells."""
  out = []
  for ref in REFERENCES:
    config = sweep.load_recipe(ref.recipe)
    name = sweep.recipe_name(ref.recipe)
    own = next((results[(name, v)] for v in REFERENCE_VALUES if (name, v) in results), None)
    column = "final" if ref.protocol == "final" else "best_test"
    out.append(
      {
        "source": config.published.source,
        "dataset": ref.dataset,
        "config": f"`{ref.recipe}`",
        "published": f"{100 * config.published.test_accuracy:.2f}%",
        "published protocol": config.published.protocol,
        "ours, same protocol": measured(
          own, column, ", final epoch" if column == "final" else ", best epoch on test"
        ),
        "ours, selected on validation (55k train)": measured(
          results.get((name, VALIDATION_VALUES)), "selected"
        ),
      }
    )
  return out


def markdown(rows: Sequence[dict[str, str]]) -> str:
  """The rows as a Markdown table."""
  header = list(rows[0])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(r[h] for h in header) + " |" for r in rows]
  return "\n".join(lines)


def main(argv):
  del argv
  print(markdown(table_rows(read_results(flags.FLAGS.results))))


if __name__ == "__main__":
  # Defined here, not at import: tests import this module beside other flag owners.
  flags.DEFINE_list("results", [], "experiments.sweep results.csv files.")
  app.run(main)
