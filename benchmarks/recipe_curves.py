"""Learning curves: capsjax vs a PyTorch port of the CapsNet-Fashion-MNIST recipe.

The recipe is XifengGuo/CapsNet-Fashion-MNIST (Keras 2.0.9): batch 100, Adam 1e-3 with
lr x 0.95 per epoch, Keras glorot_uniform init, u_hat stopped in all routing iterations
but the last, ImageDataGenerator shift 0.1 (+-2.8 px, edge fill) + horizontal flip,
margin + 0.392 x MSE loss. capsjax runs it from its config file (a subprocess of
`capsjax.main`); the port is `benchmarks.torch_peer.train_recipe`, fed capsjax's batches
(`input_pipeline.train_batches`, the same seed), so both see the same examples in the same
order every epoch. Only the initial weights and the augmentation draws differ.

  python -m benchmarks.recipe_curves --epochs=2 --workdir=/tmp/curves
      [--train_examples=0] [--threads=2] [--skip_capsjax] [--skip_torch] [--seed=0]
      [--capsjax_config=configs/capsnet_fashion_mnist.py]

Writes into --workdir:
  capsjax/      the capsjax run (its epochs.csv has the per-epoch test accuracy)
  torch/        epochs.csv (one row per epoch) and run.json (the settings it ran with)
  curves.csv    framework, epoch, test_accuracy, seconds
  curves.md     the side-by-side table, with the command, hardware and versions
  curves.png    test accuracy per epoch, both frameworks

A side whose results in --workdir already cover --epochs (with the same settings) is not
run again; the other side still is. `seconds` is training time of the epoch without the
test evaluation, for both (capsjax's epoch 1 includes its JIT compilation). --threads
sets torch's threads only; capsjax uses XLA's default (every core it may run on).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time

import numpy as np

DEFAULT_CAPSJAX_CONFIG = "configs/capsnet_fashion_mnist.py"
DATASET = "fashion_mnist"
BATCH_SIZE = 100
TORCH_FIELDS = (
  "epoch",
  "step",
  "learning_rate",
  "train_loss",
  "train_accuracy",
  "test_accuracy",
  "test_loss",
  "test_margin_loss",
  "test_recon_loss",
  "seconds",
  "eval_seconds",
  "images_per_s",
)


def _parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--workdir", required=True)
  parser.add_argument(
    "--train_examples",
    type=int,
    default=0,
    help="> 0: train on the first N training examples only (as capsjax)",
  )
  parser.add_argument("--threads", type=int, default=2, help="torch threads")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--skip_capsjax", action="store_true")
  parser.add_argument("--skip_torch", action="store_true")
  parser.add_argument("--capsjax_config", default=DEFAULT_CAPSJAX_CONFIG)
  parser.add_argument(
    "--torch_length_eps",
    type=float,
    default=0.0,
    help="torch port's capsule length sqrt(|v|^2 + eps): 0 as Keras, "
    "1e-7 as capsjax (to tell whether it explains a gap)",
  )
  # Tests of this script only: a test-set subset changes what the accuracy means.
  parser.add_argument("--eval_examples", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.epochs < 1:
    parser.error(f"--epochs must be >= 1, got {args.epochs}")
  if args.train_examples < 0 or args.eval_examples < 0:
    parser.error("--train_examples and --eval_examples must be >= 0")
  return args


def _read_csv(path: str) -> list[dict[str, str]]:
  if not os.path.isfile(path):
    return []
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _subset(images: np.ndarray, labels: np.ndarray, n: int):
  """The first n examples when 0 < n < N (capsjax's `train_examples` rule)."""
  return (images[:n], labels[:n]) if n and n < len(labels) else (images, labels)


# ----------------------------------------------------------------------------------------
# capsjax.
# ----------------------------------------------------------------------------------------


def capsjax_command(args: argparse.Namespace) -> list[str]:
  cmd = [
    sys.executable,
    "-m",
    "capsjax.main",
    f"--config={args.capsjax_config}",
    f"--workdir={os.path.join(args.workdir, 'capsjax')}",
    f"--config.num_epochs={args.epochs}",
    f"--config.seed={args.seed}",
    "--config.progress_bar=False",
  ]
  if args.train_examples:
    cmd.append(f"--config.train_examples={args.train_examples}")
  if args.eval_examples:
    cmd.append(f"--config.eval_examples={args.eval_examples}")
  return cmd


def _capsjax_rows(args: argparse.Namespace) -> list[dict]:
  path = os.path.join(args.workdir, "capsjax", "epochs.csv")
  rows = [
    {
      "epoch": int(r["epoch"]),
      "test_accuracy": float(r["test_accuracy"]),
      "seconds": float(r["seconds"]),
      "images_per_s": float(r.get("images_per_s") or "nan"),
    }
    for r in _read_csv(path)
    if r.get("test_accuracy")
  ]
  return [r for r in rows if r["epoch"] <= args.epochs]


def _check_capsjax_workdir(args: argparse.Namespace) -> None:
  """Stops when WORKDIR/capsjax holds a run with another seed or data subset.

  capsjax itself refuses to resume such a run, but epochs.csv rows that already cover
  --epochs would otherwise be reported without capsjax ever being asked.
  """
  path = os.path.join(args.workdir, "capsjax", "config.json")
  if not os.path.isfile(path):
    return
  with open(path) as f:
    saved = json.load(f)
  wanted = {
    "seed": args.seed,
    "train_examples": args.train_examples,
    "eval_examples": args.eval_examples,
  }
  diff = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k, v) != v}
  if diff:
    raise SystemExit(
      f"{args.workdir}/capsjax is a run with other settings (saved, wanted): {diff}; "
      "use another --workdir"
    )


def run_capsjax(args: argparse.Namespace) -> list[dict]:
  """Runs (or resumes) capsjax's recipe run; its per-epoch rows, 1-based epochs."""
  _check_capsjax_workdir(args)
  rows = _capsjax_rows(args)
  if len(rows) >= args.epochs:
    print(f"capsjax: {len(rows)} epochs already in {args.workdir}/capsjax, not rerun", flush=True)
    return rows
  cmd = capsjax_command(args)
  print("capsjax:", shlex.join(cmd), flush=True)
  # Its own stdout/stderr stream through: it prints one line per epoch.
  proc = subprocess.run(cmd, check=False)
  if proc.returncode != 0:
    raise SystemExit(f"capsjax exited with status {proc.returncode}: {shlex.join(cmd)}")
  return _capsjax_rows(args)


# ----------------------------------------------------------------------------------------
# PyTorch port.
# ----------------------------------------------------------------------------------------


def _torch_settings(args: argparse.Namespace, recipe) -> dict:
  """What the torch rows depend on (not --threads: it changes speed, not results)."""
  return {
    "seed": args.seed,
    "train_examples": args.train_examples,
    "eval_examples": args.eval_examples,
    "batch_size": BATCH_SIZE,
    "recipe": dataclasses.asdict(recipe),
  }


def run_torch(args: argparse.Namespace) -> list[dict]:
  """Trains the PyTorch port on capsjax's batches; its per-epoch rows, 1-based epochs."""
  # Imported here so that --skip_torch works without torch installed.
  from benchmarks import torch_peer  # pylint: disable=g-import-not-at-top
  from capsjax.data import input_pipeline  # pylint: disable=g-import-not-at-top

  recipe = torch_peer.KerasRecipe(length_eps=args.torch_length_eps)
  out_dir = os.path.join(args.workdir, "torch")
  csv_path, meta_path = os.path.join(out_dir, "epochs.csv"), os.path.join(out_dir, "run.json")
  settings = _torch_settings(args, recipe)
  if os.path.isfile(meta_path):
    with open(meta_path) as f:
      done = json.load(f)
    rows = _read_csv(csv_path)
    if done.get("settings") == settings and len(rows) >= args.epochs:
      print(f"torch: {len(rows)} epochs already in {out_dir}, not rerun", flush=True)
      return [
        {k: (int(v) if k in ("epoch", "step") else float(v)) for k, v in r.items()}
        for r in rows[: args.epochs]
      ]

  train_images, train_labels = _subset(
    *input_pipeline.load_split(DATASET, "train", data_dir=None, manual_dir=None, download=False),
    args.train_examples,
  )  # uint8 [N, 28, 28, 1], int [N]
  test_images, test_labels = _subset(
    *input_pipeline.load_split(DATASET, "test", data_dir=None, manual_dir=None, download=False),
    args.eval_examples,
  )
  test_images = input_pipeline.to_float(test_images)  # float32 [M, 28, 28, 1]

  def batches(epoch):
    # capsjax's own generator: the identical permutation and batch boundaries.
    for batch in input_pipeline.train_batches(
      train_images, train_labels, batch_size=BATCH_SIZE, seed=args.seed, epoch=epoch
    ):
      yield batch["image"], batch["label"]  # [B, 28, 28, 1], [B]

  os.makedirs(out_dir, exist_ok=True)
  if os.path.exists(meta_path):
    os.remove(meta_path)  # a finished marker: written only once every epoch is in.
  with open(csv_path, "w", newline="") as f:
    csv.DictWriter(f, TORCH_FIELDS).writeheader()

  def on_epoch(row):
    with open(csv_path, "a", newline="") as f:
      csv.DictWriter(f, TORCH_FIELDS).writerow(
        {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
      )

  print(
    f"torch: {len(train_labels)} train / {len(test_labels)} test examples, "
    f"{len(train_labels) // BATCH_SIZE} steps/epoch, {args.threads} threads",
    flush=True,
  )
  rows = torch_peer.train_recipe(
    batches,
    test_images,
    test_labels,
    epochs=args.epochs,
    seed=args.seed,
    threads=args.threads,
    recipe=recipe,
    on_epoch=on_epoch,
  )
  with open(meta_path, "w") as f:
    json.dump(
      {"settings": settings, "epochs": args.epochs, "torch": _version("torch")}, f, indent=2
    )
  return rows


# ----------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def markdown(args: argparse.Namespace, argv: list[str], results: dict[str, list[dict]]) -> str:
  """The report: a header (command, hardware, versions, date) and one row per epoch."""
  by_epoch = {fw: {r["epoch"]: r for r in rows} for fw, rows in results.items()}
  epochs = sorted({e for rows in by_epoch.values() for e in rows})
  cmd = shlex.join(["python", "-m", "benchmarks.recipe_curves", *argv])
  lines = [
    "# CapsNet-Fashion-MNIST recipe: capsjax vs a PyTorch port",
    "",
    f"- command: `{cmd}`",
    f"- capsjax config: `{args.capsjax_config}`"
    + (" (not run: --skip_capsjax)" if args.skip_capsjax else ""),
    f"- PyTorch port: `benchmarks.torch_peer.train_recipe`, capsule length eps "
    f"{args.torch_length_eps:g}" + (" (not run: --skip_torch)" if args.skip_torch else ""),
    f"- hardware: {_cpu_model()}, {os.cpu_count()} logical CPUs; torch threads: {args.threads}",
    f"- versions: torch {_version('torch')}, jax {_version('jax')}, "
    f"Python {platform.python_version()}",
    f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
    f"- data: Fashion-MNIST, "
    f"{args.train_examples or 60000} train examples in capsjax's order (seed "
    f"{args.seed}), test accuracy on "
    f"{args.eval_examples or 10000} test images",
    "",
    "| epoch | capsjax test acc | PyTorch port test acc | capsjax s/epoch | PyTorch s/epoch |",
    "|---:|---:|---:|---:|---:|",
  ]
  for e in epochs:
    cells = [str(e)]
    for key, fmt in (("test_accuracy", "{:.2%}"), ("seconds", "{:.1f}")):
      for fw in ("capsjax", "torch"):
        row = by_epoch.get(fw, {}).get(e)
        cells.append("-" if row is None else fmt.format(row[key]))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_csv(path: str, results: dict[str, list[dict]]) -> None:
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["framework", "epoch", "test_accuracy", "seconds"])
    for fw, rows in results.items():
      for r in rows:
        w.writerow([fw, r["epoch"], f"{r['test_accuracy']:.6g}", f"{r['seconds']:.3f}"])


def plot(path: str, results: dict[str, list[dict]]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top

  labels = {"capsjax": "capsjax", "torch": "PyTorch port"}
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for fw, rows in results.items():
    if rows:
      ax.plot(
        [r["epoch"] for r in rows],
        [100 * r["test_accuracy"] for r in rows],
        marker="o",
        label=labels.get(fw, fw),
      )
  ax.set_xlabel("epoch")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("CapsNet-Fashion-MNIST recipe")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = _parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  results: dict[str, list[dict]] = {}
  t0 = time.time()
  if not args.skip_capsjax:
    results["capsjax"] = run_capsjax(args)
  if not args.skip_torch:
    results["torch"] = run_torch(args)
  write_csv(os.path.join(args.workdir, "curves.csv"), results)
  table = markdown(args, argv, results)
  with open(os.path.join(args.workdir, "curves.md"), "w") as f:
    f.write(table)
  plot(os.path.join(args.workdir, "curves.png"), results)
  print(f"\nwrote {args.workdir}/curves.{{csv,md,png}} ({time.time() - t0:.0f} s)\n")
  print(table)


if __name__ == "__main__":
  main()
