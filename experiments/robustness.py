r"""The paper's two robustness experiments on any 28x28 dataset: affine-transformed test sets
(Sec. 5.2) and overlapping pairs (Sec. 6), CapsNet beside the paper's baseline CNN.

  python -m experiments.robustness --config=configs/affine_robustness.py:quick \
      --models=capsnet,baseline_cnn --workdir=runs/affine_quick
  python -m experiments.robustness --config=configs/overlapping_pairs.py:quick \
      --models=capsnet,baseline_cnn --workdir=runs/pairs_quick

For each model in --models (`config.model.name` when not given) the script trains on
training images generated on the device every step (random placement on the canvas, or
fresh pairs), then evaluates on the first `eval_examples` test images:
  affine: 'clean' (centred on the canvas), 'expanded' (randomly placed), and 'affine' at
    each of `affine.strengths` (`capsjax.canvas.random_affine` with the ranges scaled);
  pairs: pair accuracy (both labels among the two highest scores) and the measured mean
    overlap of the two objects.
Every test set is deterministic in `seed` and `eval_batch_size`. Written into --workdir:
results.csv and results.md (one row per model and set), accuracy_vs_strength.png
(affine) or reconstructions.png (pairs, CapsNet: each object reconstructed from its own
capsule, the paper's Fig. 5), and examples.png (the test sets' first images).

This is a research script, not the `capsjax.main` driver: it keeps no checkpoints, so an
interrupted run starts again.
"""

from __future__ import annotations

import csv
import os
import time
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags
from absl import logging
from flax import nnx
from ml_collections import config_flags

from capsjax import canvas as canvas_lib
from capsjax import losses
from capsjax import models
from capsjax import pair_losses
from capsjax.data import input_pipeline
from capsjax.models.baseline_cnn import BaselineCNN
from capsjax import setup
from capsjax.run import cpu_runtime

MODELS = ("capsnet", "baseline_cnn")
EXPERIMENTS = ("affine", "pairs")


# ----------------------------------------------------------------------------------------
# Models and data.
# ----------------------------------------------------------------------------------------
def build_model(config, name: str, num_classes: int, key: jax.Array) -> nnx.Module:
  """`name`'s network on the config's canvas: CapsNet or the baseline CNN."""
  if name not in MODELS:
    raise ValueError(f"model name must be one of {MODELS}, got {name!r}")
  shape = (config.canvas, config.canvas, 1)
  conv_impl = cpu_runtime.resolve_conv_impl("auto")
  fields = dict(config.model[name].items())
  if name == "capsnet":
    cfg = dict(fields, conv_impl=conv_impl, architecture="capsnet", routing="dynamic")
    return models.create_model(
      cfg, image_shape=shape, num_classes=num_classes, rngs=nnx.Rngs(params=key)
    )
  return BaselineCNN(
    **fields,
    conv_impl=conv_impl,
    image_shape=shape,
    num_classes=num_classes,
    rngs=nnx.Rngs(params=key),
  )


def load_data(config) -> dict[str, np.ndarray]:
  """{'train_x', 'train_y', 'test_x', 'test_y'}: uint8 [N, 28, 28, 1] and int32 [N]."""
  out = {}
  for split, limit in (("train", config.train_examples), ("test", config.eval_examples)):
    x, y = setup.load_data(config, split, limit)
    out[f"{split}_x"], out[f"{split}_y"] = np.asarray(x), np.asarray(y, np.int32)
  return out


def affine_ranges(config, strength: float) -> canvas_lib.AffineRanges:
  """`config.affine`'s ranges scaled by `strength`: rotation and shear x strength, the
  scale range pulled towards 1 (strength 0: translation alone)."""
  a = config.affine
  return canvas_lib.AffineRanges(
    max_rotation_deg=a.max_rotation_deg * strength,
    max_shear=a.max_shear * strength,
    scale_min=1 - (1 - a.scale_min) * strength,
    scale_max=1 + (a.scale_max - 1) * strength,
  )


def _mse(x: jax.Array, y: jax.Array) -> jax.Array:
  """[B, H, W, C] x2 -> [B] per-example mean squared error."""
  return jnp.mean(jnp.square(x - y), axis=(1, 2, 3))


# ----------------------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------------------
def make_batch(config, key: jax.Array, x: jax.Array, labels: jax.Array) -> dict:
  """float [B, 28, 28, 1] in [0, 1], labels [B] -> the training canvas batch.

  affine: {'image' [B, S, S, 1], 'labels' [B]}; pairs: `canvas.overlapping_pairs`'
  dict with 'labels' [B, 2].
  """
  if config.experiment == "affine":
    return {"image": canvas_lib.random_translate(key, x, canvas=config.canvas), "labels": labels}
  return canvas_lib.overlapping_pairs(
    key, x, labels, canvas=config.canvas, max_shift=config.pairs.max_shift
  )


def losses_and_metrics(config, name: str, model, batch: dict, dropout_key) -> tuple:
  """(mean loss [], {'loss', 'accuracy'}) of one model on one canvas batch (training)."""
  img, labels = batch["image"], batch["labels"]
  if name == "baseline_cnn":
    logits = model(img, deterministic=False, dropout_key=dropout_key)["logits"]
    if config.experiment == "affine":
      per_example = pair_losses.softmax_xent(logits, labels)
      correct = jnp.argmax(logits, -1) == labels
    else:
      per_example = pair_losses.sigmoid_pair_xent(logits, labels)
      correct = pair_losses.pair_accuracy(logits, labels)
  elif config.experiment == "affine":
    out = model(img, labels)
    per_example = losses.margin_loss(out["class_scores"], labels)
    per_example += config.recon_weight * _mse(out["reconstruction"], img)
    correct = out["pred"] == labels
  else:
    # Each object reconstructed from its own capsule, against that object alone.
    r = model.routed(img)
    scores = model.class_scores(r)  # [B, K]
    per_example = pair_losses.two_target_margin_loss(scores, labels)
    for i, target in enumerate((batch["first"], batch["second"])):
      per_example += config.recon_weight * _mse(model.decoder(r.poses, labels[:, i]), target)
    correct = pair_losses.pair_accuracy(scores, labels)
  loss = jnp.mean(per_example)
  return loss, {"loss": loss, "accuracy": jnp.mean(correct.astype(jnp.float32))}


def train(config, name: str, data: dict, num_classes: int) -> tuple[nnx.Module, list[dict]]:
  """Trains `name` for `num_epochs`; returns (model, one metrics dict per epoch)."""
  key = jax.random.key(config.seed)
  init_key, data_key = jax.random.split(key)
  model = build_model(config, name, num_classes, init_key)
  n = len(data["train_y"])
  steps = n // config.batch_size
  if steps < 1:
    raise ValueError(
      f"config.batch_size={config.batch_size} is larger than the {n} training images"
    )
  schedule = optax.exponential_decay(config.learning_rate, steps, config.decay_rate, staircase=True)
  optimizer = nnx.Optimizer(model, optax.adam(schedule), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  @jax.jit
  def step(state, images, labels, key):
    model, optimizer = nnx.merge(graphdef, state)
    k_batch, k_drop = jax.random.split(key)
    batch = make_batch(config, k_batch, images.astype(jnp.float32) / 255.0, labels)
    grad_fn = nnx.value_and_grad(
      lambda m: losses_and_metrics(config, name, m, batch, k_drop), has_aux=True
    )
    (_, aux), grads = grad_fn(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), aux

  history = []
  for epoch in range(config.num_epochs):
    start = time.time()
    order = np.random.default_rng([config.seed, epoch]).permutation(n)
    sums = {"loss": 0.0, "accuracy": 0.0}
    for i in range(steps):
      idx = order[i * config.batch_size : (i + 1) * config.batch_size]
      k = jax.random.fold_in(data_key, epoch * steps + i)
      state, aux = step(state, data["train_x"][idx], data["train_y"][idx], k)
      for m in sums:
        sums[m] += float(aux[m])
    row = {"epoch": epoch + 1, **{m: v / steps for m, v in sums.items()}}
    row["seconds"] = time.time() - start
    history.append(row)
    logging.info("%s epoch %d: %s", name, epoch + 1, row)
  model, _ = nnx.merge(graphdef, state)
  return model, history


# ----------------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------------
def scores_fn(model) -> Callable[[jax.Array], jax.Array]:
  """Jitted images [B, S, S, 1] -> class scores [B, K], without dropout."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def fn(state, images):
    m = nnx.merge(graphdef, state)
    if isinstance(m, BaselineCNN):
      return m(images, deterministic=True)["class_scores"]
    return m.class_scores(m.routed(images))

  return lambda images: fn(state, images)


def test_sets(config) -> list[tuple[str, float | None, Callable]]:
  """(set name, strength or None, jitted (key, x float [B, 28, 28, 1], labels) -> batch)."""
  s = config.canvas
  if config.experiment == "pairs":
    return [("pairs", None, jax.jit(lambda k, x, y: make_batch(config, k, x, y)))]
  offset = (s - 28) // 2

  def clean(key, x, y):
    del key
    offsets = jnp.full((x.shape[0], 2), offset, jnp.int32)
    return {"image": canvas_lib.place(x, offsets, canvas=s), "labels": y}

  def expanded(key, x, y):
    return {"image": canvas_lib.random_translate(key, x, canvas=s), "labels": y}

  def affine(strength):
    ranges = affine_ranges(config, strength)
    return lambda k, x, y: {
      "image": canvas_lib.random_affine(k, x, ranges=ranges, canvas=s)["image"],
      "labels": y,
    }

  sets = [("clean", None, jax.jit(clean)), ("expanded", None, jax.jit(expanded))]
  sets += [("affine", float(t), jax.jit(affine(float(t)))) for t in config.affine.strengths]
  return sets


def evaluate(config, model, data: dict) -> list[dict[str, Any]]:
  """One row per test set: {'set', 'strength', 'accuracy', 'count'} (+ 'mean_overlap')."""
  scores = scores_fn(model)
  x_all = data["test_x"].astype(np.float32) / 255.0
  y_all = data["test_y"]
  bs = config.eval_batch_size
  rows = []
  for set_name, strength, make in test_sets(config):
    # The same key per set and batch index in every run and for every model (the affine
    # strengths share theirs: the same draws, scaled).
    set_key = jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(set_name.encode()))
    correct, overlap, count = 0.0, 0.0, 0
    for i in range(0, len(y_all), bs):
      x, y = x_all[i : i + bs], y_all[i : i + bs]
      batch = make(jax.random.fold_in(set_key, i // bs), jnp.asarray(x), jnp.asarray(y))
      s = scores(batch["image"])
      if set_name == "pairs":
        correct += float(jnp.sum(pair_losses.pair_accuracy(s, batch["labels"])))
        overlap += float(jnp.sum(canvas_lib.overlap_fraction(batch["first"], batch["second"])))
      else:
        correct += float(jnp.sum(jnp.argmax(s, -1) == batch["labels"]))
      count += len(y)
    row = {"set": set_name, "strength": strength, "accuracy": correct / count, "count": count}
    if set_name == "pairs":
      row["mean_overlap"] = overlap / count
    rows.append(row)
  return rows


# ----------------------------------------------------------------------------------------
# Figures and tables.
# ----------------------------------------------------------------------------------------
def write_results(workdir: str, rows: list[dict]) -> None:
  """results.csv and results.md: one row per (model, set, strength)."""
  fields = ["model", "set", "strength", "accuracy", "count", "mean_overlap", "params"]
  fields += ["train_seconds", "published"]
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fields)
    w.writeheader()
    for r in rows:
      w.writerow({k: r.get(k, "") for k in fields})
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown(rows) + "\n")


def markdown(rows: list[dict]) -> str:
  """The rows as a Markdown table (accuracy in %)."""
  lines = [
    "| model | test set | strength | accuracy | images | the paper |",
    "|---|---|---:|---:|---:|---:|",
  ]
  for r in rows:
    strength = "" if r.get("strength") is None else f"{r['strength']:g}"
    paper = f"{100 * r['published']:.1f}%" if r.get("published") else ""
    overlap = f" (overlap {100 * r['mean_overlap']:.0f}%)" if "mean_overlap" in r else ""
    lines.append(
      f"| {r['model']} | {r['set']}{overlap} | {strength} | {100 * r['accuracy']:.2f}% "
      f"| {r['count']} | {paper} |"
    )
  return "\n".join(lines)


def plot_strengths(workdir: str, rows: list[dict]) -> None:
  """accuracy_vs_strength.png: affine test accuracy against transform strength per model."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name in dict.fromkeys(r["model"] for r in rows):
    pts = sorted(
      (r["strength"], r["accuracy"]) for r in rows if r["model"] == name and r["set"] == "affine"
    )
    ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=name)
  ax.set_xlabel("affine strength (1 = affNIST's ranges)")
  ax.set_ylabel("test accuracy (%)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "accuracy_vs_strength.png"), dpi=120)
  plt.close(fig)


def plot_examples(workdir: str, config, data: dict, model=None, num: int = 8) -> None:
  """examples.png (each test set's first images) and, for a CapsNet on pairs,
  reconstructions.png: the pair, then each object's reconstruction from its capsule."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  x = jnp.asarray(data["test_x"][:num].astype(np.float32) / 255.0)
  y = jnp.asarray(data["test_y"][:num])
  key = jax.random.key(config.seed)
  sets = [(n if t is None else f"{n} {t:g}", make(key, x, y)) for n, t, make in test_sets(config)]
  rows = [(label, b["image"]) for label, b in sets]
  if model is not None and config.experiment == "pairs" and not isinstance(model, BaselineCNN):
    b = sets[0][1]
    r = model.routed(b["image"])
    rows += [
      (f"from capsule of label {i + 1}", model.decoder(r.poses, b["labels"][:, i]))
      for i in range(2)
    ]
    name = "reconstructions.png"
  else:
    name = "examples.png"
  fig, axes = plt.subplots(len(rows), num, figsize=(num * 0.9, len(rows) * 1.0), squeeze=False)
  for i, (label, imgs) in enumerate(rows):
    for j in range(num):
      axes[i, j].imshow(np.asarray(imgs[j, ..., 0]), cmap="gray", vmin=0, vmax=1)
      axes[i, j].axis("off")
    axes[i, 0].set_title(label, fontsize=7, loc="left")
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, name), dpi=100)
  plt.close(fig)


# ----------------------------------------------------------------------------------------
# The experiment.
# ----------------------------------------------------------------------------------------
def run(config, model_names, workdir: str | None = None) -> list[dict]:
  """Trains and evaluates each model; returns the result rows (and writes them)."""
  if config.experiment not in EXPERIMENTS:
    raise ValueError(f"config.experiment must be one of {EXPERIMENTS}, got {config.experiment!r}")
  data = load_data(config)
  num_classes = input_pipeline.dataset_info(config.dataset).num_classes
  rows = []
  for name in model_names:
    start = time.time()
    model, _ = train(config, name, data, num_classes)
    seconds = time.time() - start
    params = models.count_params(model)
    for r in evaluate(config, model, data):
      hard = r["set"] == "pairs" or (r["set"] == "affine" and r["strength"] == 1.0)
      published = config.published[name] if hard else 0.0
      rows.append(dict(r, model=name, params=params, train_seconds=seconds, published=published))
    if workdir:
      os.makedirs(workdir, exist_ok=True)
      plot_examples(workdir, config, data, model)
  if workdir:
    write_results(workdir, rows)
    if config.experiment == "affine":
      plot_strengths(workdir, rows)
  return rows


def main(argv):
  del argv
  config = flags.FLAGS.config
  names = flags.FLAGS.models or [config.model.name]
  rows = run(config, names, flags.FLAGS.workdir)
  print(markdown(rows))


def _define_flags() -> None:
  # Defined when run as a script only: tests import this module beside capsjax.main,
  # which defines --config too.
  config_flags.DEFINE_config_file("config", None, "A robustness config file.")
  flags.DEFINE_list("models", [], "Models to compare (default: config.model.name).")
  flags.DEFINE_string("workdir", None, "Where results and figures go.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
