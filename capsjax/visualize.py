r"""Figures of a trained CapsNet: reconstructions, capsule perturbations, routing, errors.

  python -m capsjax.visualize --workdir=/tmp/caps_fmnist
  python -m capsjax.visualize --workdir=/tmp/caps_fmnist \
      --checkpoint=/tmp/caps_fmnist/checkpoints/4680
  python -m capsjax.visualize --workdir=RUN --num_examples=16 --eval_examples=0   # whole test set

Loads the latest checkpoint of `--workdir` (or `--checkpoint`, anything
`checkpoint.find_checkpoint` accepts) with `analysis.load_run`. Writes into
`WORKDIR/figures/` (or `--out_dir`):

  reconstructions.png   test inputs above their reconstructions, true / predicted labels
                        (paper Fig. 3); the decoder is masked by the predicted class
  perturbations.png     one row per dimension of the predicted class's capsule, one column
                        per offset in [-0.25, 0.25] step 0.05 (paper Fig. 4)
  routing.png           the final assignments (coupling coefficients) of the model's
                        routing algorithm (dynamic, EM, inverted dot-product or
                        self-attention: each sums to 1 over the classes), primary capsules
                        -> classes, for a few examples: the full [N_in, N_out] matrix as
                        deviations from uniform routing (1/N_out), the mean per class, and
                        where (on the PrimaryCaps grid; the matrix-capsule network's
                        last ConvCaps grid) the predicted class draws its input from
  confusion.png         confusion matrix on the first `--eval_examples` test examples
  curves.png            accuracy and loss curves from the run's metrics.csv

The numbers come from `capsjax.analysis`; this module only draws and runs the command
line. A user mistake (no checkpoint, a bad flag value) ends the command with one
`capsjax: error: ...` line and exit code 2.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from absl import logging

from capsjax import analysis
from capsjax import errors
from capsjax import metrics as metrics_lib

FIGURES = ("reconstructions.png", "perturbations.png", "routing.png", "confusion.png", "curves.png")


# ----------------------------------------------------------------------------------------
# Drawing.
# ----------------------------------------------------------------------------------------
def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def _show(ax, image: np.ndarray) -> None:
  image = np.clip(image, 0.0, 1.0)
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
  else:
    ax.imshow(image)
  ax.set_xticks([])
  ax.set_yticks([])


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  _plt().close(fig)
  logging.info("wrote %s", path)
  return path


def plot_reconstructions(
  images,
  recons,
  labels,
  preds,
  class_names: Sequence[str],
  path: str,
  *,
  title: str = "",
  per_row: int = 10,
) -> str:
  """Inputs [N, H, W, C] above their reconstructions, titled 'true' / 'pred' (red if wrong)."""
  plt = _plt()
  n = len(images)
  cols = min(n, per_row)
  blocks = -(-n // cols)
  fig, axes = plt.subplots(
    2 * blocks,
    cols,
    figsize=(1.3 * cols + 0.8, 3.0 * blocks + 0.4),
    squeeze=False,
    layout="constrained",
  )
  for ax in axes.ravel():
    ax.axis("off")
  for i in range(n):
    r, c = 2 * (i // cols), i % cols
    top, bottom = axes[r, c], axes[r + 1, c]
    for ax in (top, bottom):
      ax.axis("on")
    _show(top, images[i])
    _show(bottom, recons[i])
    ok = labels[i] == preds[i]
    top.set_title(
      f"true: {class_names[labels[i]]}\npred: {class_names[preds[i]]}",
      fontsize=7,
      color="black" if ok else "red",
    )
    if c == 0:
      top.set_ylabel("input", fontsize=8)
      bottom.set_ylabel("reconstruction", fontsize=8)
  fig.suptitle(title or "Test inputs (top) and reconstructions from the predicted capsule")
  return _save(fig, path)


def plot_perturbations(grid, deltas, path: str, *, image=None, title: str = "") -> str:
  """grid [D_out, K, H, W, C] -> D_out rows (capsule dims) x K columns (offsets).

  The input `image` [H, W, C], if given, is drawn in an extra column on the right.
  """
  plt = _plt()
  d_out, k = grid.shape[:2]
  extra = 0 if image is None else 1
  fig, axes = plt.subplots(
    d_out,
    k + extra,
    squeeze=False,
    layout="constrained",
    figsize=(0.8 * (k + extra) + 0.8, 0.8 * d_out + 1.0),
  )
  for d in range(d_out):
    for j in range(k):
      ax = axes[d, j]
      _show(ax, grid[d, j])
      if d == 0:
        ax.set_title(f"{deltas[j]:+.2f}", fontsize=8)
      if j == 0:
        ax.set_ylabel(f"dim {d}", fontsize=8, rotation=0, ha="right", va="center")
    if extra:
      axes[d, k].axis("off")
  if extra:
    _show(axes[0, k], image)
    axes[0, k].axis("on")
    axes[0, k].set_title("input", fontsize=8)
  fig.supxlabel(
    "offset added to the capsule dimension (column) / capsule dimension (row)", fontsize=9
  )
  fig.suptitle(title or "Capsule dimension perturbations")
  return _save(fig, path)


def coupling_norm(c, n_out: int):
  """A colour norm for couplings centred at uniform routing, 1/N_out, as white.

  The range is symmetric about 1/N_out (the largest deviation in `c`, both ways), so
  equal deviations get equal colour strength; it is cut at 0 below, where couplings end.
  Exactly uniform couplings (every 1-iteration model) get a tiny range and come out white.

  Args:
    c: coupling coefficients of any shape.
    n_out: N_out, the number of classes c is normalised over.

  Returns:
    A matplotlib `TwoSlopeNorm` with `vcenter == 1 / n_out`.
  """
  from matplotlib import colors  # pylint: disable=g-import-not-at-top

  centre = 1.0 / n_out
  # Today's couplings deviate from uniform by ~1e-3; a 0..max scale showed one flat colour.
  half = max(float(np.max(np.abs(np.asarray(c, np.float64) - centre))), 1e-3 * centre)
  return colors.TwoSlopeNorm(vcenter=centre, vmin=max(centre - half, 0.0), vmax=centre + half)


def routing_figure(
  images, c, labels, preds, class_names: Sequence[str], grid_hwt, *, title: str = ""
):
  """For each example: input, c heatmap, mean c per class, spatial map of the predicted class.

  Both coupling maps use a diverging colormap centred at 1/N_out (`coupling_norm`), one
  norm per kind of map shared by all rows: red routes more than uniform, blue less.

  Args:
    images: [B, H, W, C] inputs.
    c: [B, N_in, N_out] final coupling coefficients.
    labels: [B] true classes.
    preds: [B] predicted classes.
    class_names: N_out names.
    grid_hwt: (H', W', types) with N_in = H' * W' * types (the PrimaryCaps order); any
      other product drops the spatial map.
    title: the figure's title.

  Returns:
    (matplotlib Figure, axes [B, 3 or 4]): `axes[i, 1]` holds row i's heatmap and
    `axes[i, 3]`, if there, its spatial map.
  """
  plt = _plt()
  b, n_in, n_out = c.shape
  hp, wp, types = grid_hwt
  spatial = hp * wp * types == n_in
  cols = 4 if spatial else 3
  fig, axes = plt.subplots(
    b,
    cols,
    figsize=(15 if spatial else 11, 2.9 * b),
    squeeze=False,
    gridspec_kw={"width_ratios": [1, 2, 2, 1.3][:cols]},
  )
  names = list(class_names)
  uniform = f"white: uniform 1/{n_out} = {1 / n_out:.3g}"
  heat_norm = coupling_norm(c, n_out)
  if spatial:
    maps = np.stack(
      [c[i][:, preds[i]].reshape(hp, wp, types).mean(axis=-1) for i in range(b)]
    )  # [B, H', W']
    map_norm = coupling_norm(maps, n_out)
  for i in range(b):
    ax = axes[i, 0]
    _show(ax, images[i])
    ax.set_title(
      f"true: {names[labels[i]]}\npred: {names[preds[i]]}",
      fontsize=8,
      color="black" if labels[i] == preds[i] else "red",
    )
    ax = axes[i, 1]
    im = ax.imshow(c[i], aspect="auto", cmap="RdBu_r", norm=heat_norm, interpolation="nearest")
    ax.set_xticks(range(n_out))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("primary capsule", fontsize=8)
    ax.set_title("coupling c (primary -> class)", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.05).set_label(f"c ({uniform})", fontsize=7)
    ax = axes[i, 2]
    mean = c[i].mean(axis=0)  # [N_out]
    colours = ["tab:orange" if j == preds[i] else "tab:blue" for j in range(n_out)]
    ax.bar(range(n_out), mean, color=colours)
    ax.axhline(1.0 / n_out, color="gray", ls="--", lw=1, label="uniform (1 iteration)")
    ax.set_xticks(range(n_out))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("mean coupling", fontsize=8)
    ax.set_title("mean coupling per class (orange: predicted)", fontsize=8)
    ax.legend(fontsize=7)
    if spatial:
      ax = axes[i, 3]
      im = ax.imshow(maps[i], cmap="RdBu_r", norm=map_norm, interpolation="nearest")
      ax.set_title(f"c to '{names[preds[i]]}' by position\n(mean over {types} types)", fontsize=8)
      ax.set_xlabel("PrimaryCaps x", fontsize=8)
      ax.set_ylabel("PrimaryCaps y", fontsize=8)
      fig.colorbar(im, ax=ax, fraction=0.05).set_label(f"mean c ({uniform})", fontsize=7)
  fig.suptitle(title or "Routing: final coupling coefficients")
  fig.tight_layout()
  return fig, axes


def plot_routing(
  images, c, labels, preds, class_names: Sequence[str], grid_hwt, path: str, *, title: str = ""
) -> str:
  """Draws `routing_figure` (same arguments) into the PNG `path`; returns `path`."""
  fig, _ = routing_figure(images, c, labels, preds, class_names, grid_hwt, title=title)
  return _save(fig, path)


def plot_confusion(cm, class_names: Sequence[str], path: str, *, title: str = "") -> str:
  """cm [K, K] counts (rows true, columns predicted), annotated, with class names."""
  plt = _plt()
  k = len(cm)
  fig, ax = plt.subplots(figsize=(1.0 + 0.65 * k, 0.8 + 0.6 * k))
  im = ax.imshow(cm, cmap="Blues", interpolation="nearest")
  thresh = cm.max() / 2 if cm.max() else 1
  for t in range(k):
    for p in range(k):
      ax.text(
        p,
        t,
        str(cm[t, p]),
        ha="center",
        va="center",
        fontsize=7,
        color="white" if cm[t, p] > thresh else "black",
      )
  ax.set_xticks(range(k))
  ax.set_xticklabels(class_names, rotation=45, ha="right")
  ax.set_yticks(range(k))
  ax.set_yticklabels(class_names)
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class")
  acc = np.trace(cm) / max(cm.sum(), 1)
  ax.set_title(title or f"Confusion matrix: {100 * acc:.2f}% of {cm.sum()} correct")
  fig.colorbar(im, ax=ax, fraction=0.046)
  return _save(fig, path)


# ----------------------------------------------------------------------------------------
# Everything for one run.
# ----------------------------------------------------------------------------------------
def make_figures(
  workdir: str,
  *,
  checkpoint: str | None = None,
  out_dir: str | None = None,
  num_examples: int = 10,
  num_routing: int = 4,
  eval_examples: int = 2000,
  example_index: int = 0,
  data_dir: str | None = None,
  manual_dir: str | None = None,
  batch_size: int = 100,
) -> dict[str, str]:
  """Writes every figure of FIGURES for a run; returns {name: path}.

  Args:
    workdir: the run's workdir (metrics.csv; default checkpoint and output location).
    checkpoint: a checkpoint path (see `load_run`) instead of the latest of `workdir`.
    out_dir: where to write; default `workdir/figures`.
    num_examples: examples in the reconstruction grid.
    num_routing: examples in the routing figure.
    eval_examples: test examples for the confusion matrix (0 = the whole test split).
    example_index: test example whose capsule is perturbed.
    data_dir, manual_dir: passed to `input_pipeline.load_split`; None takes the run's own
      (its config.json), else the TFDS default.
    batch_size: examples per forward pass.

  Raises:
    CheckpointNotFoundError: `workdir` does not exist or holds no checkpoint (or
      `checkpoint` is not one).
    ConfigError: a count or index is out of range.
  """
  for name, value, low in (
    ("num_examples", num_examples, 1),
    ("num_routing", num_routing, 1),
    ("eval_examples", eval_examples, 0),
    ("example_index", example_index, 0),
    ("batch_size", batch_size, 1),
  ):
    if value < low:
      raise errors.ConfigError(f"{name} must be >= {low}, got {value}")
  if checkpoint is None and not os.path.isdir(workdir):
    problem = "is not a directory" if os.path.exists(workdir) else "does not exist"
    raise errors.CheckpointNotFoundError(
      f"workdir {workdir} {problem}: expected the workdir of a training run "
      "(`python -m capsjax.main --workdir=...`)"
    )
  run = analysis.load_run(checkpoint or workdir)
  data_dir = data_dir or run.config.get("data_dir")
  manual_dir = manual_dir or run.config.get("manual_dir")
  out_dir = out_dir or os.path.join(workdir, "figures")
  names = run.info.class_names
  need = max(num_examples, num_routing, example_index + 1, eval_examples)
  images, labels = analysis.load_test_images(
    run.info.name, 0 if eval_examples == 0 else need, data_dir=data_dir, manual_dir=manual_dir
  )
  if len(images) <= example_index:
    raise errors.ConfigError(
      f"example_index={example_index} is out of range: the "
      f"{run.info.name} test split has {len(images)} examples"
    )
  out = analysis.predict(run.model, images, batch_size=batch_size)
  it = run.model.digit_caps.routing_iterations
  routing = getattr(run.model, "routing", "dynamic")
  tag = f"{run.info.name}, step {run.step}, {routing} routing, {it} iteration{'s' * (it != 1)}"
  paths = {}
  n = min(num_examples, len(images))
  if run.model.decoder is not None:
    paths["reconstructions.png"] = plot_reconstructions(
      images[:n],
      out["reconstruction"][:n],
      labels[:n],
      out["pred"][:n],
      names,
      os.path.join(out_dir, "reconstructions.png"),
      title=f"Test inputs (top) and reconstructions from the predicted capsule ({tag})",
    )
    i = example_index
    cls = int(out["pred"][i])
    grid = analysis.perturbation_grid(run.model, out["v"][i], cls)
    paths["perturbations.png"] = plot_perturbations(
      grid,
      analysis.PERTURBATIONS,
      os.path.join(out_dir, "perturbations.png"),
      image=images[i],
      title=f"Perturbing each dimension of the '{names[cls]}' capsule (test example {i}, "
      f"true '{names[labels[i]]}')\n{tag}",
    )
  else:
    logging.warning("the model has no decoder: skipping reconstructions and perturbations")
  nr = min(num_routing, len(images))
  c = analysis.couplings(run.model, images[:nr])
  paths["routing.png"] = plot_routing(
    images[:nr],
    c,
    labels[:nr],
    out["pred"][:nr],
    names,
    analysis.model_primary_grid(run.model, run.model_cfg, run.info.image_shape),
    os.path.join(out_dir, "routing.png"),
    title=f"Final routing assignments, capsules -> classes ({tag})",
  )
  ne = len(images) if eval_examples == 0 else min(eval_examples, len(images))
  cm = analysis.confusion_matrix(labels[:ne], out["pred"][:ne], run.info.num_classes)
  paths["confusion.png"] = plot_confusion(
    cm,
    names,
    os.path.join(out_dir, "confusion.png"),
    title=f"Confusion matrix, first {ne} test examples: "
    f"{100 * np.trace(cm) / max(ne, 1):.2f}% correct\n{tag}",
  )
  csv_path = os.path.join(run.workdir, metrics_lib.CSV_NAME)
  if os.path.exists(csv_path):
    curves = metrics_lib.plot_curves(
      csv_path, os.path.join(out_dir, "curves.png"), title=f"CapsNet on {run.info.name}"
    )
    if curves is not None:  # None: it could not be written (plot_curves warned).
      paths["curves.png"] = curves
  else:
    logging.warning("no %s: skipping curves.png", csv_path)
  return paths


def main(argv: Sequence[str]) -> None:
  """The command line: flags as defined in `_define_flags`, no positional arguments.

  A `CapsjaxError` (a user mistake) ends the process with one `capsjax: error: ...` line
  on stderr and exit code 2; set CAPSJAX_TRACEBACK=1 to see its traceback instead. Any
  other exception is a bug and keeps its traceback.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  f = flags.FLAGS
  with errors.exit_on_user_error():
    if len(argv) > 1:
      raise errors.ConfigError(
        f"unexpected arguments: {argv[1:]}; capsjax.visualize takes only flags, e.g. --workdir=RUN"
      )
    from capsjax.run import cpu_runtime  # pylint: disable=g-import-not-at-top

    cpu_runtime.configure_cpu_runtime()  # before JAX starts its backends.
    paths = make_figures(
      f.workdir,
      checkpoint=f.checkpoint,
      out_dir=f.out_dir,
      num_examples=f.num_examples,
      num_routing=f.num_routing,
      eval_examples=f.eval_examples,
      example_index=f.example_index,
      data_dir=f.data_dir,
      manual_dir=f.manual_dir,
    )
  for name, path in paths.items():
    logging.info("%s: %s", name, path)
  print("\n".join(paths.values()), flush=True)


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("workdir", None, "Run workdir (metrics.csv, checkpoints/).")
  flags.DEFINE_string(
    "checkpoint", None, "Checkpoint to load: a workdir, its checkpoints/ or checkpoints/<step>."
  )
  flags.DEFINE_string("out_dir", None, "Output directory; default WORKDIR/figures.")
  flags.DEFINE_integer("num_examples", 10, "Examples in the reconstruction grid.")
  flags.DEFINE_integer("num_routing", 4, "Examples in the routing figure.")
  flags.DEFINE_integer("eval_examples", 2000, "Test examples for the confusion matrix (0 = all).")
  flags.DEFINE_integer("example_index", 0, "Test example whose capsule is perturbed.")
  flags.DEFINE_string(
    "data_dir", None, "TFDS data dir (default: the run's, from its config.json, else TFDS's)."
  )
  flags.DEFINE_string(
    "manual_dir", None, "Directory with the original dataset files (default: the run's)."
  )
  flags.mark_flag_as_required("workdir")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top

  _define_flags()
  app.run(main, flags_parser=errors.parse_flags)
