"""Metrics: pure accuracy/averaging helpers, and the host-side CSV + TensorBoard writer.

Files a run writes into its workdir (only process 0 writes):
  metrics.csv        one row per logged step: step, epoch, split, and the metric columns
                     (`class_loss` is the run's class loss: margin or spread)
  epochs.csv         one row per epoch: train (mean over the `train_steps` steps of the
                     epoch this invocation ran: fewer after a mid-epoch resume), validation and test
                     losses and accuracy, the epoch selected so far (on validation, or on
                     test without a validation split) and its test accuracy, learning
                     rate, seconds and images/s (as Keras' CSVLogger)
  tensorboard/       TensorBoard event files (`tensorboard --logdir WORKDIR/tensorboard`)
  plots/curves.png   accuracy and loss curves, redrawn after every epoch

A CSV or TensorBoard file that cannot be written (disk full, read-only, permissions)
stops the run with `WorkdirError`, since the run's record would have a gap; the plot is
not essential, so `plot_curves` only warns and training goes on.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import math
import os
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from capsjax import errors

CSV_NAME = "metrics.csv"
CSV_FIELDS = (
  "step",
  "epoch",
  "split",
  "loss",
  "class_loss",
  "recon_loss",
  "accuracy",
  "learning_rate",
  "grad_norm",
  "images_per_s",
  "wall_s",
)
EPOCH_CSV_NAME = "epochs.csv"
_TERMS = ("loss", "class_loss", "recon_loss", "accuracy")
EPOCH_FIELDS = (
  "epoch",
  "step",
  *(f"train_{k}" for k in _TERMS),
  *(f"val_{k}" for k in _TERMS),
  *(f"test_{k}" for k in _TERMS),
  "selected_epoch",
  "selected_test_accuracy",
  "learning_rate",
  "train_steps",
  "seconds",
  "images_per_s",
)
# {old column name: current name}, also under a split prefix ('test_margin_loss'): files
# written under the old name are read, and resumed, under the current one.
_RENAMED = {"margin_loss": "class_loss"}


def current_names(row: Mapping[str, object]) -> dict:
  """`row` (a CSV row, a summary.json) with old column names renamed to current ones.

  'margin_loss' and '<split>_margin_loss' become 'class_loss' and '<split>_class_loss',
  unless `row` has the current name too; every other key is kept as it is.
  """
  out = {}
  for key, value in row.items():
    new = key
    for old, current in _RENAMED.items():
      if isinstance(key, str) and (key == old or key.endswith("_" + old)):
        new = key[: -len(old)] + current
    out[key if new in row else new] = value
  return out


def _reason(e: OSError) -> str:
  if e.errno in (errno.ENOSPC, errno.EDQUOT):
    return "the disk is full"
  return os.strerror(e.errno).lower() if e.errno else str(e)


@contextlib.contextmanager
def _writing(path: str):
  """Turns an OSError while writing the run's record at `path` into one WorkdirError."""
  try:
    yield
  except OSError as e:
    raise errors.WorkdirError(
      f"could not write {path}: {_reason(e)}. Checkpoints already saved are kept; fix "
      "that (e.g. free space) and rerun the same command to resume from the latest"
    ) from e


def accuracy(class_scores: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of examples whose highest class score is the label. class_scores [B, K],
  labels [B]."""
  return jnp.mean(jnp.argmax(class_scores, axis=-1) == labels)


class Averager:
  """Host-side running mean of dicts of scalars (device arrays are fetched lazily)."""

  def __init__(self):
    self._sums: dict[str, float] = {}
    self._pending: list[Mapping[str, jax.Array]] = []
    self.count = 0

  def add(self, metrics: Mapping[str, jax.Array]) -> None:
    # Keep device arrays; converting here would block the host on every step.
    self._pending.append(metrics)
    self.count += 1

  def result(self) -> dict[str, float]:
    for m in jax.device_get(self._pending):
      for k, v in m.items():
        self._sums[k] = self._sums.get(k, 0.0) + float(v)
    self._pending = []
    return {k: v / max(self.count, 1) for k, v in self._sums.items()}

  def state(self) -> dict:
    """{'sums', 'count'} as JSON: what `load` continues from, to the same float sums."""
    self.result()
    return {"sums": dict(self._sums), "count": self.count}

  def load(self, state: dict) -> None:
    """Continues from a `state()`: later values add to the same sums in the same order."""
    self._sums = {k: float(v) for k, v in state["sums"].items()}
    self._pending, self.count = [], int(state["count"])


class MetricWriter:
  """Appends metric rows to metrics.csv and TensorBoard; a no-op on processes != 0."""

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    self.path = os.path.join(workdir, CSV_NAME)
    self.epoch_path = os.path.join(workdir, EPOCH_CSV_NAME)
    self._tb = None
    # wall_s counts the run's seconds across resumed invocations: it continues from the
    # last row kept at the resume step.
    self._t0 = time.time()
    self._wall_offset = 0.0
    if not enabled:
      return
    with _writing(workdir):
      os.makedirs(workdir, exist_ok=True)
    # Also without a resume step: a file with old column names gets the current header,
    # so the rows appended below line up with it.
    truncate_csv(self.path, resume_step)
    truncate_csv(self.epoch_path, resume_step, EPOCH_FIELDS)
    if not os.path.exists(self.epoch_path):
      with _writing(self.epoch_path), open(self.epoch_path, "w", newline="") as f:
        csv.DictWriter(f, EPOCH_FIELDS).writeheader()
    if not os.path.exists(self.path):
      with _writing(self.path), open(self.path, "w", newline="") as f:
        csv.DictWriter(f, CSV_FIELDS).writeheader()
    else:
      walls = [float(r["wall_s"]) for r in read_csv(self.path) if r.get("wall_s")]
      self._wall_offset = max(walls, default=0.0)
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:  # tensorboardX is a dependency; keep training if it is broken.
      logging.warning("tensorboardX is not importable; writing CSV metrics only")

  def write(self, step: int, epoch: float, split: str, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    values = {"wall_s": self._wall_offset + time.time() - self._t0, **values}
    row = {"step": step, "epoch": f"{epoch:.4f}", "split": split}
    row.update({k: f"{float(v):.6g}" for k, v in values.items() if k in CSV_FIELDS})
    with _writing(self.path), open(self.path, "a", newline="") as f:
      csv.DictWriter(f, CSV_FIELDS).writerow(row)
    if self._tb is not None:
      with _writing(os.path.dirname(self.path) + "/tensorboard"):
        for k, v in values.items():
          self._tb.add_scalar(f"{split}/{k}", float(v), step)
        self._tb.flush()

  def write_epoch(
    self,
    epoch: int,
    step: int,
    train: Mapping[str, float],
    test: Mapping[str, float],
    *,
    seconds: float,
    images: int,
    val: Mapping[str, float] | None = None,
    selected: tuple[int, float] | None = None,
    train_steps: int | None = None,
  ) -> None:
    """One epochs.csv row. `train` averages this invocation's steps of the epoch.

    `selected` is (epoch, test accuracy) of the epoch selected so far (see `select`);
    `train_steps` is how many steps `train` averages.
    """
    if not self.enabled:
      return
    row = {
      "epoch": epoch,
      "step": step,
      "seconds": f"{seconds:.3f}",
      "images_per_s": f"{images / max(seconds, 1e-9):.6g}",
    }
    if train_steps is not None:
      row["train_steps"] = train_steps
    if "learning_rate" in train:
      row["learning_rate"] = f"{train['learning_rate']:.6g}"
    for prefix, values in (("train", train), ("val", val or {}), ("test", test)):
      row.update({f"{prefix}_{k}": f"{float(values[k]):.6g}" for k in _TERMS if k in values})
    if selected is not None:
      row["selected_epoch"] = selected[0]
      row["selected_test_accuracy"] = f"{selected[1]:.6g}"
    with _writing(self.epoch_path), open(self.epoch_path, "a", newline="") as f:
      csv.DictWriter(f, EPOCH_FIELDS).writerow(row)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def truncate_csv(path: str, max_step: int | None, fields: Sequence[str] = CSV_FIELDS) -> None:
  """Drops rows logged after `max_step`: a resumed run recomputes those steps.

  A file with other columns than `fields` (fewer, or old names such as 'margin_loss') is
  rewritten with the header `fields`, each kept value under its current column name
  (`current_names`), so that the rows appended after it line up with its header.

  Args:
    path: a CSV with a 'step' column; nothing happens if it does not exist.
    max_step: the last step kept; None keeps every row.
    fields: the header the file must have.
  """
  if not os.path.exists(path):
    return
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    rows = list(reader)
    header = list(reader.fieldnames or [])
  kept = [r for r in rows if max_step is None or int(r["step"]) <= max_step]
  if len(kept) == len(rows) and header == list(fields):
    return
  kept = [{k: v for k, v in current_names(r).items() if k in fields} for r in kept]
  tmp = path + ".tmp"
  with _writing(path):
    with open(tmp, "w", newline="") as f:
      w = csv.DictWriter(f, fields)
      w.writeheader()
      w.writerows(kept)
    os.replace(tmp, path)


def select(history: Sequence[Mapping[str, float]], on: str) -> Mapping[str, float] | None:
  """The entry of `history` with the highest `{on}_accuracy`; the earliest on ties.

  Args:
    history: per-epoch dicts with at least 'epoch' and f'{on}_accuracy'.
    on: 'val' (model selection) or 'test' (how the reference projects that say how they
      chose an epoch chose it: their "validation data" was the test set).

  Returns:
    The selected entry, or None if no entry has the metric.
  """
  key = f"{on}_accuracy"
  best = None
  for h in history:
    if h.get(key) is not None and (best is None or h[key] > best[key]):
      best = h
  return best


def summarize(history: list[dict], final: dict[str, float], *, on: str) -> dict:
  """summary.json: the final checkpoint's test metrics and the two selections.

  Args:
    history: one dict per epoch: 'epoch', 'test_accuracy' and, with a validation split,
      'val_accuracy'.
    final: test metrics of the final checkpoint ('accuracy', losses, 'count').
    on: 'val' or 'test', the split the run selects on.

  Returns:
    `final` plus 'final_test_accuracy'; 'selected_on', 'selected_epoch',
    'selected_test_accuracy' (and 'selected_val_accuracy'); 'best_test_epoch' and
    'best_test_accuracy', the references' protocol (the best epoch picked on test).
  """
  summary = dict(final, final_test_accuracy=final["accuracy"], selected_on=on)
  selected = select(history, on)
  if selected is not None:
    summary.update(
      selected_epoch=selected["epoch"], selected_test_accuracy=selected["test_accuracy"]
    )
    if on == "val":
      summary["selected_val_accuracy"] = selected["val_accuracy"]
  best_test = select(history, "test")
  if best_test is not None:
    summary.update(
      best_test_epoch=best_test["epoch"], best_test_accuracy=best_test["test_accuracy"]
    )
  return summary


def format_summary(summary: dict, dataset: str) -> str:
  """The lines printed at the end of a run: final, selected and best-on-test accuracy."""

  def pct(x):
    return f"{100 * x:.2f}%"

  lines = [
    f"{dataset} test accuracy (all {int(summary['count'])} test images):",
    f"  {pct(summary['final_test_accuracy'])}  final checkpoint (epoch {summary['epochs']:g})",
  ]
  if "selected_epoch" in summary and summary["selected_on"] == "val":
    lines.append(
      f"  {pct(summary['selected_test_accuracy'])}  epoch "
      f"{summary['selected_epoch']}, selected on validation "
      f"({pct(summary['selected_val_accuracy'])} validation accuracy)"
    )
  if "best_test_epoch" in summary:
    lines.append(
      f"  {pct(summary['best_test_accuracy'])}  epoch "
      f"{summary['best_test_epoch']}, best on test: the reference projects' "
      "protocol (selected on the test set, optimistic)"
    )
  if "wall_s" in summary:
    m, s = divmod(summary["wall_s"], 60)
    lines.append(f"wall time {int(m)} min {s:.0f} s")
  return "\n".join(lines)


def read_csv(path: str) -> list[dict[str, str]]:
  """The rows of metrics.csv or epochs.csv, under current column names (`current_names`)."""
  with open(path, newline="") as f:
    return [current_names(r) for r in csv.DictReader(f)]


def _series(rows: Iterable[Mapping[str, str]], split: str, key: str):
  xs, ys = [], []
  for r in rows:
    if r["split"] == split and r.get(key) not in (None, ""):
      xs.append(float(r["epoch"]))
      ys.append(float(r[key]))
  return np.array(xs), np.array(ys)


def plot_curves(csv_path: str, out_path: str, *, title: str = "") -> str | None:
  """Draws accuracy and loss vs epoch (train, val, test) from metrics.csv into a PNG.

  Returns `out_path`, or None (with a warning) if the file cannot be written: a plot
  is redrawn from metrics.csv at any time, so it never stops a run.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows = read_csv(csv_path)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for split, style in (("train", "-"), ("val", "s--"), ("test", "o-")):
    x, y = _series(rows, split, "accuracy")
    if len(x):
      axes[0].plot(x, 100 * y, style, label=split)
    x, y = _series(rows, split, "loss")
    if len(x):
      axes[1].plot(x, y, style, label=split)
  axes[0].set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
  axes[1].set(xlabel="epoch", ylabel="loss (class + recon)", title="Loss")
  for ax in axes:
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  try:
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    fig.savefig(out_path, dpi=100)
  except OSError as e:
    logging.warning("could not write the plot %s (%s); continuing without it", out_path, _reason(e))
    return None
  finally:
    plt.close(fig)
  return out_path


def first_non_finite(values: Mapping[str, float]) -> tuple[str, float] | None:
  """(name, value) of the first NaN/inf metric, loss terms first; None if all are finite."""
  for k in ("class_loss", "recon_loss", "loss", "grad_norm", *values):
    if k in values and not math.isfinite(values[k]):
      return k, float(values[k])
  return None


_AGGREGATED = ("final_test_accuracy", "selected_test_accuracy", "best_test_accuracy")


def aggregate_summaries(summaries: Sequence[dict], *, names: Sequence[str]) -> dict[str, Any]:
  """The members' summaries and, per accuracy, their mean and sample standard deviation.

  Members that stopped with a non-finite loss (a 'stopped' entry) are listed but left out
  of the statistics: their last accuracy is from an unfinished run.
  """
  out: dict[str, Any] = {"members": dict(zip(names, summaries, strict=True))}
  finished = [s for s in summaries if "stopped" not in s]
  for key in _AGGREGATED:
    values = [s[key] for s in finished if key in s and not math.isnan(s[key])]
    if values:
      out[key] = {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "n": len(values),
      }
  out["wall_s"] = max((s.get("wall_s", 0.0) for s in summaries), default=0.0)
  return out


def format_aggregate(summary: dict) -> str:
  """A table of the members' test accuracies, then mean ± std over members."""

  def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"

  def mean_std(a) -> str:
    return "-" if a is None else f"{100 * a['mean']:.2f}±{100 * a['std']:.2f}"

  lines = [f"{'member':<14} {'final':>8} {'selected':>9} {'best on test':>13}"]
  for name, s in summary["members"].items():
    note = f"  ({s['stopped']})" if "stopped" in s else ""
    lines.append(
      f"{name:<14} {pct(s.get('final_test_accuracy')):>8} "
      f"{pct(s.get('selected_test_accuracy')):>9} {pct(s.get('best_test_accuracy')):>13}{note}"
    )
  final, selected, best = (mean_std(summary.get(k)) for k in _AGGREGATED)
  lines.append(f"{'mean ± std':<14} {final:>8} {selected:>9} {best:>13}")
  m, s = divmod(summary["wall_s"], 60)
  lines.append(f"wall time {int(m)} min {s:.0f} s")
  return "\n".join(lines)
