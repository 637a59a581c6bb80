r"""Sweep any config fields x seeds over one or more recipes, then a results table.

  python -m experiments.sweep --recipes=configs/fashion.py:quick \
      --sweep=optim.decay_rate=0.9,0.95 --sweep=model.routing_iterations=1,3 \
      --seeds=0,1,2 --workdir=runs/sweep
  # reference recipes side by side, each beside the number its source publishes:
  python -m experiments.sweep \
      --recipes=configs/fashion.py,configs/capsnet_fashion_mnist.py --seeds=0,1,2 \
      --workdir=runs/recipes
  # overrides for every run (as --config.FIELD=VALUE of capsjax.main); 2 recipes x 2 seeds
  # of the tiny :smoke model in about a minute on a CPU:
  python -m experiments.sweep \
      --recipes=configs/fashion.py:smoke,configs/capsnet_fashion_mnist.py:smoke \
      --set=num_epochs=1 --seeds=0,1 --workdir=/tmp/sweep_smoke
  # 3 seeds x 2 learning rates x 2 iteration counts as 2 ensembles of 6 runs (one per
  # iteration count: it changes the program), each trained as one jitted program:
  python -m experiments.sweep --recipes=configs/fashion.py:quick --parallel \
      --sweep=optim.learning_rate=0.001,0.003 --sweep=model.routing_iterations=1,3 \
      --seeds=0,1,2 --workdir=runs/packed

One run per (recipe, combination of --sweep values, seed), trained by
`capsjax.train.train_and_evaluate` (the code behind `capsjax.main`) in
`WORKDIR/<recipe>__<field>=<value>...__seed<S>/`. Rerunning the command skips finished
runs and resumes unfinished ones from their latest checkpoint. With --parallel, the runs
whose configs differ only in `capsjax.ensemble.packable_fields()` (seed, optim rates,
loss weights) train together through `capsjax.train_ensemble.train_ensemble`
(--max_members caps a pack), each into its run's directory, written as the single run
writes it.
`experiments.routing_sweep` is the routing-iteration shortcut with coupling entropies.

Written into WORKDIR:
  runs.csv          one row per run (RUN_FIELDS); a packed run's wall_s is its share of
                    its ensemble's wall time
  results.csv/.md   one row per (recipe, sweep values): mean and std over seeds of the
                    final, validation-selected and best-on-test test accuracies, with the
                    recipe's published figure beside it
  curves.png        every run's test accuracy per epoch, one colour per group
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import importlib.util
import itertools
import json
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import numpy as np

from capsjax import ensemble
from capsjax import errors
from capsjax import metrics as metrics_lib
from capsjax.run import checkpoint as ckpt_lib
from capsjax.run import config as run_config
from capsjax import train
from capsjax import train_ensemble as train_ensemble_lib

RUN_FIELDS = (
  "recipe",
  "values",
  "seed",
  "final_test_accuracy",
  "selected_on",
  "selected_epoch",
  "selected_test_accuracy",
  "best_test_accuracy",
  "best_test_epoch",
  "epochs",
  "images_per_s",
  "wall_s",
  "skipped",
  "workdir",
)
RESULT_FIELDS = (
  "recipe",
  "values",
  "num_seeds",
  "final_mean",
  "final_std",
  "selected_on",
  "selected_mean",
  "selected_std",
  "best_test_mean",
  "best_test_std",
  "published",
  "published_source",
  "epochs",
  "images_per_s",
  "wall_s",
)
RUN_JSON = "sweep_run.json"


# ----------------------------------------------------------------------------------------
# Configs: loading recipe files and setting fields from text.
# ----------------------------------------------------------------------------------------
def load_recipe(spec: str):
  """`configs/fashion.py:quick` -> the ConfigDict its `get_config('quick')` returns."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise errors.ConfigError(f"recipe config file {path!r} (from {spec!r}) does not exist")
  errors.add_config_root(path)  # its `from configs import common`, from any cwd.
  name = "capsjax_recipe_" + re.sub(r"\W", "_", os.path.abspath(path))
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    return module.get_config(arg or None)
  except ValueError as e:  # e.g. an unknown :variant.
    raise errors.ConfigError(f"recipe {spec!r}: {e}") from e


def recipe_name(spec: str) -> str:
  """`configs/fashion.py:quick` -> 'fashion-quick' (a directory-name-safe label)."""
  path, _, arg = spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return name + (f"-{arg.replace(',', '-')}" if arg else "")


def parse_value(config, field: str, text: str) -> Any:
  """Parses `text` as a value of `config.<field>`, typed like the field's current value."""
  try:
    current = run_config.get_field(config, field)
  except (KeyError, AttributeError, TypeError):
    raise errors.ConfigError(f"unknown config field {field!r}") from None
  if isinstance(current, bool):
    if text.lower() not in ("true", "false"):
      raise errors.ConfigError(f"{field} expects True or False, got {text!r}")
    return text.lower() == "true"
  if isinstance(current, str) or current is None:
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise errors.ConfigError(f"{field} expects a {type(current).__name__}, got {text!r}") from None
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  if type(value) is not type(current):
    raise errors.ConfigError(f"{field} expects a {type(current).__name__}, got {text!r}")
  return value


def parse_axes(config, specs: Sequence[str]) -> list[tuple[str, list[Any]]]:
  """['optim.decay_rate=0.9,0.95', ...] -> [('optim.decay_rate', [0.9, 0.95]), ...]."""
  axes = []
  for spec in specs:
    field, sep, values = spec.partition("=")
    if not sep or not values:
      raise errors.ConfigError(f"--sweep expects FIELD=V1,V2,..., got {spec!r}")
    parsed = [parse_value(config, field, v) for v in values.split(",")]
    if len(set(map(repr, parsed))) != len(parsed):
      raise errors.ConfigError(f"--sweep {field} repeats a value: {values}")
    axes.append((field, parsed))
  fields = [f for f, _ in axes]
  if len(set(fields)) != len(fields) or "seed" in fields:
    raise errors.ConfigError(
      f"--sweep fields must be distinct and not 'seed' (use --seeds): {fields}"
    )
  return axes


# ----------------------------------------------------------------------------------------
# Runs.
# ----------------------------------------------------------------------------------------
def read_json(path: str):
  """The JSON object in `path`, or None if there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj) -> None:
  """Writes `obj` to `path` atomically (a temporary file, then a rename)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def is_finished(cfg, rdir: str) -> bool:
  """True if `rdir` holds a completed run of `cfg`: summary.json at `num_epochs` epochs (or
  stopped early) and a config.json whose run-defining fields equal `cfg`'s."""
  summary = read_json(os.path.join(rdir, "summary.json"))
  saved = read_json(os.path.join(rdir, "config.json"))
  if summary is None or saved is None:
    return False
  saved = run_config.with_legacy_defaults(saved)
  # Only the run-defining fields: changing e.g. progress_bar or eval_batch_size must not
  # rerun a finished run (train_and_evaluate refuses changes to the others, naming them).
  now = json.loads(cfg.to_json_best_effort())
  if any(now.get(k) != saved.get(k) for k in run_config.RUN_DEFINING_FIELDS):
    return False
  if summary.get("early_stopped"):
    return True
  return summary.get("epochs", -1) >= cfg.num_epochs - 1e-9


def images_per_second(rdir: str) -> float:
  """Median training images/s over the logged intervals of metrics.csv (nan if none)."""
  path = os.path.join(rdir, metrics_lib.CSV_NAME)
  if not os.path.exists(path):
    return float("nan")
  vals = [
    float(r["images_per_s"])
    for r in metrics_lib.read_csv(path)
    if r["split"] == "train" and r.get("images_per_s")
  ]
  return statistics.median(vals) if vals else float("nan")


def finished_summary(cfg, rdir: str) -> dict | None:
  """The summary.json of `rdir` (current column names) if it holds a finished run of `cfg`."""
  if not is_finished(cfg, rdir):
    return None
  logging.info("finished run in %s, skipped", rdir)
  return metrics_lib.current_names(read_json(os.path.join(rdir, "summary.json")))


def train_or_skip(cfg, rdir: str, record: dict) -> tuple[dict, bool]:
  """Trains `cfg` in `rdir` unless finished there; adds the call's wall time to `record`.

  Returns (summary, skipped).
  """
  summary = finished_summary(cfg, rdir)
  if summary is not None:
    return summary, True
  logging.info("training in %s", rdir)
  t0 = time.time()
  summary = train.train_and_evaluate(cfg, rdir)
  wall = time.time() - t0
  record["wall_s"] = float(record.get("wall_s", 0.0)) + wall
  record.setdefault("calls", []).append(
    {
      "wall_s": wall,
      "end_step": int(summary["step"]),
      "host": platform.node(),
      "finished": time.strftime("%F %T"),
    }
  )
  return summary, False


def _label(values: dict) -> str:
  return ",".join(f"{k}={v}" for k, v in values.items())


def run_dir(workdir: str, recipe: str, values: dict, seed: int) -> str:
  parts = [recipe, *(f"{k}={v}" for k, v in values.items()), f"seed{seed}"]
  return os.path.join(workdir, re.sub(r"[^\w.=+-]", "_", "__".join(parts)))


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep: its config (fields and seed set), directory and table labels."""

  config: Any
  workdir: str
  recipe: str
  values: dict
  seed: int


def make_run(config, workdir: str, recipe: str, values: dict, seed: int) -> Run:
  """The run of `config` with the sweep `values` and `seed`, in its `run_dir`."""
  cfg = config.copy_and_resolve_references()
  for field, value in values.items():
    run_config.set_field(cfg, field, value)
  cfg.seed = int(seed)
  return Run(cfg, run_dir(workdir, recipe, values, seed), recipe, values, seed)


def _read_record(rdir: str) -> dict:
  return read_json(os.path.join(rdir, RUN_JSON)) or {"wall_s": 0.0, "calls": []}


def run_row(run: Run, summary: dict, skipped: bool, record: dict) -> dict:
  """The RUN_FIELDS row of `run` from its summary and its sweep_run.json record."""
  row = {k: summary.get(k) for k in RUN_FIELDS if k in summary}
  row.update(
    recipe=run.recipe,
    values=_label(run.values),
    seed=run.seed,
    images_per_s=images_per_second(run.workdir),
    wall_s=record["wall_s"],
    skipped=skipped,
    workdir=run.workdir,
  )
  return row


def train_run(run: Run) -> dict:
  """Trains (or skips/resumes) `run` alone and returns its RUN_FIELDS row."""
  record = _read_record(run.workdir)
  summary, skipped = train_or_skip(run.config, run.workdir, record)
  write_json(os.path.join(run.workdir, RUN_JSON), record)
  return run_row(run, summary, skipped, record)


def run_one(config, workdir: str, recipe: str, values: dict, seed: int) -> dict:
  """Trains (or skips/resumes) one run and returns its RUN_FIELDS row."""
  return train_run(make_run(config, workdir, recipe, values, seed))


# ----------------------------------------------------------------------------------------
# --parallel: runs that differ only in per-member fields train as one ensemble.
# ----------------------------------------------------------------------------------------
def saved_steps(rdir: str) -> frozenset[int]:
  """The steps of the checkpoints in `rdir`; {0} for none (a run starts at step 0)."""
  if not os.path.isdir(os.path.join(rdir, ckpt_lib.CKPT_DIR)):
    return frozenset({0})
  with ckpt_lib.Checkpointer(rdir, read_only=True) as c:
    return frozenset(c.all_steps()) or frozenset({0})


def _packable(a, b) -> bool:
  try:
    ensemble.check_packable([a, b])
  except errors.ConfigError:
    return False
  return True


def pack(
  runs: Sequence[Run],
  max_members: int | None = None,
  saved: Mapping[str, frozenset[int]] | None = None,
) -> list[list[Run]]:
  """Splits `runs` into packs that `ensemble.check_packable` accepts, in first-seen order.

  "Differs only in `ensemble.packable_fields()`" is an equivalence, so a run joins the
  first pack whose first run it packs with, that holds fewer than `max_members`, and
  whose members can all resume from one step: `train_ensemble` resumes a pack at the
  oldest of its members' latest steps, which each must have saved ({0}: never started).
  `saved`: {run directory: its `saved_steps`}; None: every run starts afresh.
  """

  def steps(run: Run) -> frozenset[int]:
    return saved[run.workdir] if saved else frozenset({0})

  packs: list[list[Run]] = []
  for run in runs:
    for p in packs:
      common = min(max(steps(r)) for r in (*p, run))
      if (
        (max_members is None or len(p) < max_members)
        and _packable(p[0].config, run.config)
        and all(common in steps(r) for r in (*p, run))
      ):
        p.append(run)
        break
    else:
      packs.append([run])
  return packs


def train_packs(packs: Sequence[Sequence[Run]]) -> dict[str, tuple[dict, bool, dict]]:
  """Trains each pack as one `train_ensemble` call (one run alone: `train_or_skip`).

  Returns {run directory: (summary, skipped, sweep_run.json record)}. A member's wall time
  is its share of the ensemble's (wall / members), so 'wall / run' stays the cost of a run
  and the runs' times add up to the sweep's.
  """
  out = {}
  for p in packs:
    records = [_read_record(r.workdir) for r in p]
    if len(p) == 1:  # nothing to share a program with: the single run's own program.
      summaries = [train_or_skip(p[0].config, p[0].workdir, records[0])[0]]
    else:
      logging.info("training %d runs as one ensemble: %s", len(p), [r.workdir for r in p])
      t0 = time.time()
      summaries = train_ensemble_lib.train_ensemble([r.config for r in p], [r.workdir for r in p])
      wall = time.time() - t0
      for record, summary in zip(records, summaries, strict=True):
        record["wall_s"] = float(record.get("wall_s", 0.0)) + wall / len(p)
        record.setdefault("calls", []).append(
          {
            "wall_s": wall / len(p),
            "ensemble_wall_s": wall,
            "members": len(p),
            "end_step": int(summary["step"]),
            "host": platform.node(),
            "finished": time.strftime("%F %T"),
          }
        )
    for run, summary, record in zip(p, summaries, records, strict=True):
      write_json(os.path.join(run.workdir, RUN_JSON), record)
      out[run.workdir] = (summary, False, record)
  return out


def run_parallel(runs: Sequence[Run], *, max_members: int | None = None) -> list[dict]:
  """The RUN_FIELDS rows of `runs` (in their order), the unfinished ones trained in packs.

  Finished runs are skipped as in `train_run`, and only the unfinished ones are packed: a
  finished member would otherwise go back to the pack's common resume step and retrain.
  Unfinished runs pack only with runs that can resume from the same step (`pack`): the
  members of a killed --parallel sweep saved together and pack again, exactly; a run
  killed in a sequential sweep resumes alone rather than restart beside fresh runs.
  """
  done, todo = {}, []
  for run in runs:
    summary = finished_summary(run.config, run.workdir)
    if summary is None:
      todo.append(run)
    else:
      done[run.workdir] = (summary, True, _read_record(run.workdir))
  packs = pack(todo, max_members, {r.workdir: saved_steps(r.workdir) for r in todo})
  for p in packs:
    if len(p) > 1 and p[0].config.keep_checkpoints < 2:
      raise errors.ConfigError(
        f"--parallel packs {len(p)} runs of recipe {p[0].recipe!r} with "
        f"keep_checkpoints={p[0].config.keep_checkpoints}; an ensemble keeps at least 2 "
        "(e.g. --set=keep_checkpoints=2)"
      )
  logging.info("%d runs to train in %d packs of %s", len(todo), len(packs), [len(p) for p in packs])
  done.update(train_packs(packs))
  return [run_row(r, *done[r.workdir]) for r in runs]


# ----------------------------------------------------------------------------------------
# Tables and plots.
# ----------------------------------------------------------------------------------------
def mean_std(xs: Sequence[float | None]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one value; nan, nan for none)."""
  xs = [float(x) for x in xs if x is not None]
  if not xs:
    return float("nan"), float("nan")
  return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def summarize(rows: Sequence[dict], published: dict[str, tuple[float, str]]) -> list[dict]:
  """One RESULT_FIELDS row per (recipe, values) group, in first-seen order."""
  out = []
  groups = list(dict.fromkeys((r["recipe"], r["values"]) for r in rows))
  for recipe, values in groups:
    g = [r for r in rows if (r["recipe"], r["values"]) == (recipe, values)]
    res = {
      "recipe": recipe,
      "values": values,
      "num_seeds": len(g),
      "selected_on": g[0].get("selected_on", ""),
    }
    for name, key in (
      ("final", "final_test_accuracy"),
      ("selected", "selected_test_accuracy"),
      ("best_test", "best_test_accuracy"),
    ):
      res[f"{name}_mean"], res[f"{name}_std"] = mean_std([r.get(key) for r in g])
    for key in ("epochs", "images_per_s", "wall_s"):
      res[key] = mean_std([r.get(key) for r in g])[0]
    res["published"], res["published_source"] = published.get(recipe, (0.0, ""))
    out.append(res)
  return out


def write_csv(path: str, fields: Sequence[str], rows: Sequence[dict]) -> None:
  """Writes `rows` (dicts) as CSV with columns `fields`; floats with 6 significant digits."""
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: (f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k)) for k in fields})


def hardware() -> str:
  """'<CPU model>, N cores; JAX <backend> xD' for result tables."""
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  import jax  # pylint: disable=g-import-not-at-top

  devs = jax.devices()
  return f"{model}, {os.cpu_count()} cores; JAX {jax.default_backend()} x{len(devs)}"


def _pct(mean: float, std: float) -> str:
  return "-" if np.isnan(mean) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def write_markdown(
  path: str, results: Sequence[dict], rows: Sequence[dict], *, command: str = ""
) -> None:
  """results.md: one table row per `summarize` group, then one line per run."""
  lines = ["# Sweep results", ""]
  if command:
    lines += [f"- command: `{command}`"]
  lines += [
    f"- hardware: {hardware()}",
    f"- date: {time.strftime('%F')}",
    "",
    "| recipe | values | seeds | selected on | test acc., selected epoch (%) | "
    "test acc., final (%) | best on test (%) | published (%) | epochs | "
    "train img/s | wall / run (s) |",
    "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in results:
    pub = f"{100 * r['published']:.2f} ({r['published_source']})" if r["published"] else "-"
    lines.append(
      f"| {r['recipe']} | {r['values'] or '-'} | {r['num_seeds']} | {r['selected_on']} | "
      f"{_pct(r['selected_mean'], r['selected_std'])} | "
      f"{_pct(r['final_mean'], r['final_std'])} | "
      f"{_pct(r['best_test_mean'], r['best_test_std'])} | {pub} | {r['epochs']:g} | "
      f"{r['images_per_s']:.1f} | {r['wall_s']:.1f} |"
    )
  lines += [
    "",
    "Mean ± sample standard deviation over seeds (0 with one seed). 'selected epoch': "
    "the epoch with the best validation accuracy (or, with selected on = test, the best "
    "test accuracy, as the reference projects chose it). 'best on test' is always the "
    "best epoch picked on the test set: comparable with the references' figures, and "
    "optimistic.",
    "",
    "Runs:",
    "",
  ]
  lines += [
    f"- `{os.path.basename(r['workdir'])}`: final {100 * r['final_test_accuracy']:.2f}%"
    f" after {r['epochs']:g} epochs, {r['wall_s']:.1f} s"
    for r in rows
  ]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def plot_curves(path: str, rows: Sequence[dict], *, title: str = "") -> str:
  """Every run's test (solid) and validation (dashed) accuracy per epoch, one colour a group."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(8, 5))
  groups = list(dict.fromkeys((r["recipe"], r["values"]) for r in rows))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, group in enumerate(groups):
    color = colors[i % len(colors)]
    for j, r in enumerate(x for x in rows if (x["recipe"], x["values"]) == group):
      path_csv = os.path.join(r["workdir"], metrics_lib.EPOCH_CSV_NAME)
      if not os.path.exists(path_csv):
        continue
      epochs = metrics_lib.read_csv(path_csv)
      xs = [int(e["epoch"]) for e in epochs]
      label = " ".join(x for x in group if x) if j == 0 else None
      ax.plot(
        xs, [100 * float(e["test_accuracy"]) for e in epochs], "o-", ms=3, color=color, label=label
      )
      val = [
        (x, float(e["val_accuracy"]))
        for x, e in zip(xs, epochs, strict=False)
        if e.get("val_accuracy")
      ]
      if val:
        ax.plot(*zip(*[(x, 100 * v) for x, v in val], strict=False), "--", color=color, alpha=0.6)
  ax.set(
    xlabel="epoch",
    ylabel="accuracy (%)",
    title=title or "Test (solid) and validation (dashed) accuracy",
  )
  ax.grid(alpha=0.3)
  if ax.lines:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def int_list(flag: str, values: Sequence[Any]) -> list[int]:
  """The integers of a list flag such as --seeds=0,1,2; ConfigError naming the flag."""
  try:
    return [int(v) for v in values]
  except (TypeError, ValueError):
    raise errors.ConfigError(
      f"--{flag} expects integers, e.g. --{flag}=0,1, got {','.join(map(str, values))!r}"
    ) from None


def join_recipe_specs(tokens: Sequence[str]) -> list[str]:
  """Re-joins comma-split recipe specs: ['k.py:augment', 'quick'] -> ['k.py:augment,quick'].

  The --recipes flag is split at every comma, but a spec's variants are comma-separated
  too; a token that names no config file continues the previous spec.
  """
  specs: list[str] = []
  for token in tokens:
    if specs and not token.partition(":")[0].endswith(".py"):
      specs[-1] += "," + token
    else:
      specs.append(token)
  return specs


def _log_row(row: dict) -> None:
  logging.info(
    "%s %s seed=%d: final test accuracy %.4f",
    row["recipe"],
    row["values"],
    row["seed"],
    row["final_test_accuracy"],
  )


def run_sweep(
  recipes: Sequence[str],
  workdir: str,
  *,
  sweep: Sequence[str] = (),
  seeds: Sequence[int] = (0,),
  overrides: Sequence[str] = (),
  command: str = "",
  parallel: bool = False,
  max_members: int | None = None,
) -> list[dict]:
  """Trains every (recipe, sweep values, seed) run and writes the tables and the plot.

  Args:
    recipes: config specs, e.g. ['configs/fashion.py:quick'].
    workdir: the sweep directory.
    sweep: axes as 'FIELD=V1,V2'; runs cover their Cartesian product.
    seeds: seeds (config.seed of each run).
    overrides: 'FIELD=VALUE' applied to every recipe before the axes.
    command: the command line, recorded in results.md.
    parallel: train the runs that differ only in `ensemble.packable_fields()` as one
      ensemble each (`run_parallel`); False: one `train_and_evaluate` call per run.
    max_members: with `parallel`, at most this many runs per ensemble (None: no cap).

  Returns:
    The per-run rows (RUN_FIELDS), in (recipe, values, seed) order.
  """
  seeds = int_list("seeds", seeds)
  if not recipes or not seeds or len(set(seeds)) != len(seeds):
    raise errors.ConfigError(
      f"need at least one recipe and distinct seeds, got {list(recipes)} and {seeds}"
    )
  if max_members is not None and (isinstance(max_members, bool) or max_members < 1):
    raise errors.ConfigError(f"--max_members expects an integer >= 1, got {max_members!r}")
  names = [recipe_name(r) for r in recipes]
  if len(set(names)) != len(names):
    raise errors.ConfigError(f"recipes must differ: {list(recipes)}")
  configs = []
  for spec in recipes:
    config = load_recipe(spec)
    for text in overrides:
      field, sep, value = text.partition("=")
      if not sep:
        raise errors.ConfigError(f"--set expects FIELD=VALUE, got {text!r}")
      run_config.set_field(config, field, parse_value(config, field, value))
    configs.append(config)
  axes = parse_axes(configs[0], sweep)
  for config in configs:
    run_config.validate_config(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  runs = []
  published = {}
  for name, config in zip(names, configs, strict=False):
    published[name] = (float(config.published.test_accuracy), config.published.source)
    for combo in itertools.product(*(vals for _, vals in axes)):
      values = dict(zip((f for f, _ in axes), combo, strict=False))
      runs += [make_run(config, workdir, name, values, seed) for seed in seeds]
  # Every combination before the first run: a bad value must not wait behind hours of
  # training of the good ones.
  for run in runs:
    try:
      run_config.validate_config(run.config, num_devices=jax.device_count())
    except errors.ConfigError as e:
      raise errors.ConfigError(
        f"run {run.recipe} {_label(run.values) or '(no sweep values)'} seed {run.seed}: {e}"
      ) from e
  os.makedirs(workdir, exist_ok=True)
  if parallel:
    rows = run_parallel(runs, max_members=max_members)
    for row in rows:
      _log_row(row)
  else:
    rows = []
    for run in runs:
      rows.append(train_run(run))
      _log_row(rows[-1])
  results = summarize(rows, published)
  write_csv(os.path.join(workdir, "runs.csv"), RUN_FIELDS, rows)
  write_csv(os.path.join(workdir, "results.csv"), RESULT_FIELDS, results)
  write_markdown(os.path.join(workdir, "results.md"), results, rows, command=command)
  plot_curves(os.path.join(workdir, "curves.png"), rows)
  return rows


def start_cli(argv: Sequence[str]):
  """The sweeps' CLI start: no stray arguments, CPU runtime set up; returns absl's FLAGS."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments: {argv[1:]}; only flags are taken")
  from capsjax.run import cpu_runtime  # pylint: disable=g-import-not-at-top

  cpu_runtime.configure_cpu_runtime()  # before JAX starts its backends.
  return flags.FLAGS


def flags_parser(config_flags: tuple[str, ...] = ()):
  """The sweeps' `app.run` flags parser: signals handled from here on (as capsjax.main),
  and every flag mistake one `capsjax: error:` line with exit code 2."""

  def parse(argv):
    from capsjax.run import processes  # pylint: disable=g-import-not-at-top

    processes.handle_signals()
    return errors.parse_flags(argv, config_flags=config_flags)

  return parse


def run_cli(body: Callable[[Any], None], argv: Sequence[str]) -> None:
  """Runs `body(FLAGS)` as the sweeps' main, ending as capsjax.main does.

  A user mistake is one `capsjax: error:` line and exit code 2; a preemption (SIGTERM
  during a run's training: its checkpoint saved) exit code 75, so rerunning the sweep
  resumes that run.
  """
  from capsjax.run import processes  # pylint: disable=g-import-not-at-top

  with errors.exit_on_user_error():
    f = start_cli(argv)
    try:
      body(f)
    except processes.Preempted as e:
      errors.print_fresh_line(f"capsjax: {e}")
      sys.exit(processes.PREEMPTED_EXIT_CODE)


def main(argv: Sequence[str]) -> None:
  run_cli(_main, argv)


def _main(f) -> None:
  rows = run_sweep(
    join_recipe_specs(f.recipes),
    f.workdir,
    sweep=f.sweep or (),
    seeds=f.seeds,
    overrides=f.set or (),
    parallel=f.parallel,
    max_members=f.max_members,
    command=" ".join(["python -m experiments.sweep", *sys.argv[1:]]),
  )
  with open(os.path.join(os.path.abspath(f.workdir), "results.md")) as fh:
    print(fh.read(), flush=True)
  logging.info("%d runs; results in %s", len(rows), f.workdir)


def _define_flags(flag_values=None) -> None:
  """Registers the command-line flags on `flag_values` (default: absl's global FLAGS)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  fv = flags.FLAGS if flag_values is None else flag_values
  flags.DEFINE_list(
    "recipes",
    None,
    "Config files with optional :variant, e.g. "
    "configs/fashion.py:quick,configs/capsnet_fashion_mnist.py:quick.",
    flag_values=fv,
  )
  flags.DEFINE_multi_string("sweep", None, "An axis FIELD=V1,V2,... (repeatable).", flag_values=fv)
  flags.DEFINE_multi_string("set", None, "FIELD=VALUE for every run (repeatable).", flag_values=fv)
  flags.DEFINE_list("seeds", ["0"], "Seeds.", flag_values=fv)
  flags.DEFINE_string(
    "workdir", None, "Sweep directory (one sub-directory per run).", flag_values=fv
  )
  flags.DEFINE_bool(
    "parallel",
    False,
    "Train the runs that differ only in seed, optim.* rates or loss.* weights as one "
    "ensemble (capsjax.train_ensemble) each.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "max_members", None, "With --parallel: at most this many runs per ensemble.", flag_values=fv
  )
  flags.mark_flags_as_required(["recipes", "workdir"], flag_values=fv)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top

  _define_flags()
  app.run(main, flags_parser=flags_parser())
