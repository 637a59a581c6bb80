"""experiments.reproduction: the reproduction table from experiments.sweep's results.csv."""

import pytest

from experiments import reproduction
from experiments import sweep


def _write(path, rows):
  full = [{k: r.get(k, "") for k in sweep.RESULT_FIELDS} for r in rows]
  sweep.write_csv(str(path), sweep.RESULT_FIELDS, full)
  return str(path)


def test_each_reference_gets_the_number_of_its_own_protocol(tmp_path):
  first = _write(
    tmp_path / "a.csv",
    [
      # fashion.py's figure is a final epoch; kmnist.py's the best epoch on test.
      {"recipe": "fashion", "values": "", "num_seeds": 3, "final_mean": 0.9291,
       "final_std": 0.001, "best_test_mean": 0.95},
      {"recipe": "kmnist", "values": "val_examples=0", "num_seeds": 1, "final_mean": 0.5,
       "best_test_mean": 0.9534},
      {"recipe": "kmnist", "values": "val_examples=5000", "num_seeds": 2,
       "selected_mean": 0.9412, "selected_std": 0.0005},
    ],
  )  # fmt: skip
  later = _write(
    tmp_path / "b.csv",
    [{"recipe": "fashion", "values": "", "num_seeds": 1, "final_mean": 0.9},
     {"recipe": "mnist", "values": "", "num_seeds": 1, "final_mean": float("nan")}],
  )  # fmt: skip
  rows = {r["config"]: r for r in reproduction.table_rows(reproduction.read_results([first]))}
  assert len(rows) == len(reproduction.REFERENCES)
  fashion, kmnist = rows["`configs/fashion.py`"], rows["`configs/kmnist.py`"]
  assert fashion["ours, same protocol"] == "92.91% ± 0.10 (3 seeds, final epoch)"
  assert fashion["published"] == "92.91%"
  assert kmnist["ours, same protocol"] == "95.34% (1 seed, best epoch on test)"
  assert kmnist["ours, selected on validation (55k train)"] == "94.12% ± 0.05 (2 seeds)"
  assert rows["`configs/kmnist.py:augment`"]["ours, same protocol"] == reproduction.NOT_RUN
  merged = reproduction.table_rows(reproduction.read_results([first, later]))
  merged = {r["config"]: r for r in merged}
  assert merged["`configs/fashion.py`"]["ours, same protocol"] == "90.00% (1 seed, final epoch)"
  assert merged["`configs/mnist.py`"]["ours, same protocol"] == reproduction.NOT_RUN  # NaN
  table = reproduction.markdown(list(merged.values())).splitlines()
  assert len(table) == 2 + len(reproduction.REFERENCES)
  assert all(line.count("|") == table[0].count("|") for line in table)


def test_missing_results_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="--results: no file .*nope.csv"):
    reproduction.read_results([str(tmp_path / "nope.csv")])
