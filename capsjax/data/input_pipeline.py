"""Datasets as NumPy arrays: the dataset registry, `load_split` with its cache, batching.

No JAX import here: batches are NumPy, and `train.py` puts them on devices. `batch_at`
indexes and casts with array methods only, so the scanned training loop
(`steps.train_chunk`) runs the very same code on device arrays inside `jit`. Reading and
validating the original release files, and building TFDS datasets from them offline, is
`offline_data`'s job; downloading a dataset is `download_lib`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from capsjax import errors
from capsjax.data import download as download_lib
from capsjax.data import offline as offline_data

SPLITS = offline_data.SPLITS
CACHE_DIRNAME = "capsjax_cache"


# ----------------------------------------------------------------------------------------
# Dataset registry.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a supported dataset (no I/O needed to get them)."""

  name: str
  image_shape: tuple[int, int, int]  # (H, W, C)
  num_classes: int
  class_names: tuple[str, ...]
  num_train: int
  num_test: int

  def num_examples(self, split: str) -> int:
    return {"train": self.num_train, "test": self.num_test}[_check_split(split)]


_DATASET_INFOS = {
  "fashion_mnist": DatasetInfo(
    "fashion_mnist",
    (28, 28, 1),
    10,
    (
      "T-shirt/top",
      "Trouser",
      "Pullover",
      "Dress",
      "Coat",
      "Sandal",
      "Shirt",
      "Sneaker",
      "Bag",
      "Ankle boot",
    ),
    60000,
    10000,
  ),
  "kmnist": DatasetInfo(
    "kmnist",
    (28, 28, 1),
    10,
    ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    60000,
    10000,
  ),
  "mnist": DatasetInfo("mnist", (28, 28, 1), 10, tuple(str(d) for d in range(10)), 60000, 10000),
  "cifar10": DatasetInfo(
    "cifar10",
    (32, 32, 3),
    10,
    ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    50000,
    10000,
  ),
}
DATASETS = tuple(_DATASET_INFOS)


def dataset_info(name: str) -> DatasetInfo:
  """Returns the `DatasetInfo` of `name`.

  Raises:
    ConfigError: `name` is not one of `DATASETS` (the message lists them).
  """
  if name not in _DATASET_INFOS:
    raise errors.ConfigError(f"Unknown dataset {name!r}; supported: {', '.join(DATASETS)}.")
  return _DATASET_INFOS[name]


def _check_split(split: str) -> str:
  if split not in SPLITS:
    raise errors.ConfigError(f"split must be one of {SPLITS}, got {split!r}.")
  return split


# ----------------------------------------------------------------------------------------
# The decoded-array cache: `<data_dir>/capsjax_cache/<name>/<version>/<split>.npz`.
# ----------------------------------------------------------------------------------------


def _version(dataset: str) -> str:
  return str(tfds.builder_cls(dataset).VERSION)


def _cache_path(data_dir: str, dataset: str, split: str) -> str:
  return os.path.join(data_dir, CACHE_DIRNAME, dataset, _version(dataset), f"{split}.npz")


def _stat_fingerprint(paths: Sequence[str]) -> list[list[Any]]:
  """[name, size, mtime] of each file: any rewrite changes them.

  Not the full path: the same data_dir reached another way (a symlink, a relative path, a
  mount point on another machine) is the same source, and must not rebuild the cache.
  """
  out = []
  for p in paths:
    st = os.stat(p)
    out.append([os.path.basename(p), st.st_size, st.st_mtime_ns])
  return out


def _tfds_fingerprint(prepared: str | None) -> str | None:
  """Size and mtime of a TFDS dataset's `dataset_info.json`: any rebuild changes them."""
  if prepared is None:  # Nothing on disk to fingerprint: never cached.
    return None
  return json.dumps(
    {"source": "tfds", "files": _stat_fingerprint([os.path.join(prepared, "dataset_info.json")])}
  )


def _files_fingerprint(paths: Sequence[str]) -> str:
  return json.dumps({"source": "files", "files": _stat_fingerprint(paths)})


def _array_digest(images: np.ndarray, labels: np.ndarray) -> str:
  """sha256 over the dtypes, shapes and bytes of images [N, H, W, C] and labels [N]."""
  h = hashlib.sha256()
  for a in (images, labels):
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape};".encode())
    h.update(a)
  return h.hexdigest()


def _read_cache(path: str, fingerprint: str | None) -> tuple[np.ndarray, np.ndarray] | None:
  """The cached (images, labels) if built from the source we would read now and intact.

  The fingerprint catches a changed source; the digest catches a changed cache file (a
  partial copy, a tool that rewrote it), which would otherwise load silently.
  """
  if fingerprint is None or not os.path.isfile(path):
    return None
  try:
    with np.load(path) as z:
      if str(z["fingerprint"]) != fingerprint:
        logging.info("Cache %s is stale (its source changed); rebuilding it.", path)
        return None
      images, labels = z["image"], z["label"]
      stored = str(z["digest"]) if "digest" in z.files else None
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Ignoring unreadable cache %s (%s); rebuilding it.", path, e)
    return None
  if stored is None:
    logging.info("Cache %s has no digest (written by an older capsjax); rebuilding it.", path)
    return None
  if stored != _array_digest(images, labels):
    logging.warning(
      "Cache %s does not match its stored digest (modified or damaged); rebuilding it.", path
    )
    return None
  logging.info("Loaded decoded arrays from cache %s", path)
  return images, labels


def _write_cache(path: str, images: np.ndarray, labels: np.ndarray, fingerprint: str) -> None:
  """Writes the cache atomically; on any OSError (read-only data_dir) warns once and goes on."""
  tmp = f"{path}.tmp{os.getpid()}.npz"
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(
      tmp,
      image=images,
      label=labels,
      fingerprint=np.array(fingerprint),
      digest=np.array(_array_digest(images, labels)),
    )
    os.replace(tmp, path)
  except OSError as e:
    logging.warning("Not caching decoded arrays: cannot write %s (%s).", path, e)
    try:
      os.remove(tmp)
    except OSError:
      pass  # Never created, or the directory refuses even that.


# ----------------------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------------------


def _prepared_dir(data_dir: str, dataset: str) -> str | None:
  path = os.path.join(data_dir, dataset, _version(dataset))
  return path if os.path.isfile(os.path.join(path, "dataset_info.json")) else None


def _read_data_source(ds, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
  """Decodes a whole `tfds.data_source` split -> uint8 [N, H, W, C], int32 [N]."""
  n = len(ds)
  images = np.empty((n, *info.image_shape), np.uint8)
  labels = np.empty((n,), np.int32)
  chunk = 4096
  for start in range(0, n, chunk):
    idx = list(range(start, min(start + chunk, n)))
    try:
      records = ds.__getitems__(idx)
    except Exception:  # pylint: disable=broad-except  # mock_data: integer indexing only.
      records = [ds[i] for i in idx]
    for i, r in zip(idx, records, strict=False):
      images[i] = np.asarray(r["image"]).reshape(info.image_shape)
      labels[i] = int(r["label"])
  return images, labels


def _load_from_tfds(
  info: DatasetInfo,
  split: str,
  root: str,
  prepared: str | None,
  *,
  download: bool,
  manual_dir: str | os.PathLike | None,
) -> tuple[np.ndarray, np.ndarray, str | None]:
  """Reads a split through `tfds.data_source`, downloading first if allowed.

  Returns:
    images uint8 [N, H, W, C], labels int32 [N], and the prepared directory, or None
    when TFDS served the data without files on disk (`tfds.testing.mock_data`).
  """
  dataset = info.name
  builder = tfds.builder(dataset, data_dir=root, file_format="array_record")
  if prepared is not None:
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if file_format is not None and file_format != "array_record":
      raise errors.DatasetNotFoundError(
        f"{prepared} is prepared as {file_format}, which has no random access. "
        f"Rebuild it: `tfds build {dataset} --file_format=array_record "
        f"--data_dir={root}`, or delete it to let capsjax build it offline."
      )
  elif download:
    download_lib.download(dataset, data_dir=root)
    prepared = _prepared_dir(root, dataset)
    builder = tfds.builder(dataset, data_dir=root, file_format="array_record")
  try:  # Not prepared: only works where TFDS serves data itself (mock_data).
    ds = builder.as_data_source(split=split)
  except Exception as e:  # pylint: disable=broad-except
    if prepared is not None and split not in builder.info.splits:
      raise errors.DatasetNotFoundError(
        f"{prepared} has no split {split!r} (has {list(builder.info.splits)})."
      ) from e
    raise errors.DatasetNotFoundError(
      offline_data.not_found_message(
        dataset,
        split,
        data_dir=root,
        manual_dir=manual_dir,
        looked_in=[
          f"decoded-array cache: {_cache_path(root, dataset, split)}",
          f"TFDS array_record dataset: {os.path.join(root, dataset, _version(dataset))} "
          "(no dataset_info.json)",
        ],
      )
    ) from e
  try:
    images, labels = _read_data_source(ds, info)
  except (RuntimeError, OSError) as e:
    if prepared is None or not _damaged_file(e):
      raise
    files = sorted(n for n in os.listdir(prepared) if f"-{split}." in n)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise errors.DatasetValidationError(
      f"{prepared}: the {split!r} split's files ({', '.join(files)}) cannot be read "
      f"({first[:200]}). Move {prepared} aside and rerun: capsjax rebuilds it from the "
      "original files (--config.manual_dir) or, with --config.download=True, downloads it"
    ) from e
  return images, labels, prepared


def _damaged_file(e: BaseException) -> bool:
  """Whether an array_record read failed on the file's bytes (not on the code's use)."""
  text = str(e)
  return isinstance(e, OSError) or any(
    s in text for s in ("Riegeli", "Corrupted", "DATA_LOSS", "hash mismatch")
  )


def _original_files(dataset: str, manual_dir) -> dict[str, tuple[str, str] | None]:
  """{split: (images_path, labels_path) or None}; {} for a dataset without offline build."""
  if dataset not in offline_data.OFFLINE_DATASETS:
    return {}
  return {s: offline_data.find_original_files(dataset, s, manual_dir=manual_dir) for s in SPLITS}


def _load_from_files(
  info: DatasetInfo, split: str, files: Mapping[str, tuple[str, str] | None]
) -> tuple[np.ndarray, np.ndarray]:
  """Reads a split straight from its original files -> uint8 [N, H, W, C], int32 [N].

  Used when only some splits are on disk (K-MNIST's test files alone): no TFDS dataset is
  written then, because a half-built one would look prepared to TFDS and hide the missing
  split from every later `tfds.load`.
  """
  logging.info(
    "Only splits %s of %s found offline: reading %s from the original files "
    "(no TFDS dataset written).",
    [s for s in SPLITS if files[s]],
    info.name,
    files[split],
  )
  return offline_data.read_original_split(
    info.name, *files[split], expected_count=info.num_examples(split)
  )


def load_split(
  dataset: str,
  split: str,
  *,
  data_dir: str | os.PathLike | None = None,
  manual_dir: str | os.PathLike | None = None,
  download: bool = False,
  use_cache: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
  """Loads one split as NumPy arrays from the first source that has it.

  In order: the decoded-array cache, if it was built from the source below and its
  arrays are intact; the TFDS array_record dataset in `data_dir`; the original release
  files (`offline_data.find_original_files`), from which the TFDS dataset is built first
  if every split is there; with `download=True` only, a TFDS download.

  Args:
    dataset: one of `DATASETS`.
    split: 'train' or 'test'.
    data_dir: TFDS data dir; None = $TFDS_DATA_DIR or ~/tensorflow_datasets. The cache
      lives in `<data_dir>/capsjax_cache/` (delete it to drop the cache).
    manual_dir: directory with the original release files.
    download: allow a network download. Off by default: a missing dataset then raises in
      well under a second. On, an unreachable download host raises within seconds
      (`download_lib.download`), before TFDS would retry for minutes.
    use_cache: read and write the decoded-array cache.

  Returns:
    images uint8 [N, H, W, C] and labels int32 [N].

  Raises:
    ConfigError: unknown dataset or split.
    DatasetNotFoundError (a FileNotFoundError): nothing found; the message lists every
      place looked in and how to fix it.
    DatasetValidationError (a ValueError): original files found but invalid.
  """
  info = dataset_info(dataset)
  _check_split(split)
  root = offline_data.default_data_dir(data_dir)
  cache = _cache_path(root, dataset, split)
  prepared = _prepared_dir(root, dataset)
  files = _original_files(dataset, manual_dir) if prepared is None else {}
  fingerprint = (
    _files_fingerprint(files[split]) if files.get(split) else _tfds_fingerprint(prepared)
  )
  if use_cache and (hit := _read_cache(cache, fingerprint)) is not None:
    return hit

  if files and all(files.values()):
    prepared = offline_data.prepare_offline(
      dataset,
      data_dir=root,
      source_files=files,
      expected_counts={s: info.num_examples(s) for s in SPLITS},
    )
  if prepared is None and files.get(split):
    images, labels = _load_from_files(info, split, files)
  else:
    images, labels, prepared = _load_from_tfds(
      info, split, root, prepared, download=download, manual_dir=manual_dir
    )
    fingerprint = _tfds_fingerprint(prepared)
  # No fingerprint: TFDS served data without files on disk (`tfds.testing.mock_data`).
  # Never cached, so fake data cannot pass for real data later.
  if use_cache and fingerprint is not None:
    _write_cache(cache, images, labels, fingerprint)
  return images, labels


# ----------------------------------------------------------------------------------------
# Batching.
# ----------------------------------------------------------------------------------------


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Training steps per epoch; the remainder is dropped."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  return num_examples // batch_size


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 [..., H, W, C] -> float32 in [0, 1]."""
  return images.astype(np.float32) * np.float32(1.0 / 255.0)


# The validation split does not depend on config.seed: runs with different seeds (and
# different train_examples) hold out the same examples, so their validation numbers compare.
VAL_SPLIT_SEED = 1710_09829


def split_validation(images: np.ndarray, labels: np.ndarray, num_val: int):
  """Holds `num_val` examples of a training split out for validation, deterministically.

  The held-out examples are the last `num_val` of a fixed permutation (seed
  `VAL_SPLIT_SEED`); the training examples keep their original order.

  Args:
    images: [N, H, W, C].
    labels: [N].
    num_val: examples to hold out, 0 <= num_val < N.

  Returns:
    (train_images [N - num_val, ...], train_labels, val_images [num_val, ...], val_labels).
  """
  n = len(labels)
  if len(images) != n:
    raise ValueError(f"images has {len(images)} examples but labels has {n}.")
  if not 0 <= num_val < n:  # num_val is the user's config.val_examples.
    raise errors.ConfigError(
      f"config.val_examples must be in [0, {n}) for a training split of {n} examples, got "
      f"{num_val}."
    )
  if num_val == 0:
    return images, labels, images[:0], labels[:0]
  perm = np.random.default_rng(VAL_SPLIT_SEED).permutation(n)
  val_idx = np.sort(perm[n - num_val :])
  keep = np.ones(n, bool)
  keep[val_idx] = False
  return images[keep], labels[keep], images[val_idx], labels[val_idx]


def epoch_permutation(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
  """The example order of `epoch`: int64 [N], from `np.random.default_rng([seed, epoch])`."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def epoch_batch_indices(num_examples: int, *, batch_size: int, seed: int, epoch: int) -> np.ndarray:
  """The examples of every batch of `epoch`: int32 [S, B], S = steps_per_epoch.

  Row s is batch s of `train_batches(..., seed=seed, epoch=epoch)`: the first S * B
  entries of `epoch_permutation`, the last N % B dropped.
  """
  steps = steps_per_epoch(num_examples, batch_size)
  perm = epoch_permutation(num_examples, seed=seed, epoch=epoch)  # [N]
  return perm[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)  # [S, B]


def batch_at(images, labels, idx) -> dict[str, Any]:
  """The training batch of the examples `idx` [B].

  Works on NumPy arrays and, unchanged, on JAX arrays inside `jit` (the scanned loop
  gathers from the uint8 set on the device), so both loops cast pixels the same way.

  Args:
    images: uint8 [N, H, W, C].
    labels: int [N].
    idx: int [B].

  Returns:
    {'image': float32 [B, H, W, C] in [0, 1], 'label': int32 [B]}.
  """
  return {
    "image": to_float(images[idx]),  # [B, H, W, C]
    "label": labels[idx].astype(np.int32),
  }  # [B]


def train_batches(
  images: np.ndarray,
  labels: np.ndarray,
  *,
  batch_size: int,
  seed: int,
  epoch: int,
  start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields the shuffled batches of one epoch, starting at batch `start_step`.

  Args:
    images: uint8 [N, H, W, C].
    labels: int [N].
    batch_size: B; the last N % B examples of the permutation are dropped.
    seed, epoch: the order is `epoch_permutation(N, seed=seed, epoch=epoch)`.
    start_step: index of the first batch to yield (resuming mid-epoch).

  Yields:
    {'image': float32 [B, H, W, C] in [0, 1], 'label': int32 [B]}.
  """
  if len(images) != len(labels):
    raise ValueError(f"images has {len(images)} examples but labels has {len(labels)}.")
  steps = steps_per_epoch(len(images), batch_size)
  if not 0 <= start_step <= steps:
    raise ValueError(f"start_step must be in [0, {steps}], got {start_step}.")
  indices = epoch_batch_indices(len(images), batch_size=batch_size, seed=seed, epoch=epoch)
  for step in range(start_step, steps):
    yield batch_at(images, labels, indices[step])


def eval_batches(
  images: np.ndarray,
  labels: np.ndarray,
  *,
  batch_size: int,
  multiple_of: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields every example exactly once, in order; the last batch is padded.

  A `batch_size` larger than the split shrinks to the split's size rounded up to
  `multiple_of` (the device count, which every batch must divide into): padding beyond
  that would only allocate zeros, terabytes of them for a mistyped size.

  Yields:
    {'image': float32 [B, H, W, C], 'label': int32 [B], 'mask': bool [B]}; padding rows
    are zero images with label 0 and mask False.
  """
  if len(images) != len(labels):
    raise ValueError(f"images has {len(images)} examples but labels has {len(labels)}.")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  n = len(images)
  batch_size = min(batch_size, -(-n // multiple_of) * multiple_of)
  for start in range(0, n, batch_size):
    count = min(batch_size, n - start)
    image = np.zeros((batch_size, *images.shape[1:]), np.float32)  # [B, H, W, C]
    label = np.zeros((batch_size,), np.int32)  # [B]
    mask = np.zeros((batch_size,), bool)  # [B]
    image[:count] = to_float(images[start : start + count])
    label[:count] = labels[start : start + count]
    mask[:count] = True
    yield {"image": image, "label": label, "mask": mask}
