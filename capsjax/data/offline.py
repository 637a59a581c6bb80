"""Original release files (MNIST-family IDX, K-MNIST npz) -> validated NumPy arrays, and
the official TFDS datasets built from them without TensorFlow or a network.

`read_original_split` checks every file it reads: IDX magic numbers and header
dimensions, image shape, label range, example counts, and published digests. A file
byte-identical to the upstream release must match its digest; a re-compressed copy is
checked on its decompressed payload where that digest is known, and otherwise accepted with
a warning; a file whose digest belongs to another dataset is rejected.

`prepare_offline` writes the same array_record dataset as the official TFDS builder (same
name and version, PNG-encoded with PIL), so `tfds.data_source(name)` reads it afterwards.
The same builders fetch the upstream files when `download.download` asks for them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import registered
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from capsjax import errors

SPLITS = ("train", "test")
MANUAL_DIR_ENV = "CAPSJAX_MANUAL_DIR"
# Datasets that can be built offline from their original release files.
OFFLINE_DATASETS = ("fashion_mnist", "kmnist", "mnist")
# What every OFFLINE_DATASETS release holds; `input_pipeline.DATASETS` states the same.
RELEASE_COUNTS = {"train": 60000, "test": 10000}
IMAGE_SHAPE = (28, 28, 1)  # (H, W, C)
NUM_CLASSES = 10

_IDX_NAMES = {
  "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_NPZ_NAMES = {
  "train": ("kmnist-train-imgs.npz", "kmnist-train-labels.npz"),
  "test": ("kmnist-test-imgs.npz", "kmnist-test-labels.npz"),
}
# Debian's dataset-fashion-mnist package.
_DEFAULT_DIRS = {"fashion_mnist": ("/usr/share/datasets/fashion-mnist",)}

# Upstream `.gz` files: (size, sha256), as in tensorflow_datasets/url_checksums/*.txt.
_GZ_SHA256 = {
  "fashion_mnist": {
    "t10k-images-idx3-ubyte.gz": (
      4422102,
      "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    ),
    "t10k-labels-idx1-ubyte.gz": (
      5148,
      "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    ),
    "train-images-idx3-ubyte.gz": (
      26421880,
      "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    ),
    "train-labels-idx1-ubyte.gz": (
      29515,
      "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    ),
  },
  "kmnist": {
    "t10k-images-idx3-ubyte.gz": (
      3041136,
      "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5",
    ),
    "t10k-labels-idx1-ubyte.gz": (
      5120,
      "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c",
    ),
    "train-images-idx3-ubyte.gz": (
      18165135,
      "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4",
    ),
    "train-labels-idx1-ubyte.gz": (
      29497,
      "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17",
    ),
  },
  "mnist": {
    "t10k-images-idx3-ubyte.gz": (
      1648877,
      "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    ),
    "t10k-labels-idx1-ubyte.gz": (
      4542,
      "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    ),
    "train-images-idx3-ubyte.gz": (
      9912422,
      "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    ),
    "train-labels-idx1-ubyte.gz": (
      28881,
      "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    ),
  },
}
# sha256 of the decompressed IDX payload, for copies whose gzip wrapper differs from
# upstream. Recorded from Debian's dataset-fashion-mnist (its .gz files differ from the
# upstream ones only by the dropped FNAME header field and the mtime).
_PAYLOAD_SHA256 = {
  "fashion_mnist": {
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
  },
}
# md5 of the K-MNIST NumPy release files (rois-codh/kmnist).
_NPZ_MD5 = {
  "kmnist": {
    "kmnist-train-imgs.npz": "a183fbc01ed9a345513b145673d3d0bb",
    "kmnist-train-labels.npz": "b0e1d240e8afec72b50437fc3bc5908a",
    "kmnist-test-imgs.npz": "dace6de62ca8b90843cc45366337d02e",
    "kmnist-test-labels.npz": "3ae489a79983d0fe386152684e3b5412",
  },
}


def default_data_dir(data_dir: str | os.PathLike | None = None) -> str:
  """Returns `data_dir`, else $TFDS_DATA_DIR, else TFDS's default, as an absolute path."""
  if data_dir is not None:
    return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
  from tensorflow_datasets.core import constants  # pylint: disable=g-import-not-at-top

  return os.path.abspath(os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or constants.DATA_DIR))


def _check_offline(dataset: str) -> None:
  if dataset not in OFFLINE_DATASETS:
    raise errors.ConfigError(
      f"No offline build for {dataset!r}; offline datasets: {', '.join(OFFLINE_DATASETS)}."
    )


# ----------------------------------------------------------------------------------------
# Finding the files, and the message when they are not there.
# ----------------------------------------------------------------------------------------


def _candidate_dirs(dataset: str, manual_dir: str | os.PathLike | None) -> list[str]:
  """Directories searched for original files, in order (duplicates removed)."""
  roots = []
  if manual_dir is not None:
    roots.append(os.fspath(manual_dir))
  if os.environ.get(MANUAL_DIR_ENV):
    roots.append(os.environ[MANUAL_DIR_ENV])
  dirs = []
  for root in roots:  # `<dir>/<name>/` first: MNIST and Fashion-MNIST share file names.
    dirs += [os.path.join(root, dataset), root]
  dirs += list(_DEFAULT_DIRS.get(dataset, ()))
  return list(dict.fromkeys(os.path.abspath(d) for d in dirs))


def _split_file_options(dataset: str, split: str) -> list[tuple[str, str]]:
  """Accepted (images, labels) file-name pairs for one split, in preference order."""
  imgs, labels = _IDX_NAMES[split]
  options = [(imgs + ".gz", labels + ".gz"), (imgs, labels)]
  if dataset == "kmnist":
    options.insert(0, _NPZ_NAMES[split])
  return options


def find_original_files(
  dataset: str,
  split: str,
  *,
  manual_dir: str | os.PathLike | None = None,
) -> tuple[str, str] | None:
  """Returns (images_path, labels_path) of one split's original files, or None.

  Searched: `manual_dir`, then $CAPSJAX_MANUAL_DIR (each as `<dir>/<dataset>/`, then
  `<dir>`), then the dataset's system directory (Debian's, for Fashion-MNIST).
  """
  _check_offline(dataset)
  if split not in SPLITS:
    raise errors.ConfigError(f"split must be one of {SPLITS}, got {split!r}.")
  for d in _candidate_dirs(dataset, manual_dir):
    for imgs, labels in _split_file_options(dataset, split):
      pi, pl = os.path.join(d, imgs), os.path.join(d, labels)
      if os.path.isfile(pi) and os.path.isfile(pl):
        return pi, pl
  return None


def not_found_message(
  dataset: str,
  split: str,
  *,
  data_dir: str,
  manual_dir: str | os.PathLike | None,
  looked_in: Iterable[str] = (),
  extra: str = "",
) -> str:
  """Text of a `DatasetNotFoundError`: every place looked in, and how to fix it.

  One line (the command line prints every user error as one `capsjax: error:` line):
  `looked_in` holds the caller's places (cache, TFDS dir); the original-file directories
  follow. `data_dir` goes into the `tfds build` hint.
  """
  places = list(looked_in)
  if dataset in OFFLINE_DATASETS:
    wanted = " + ".join(f"{a} & {b}" for a, b in _split_file_options(dataset, split))
    dirs = [
      f"{d}{'' if os.path.isdir(d) else ' (does not exist)'}"
      for d in _candidate_dirs(dataset, manual_dir)
    ]
    if manual_dir is None and not os.environ.get(MANUAL_DIR_ENV):
      dirs.append(f"no manual_dir given and ${MANUAL_DIR_ENV} is not set")
    places.append(f"original files ({wanted}) in: {', '.join(dirs)}")
    fixes = [
      f"copy the original files of every split ({', '.join(SPLITS)}) into a directory and "
      f"pass --config.manual_dir=<dir> (manual_dir=<dir>) or set {MANUAL_DIR_ENV}=<dir>"
    ]
    if dataset == "fashion_mnist":
      fixes.append(
        "or install them: sudo apt-get install dataset-fashion-mnist "
        "(puts them in /usr/share/datasets/fashion-mnist/)"
      )
    fixes.append(
      "or, with internet, --config.download=True "
      f"(load_split({dataset!r}, {split!r}, download=True))"
    )
  else:
    places.append(f"no offline build for {dataset!r}: it is available through plain TFDS only")
    fixes = [
      "with internet, --config.download=True (load_split(..., download=True)), or prepare it "
      f"with `tfds build {dataset} --file_format=array_record --data_dir={data_dir}`"
    ]
  text = (
    f"Dataset {dataset!r} split {split!r} not found (looked in: {'; '.join(places)}). "
    f"To fix: {'; '.join(fixes)}."
  )
  return f"{text} {extra}" if extra else text


# ----------------------------------------------------------------------------------------
# Reading and validating original files.
# ----------------------------------------------------------------------------------------


def _file_digest(path: str, algo: str) -> str:
  h = hashlib.new(algo)
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _digest_owner(table: Mapping[str, Mapping[str, Any]], digest: str) -> tuple[str, str] | None:
  for dataset, files in table.items():
    for fname, value in files.items():
      if (value[1] if isinstance(value, tuple) else value) == digest:
        return dataset, fname
  return None


def _wrong_file_message(dataset: str, path: str, owner: tuple[str, str]) -> str:
  """Names the release file whose published digest `path` has: another split's, another
  kind's (images/labels) or another dataset's."""
  other, fname = owner
  if other != dataset:
    return f"{path} is the {other!r} file {fname}, not a {dataset!r} file."
  split = next(s for s, names in _IDX_NAMES.items() if fname.startswith(names))
  kind = "labels" if "labels" in fname else "images"
  return (
    f"{path}: this looks like the {split} {kind} file ({fname} of {dataset!r}), not "
    f"{os.path.basename(path)}: are the train and test files swapped or misnamed?"
  )


def _read_idx_payload(path: str) -> bytes:
  """Whole (decompressed) content of an IDX file; DatasetValidationError if corrupt."""
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        return f.read()
    with open(path, "rb") as f:
      return f.read()
  except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError.
    raise errors.DatasetValidationError(f"{path}: corrupt or truncated gzip file ({e}).") from e


def _verify_idx_checksum(dataset: str, path: str, payload: bytes) -> None:
  """Checks one IDX file against the published digests (policy: the module docstring)."""
  base = os.path.basename(path)
  if base.endswith(".gz"):
    digest = _file_digest(path, "sha256")
    published = _GZ_SHA256[dataset].get(base)
    if published and digest == published[1]:
      return  # Byte-identical to the upstream release.
    owner = _digest_owner(_GZ_SHA256, digest)
    if owner:
      raise errors.DatasetValidationError(_wrong_file_message(dataset, path, owner))
    if published and os.path.getsize(path) == published[0]:
      raise errors.DatasetValidationError(
        f"{path}: sha256 {digest} does not match the published {published[1]} although "
        "the size is the same: the file is corrupt."
      )
  # Re-compressed copies (Debian strips the gzip FNAME field) can still be checked on the
  # decompressed payload where its digest is known.
  stem = base[:-3] if base.endswith(".gz") else base
  digest = hashlib.sha256(payload).hexdigest()
  expected = _PAYLOAD_SHA256.get(dataset, {}).get(stem)
  if expected and digest == expected:
    return
  owner = _digest_owner(_PAYLOAD_SHA256, digest)
  if owner and owner != (dataset, stem):
    raise errors.DatasetValidationError(_wrong_file_message(dataset, path, owner))
  if expected:
    raise errors.DatasetValidationError(
      f"{path}: decompressed sha256 {digest} does not match the published content {expected}."
    )
  logging.warning(
    "%s: not byte-identical to the published release and no content digest "
    "is known; accepted after structural checks only.",
    path,
  )


def _parse_idx(path: str, payload: bytes, magic: int, ndim: int) -> np.ndarray:
  """IDX bytes -> uint8 array of the header's shape ([N, H, W] or [N])."""
  if len(payload) < 4 + 4 * ndim:
    raise errors.DatasetValidationError(
      f"{path}: {len(payload)} bytes is too short for an IDX header."
    )
  got_magic = struct.unpack(">I", payload[:4])[0]
  if got_magic != magic:
    raise errors.DatasetValidationError(
      f"{path}: IDX magic number {got_magic}, expected {magic} "
      f"({'images' if magic == 2051 else 'labels'} file)."
    )
  dims = struct.unpack(f">{ndim}I", payload[4 : 4 + 4 * ndim])
  body = payload[4 + 4 * ndim :]
  if len(body) != int(np.prod(dims)):
    raise errors.DatasetValidationError(
      f"{path}: header says shape {dims} ({int(np.prod(dims))} bytes) but the body has "
      f"{len(body)} bytes."
    )
  return np.frombuffer(body, np.uint8).reshape(dims)


def _load_npz_array(path: str) -> np.ndarray:
  try:
    with np.load(path) as z:
      if "arr_0" not in z.files:
        raise errors.DatasetValidationError(f'{path}: no array "arr_0" (has {z.files}).')
      return np.asarray(z["arr_0"])
  except errors.DatasetValidationError:
    raise
  except Exception as e:  # zipfile.BadZipFile, CRC errors, pickle refusals, ...
    raise errors.DatasetValidationError(f"{path}: cannot read .npz file ({e}).") from e


def read_original_split(
  dataset: str,
  images_path: str,
  labels_path: str,
  *,
  expected_count: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Reads and validates one split of the original release files.

  Args:
    dataset: one of `OFFLINE_DATASETS`.
    images_path, labels_path: IDX (`.gz` or uncompressed) or K-MNIST `.npz` files.
    expected_count: number of examples required; None means no count check (real data
      has `RELEASE_COUNTS[split]`).

  Returns:
    images uint8 [N, 28, 28, 1] and labels int32 [N], in file order.

  Raises:
    DatasetValidationError: corrupt file, wrong magic/shape/count/dtype, label out of
      range, or a published checksum that does not match.
  """
  _check_offline(dataset)
  if images_path.endswith(".npz"):
    for p in (images_path, labels_path):
      published = _NPZ_MD5.get(dataset, {}).get(os.path.basename(p))
      if published and _file_digest(p, "md5") != published:
        logging.warning(
          "%s: md5 differs from the published release file; accepted after structural checks only.",
          p,
        )
    images, labels = _load_npz_array(images_path), _load_npz_array(labels_path)
    for p, a in ((images_path, images), (labels_path, labels)):
      if a.dtype != np.uint8:
        raise errors.DatasetValidationError(f"{p}: dtype {a.dtype}, expected uint8.")
  else:
    img_payload = _read_idx_payload(images_path)
    lbl_payload = _read_idx_payload(labels_path)
    _verify_idx_checksum(dataset, images_path, img_payload)
    _verify_idx_checksum(dataset, labels_path, lbl_payload)
    images = _parse_idx(images_path, img_payload, 2051, 3)  # [N, H, W]
    labels = _parse_idx(labels_path, lbl_payload, 2049, 1)  # [N]
  if images.ndim == 3:
    images = images[..., None]  # [N, H, W, 1]
  if images.shape[1:] != IMAGE_SHAPE:
    raise errors.DatasetValidationError(
      f"{images_path}: image shape {images.shape[1:]}, expected {IMAGE_SHAPE}."
    )
  if labels.ndim != 1:
    raise errors.DatasetValidationError(
      f"{labels_path}: labels shape {labels.shape}, expected [N]."
    )
  if len(images) != len(labels):
    raise errors.DatasetValidationError(
      f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels."
    )
  if expected_count is not None and len(images) != expected_count:
    raise errors.DatasetValidationError(
      f"{images_path}: {len(images)} examples, expected {expected_count}."
    )
  if len(labels) and int(labels.max()) >= NUM_CLASSES:
    raise errors.DatasetValidationError(
      f"{labels_path}: label {int(labels.max())} out of range [0, {NUM_CLASSES})."
    )
  return images, labels.astype(np.int32)


# ----------------------------------------------------------------------------------------
# TFDS builders: the official names and versions, without TensorFlow.
# ----------------------------------------------------------------------------------------


def _png_file(image: np.ndarray) -> io.BytesIO:
  """[H, W, C] uint8 -> PNG file object (what `tfds.features.Image` stores)."""
  f = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(f, format="PNG")
  f.seek(0)
  return f


class _OfflineMixin:
  """Replaces the download and the TF-based reading of the official MNIST-family builders.

  Given `arrays` ({split: (images [N, H, W, C], labels [N])}, already validated) it writes
  those; without them (`download.download`) it fetches the upstream IDX files with the
  TFDS download manager, which checks the registered checksums. Examples are keyed by
  file index, as in the official builder, so TFDS stores them in the same order.
  """

  def __init__(
    self, *, arrays: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None, **kwargs
  ):
    self._arrays = dict(arrays) if arrays else None
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # The official module, so TFDS finds its url_checksums file.
    return epath.Path(tfds_mnist.__file__)

  def _split_generators(self, dl_manager):
    arrays = self._arrays
    if arrays is None:  # Online: the same URLs as the official builder.
      urls = {
        f"{s}_{k}": self.URL + n + ".gz"
        for s in SPLITS
        for k, n in zip(("images", "labels"), _IDX_NAMES[s], strict=False)
      }
      paths = {k: os.fspath(v) for k, v in dl_manager.download(urls).items()}
      arrays = {
        s: read_original_split(self.name, paths[f"{s}_images"], paths[f"{s}_labels"])
        for s in SPLITS
      }
    return {split: self._generate_examples(*arrays[split]) for split in arrays}

  def _generate_examples(self, images, labels):
    for index, (image, label) in enumerate(zip(images, labels, strict=False)):
      yield index, {"image": _png_file(image), "label": int(label)}


with registered.skip_registration():

  class _OfflineMNIST(_OfflineMixin, tfds_mnist.MNIST):
    name = "mnist"

  class _OfflineFashionMNIST(_OfflineMixin, tfds_mnist.FashionMNIST):
    name = "fashion_mnist"

  class _OfflineKMNIST(_OfflineMixin, tfds_mnist.KMNIST):
    name = "kmnist"


_OFFLINE_BUILDERS = {
  "mnist": _OfflineMNIST,
  "fashion_mnist": _OfflineFashionMNIST,
  "kmnist": _OfflineKMNIST,
}


def release_builder(
  dataset: str,
  *,
  data_dir: str | os.PathLike,
  arrays: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> tfds.core.DatasetBuilder:
  """The official TFDS builder of `dataset` (name, version) that needs no TensorFlow.

  Args:
    dataset: one of `OFFLINE_DATASETS`.
    data_dir: TFDS data dir to build into.
    arrays: {split: (images uint8 [N, H, W, C], labels [N])}, already validated, to
      write; None fetches the upstream release files (needs a network).

  Returns:
    An array_record builder; `download_and_prepare()` writes the dataset.
  """
  _check_offline(dataset)
  return _OFFLINE_BUILDERS[dataset](arrays=arrays, data_dir=data_dir, file_format="array_record")


def prepare_offline(
  dataset: str,
  *,
  data_dir: str | os.PathLike | None = None,
  manual_dir: str | os.PathLike | None = None,
  source_files: Mapping[str, tuple[str, str]] | None = None,
  expected_counts: Mapping[str, int] | None = None,
) -> str:
  """Builds the official TFDS array_record dataset from the original files, without TF.

  Every split is read and validated before TFDS starts, so a bad file raises before any
  TFDS progress bar is drawn and before anything is written.

  Args:
    dataset: one of `OFFLINE_DATASETS`.
    data_dir: TFDS data dir (see `default_data_dir`).
    manual_dir: where to look for the original files (see `find_original_files`);
      ignored when `source_files` is given.
    source_files: {split: (images_path, labels_path)} for EVERY split, to skip the search.
    expected_counts: {split: N}; defaults to `RELEASE_COUNTS`. Tests with tiny fixtures
      pass their own.

  Returns:
    The prepared directory `<data_dir>/<dataset>/<version>`; afterwards
    `tfds.data_source(dataset, split=..., data_dir=data_dir)` reads it.

  Raises:
    ConfigError: `dataset` has no offline build.
    DatasetNotFoundError: the files of some split are missing.
    DatasetValidationError: see `read_original_split`.
  """
  _check_offline(dataset)
  root = default_data_dir(data_dir)
  if source_files is None:
    source_files = {s: find_original_files(dataset, s, manual_dir=manual_dir) for s in SPLITS}
  missing = [s for s in SPLITS if not source_files.get(s)]
  if missing:
    raise errors.DatasetNotFoundError(
      not_found_message(
        dataset,
        missing[0],
        data_dir=root,
        manual_dir=manual_dir,
        extra=f"(prepare_offline needs every split; missing: {missing})",
      )
    )
  counts = RELEASE_COUNTS if expected_counts is None else expected_counts
  arrays = {
    s: read_original_split(dataset, *source_files[s], expected_count=counts[s]) for s in SPLITS
  }
  builder = release_builder(dataset, data_dir=root, arrays=arrays)
  logging.info(
    "Building TFDS %s/%s in %s from %s", dataset, builder.version, root, dict(source_files)
  )
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(
      download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
  )
  return os.fspath(builder.data_dir)
