r"""Routing sweep: one training run per (routing algorithm, iterations, seed), then a table.

  python -m experiments.routing_sweep --config=configs/fashion.py:quick \
      --iterations=1,2,3,5 --seeds=0,1 --workdir=/tmp/sweep
  # every routing of capsjax.routing in the same CapsNet skeleton and budget:
  python -m experiments.routing_sweep --config=configs/fashion.py:quick \
      --routings=dynamic,em,inverted_dot_product,self_attention --iterations=1,3 \
      --seeds=0 --workdir=/tmp/routing_zoo
  # EM routing learns with its paper's spread loss, not the margin loss (RESULTS.md):
  python -m experiments.routing_sweep --config=configs/fashion.py:quick --routings=em \
      --config.loss.class_loss=spread --iterations=1,2,3 --seeds=0 --workdir=/tmp/em_sweep
  # any config override works as for capsjax.main:
  python -m experiments.routing_sweep --config=configs/fashion.py:smoke \
      --config.dataset=fashion_mnist --iterations=1,3 --seeds=0 --workdir=/tmp/sweep_smoke

Each run trains through `capsjax.train.train_and_evaluate` (the code behind
`capsjax.main`) in `WORKDIR/iter{N}_seed{S}/` (dynamic routing) or
`WORKDIR/{routing}_iter{N}_seed{S}/`, with `config.model.routing`,
`config.model.routing_iterations=N` and `config.seed=S`. Self-attention routing is a single
pass that ignores the iteration count, so it runs once per seed (as iterations=1).
Rerunning the command skips finished runs (`summary.json` reports `num_epochs` epochs and
the run's `config.json` matches) and resumes killed ones from their latest checkpoint. The
single-run form stays `python -m capsjax.main ... --config.model.routing_iterations=N`.

Written into WORKDIR:
  iter{N}_seed{S}/          a normal capsjax run dir, plus sweep_run.json (wall time of the
                            invocations that trained it, coupling entropy)
  runs.csv                  one row per run (RUN_FIELDS)
  results.csv, results.md   one row per (routing, iteration count) (RESULT_FIELDS): the
                            model's parameters, test accuracy mean and std over seeds,
                            final test losses, training images/s, wall time, and the mean
                            entropy of the final assignments (coupling coefficients)
  accuracy_vs_iterations.png

Definitions: images/s is the median over a run's logged training intervals in
metrics.csv (the first interval includes compilation); wall time is measured around each
`train_and_evaluate` call that trained (time of an invocation that was killed is lost);
coupling entropy is -sum_j c_ij log c_ij over the classes (nats) of each routing's
assignments (they sum to 1 over the classes for every algorithm), averaged over primary
capsules i and the first `--entropy_examples` test images, for the final checkpoint.
log(10) = 2.303 is uniform routing, which is exactly what 1 iteration of dynamic, EM or
inverted dot-product routing gives.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from absl import logging

import jax
from flax import nnx

from capsjax import analysis
from capsjax import errors
from capsjax.data import input_pipeline
from capsjax import models
from capsjax import routing as routing_lib
from experiments import sweep

RUN_FIELDS = (
  "routing",
  "iterations",
  "seed",
  "parameters",
  "accuracy",
  "loss",
  "class_loss",
  "recon_loss",
  "step",
  "epochs",
  "images_per_s",
  "wall_s",
  "coupling_entropy",
  "skipped",
  "workdir",
)
RESULT_FIELDS = (
  "routing",
  "iterations",
  "parameters",
  "num_seeds",
  "accuracy_mean",
  "accuracy_std",
  "loss",
  "class_loss",
  "recon_loss",
  "images_per_s",
  "wall_s",
  "coupling_entropy",
  "coupling_entropy_std",
  "epochs",
)
RUN_JSON = "sweep_run.json"
# Routings whose result does not depend on the iteration count: run once, as 1 iteration.
SINGLE_PASS = ("self_attention",)


def run_dir(workdir: str, iterations: int, seed: int, routing: str = "dynamic") -> str:
  # Dynamic routing keeps the names of sweeps made before the routing axis existed, so
  # they are still found finished.
  prefix = "" if routing == "dynamic" else f"{routing}_"
  return os.path.join(workdir, f"{prefix}iter{iterations}_seed{seed}")


def run_config(config, iterations: int, seed: int, routing: str | None = None):
  """A copy of `config` with the run's routing (None: the config's), iterations and seed."""
  cfg = config.copy_and_resolve_references()
  if routing is not None:
    cfg.model.routing = routing
  cfg.model.routing_iterations = int(iterations)
  cfg.seed = int(seed)
  return cfg


def parameter_count(config) -> int:
  """Parameters of the model `config` builds (shapes only, nothing allocated)."""
  info = input_pipeline.dataset_info(config.dataset)
  model = nnx.eval_shape(
    lambda: models.create_model(
      config.model,
      image_shape=info.image_shape,
      num_classes=info.num_classes,
      rngs=nnx.Rngs(params=jax.random.key(0)),
      conv_impl="xla",
    )
  )
  return models.count_params(model)


def coupling_entropy_of_run(rdir: str, images: np.ndarray) -> tuple[float, int]:
  """Mean entropy (nats) of the final checkpoint's couplings on `images`; (value, step)."""
  run = analysis.load_run(rdir)
  ent = []
  for start in range(0, len(images), 64):
    c = analysis.couplings(run.model, images[start : start + 64])  # [b, N_in, N_out]
    ent.append(analysis.coupling_entropy(c).mean(axis=-1))  # [b]
  return float(np.concatenate(ent).mean()), run.step


def run_one(
  config,
  workdir: str,
  iterations: int,
  seed: int,
  *,
  entropy_images: np.ndarray | None = None,
  routing: str | None = None,
) -> dict:
  """Trains (or skips/resumes) one run of the sweep and returns its RUN_FIELDS row."""
  cfg = run_config(config, iterations, seed, routing)
  routing = cfg.model.get("routing", "dynamic")
  rdir = run_dir(workdir, iterations, seed, routing)
  record = sweep.read_json(os.path.join(rdir, RUN_JSON)) or {
    "iterations": iterations,
    "seed": seed,
    "wall_s": 0.0,
    "calls": [],
  }
  summary, skipped = sweep.train_or_skip(cfg, rdir, record)
  if entropy_images is not None and (
    record.get("entropy_step") != summary["step"]
    or record.get("entropy_examples") != len(entropy_images)
  ):
    record["coupling_entropy"], record["entropy_step"] = coupling_entropy_of_run(
      rdir, entropy_images
    )
    record["entropy_examples"] = len(entropy_images)
  sweep.write_json(os.path.join(rdir, RUN_JSON), record)
  row = {
    k: summary.get(k) for k in ("accuracy", "loss", "class_loss", "recon_loss", "step", "epochs")
  }
  row.update(
    routing=routing,
    iterations=iterations,
    seed=seed,
    parameters=parameter_count(cfg),
    images_per_s=sweep.images_per_second(rdir),
    wall_s=record["wall_s"],
    coupling_entropy=record.get("coupling_entropy"),
    skipped=skipped,
    workdir=rdir,
  )
  return row


def summarize(rows: Sequence[dict]) -> list[dict]:
  """Per-(routing, iteration count) aggregates (RESULT_FIELDS) of `run_one` rows: routings
  in the order they first appear, iterations sorted within each."""
  out = []
  routings = list(dict.fromkeys(r.get("routing", "dynamic") for r in rows))
  for name in routings:
    mine = [r for r in rows if r.get("routing", "dynamic") == name]
    for it in sorted({r["iterations"] for r in mine}):
      out.append(_aggregate(name, it, [r for r in mine if r["iterations"] == it]))
  return out


def _aggregate(name: str, it: int, group: Sequence[dict]) -> dict:
  acc, acc_std = sweep.mean_std([r["accuracy"] for r in group])
  ent, ent_std = sweep.mean_std([r["coupling_entropy"] for r in group])
  return {
    "routing": name,
    "iterations": it,
    "parameters": group[0].get("parameters"),
    "num_seeds": len(group),
    "accuracy_mean": acc,
    "accuracy_std": acc_std,
    "coupling_entropy": ent,
    "coupling_entropy_std": ent_std,
    **{
      k: sweep.mean_std([r[k] for r in group])[0]
      for k in ("loss", "class_loss", "recon_loss", "images_per_s", "wall_s", "epochs")
    },
  }


def write_markdown(path: str, config, results: Sequence[dict], rows: Sequence[dict]) -> None:
  info = input_pipeline.dataset_info(config.dataset)
  m = config.model
  if m.get("architecture", "capsnet") == "capsnet":
    model = (
      f"conv1 {m.conv1_channels}x{m.conv1_kernel}, PrimaryCaps {m.primary_types} "
      f"types x {m.primary_dim}D, class capsules {m.digit_dim}D, decoder "
      f"{'on' if m.use_decoder else 'off'}"
    )
  else:
    model = f"architecture {m.architecture} (see its config file)"
  lines = [
    f"# Routing sweep on {info.name}",
    "",
    f"- epochs: {config.num_epochs}; train examples: "
    f"{config.train_examples or info.num_train}; test examples: "
    f"{config.eval_examples or info.num_test}; batch {config.batch_size}",
    f"- model: {model}",
    f"- hardware: {sweep.hardware()}",
    "",
    "| routing | parameters | routing iterations | seeds | test accuracy (%) | test loss | "
    "class loss | recon loss | train images/s | wall time / run (s) | "
    "coupling entropy (nats) |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in results:
    lines.append(
      f"| {r['routing']} | {r['parameters']:,} | {r['iterations']} | {r['num_seeds']} | "
      f"{100 * r['accuracy_mean']:.2f} ± "
      f"{100 * r['accuracy_std']:.2f} | {r['loss']:.4f} | {r['class_loss']:.4f} | "
      f"{r['recon_loss']:.4f} | {r['images_per_s']:.1f} | {r['wall_s']:.1f} | "
      f"{r['coupling_entropy']:.4f} ± {r['coupling_entropy_std']:.2g} |"
    )
  lines += [
    "",
    "± is the standard deviation over seeds (0 with one seed). Coupling entropy: "
    f"mean over primary capsules of the entropy of their assignments (coupling "
    f"coefficients) over the classes; uniform = ln {info.num_classes} = "
    f"{np.log(info.num_classes):.4f}.",
    "",
    "Runs:",
    "",
  ]
  lines += [
    f"- `{os.path.basename(r['workdir'])}`: {100 * r['accuracy']:.2f}% after "
    f"{r['epochs']:g} epochs, {r['wall_s']:.1f} s"
    for r in rows
  ]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def plot_results(
  path: str, results: Sequence[dict], rows: Sequence[dict], *, title: str = ""
) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  its = sorted({r["iterations"] for r in results})
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  routings = list(dict.fromkeys(r.get("routing", "dynamic") for r in results))
  for name in routings:
    mine = [r for r in results if r.get("routing", "dynamic") == name]
    label = name if len(routings) > 1 else "mean ± std over seeds"
    axes[0].errorbar(
      [r["iterations"] for r in mine],
      [100 * r["accuracy_mean"] for r in mine],
      yerr=[100 * r["accuracy_std"] for r in mine],
      fmt="o-",
      capsize=4,
      label=label,
    )
    if all(r["coupling_entropy"] is not None for r in mine):
      axes[1].errorbar(
        [r["iterations"] for r in mine],
        [r["coupling_entropy"] for r in mine],
        yerr=[r["coupling_entropy_std"] for r in mine],
        fmt="s-",
        capsize=4,
        label=name,
      )
  ax = axes[0]
  ax.scatter(
    [r["iterations"] for r in rows],
    [100 * r["accuracy"] for r in rows],
    color="gray",
    s=12,
    zorder=3,
    label="single runs",
  )
  ax.set(
    xlabel="routing iterations",
    ylabel="test accuracy (%)",
    title="Test accuracy vs routing iterations",
  )
  ax.set_xticks(its)
  ax.legend()
  ax = axes[1]
  ax.set(
    xlabel="routing iterations",
    ylabel="mean coupling entropy (nats)",
    title="Coupling entropy vs routing iterations",
  )
  ax.set_xticks(its)
  for a in axes:
    a.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def run_sweep(
  config,
  workdir: str,
  iterations: Sequence[int],
  seeds: Sequence[int],
  *,
  entropy_examples: int = 256,
  routings: Sequence[str] | None = None,
) -> list[dict]:
  """Trains every (routing, iterations, seed) run and writes the tables and the plot.

  Args:
    config: a training config (as for `capsjax.main`); routing, routing_iterations and
      seed are set per run.
    workdir: the sweep directory.
    iterations: routing iteration counts (ints >= 1).
    seeds: seeds.
    entropy_examples: test images for the coupling entropy (0: skip it).
    routings: names in `capsjax.routing.ROUTINGS`; None: the config's routing only.
      A routing in SINGLE_PASS runs once per seed, as iterations=1.

  Returns:
    The per-run rows (RUN_FIELDS), in (routing, iterations, seed) order.

  Raises:
    errors.ConfigError: an unknown routing name (listing the valid ones).
  """
  iterations = [int(i) for i in iterations]
  seeds = [int(s) for s in seeds]
  if not iterations or any(i < 1 for i in iterations):
    raise errors.ConfigError(f"iterations must be a non-empty list of ints >= 1, got {iterations}")
  if not seeds:
    raise errors.ConfigError("seeds must be a non-empty list of ints")
  if len(set(iterations)) != len(iterations) or len(set(seeds)) != len(seeds):
    raise errors.ConfigError(f"iterations {iterations} and seeds {seeds} must not repeat")
  routings = [config.model.get("routing", "dynamic")] if routings is None else list(routings)
  if not routings or len(set(routings)) != len(routings):
    raise errors.ConfigError(f"routings {routings} must be a non-empty list without repeats")
  for name in routings:
    try:
      routing_lib.get(name)
    except ValueError as e:
      raise errors.ConfigError(f"--routings: {e}") from None
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  images = None
  if entropy_examples:
    images, _ = analysis.load_test_images(
      config.dataset, entropy_examples, data_dir=config.data_dir, manual_dir=config.manual_dir
    )
  rows = []
  for name in routings:
    for it in [1] if name in SINGLE_PASS else iterations:
      for seed in seeds:
        rows.append(run_one(config, workdir, it, seed, entropy_images=images, routing=name))
        r = rows[-1]
        logging.info(
          "%s iter=%d seed=%d: test accuracy %.4f, %.1f s",
          name,
          it,
          seed,
          r["accuracy"],
          r["wall_s"],
        )
  results = summarize(rows)
  sweep.write_csv(os.path.join(workdir, "runs.csv"), RUN_FIELDS, rows)
  sweep.write_csv(os.path.join(workdir, "results.csv"), RESULT_FIELDS, results)
  write_markdown(os.path.join(workdir, "results.md"), config, results, rows)
  plot_results(
    os.path.join(workdir, "accuracy_vs_iterations.png"),
    results,
    rows,
    title=f"{', '.join(routings)} routing on {config.dataset}, {config.num_epochs} epochs",
  )
  return rows


def main(argv: Sequence[str]) -> None:
  sweep.run_cli(_main, argv)


def _main(f) -> None:
  iterations, seeds = sweep.int_list("iterations", f.iterations), sweep.int_list("seeds", f.seeds)
  rows = run_sweep(
    f.config,
    f.workdir,
    iterations,
    seeds,
    entropy_examples=f.entropy_examples,
    routings=f.routings or None,
  )
  with open(os.path.join(os.path.abspath(f.workdir), "results.md")) as fh:
    print(fh.read(), flush=True)
  logging.info("%d runs; results in %s", len(rows), f.workdir)


def _define_flags(flag_values=None) -> None:
  """Registers the command-line flags on `flag_values` (default: absl's global FLAGS)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  fv = flags.FLAGS if flag_values is None else flag_values
  config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/fashion.py:quick.", flag_values=fv, lock_config=True
  )
  flags.DEFINE_string(
    "workdir", None, "Sweep directory (one sub-directory per run).", flag_values=fv
  )
  flags.DEFINE_list("iterations", ["1", "2", "3"], "Routing iteration counts.", flag_values=fv)
  flags.DEFINE_list("seeds", ["0"], "Seeds.", flag_values=fv)
  flags.DEFINE_list(
    "routings",
    [],
    "Routing algorithms (names in capsjax.routing.ROUTINGS); empty: the config's model.routing.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "entropy_examples", 256, "Test images for the coupling entropy (0: skip).", flag_values=fv
  )
  flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top

  _define_flags()
  app.run(main, flags_parser=sweep.flags_parser(("config",)))
