"""Host-side metrics: averaging, CSV rows, truncation on resume, plots, NaN detection."""

import csv
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
    {"accuracy": math.inf, "loss": math.nan, "recon_loss": math.nan, "class_loss": 1.0}
  )
  assert bad[0] == "recon_loss" and math.isnan(bad[1])
  assert metrics.first_non_finite({"accuracy": -math.inf, "loss": 1.0}) == ("accuracy", -math.inf)
  assert metrics.first_non_finite({"loss": 1.0, "grad_norm": 3.0}) is None


def test_resume_rewrites_an_epochs_csv_with_the_columns_of_an_earlier_version(tmp_path):
  # An epochs.csv without validation columns and with the class loss as 'margin_loss'.
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
  # The class-loss values keep their numbers under the current column name.
  assert (rows[0]["train_class_loss"], rows[0]["test_class_loss"]) == ("0.4", "0.5")
  with open(path) as f:
    assert "margin_loss" not in f.read()


def _raw(path):
  """(header, rows) of a CSV as lists of strings, without DictReader's renaming."""
  with open(path, newline="") as f:
    lines = list(csv.reader(f))
  return lines[0], lines[1:]


OLD_CSV_FIELDS = tuple("margin_loss" if k == "class_loss" else k for k in metrics.CSV_FIELDS)


@pytest.mark.parametrize("resume_step", [20, None])
def test_an_old_metrics_csv_gets_the_current_header_before_rows_are_appended(tmp_path, resume_step):
  # metrics.csv with the class loss under 'margin_loss', as a run resumed from it has.
  path = tmp_path / metrics.CSV_NAME
  old = [dict(zip(OLD_CSV_FIELDS, [""] * len(OLD_CSV_FIELDS), strict=False)) for _ in range(2)]
  for row, step in zip(old, (10, 20), strict=False):
    row.update(step=step, epoch=step / 10, split="train", loss=0.5, margin_loss=0.25, wall_s=3)
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, OLD_CSV_FIELDS)
    w.writeheader()
    w.writerows(old)
  writer = metrics.MetricWriter(str(tmp_path), resume_step=resume_step)
  writer.write(30, 3.0, "train", {"loss": 0.4, "class_loss": 0.125})
  writer.close()
  header, rows = _raw(path)
  assert header == list(metrics.CSV_FIELDS)
  assert all(len(r) == len(header) for r in rows)  # header and rows agree.
  col = header.index("class_loss")
  assert [(r[0], r[col]) for r in rows] == [("10", "0.25"), ("20", "0.25"), ("30", "0.125")]
  # A file already in the current layout, with no row past the resume step, is left as
  # it is.
  before = path.read_text()
  metrics.MetricWriter(str(tmp_path), resume_step=resume_step and 30).close()
  assert path.read_text() == before


def test_old_column_names_are_read_under_the_current_ones(tmp_path):
  path = tmp_path / metrics.EPOCH_CSV_NAME
  path.write_text("epoch,step,train_margin_loss,test_margin_loss\n1,4,0.5,0.25\n")
  assert metrics.read_csv(str(path)) == [
    {"epoch": "1", "step": "4", "train_class_loss": "0.5", "test_class_loss": "0.25"}
  ]
  # summary.json of an old run, as experiments/routing_sweep.py tabulates it.
  old = {"accuracy": 0.9, "margin_loss": 0.1, "recon_loss": 0.05}
  assert metrics.current_names(old) == {"accuracy": 0.9, "class_loss": 0.1, "recon_loss": 0.05}
  # Both names present: neither value is lost or overwritten.
  both = {"margin_loss": 1.0, "class_loss": 2.0}
  assert metrics.current_names(both) == both
  assert metrics.current_names({"margin": 1, "spread_loss": 2}) == {"margin": 1, "spread_loss": 2}


def test_a_plot_of_an_old_metrics_csv(tmp_path):
  path = tmp_path / metrics.CSV_NAME
  path.write_text(
    ",".join(OLD_CSV_FIELDS)
    + "\n"
    + "\n".join(
      f"{s},{s / 4},{split},{1 / s},{0.5 / s},0.1,{0.5 + s / 100},,,,"
      for s in (4, 8)
      for split in ("train", "test")
    )
    + "\n"
  )
  rows = metrics.read_csv(str(path))
  assert [r["class_loss"] for r in rows] == ["0.125", "0.125", "0.0625", "0.0625"]
  assert os.path.getsize(metrics.plot_curves(str(path), str(tmp_path / "c.png"))) > 1000


def test_select_prefers_the_earliest_best():
  history = [
    {"epoch": 1, "val_accuracy": 0.5},
    {"epoch": 2, "val_accuracy": 0.7},
    {"epoch": 3, "val_accuracy": 0.7},
    {"epoch": 4},
  ]
  assert metrics.select(history, "val")["epoch"] == 2
  assert metrics.select(history, "test") is None


def test_aggregate_mean_and_sample_std():
  summaries = [{"final_test_accuracy": a, "wall_s": w} for a, w in ((0.9, 3), (0.8, 5), (0.7, 4))]
  out = metrics.aggregate_summaries(summaries, names=["a", "b", "c"])
  assert out["final_test_accuracy"]["mean"] == pytest.approx(0.8)
  assert out["final_test_accuracy"]["std"] == pytest.approx(0.1)  # sqrt(0.02 / 2)
  assert out["wall_s"] == 5
  assert "mean ± std" in metrics.format_aggregate(out)
