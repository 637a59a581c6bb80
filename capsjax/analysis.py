"""Analysis of a trained CapsNet: load a run, predict, couplings, perturbations, confusion.

Arrays in, NumPy arrays out; nothing here draws (`capsjax.visualize` does) or reads
flags, so notebooks and `experiments/` can use it without matplotlib.

  run = analysis.load_run("/tmp/caps_fmnist")            # latest checkpoint
  images, labels = analysis.load_test_images(run.info.name, 100)
  out = analysis.predict(run.model, images)              # v, class_scores, pred, reconstruction
  c = analysis.couplings(run.model, images[:8])          # [8, N_in, N_out]
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

from capsjax.run import checkpoint as ckpt_lib
from capsjax import errors
from capsjax.data import input_pipeline
from capsjax import models
from capsjax.run import cpu_runtime

# Offsets added to one capsule dimension: -0.25, -0.20, ..., 0.25 (paper Fig. 4). Built
# from integers so the middle one is exactly 0.0.
PERTURBATIONS = np.arange(-5, 6, dtype=np.float32) / np.float32(20.0)  # [11]


# ----------------------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
  """A restored CapsNet with what is known about the run that trained it."""

  model: models.CapsNet
  info: input_pipeline.DatasetInfo  # image_shape/num_classes as in the checkpoint
  meta: dict  # checkpoint metadata
  model_cfg: dict  # config.model of the run (plain dict)
  workdir: str  # the run's workdir
  step: int  # the restored checkpoint's step
  config: dict  # the run's config.json ({} when there is none)


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def load_run(path: str, *, step: int | None = None) -> Run:
  """Restores the model of a checkpoint (its weights only, not the optimizer).

  The architecture comes from the checkpoint's metadata (`meta['model']`,
  `meta['dataset']`, `meta['image_shape']`, `meta['num_classes']`), falling back to the
  run's `config.json`.

  Args:
    path: a run workdir (latest checkpoint), its `checkpoints/` dir, or
      `checkpoints/<step>`.
    step: restore this step instead of the one `path` resolves to.

  Returns:
    A `Run`; `run.model` is an `nnx` CapsNet holding the trained weights.

  Raises:
    CheckpointNotFoundError: no checkpoint at `path` (or of `step`).
    CheckpointReadError: neither the metadata nor `config.json` describe the model.
    CheckpointMismatchError: the saved weights do not fit the model the metadata describe.
  """
  workdir, found = ckpt_lib.find_checkpoint(path)
  # The latest checkpoint falls back, with a warning, to the newest readable one before it,
  # as training and mode=eval do; a step that is named is restored or refused as it is.
  fallback = step is None and not ckpt_lib.names_a_step(path)
  step = found if step is None else int(step)
  saved = _read_json(os.path.join(workdir, "config.json")) or {}

  def restore(step: int):
    meta = ckpt.read_meta(step)
    model_cfg = meta.get("model") or saved.get("model")
    dataset = meta.get("dataset") or saved.get("dataset")
    if not model_cfg or not dataset:
      raise errors.CheckpointReadError(
        f"checkpoint {ckpt.directory}/{step} has no 'model'/'dataset' metadata and "
        f"{workdir}/config.json does not give them either; cannot rebuild the model"
      )
    info = input_pipeline.dataset_info(dataset)
    info = dataclasses.replace(
      info,
      image_shape=tuple(meta.get("image_shape", info.image_shape)),
      num_classes=int(meta.get("num_classes", info.num_classes)),
    )
    # Shapes only: the weights come from the checkpoint, so nothing is initialised.
    abstract = nnx.eval_shape(
      lambda: models.create_model(
        config_dict.ConfigDict(model_cfg),
        image_shape=info.image_shape,
        num_classes=info.num_classes,
        rngs=nnx.Rngs(params=jax.random.key(0)),
        conv_impl=cpu_runtime.resolve_conv_impl(model_cfg.get("conv_impl", "auto")),
      )
    )
    graphdef, target = nnx.split(abstract)
    model = nnx.merge(graphdef, ckpt.restore_params(step, target))
    model.eval()  # evaluation behaviour: BatchNorm reads its running statistics.
    return meta, model_cfg, dataset, info, model

  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    candidates = [s for s in ckpt.all_steps() if s <= step] if fallback else [step]
    step, (meta, model_cfg, dataset, info, model) = ckpt.first_readable(
      candidates, restore, advice=""
    )
  finally:
    ckpt.close()
  logging.info(
    "restored %s step %d (%s, %d routing iterations)",
    ckpt.directory,
    step,
    dataset,
    model.digit_caps.routing_iterations,
  )
  return Run(
    model=model,
    info=info,
    meta=meta,
    model_cfg=dict(model_cfg),
    workdir=workdir,
    step=step,
    config=saved,
  )


def load_test_images(
  dataset: str, num: int, *, data_dir: str | None = None, manual_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """The first `num` test examples (0 = all).

  Returns:
    (images float32 [N, H, W, C] in [0, 1], labels int32 [N]).
  """
  images, labels = input_pipeline.load_split(
    dataset, "test", data_dir=data_dir, manual_dir=manual_dir
  )
  if num:
    images, labels = images[:num], labels[:num]
  return input_pipeline.to_float(images), np.asarray(labels, np.int32)


# ----------------------------------------------------------------------------------------
# Pure computations.
# ----------------------------------------------------------------------------------------
def _jitted(model: nnx.Module, fn):
  """jax.jit of `fn(model, *args)` with the model split once (no nnx.jit overhead).

  The model runs in the mode it is in: a model with BatchNorm (Efficient-CapsNet) should
  be in evaluation mode (`model.eval()`, as `load_run` leaves it) to use its running
  statistics; its state is never written back.
  """
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda s, *args: fn(nnx.merge(graphdef, s), *args))
  return lambda *args: jitted(state, *args)


def _as_images(model: models.CapsNet, images) -> np.ndarray:
  images = np.asarray(images, np.float32)
  model.check_images(images)  # before jit, so the error is not buried in a trace.
  return images


def predict(model: models.CapsNet, images, *, batch_size: int = 100) -> dict[str, np.ndarray]:
  """Runs the model in batches (decoder masked by the predicted class).

  Args:
    model: a CapsNet.
    images: float32 [N, H, W, C] in [0, 1].
    batch_size: examples per jitted call.

  Returns:
    {'v': [N, N_out, D_out], 'class_scores': [N, N_out], 'pred': [N] int32,
     'reconstruction': [N, H, W, C] (if the model has a decoder)} as NumPy arrays.
  """
  images = _as_images(model, images)
  fwd = _jitted(model, lambda m, x: m(x))
  parts: dict[str, list[np.ndarray]] = {}
  n = len(images)
  for start in range(0, n, batch_size):
    chunk = images[start : start + batch_size]  # [b, H, W, C]
    pad = batch_size - len(chunk) if n > batch_size else 0  # one compiled shape
    x = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)]) if pad else chunk
    out = jax.device_get(fwd(x))
    for k, v in out.items():
      parts.setdefault(k, []).append(np.asarray(v)[: len(chunk)])
  return {k: np.concatenate(v) for k, v in parts.items()}


def couplings(model: models.CapsNet, images) -> np.ndarray:
  """Final coupling coefficients: the `assignments` of the model's routing algorithm
  (`capsjax.routing.Routed`): dynamic routing's c, EM's R, inverted dot-product
  routing's r, self-attention's C (without the log prior).

  Args:
    model: any model `models.create_model` builds.
    images: float32 [B, H, W, C].

  Returns:
    c [B, N_in, N_out]; each input capsule's row sums to 1 over N_out.
  """
  images = _as_images(model, images)
  fwd = _jitted(model, lambda m, x: m.routed(x).assignments)
  return np.asarray(jax.device_get(fwd(images)))  # [B, N_in, N_out]


def coupling_entropy(c) -> np.ndarray:
  """Entropy (nats) of each input capsule's coupling distribution over the classes.

  Args:
    c: [..., N_in, N_out], summing to 1 over N_out.

  Returns:
    [..., N_in] float64. log(N_out) (2.303 for 10 classes) is uniform routing (every
    1-iteration model); 0 is all-to-one routing.
  """
  c = np.asarray(c, np.float64)
  return -np.sum(np.where(c > 0, c * np.log(np.where(c > 0, c, 1.0)), 0.0), axis=-1)


def perturbation_grid(
  model: models.CapsNet, v, cls: int, *, deltas: Sequence[float] = PERTURBATIONS
) -> np.ndarray:
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
  deltas = np.asarray(deltas, np.float32)  # [K]
  k = len(deltas)
  offsets = np.zeros((d_out, k, n_out, d_out), np.float32)  # [D_out, K, N_out, D_out]
  offsets[np.arange(d_out), :, int(cls), np.arange(d_out)] = deltas
  vs = (v[None, None] + offsets).reshape(d_out * k, n_out, d_out)  # [D_out*K, N_out, D_out]
  decode = _jitted(model, lambda m, x, c: m.decoder(x, c))
  # Decode one image at a time (the same batch shape as a plain single-example decode):
  # XLA's matmul blocking may depend on the batch size, and delta 0 must reproduce the
  # unperturbed reconstruction bit for bit.
  cls_arr = np.full((1,), int(cls), np.int32)
  recon = np.stack([np.asarray(decode(vs[i : i + 1], cls_arr))[0] for i in range(len(vs))])
  return recon.reshape(d_out, k, *recon.shape[1:])  # [D_out, K, H, W, C]


def confusion_matrix(labels, preds, num_classes: int) -> np.ndarray:
  """Counts of (true, predicted) class pairs.

  Args:
    labels: [N] int true classes.
    preds: [N] int predicted classes.
    num_classes: K.

  Returns:
    int64 [K, K]; entry [t, p] counts examples of class t predicted as p.
  """
  labels, preds = np.asarray(labels), np.asarray(preds)
  if labels.shape != preds.shape:
    raise ValueError(f"labels {labels.shape} and preds {preds.shape} must have the same shape")
  out = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(out, (labels, preds), 1)
  return out


def primary_grid(model_cfg: dict, image_shape: Sequence[int]) -> tuple[int, int, int]:
  """(H', W', types) of the PrimaryCaps grid; N_in = H' * W' * types in that order.

  Args:
    model_cfg: config.model as a dict (conv1_kernel, primary_kernel, primary_stride,
      primary_types).
    image_shape: (H, W, C) of the input images.
  """
  h, w = image_shape[:2]
  k1, kp, sp = model_cfg["conv1_kernel"], model_cfg["primary_kernel"], model_cfg["primary_stride"]
  return ((h - k1 + 1 - kp) // sp + 1, (w - k1 + 1 - kp) // sp + 1, int(model_cfg["primary_types"]))


def model_primary_grid(model, model_cfg: dict, image_shape: Sequence[int]) -> tuple[int, int, int]:
  """(H', W', types) of a model's primary capsules: the model's own `primary_grid`
  (every architecture in `models` has one), else `primary_grid` of its config."""
  grid = getattr(model, "primary_grid", None)
  return tuple(grid) if grid is not None else primary_grid(model_cfg, image_shape)
