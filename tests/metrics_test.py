"""Host-side metrics: averaging, CSV rows, truncation on resume, plots, NaN detection."""

import math
import os

import numpy as np
import pytest

from capsjax import metrics


def test_accuracy_and_averager():
  lengths = np.array([[0.9, 0.1, 0.2], [0.3, 0.1, 0.8], [0.2, 0.7, 0.1]])
  assert float(metrics.accuracy(lengths, np.array([0, 2, 0]))) == pytest.approx(2 / 3)
  avg = metrics.Averager()
  avg.add({"loss": np.float32(1.0)})
  avg.add({"loss": np.float32(3.0)})
  assert avg.result() == {"loss": 2.0}


def test_writer_truncates_rows_after_resume_step_and_plots(tmp_path):
  w = metrics.MetricWriter(str(tmp_path))
  for step in (10, 20, 30):
    w.write(step, step / 10, "train", {"loss": 1.0 / step, "accuracy": 0.5, "junk": 1})
  w.write(30, 3, "test", {"loss": 0.1, "accuracy": 0.9})
  w.close()
  rows = metrics.read_csv(w.path)
  assert [r["step"] for r in rows] == ["10", "20", "30", "30"]
  assert "junk" not in rows[0]
  walls = [float(r["wall_s"]) for r in rows]
  assert walls == sorted(walls) and walls[0] >= 0
  # A run resumed from step 20 recomputes step 30: its old rows go, and wall time
  # continues from the last kept row.
  w = metrics.MetricWriter(str(tmp_path), resume_step=20)
  w.write(30, 3, "train", {"loss": 0.2, "wall_s": 123.0})
  w.write(40, 4, "train", {"loss": 0.2})
  w.close()
  rows = metrics.read_csv(w.path)
  assert [r["step"] for r in rows] == ["10", "20", "30", "40"]
  assert float(rows[2]["wall_s"]) == 123.0  # an explicit value wins.
  assert float(rows[3]["wall_s"]) >= float(rows[1]["wall_s"])
  out = metrics.plot_curves(w.path, str(tmp_path / "plots" / "c.png"), title="t")
  assert os.path.getsize(out) > 1000


def test_first_non_finite_names_a_loss_term_first():
  bad = metrics.first_non_finite(
    {"accuracy": math.inf, "loss": math.nan, "recon_loss": math.nan, "margin_loss": 1.0}
  )
  assert bad[0] == "recon_loss" and math.isnan(bad[1])
  assert metrics.first_non_finite({"accuracy": -math.inf, "loss": 1.0}) == ("accuracy", -math.inf)
  assert metrics.first_non_finite({"loss": 1.0, "grad_norm": 3.0}) is None


def test_resume_rewrites_an_epochs_csv_with_the_columns_of_an_earlier_version(tmp_path):
  # epochs.csv as capsjax wrote it before validation columns existed.
  old_fields = (
    "epoch",
    "step",
    "train_loss",
    "train_margin_loss",
    "train_recon_loss",
    "train_accuracy",
    "test_loss",
    "test_margin_loss",
    "test_recon_loss",
    "test_accuracy",
    "learning_rate",
    "seconds",
    "images_per_s",
  )
  path = tmp_path / metrics.EPOCH_CSV_NAME
  path.write_text(
    ",".join(old_fields) + "\n" + "1,4,0.5,0.4,0.1,0.7,0.6,0.5,0.1,0.75,0.001,2.0,16\n"
  )
  writer = metrics.MetricWriter(str(tmp_path), resume_step=4)
  writer.write_epoch(
    2,
    8,
    {"loss": 0.4, "accuracy": 0.8, "learning_rate": 9e-4},
    {"loss": 0.5, "accuracy": 0.85},
    seconds=2.0,
    images=32,
    val={"loss": 0.45, "accuracy": 0.9},
    selected=(2, 0.85),
  )
  writer.close()
  rows = metrics.read_csv(str(path))
  assert list(rows[0]) == list(metrics.EPOCH_FIELDS)
  assert (rows[0]["test_accuracy"], rows[0]["learning_rate"], rows[0]["val_accuracy"]) == (
    "0.75",
    "0.001",
    "",
  )
  assert (
    rows[1]["test_accuracy"],
    rows[1]["val_accuracy"],
    rows[1]["selected_epoch"],
    rows[1]["learning_rate"],
  ) == ("0.85", "0.9", "2", "0.0009")


def test_select_prefers_the_earliest_best():
  history = [
    {"epoch": 1, "val_accuracy": 0.5},
    {"epoch": 2, "val_accuracy": 0.7},
    {"epoch": 3, "val_accuracy": 0.7},
    {"epoch": 4},
  ]
  assert metrics.select(history, "val")["epoch"] == 2
  assert metrics.select(history, "test") is None
