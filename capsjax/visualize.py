r"""Figures of a trained CapsNet: reconstructions, capsule perturbations, routing, errors.

  python -m capsjax.visualize --workdir=/tmp/caps_fmnist
  python -m capsjax.visualize --workdir=/tmp/caps_fmnist --checkpoint=/tmp/caps_fmnist/checkpoints/4680
  python -m capsjax.visualize --workdir=RUN --num_examples=16 --eval_examples=0   # whole test set

Loads the latest checkpoint of `--workdir` (or `--checkpoint`, anything
`checkpoint.find_checkpoint` accepts). The architecture comes from the checkpoint's
metadata (`meta['model']`, `meta['image_shape']`, `meta['num_classes']`,
`meta['dataset']`), falling back to the run's `config.json`. Writes into
`WORKDIR/figures/` (or `--out_dir`):

  reconstructions.png   test inputs above their reconstructions, true / predicted labels
                        (paper Fig. 3); the decoder is masked by the predicted class
  perturbations.png     one row per dimension of the predicted class's capsule, one column
                        per offset in [-0.25, 0.25] step 0.05 (paper Fig. 4)
  routing.png           final coupling coefficients primary capsules -> classes for a few
                        examples: the full [N_in, N_out] matrix, the mean coupling per
                        class, and where (on the PrimaryCaps grid) the predicted class
                        draws its input from
  confusion.png         confusion matrix on the first `--eval_examples` test examples
  curves.png            accuracy and loss curves from the run's metrics.csv

The compute functions (`load_run`, `predict`, `couplings`, `perturbation_grid`,
`confusion_matrix`) are pure (arrays in, arrays out) and usable from notebooks; the
`plot_*` functions only draw.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from ml_collections import config_dict

from capsjax import checkpoint as ckpt_lib
from capsjax import input_pipeline
from capsjax import metrics as metrics_lib
from capsjax import models
from capsjax import train

# Offsets added to one capsule dimension: -0.25, -0.20, ..., 0.25 (paper Fig. 4). Built
# from integers so the middle one is exactly 0.0.
PERTURBATIONS = np.arange(-5, 6, dtype=np.float32) / np.float32(20.0)   # [11]

FIGURES = ("reconstructions.png", "perturbations.png", "routing.png", "confusion.png",
           "curves.png")

# Structure-only stand-in for the optimizer when a checkpoint comes without config.json:
# the Adam state's shapes do not depend on these values, and only the model is used.
_STANDIN_OPTIM = {"learning_rate": 1e-3, "decay_rate": 1.0, "decay_epochs": 1.0,
                  "decay_steps": 0, "staircase": True}


# ----------------------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
  """A restored CapsNet with what is known about the run that trained it."""
  model: models.CapsNet
  info: input_pipeline.DatasetInfo   # image_shape/num_classes as in the checkpoint
  meta: dict                         # checkpoint metadata
  model_cfg: dict                    # config.model of the run (plain dict)
  workdir: str                       # the run's workdir
  step: int                          # the restored checkpoint's step
  config: dict                       # the run's config.json ({} when there is none)


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def load_run(path: str, *, step: int | None = None) -> Run:
  """Restores the model of a checkpoint.

  Args:
    path: a run workdir (latest checkpoint), its `checkpoints/` dir, or
      `checkpoints/<step>`.
    step: restore this step instead of the one `path` resolves to.

  Returns:
    A `Run`; `run.model` is an `nnx` CapsNet holding the trained weights.

  Raises:
    FileNotFoundError: no checkpoint at `path`.
    ValueError: neither the checkpoint metadata nor `config.json` describe the model.
  """
  workdir, found = ckpt_lib.find_checkpoint(path)
  step = found if step is None else int(step)
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  meta = ckpt.read_meta(step)
  saved = _read_json(os.path.join(workdir, "config.json")) or {}
  model_cfg = meta.get("model") or saved.get("model")
  dataset = meta.get("dataset") or saved.get("dataset")
  if not model_cfg or not dataset:
    raise ValueError(
        f"checkpoint {ckpt.directory}/{step} has no 'model'/'dataset' metadata and "
        f"{workdir}/config.json does not give them either; cannot rebuild the model")
  info = input_pipeline.dataset_info(dataset)
  info = dataclasses.replace(
      info, image_shape=tuple(meta.get("image_shape", info.image_shape)),
      num_classes=int(meta.get("num_classes", info.num_classes)))
  config = config_dict.ConfigDict(
      {"model": model_cfg, "optim": saved.get("optim") or _STANDIN_OPTIM})
  graphdef, state = train.create_model_and_optimizer(
      config, info, int(meta.get("steps_per_epoch", 1)), jax.random.key(0))
  state, _ = ckpt.restore(step, state)
  model, _ = nnx.merge(graphdef, state)
  logging.info("restored %s step %d (%s, %d routing iterations)", ckpt.directory, step,
               dataset, model.digit_caps.routing_iterations)
  return Run(model=model, info=info, meta=meta, model_cfg=dict(model_cfg), workdir=workdir,
             step=step, config=saved)


def load_test_images(dataset: str, num: int, *, data_dir: str | None = None,
                     manual_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The first `num` test examples (0 = all): float32 [N, H, W, C] in [0, 1], int32 [N]."""
  images, labels = input_pipeline.load_split(dataset, "test", data_dir=data_dir,
                                             manual_dir=manual_dir)
  if num:
    images, labels = images[:num], labels[:num]
  return input_pipeline.to_float(images), np.asarray(labels, np.int32)


# ----------------------------------------------------------------------------------------
# Pure computations.
# ----------------------------------------------------------------------------------------
def _jitted(model: nnx.Module, fn):
  """jax.jit of `fn(model, *args)` with the model split once (no nnx.jit overhead)."""
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda s, *args: fn(nnx.merge(graphdef, s), *args))
  return lambda *args: jitted(state, *args)


def _check_images(model: models.CapsNet, images) -> np.ndarray:
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or tuple(images.shape[1:]) != model.image_shape:
    raise ValueError(
        f"images must have shape [B, {', '.join(map(str, model.image_shape))}], got "
        f"{images.shape}")
  return images


def predict(model: models.CapsNet, images, *, batch_size: int = 100) -> dict[str, np.ndarray]:
  """Runs the model in batches (decoder masked by the predicted class).

  Args:
    images: float32 [N, H, W, C] in [0, 1].

  Returns:
    {'v': [N, N_out, D_out], 'lengths': [N, N_out], 'pred': [N] int32,
     'reconstruction': [N, H, W, C] (if the model has a decoder)} as NumPy arrays.
  """
  images = _check_images(model, images)
  fwd = _jitted(model, lambda m, x: m(x))
  parts: dict[str, list[np.ndarray]] = {}
  n = len(images)
  for start in range(0, n, batch_size):
    chunk = images[start:start + batch_size]                           # [b, H, W, C]
    pad = batch_size - len(chunk) if n > batch_size else 0             # one compiled shape
    x = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)]) if pad else chunk
    out = jax.device_get(fwd(x))
    for k, v in out.items():
      parts.setdefault(k, []).append(np.asarray(v)[:len(chunk)])
  return {k: np.concatenate(v) for k, v in parts.items()}


def couplings(model: models.CapsNet, images) -> np.ndarray:
  """Final coupling coefficients: images [B, H, W, C] -> c [B, N_in, N_out] (rows sum to 1)."""
  images = _check_images(model, images)
  fwd = _jitted(model, lambda m, x: m.capsules(x, return_couplings=True).c)
  return np.asarray(jax.device_get(fwd(images)))                      # [B, N_in, N_out]


def coupling_entropy(c) -> np.ndarray:
  """Entropy (nats) of each input capsule's coupling distribution over the classes.

  c: [..., N_in, N_out], summing to 1 over N_out -> [..., N_in]. log(N_out) (2.303 for
  10 classes) is uniform routing (every 1-iteration model); 0 is all-to-one routing.
  """
  c = np.asarray(c, np.float64)
  return -np.sum(np.where(c > 0, c * np.log(np.where(c > 0, c, 1.0)), 0.0), axis=-1)


def perturbation_grid(model: models.CapsNet, v, cls: int, *,
                      deltas: Sequence[float] = PERTURBATIONS) -> np.ndarray:
  """Reconstructions with one capsule dimension tweaked at a time (paper Fig. 4).

  Args:
    model: a CapsNet with a decoder.
    v: [N_out, D_out] the output capsules of one example.
    cls: the class whose capsule is perturbed (and which masks the decoder).
    deltas: [K] offsets added to each dimension in turn.

  Returns:
    [D_out, K, H, W, C]: row d decodes v with v[cls, d] += deltas[k]. A delta of 0 gives
    exactly `model.decoder(v[None], [cls])[0]`.
  """
  if model.decoder is None:
    raise ValueError("perturbation_grid needs a model with a decoder (model.use_decoder=True)")
  v = np.asarray(v, np.float32)
  if v.ndim != 2:
    raise ValueError(f"v must have shape [N_out, D_out] (one example), got {v.shape}")
  n_out, d_out = v.shape
  if not 0 <= int(cls) < n_out:
    raise ValueError(f"cls must be in [0, {n_out}), got {cls}")
  deltas = np.asarray(deltas, np.float32)                              # [K]
  k = len(deltas)
  offsets = np.zeros((d_out, k, n_out, d_out), np.float32)             # [D_out, K, N_out, D_out]
  offsets[np.arange(d_out), :, int(cls), np.arange(d_out)] = deltas
  vs = (v[None, None] + offsets).reshape(d_out * k, n_out, d_out)      # [D_out*K, N_out, D_out]
  decode = _jitted(model, lambda m, x, c: m.decoder(x, c))
  # Decode one image at a time (the same batch shape as a plain single-example decode):
  # XLA's matmul blocking may depend on the batch size, and delta 0 must reproduce the
  # unperturbed reconstruction bit for bit.
  cls_arr = np.full((1,), int(cls), np.int32)
  recon = np.stack([np.asarray(decode(vs[i:i + 1], cls_arr))[0] for i in range(len(vs))])
  return recon.reshape(d_out, k, *recon.shape[1:])                    # [D_out, K, H, W, C]


def confusion_matrix(labels, preds, num_classes: int) -> np.ndarray:
  """labels [N], preds [N] -> int64 [K, K]; entry [t, p] counts true t predicted as p."""
  labels, preds = np.asarray(labels), np.asarray(preds)
  if labels.shape != preds.shape:
    raise ValueError(f"labels {labels.shape} and preds {preds.shape} must have the same shape")
  out = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(out, (labels, preds), 1)
  return out


def primary_grid(model_cfg: dict, image_shape: Sequence[int]) -> tuple[int, int, int]:
  """(H', W', types) of the PrimaryCaps grid; N_in = H' * W' * types in that order."""
  h, w = image_shape[:2]
  k1, kp, sp = model_cfg["conv1_kernel"], model_cfg["primary_kernel"], model_cfg["primary_stride"]
  return ((h - k1 + 1 - kp) // sp + 1, (w - k1 + 1 - kp) // sp + 1,
          int(model_cfg["primary_types"]))


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


def plot_reconstructions(images, recons, labels, preds, class_names: Sequence[str],
                         path: str, *, title: str = "", per_row: int = 10) -> str:
  """Inputs [N, H, W, C] above their reconstructions, titled 'true' / 'pred' (red if wrong)."""
  plt = _plt()
  n = len(images)
  cols = min(n, per_row)
  blocks = -(-n // cols)
  fig, axes = plt.subplots(2 * blocks, cols, figsize=(1.3 * cols + 0.8, 3.0 * blocks + 0.4),
                           squeeze=False, layout="constrained")
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
    top.set_title(f"true: {class_names[labels[i]]}\npred: {class_names[preds[i]]}",
                  fontsize=7, color="black" if ok else "red")
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
  fig, axes = plt.subplots(d_out, k + extra, squeeze=False, layout="constrained",
                           figsize=(0.8 * (k + extra) + 0.8, 0.8 * d_out + 1.0))
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
  fig.supxlabel("offset added to the capsule dimension (column) / capsule dimension (row)",
                fontsize=9)
  fig.suptitle(title or "Capsule dimension perturbations")
  return _save(fig, path)


def plot_routing(images, c, labels, preds, class_names: Sequence[str], grid_hwt,
                 path: str, *, title: str = "") -> str:
  """For each example: input, c [N_in, N_out] heatmap, mean c per class, spatial map.

  images [B, H, W, C], c [B, N_in, N_out], grid_hwt = (H', W', types) with
  N_in = H' * W' * types (the PrimaryCaps order).
  """
  plt = _plt()
  b, n_in, n_out = c.shape
  hp, wp, types = grid_hwt
  spatial = hp * wp * types == n_in
  fig, axes = plt.subplots(b, 4 if spatial else 3, figsize=(15 if spatial else 11, 2.9 * b),
                           squeeze=False, gridspec_kw={"width_ratios": [1, 2, 2, 1.3][:4 if spatial else 3]})
  names = list(class_names)
  for i in range(b):
    ax = axes[i, 0]
    _show(ax, images[i])
    ax.set_title(f"true: {names[labels[i]]}\npred: {names[preds[i]]}", fontsize=8,
                 color="black" if labels[i] == preds[i] else "red")
    ax = axes[i, 1]
    im = ax.imshow(c[i], aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    ax.set_xticks(range(n_out))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("primary capsule", fontsize=8)
    ax.set_title("coupling c (primary -> class)", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.05)
    ax = axes[i, 2]
    mean = c[i].mean(axis=0)                                           # [N_out]
    colors = ["tab:orange" if j == preds[i] else "tab:blue" for j in range(n_out)]
    ax.bar(range(n_out), mean, color=colors)
    ax.axhline(1.0 / n_out, color="gray", ls="--", lw=1, label="uniform (1 iteration)")
    ax.set_xticks(range(n_out))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("mean coupling", fontsize=8)
    ax.set_title("mean coupling per class (orange: predicted)", fontsize=8)
    ax.legend(fontsize=7)
    if spatial:
      ax = axes[i, 3]
      m = c[i][:, preds[i]].reshape(hp, wp, types).mean(axis=-1)       # [H', W']
      im = ax.imshow(m, cmap="magma", interpolation="nearest")
      ax.set_title(f"c to '{names[preds[i]]}' by position\n(mean over {types} types)",
                   fontsize=8)
      ax.set_xlabel("PrimaryCaps x", fontsize=8)
      ax.set_ylabel("PrimaryCaps y", fontsize=8)
      fig.colorbar(im, ax=ax, fraction=0.05)
  fig.suptitle(title or "Routing: final coupling coefficients")
  fig.tight_layout()
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
      ax.text(p, t, str(cm[t, p]), ha="center", va="center", fontsize=7,
              color="white" if cm[t, p] > thresh else "black")
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
def make_figures(workdir: str, *, checkpoint: str | None = None, out_dir: str | None = None,
                 num_examples: int = 10, num_routing: int = 4, eval_examples: int = 2000,
                 example_index: int = 0, data_dir: str | None = None,
                 manual_dir: str | None = None, batch_size: int = 100) -> dict[str, str]:
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
  """
  run = load_run(checkpoint or workdir)
  data_dir = data_dir or run.config.get("data_dir")
  manual_dir = manual_dir or run.config.get("manual_dir")
  out_dir = out_dir or os.path.join(workdir, "figures")
  names = run.info.class_names
  need = max(num_examples, num_routing, example_index + 1, eval_examples)
  images, labels = load_test_images(run.info.name, 0 if eval_examples == 0 else need,
                                    data_dir=data_dir, manual_dir=manual_dir)
  if len(images) <= example_index:
    raise ValueError(f"example_index={example_index} but the test split has {len(images)} examples")
  out = predict(run.model, images, batch_size=batch_size)
  it = run.model.digit_caps.routing_iterations
  tag = f"{run.info.name}, step {run.step}, {it} routing iteration{'s' * (it != 1)}"
  paths = {}
  n = min(num_examples, len(images))
  if run.model.decoder is not None:
    paths["reconstructions.png"] = plot_reconstructions(
        images[:n], out["reconstruction"][:n], labels[:n], out["pred"][:n], names,
        os.path.join(out_dir, "reconstructions.png"),
        title=f"Test inputs (top) and reconstructions from the predicted capsule ({tag})")
    i = example_index
    cls = int(out["pred"][i])
    grid = perturbation_grid(run.model, out["v"][i], cls)
    paths["perturbations.png"] = plot_perturbations(
        grid, PERTURBATIONS, os.path.join(out_dir, "perturbations.png"), image=images[i],
        title=f"Perturbing each dimension of the '{names[cls]}' capsule (test example {i}, "
              f"true '{names[labels[i]]}')\n{tag}")
  else:
    logging.warning("the model has no decoder: skipping reconstructions and perturbations")
  nr = min(num_routing, len(images))
  c = couplings(run.model, images[:nr])
  paths["routing.png"] = plot_routing(
      images[:nr], c, labels[:nr], out["pred"][:nr], names,
      primary_grid(run.model_cfg, run.info.image_shape),
      os.path.join(out_dir, "routing.png"),
      title=f"Final coupling coefficients, primary capsules -> classes ({tag})")
  ne = len(images) if eval_examples == 0 else min(eval_examples, len(images))
  cm = confusion_matrix(labels[:ne], out["pred"][:ne], run.info.num_classes)
  paths["confusion.png"] = plot_confusion(
      cm, names, os.path.join(out_dir, "confusion.png"),
      title=f"Confusion matrix, first {ne} test examples: "
            f"{100 * np.trace(cm) / max(ne, 1):.2f}% correct\n{tag}")
  csv_path = os.path.join(run.workdir, metrics_lib.CSV_NAME)
  if os.path.exists(csv_path):
    paths["curves.png"] = metrics_lib.plot_curves(
        csv_path, os.path.join(out_dir, "curves.png"), title=f"CapsNet on {run.info.name}")
  else:
    logging.warning("no %s: skipping curves.png", csv_path)
  return paths


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  from capsjax import cpu_runtime  # pylint: disable=g-import-not-at-top
  cpu_runtime.configure_cpu_runtime()   # before JAX starts its backends.
  f = flags.FLAGS
  paths = make_figures(f.workdir, checkpoint=f.checkpoint, out_dir=f.out_dir,
                       num_examples=f.num_examples, num_routing=f.num_routing,
                       eval_examples=f.eval_examples, example_index=f.example_index,
                       data_dir=f.data_dir, manual_dir=f.manual_dir)
  for name, path in paths.items():
    logging.info("%s: %s", name, path)
  print("\n".join(paths.values()), flush=True)


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Run workdir (metrics.csv, checkpoints/).")
  flags.DEFINE_string("checkpoint", None,
                      "Checkpoint to load: a workdir, its checkpoints/ or checkpoints/<step>.")
  flags.DEFINE_string("out_dir", None, "Output directory; default WORKDIR/figures.")
  flags.DEFINE_integer("num_examples", 10, "Examples in the reconstruction grid.")
  flags.DEFINE_integer("num_routing", 4, "Examples in the routing figure.")
  flags.DEFINE_integer("eval_examples", 2000,
                       "Test examples for the confusion matrix (0 = all).")
  flags.DEFINE_integer("example_index", 0, "Test example whose capsule is perturbed.")
  flags.DEFINE_string("data_dir", None,
                      "TFDS data dir (default: the run's, from its config.json, else TFDS's).")
  flags.DEFINE_string("manual_dir", None,
                      "Directory with the original dataset files (default: the run's).")
  flags.mark_flag_as_required("workdir")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
