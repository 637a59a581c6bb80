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


def test_non_finite_names_the_term_and_step():
  with pytest.raises(FloatingPointError, match=r"non-finite recon_loss=nan at step 7"):
    metrics.finite_or_raise({"loss": math.nan, "recon_loss": math.nan, "margin_loss": 1.0}, 7)
  metrics.finite_or_raise({"loss": 1.0}, 7)
