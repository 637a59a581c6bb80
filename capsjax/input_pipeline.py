"""Host input pipeline: TFDS (array_record) or original release files -> NumPy -> batches.

No JAX here. Everything returns NumPy arrays; `train.py` puts batches on devices.

Loading (`load_split`) tries, in order, and stops at the first that works:

  1. the decoded-array cache `<data_dir>/capsjax_cache/<name>/<version>/<split>.npz`, if its
     fingerprint still matches its source (see "Cache" below);
  2. the TFDS dataset `<data_dir>/<name>/<version>` if it is prepared in array_record format,
     read with `tfds.data_source` (no TensorFlow);
  3. the original release files (Fashion-MNIST/MNIST IDX `*-ubyte[.gz]`, K-MNIST
     `kmnist-{train,test}-{imgs,labels}.npz`) found in `manual_dir`, `$CAPSJAX_MANUAL_DIR`
     (each also as `<dir>/<name>/`) and, for Fashion-MNIST only, Debian's
     `/usr/share/datasets/fashion-mnist/` (package `dataset-fashion-mnist`):
     - if the files of EVERY split are there, `prepare_offline` builds the same TFDS dataset
       as the official builder (same name and version; images PNG-encoded with PIL, not
       TensorFlow), so `tfds.data_source(name)` works afterwards for any tool;
     - if only some splits are there (K-MNIST offline: only the test split), no TFDS dataset
       is written (a half-built `<name>/<version>` would look "prepared" to TFDS and hide
       the missing split from every later `tfds.load`); the available split is read straight
       from the files, validated the same way, and cached;
  4. only with `download=True`: the network download through TFDS (TFDS checks the
     published checksums). Never by default: without internet a TFDS download retries for
     minutes. Without it, a missing dataset raises `DatasetNotFoundError` in well under a
     second, listing every place looked in and the files/commands that would fix it.

Validation of original files: example counts (60000/10000 from the official info), IDX
magic numbers and header dimensions, image shape, label range, and checksums: a file
byte-identical to the upstream release must match the published digest (TFDS
`url_checksums` sha256 for the IDX `.gz` files; the K-MNIST release md5s for the `.npz`
files). Re-compressed copies (Debian strips the gzip FNAME header, so its `.gz` files are
`len(name) + 1` bytes shorter than upstream) are checked on the decompressed payload where
that digest is known (Fashion-MNIST), and otherwise accepted with a logged warning after
the structural checks. A file whose digest belongs to a DIFFERENT dataset (MNIST files
passed as Fashion-MNIST) is rejected.

Cache: an uncompressed `.npz` holding `image`, `label` and a `fingerprint` string: the size
and mtime of the TFDS `dataset_info.json` (TFDS source) or of every original file read
(file source). Any rebuild, replacement or deletion of the source changes the fingerprint,
and the cache is rebuilt. Data that TFDS serves without files on disk
(`tfds.testing.mock_data`) is never cached. Delete `<data_dir>/capsjax_cache` to drop the
cache by hand.

Batching is deterministic and resumable: the order of epoch `e` is
`np.random.default_rng([seed, e]).permutation(N)`, so a run resumed at `start_step`
sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import registered
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from capsjax import errors

SPLITS = ('train', 'test')
MANUAL_DIR_ENV = 'CAPSJAX_MANUAL_DIR'
CACHE_DIRNAME = 'capsjax_cache'


DatasetNotFoundError = errors.DatasetNotFoundError
DatasetValidationError = errors.DatasetValidationError


# ----------------------------------------------------------------------------------------
# Dataset metadata.
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
    return {'train': self.num_train, 'test': self.num_test}[_check_split(split)]


_DATASET_INFOS = {
    'fashion_mnist': DatasetInfo(
        'fashion_mnist', (28, 28, 1), 10,
        ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
         'Sneaker', 'Bag', 'Ankle boot'), 60000, 10000),
    'kmnist': DatasetInfo(
        'kmnist', (28, 28, 1), 10,
        ('o', 'ki', 'su', 'tsu', 'na', 'ha', 'ma', 'ya', 're', 'wo'), 60000, 10000),
    'mnist': DatasetInfo(
        'mnist', (28, 28, 1), 10, tuple(str(d) for d in range(10)), 60000, 10000),
    'cifar10': DatasetInfo(
        'cifar10', (32, 32, 3), 10,
        ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
         'truck'), 50000, 10000),
}
DATASETS = tuple(_DATASET_INFOS)
# Datasets that can be built offline from their original release files.
OFFLINE_DATASETS = ('fashion_mnist', 'kmnist', 'mnist')


def dataset_info(name: str) -> DatasetInfo:
  """Returns the `DatasetInfo` of `name`; ValueError listing `DATASETS` otherwise."""
  if name not in _DATASET_INFOS:
    raise ValueError(f'Unknown dataset {name!r}; supported: {", ".join(DATASETS)}.')
  return _DATASET_INFOS[name]


def _check_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}.')
  return split


# ----------------------------------------------------------------------------------------
# Original release files: names, digests, locations.
# ----------------------------------------------------------------------------------------

_IDX_NAMES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
_NPZ_NAMES = {
    'train': ('kmnist-train-imgs.npz', 'kmnist-train-labels.npz'),
    'test': ('kmnist-test-imgs.npz', 'kmnist-test-labels.npz'),
}
_DEFAULT_DIRS = {'fashion_mnist': ('/usr/share/datasets/fashion-mnist',)}

# Upstream `.gz` files: (size, sha256), as in tensorflow_datasets/url_checksums/*.txt.
_GZ_SHA256 = {
    'fashion_mnist': {
        't10k-images-idx3-ubyte.gz': (4422102, '346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073'),
        't10k-labels-idx1-ubyte.gz': (5148, '67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5'),
        'train-images-idx3-ubyte.gz': (26421880, '3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84'),
        'train-labels-idx1-ubyte.gz': (29515, 'a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845'),
    },
    'kmnist': {
        't10k-images-idx3-ubyte.gz': (3041136, 'edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5'),
        't10k-labels-idx1-ubyte.gz': (5120, '20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c'),
        'train-images-idx3-ubyte.gz': (18165135, '51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4'),
        'train-labels-idx1-ubyte.gz': (29497, 'e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17'),
    },
    'mnist': {
        't10k-images-idx3-ubyte.gz': (1648877, '8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6'),
        't10k-labels-idx1-ubyte.gz': (4542, 'f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6'),
        'train-images-idx3-ubyte.gz': (9912422, '440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609'),
        'train-labels-idx1-ubyte.gz': (28881, '3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c'),
    },
}
# sha256 of the decompressed IDX payload, for copies whose gzip wrapper differs from
# upstream. Recorded from Debian's dataset-fashion-mnist (its .gz files differ from the
# upstream ones only by the dropped FNAME header field and the mtime).
_PAYLOAD_SHA256 = {
    'fashion_mnist': {
        't10k-images-idx3-ubyte': '5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b',
        't10k-labels-idx1-ubyte': '0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34',
        'train-images-idx3-ubyte': 'c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888',
        'train-labels-idx1-ubyte': 'bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9',
    },
}
# md5 of the K-MNIST NumPy release files (rois-codh/kmnist).
_NPZ_MD5 = {
    'kmnist': {
        'kmnist-train-imgs.npz': 'a183fbc01ed9a345513b145673d3d0bb',
        'kmnist-train-labels.npz': 'b0e1d240e8afec72b50437fc3bc5908a',
        'kmnist-test-imgs.npz': 'dace6de62ca8b90843cc45366337d02e',
        'kmnist-test-labels.npz': '3ae489a79983d0fe386152684e3b5412',
    },
}


def _digest_owner(table: Mapping[str, Mapping[str, Any]], digest: str) -> tuple[str, str] | None:
  for dataset, files in table.items():
    for fname, value in files.items():
      if (value[1] if isinstance(value, tuple) else value) == digest:
        return dataset, fname
  return None


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
  options = [(imgs + '.gz', labels + '.gz'), (imgs, labels)]
  if dataset == 'kmnist':
    options.insert(0, _NPZ_NAMES[split])
  return options


def find_original_files(
    dataset: str, split: str, *, manual_dir: str | os.PathLike | None = None,
) -> tuple[str, str] | None:
  """Returns (images_path, labels_path) of `split`'s original files, or None."""
  for d in _candidate_dirs(dataset, manual_dir):
    for imgs, labels in _split_file_options(dataset, split):
      pi, pl = os.path.join(d, imgs), os.path.join(d, labels)
      if os.path.isfile(pi) and os.path.isfile(pl):
        return pi, pl
  return None


def _not_found_message(dataset: str, split: str, data_dir: str,
                       manual_dir: str | os.PathLike | None, extra: str = '') -> str:
  version = _version(dataset)
  lines = [f'Dataset {dataset!r} split {split!r} not found. Looked in:',
           f'  - decoded-array cache: {_cache_path(data_dir, dataset, split)}',
           f'  - TFDS array_record dataset: {os.path.join(data_dir, dataset, version)} '
           '(no dataset_info.json)']
  if dataset in OFFLINE_DATASETS:
    wanted = ' + '.join(f'{a} & {b}' for a, b in _split_file_options(dataset, split))
    dirs = _candidate_dirs(dataset, manual_dir)
    env = os.environ.get(MANUAL_DIR_ENV)
    lines.append(f'  - original files ({wanted}) in:')
    lines += [f'      {d}{"" if os.path.isdir(d) else "  (does not exist)"}' for d in dirs]
    if manual_dir is None and not env:
      lines.append(f'      (no manual_dir given and ${MANUAL_DIR_ENV} is not set)')
    lines.append('To fix, either:')
    lines.append(f'  * copy the original files of every split ({", ".join(SPLITS)}) into a '
                 f'directory and pass manual_dir=<dir> or set {MANUAL_DIR_ENV}=<dir>;')
    if dataset == 'fashion_mnist':
      lines.append('  * or install them: sudo apt-get install dataset-fashion-mnist '
                   '(puts them in /usr/share/datasets/fashion-mnist/);')
    lines.append(f'  * or, with internet: load_split({dataset!r}, {split!r}, download=True) '
                 '(command line: --config.download=True).')
  else:
    lines.append(f'  (no offline build for {dataset!r}: it is available through plain TFDS only)')
    lines.append('To fix, with internet: --config.download=True (load_split(..., download=True)), '
                 'or prepare it with '
                 f'`tfds build {dataset} --file_format=array_record --data_dir={data_dir}`.')
  if extra:
    lines.append(extra)
  return '\n'.join(lines)


# ----------------------------------------------------------------------------------------
# Reading and validating original files.
# ----------------------------------------------------------------------------------------


def _file_digest(path: str, algo: str) -> str:
  h = hashlib.new(algo)
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      h.update(chunk)
  return h.hexdigest()


def _read_idx_payload(path: str) -> bytes:
  """Whole (decompressed) content of an IDX file; DatasetValidationError if corrupt."""
  try:
    if path.endswith('.gz'):
      with gzip.open(path, 'rb') as f:
        return f.read()
    with open(path, 'rb') as f:
      return f.read()
  except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError.
    raise DatasetValidationError(f'{path}: corrupt or truncated gzip file ({e}).') from e


def _verify_idx_checksum(dataset: str, path: str, payload: bytes) -> None:
  """Published-checksum check of one IDX file (see the module docstring for the policy)."""
  base = os.path.basename(path)
  if base.endswith('.gz'):
    digest = _file_digest(path, 'sha256')
    published = _GZ_SHA256[dataset].get(base)
    if published and digest == published[1]:
      return  # Byte-identical to the upstream release.
    owner = _digest_owner(_GZ_SHA256, digest)
    if owner:
      raise DatasetValidationError(
          f'{path} is the {owner[0]!r} file {owner[1]}, not a {dataset!r} file.')
    if published and os.path.getsize(path) == published[0]:
      raise DatasetValidationError(
          f'{path}: sha256 {digest} does not match the published {published[1]} although '
          'the size is the same: the file is corrupt.')
  stem = base[:-3] if base.endswith('.gz') else base
  digest = hashlib.sha256(payload).hexdigest()
  expected = _PAYLOAD_SHA256.get(dataset, {}).get(stem)
  if expected and digest == expected:
    return
  owner = _digest_owner(_PAYLOAD_SHA256, digest)
  if owner and owner[0] != dataset:
    raise DatasetValidationError(
        f'{path} holds the {owner[0]!r} file {owner[1]}, not a {dataset!r} file.')
  if expected:
    raise DatasetValidationError(
        f'{path}: decompressed sha256 {digest} does not match the published content '
        f'{expected}.')
  logging.warning('%s: not byte-identical to the published release and no content digest '
                  'is known; accepted after structural checks only.', path)


def _parse_idx(path: str, payload: bytes, magic: int, ndim: int) -> np.ndarray:
  if len(payload) < 4 + 4 * ndim:
    raise DatasetValidationError(f'{path}: {len(payload)} bytes is too short for an IDX header.')
  got_magic = struct.unpack('>I', payload[:4])[0]
  if got_magic != magic:
    raise DatasetValidationError(
        f'{path}: IDX magic number {got_magic}, expected {magic} '
        f'({"images" if magic == 2051 else "labels"} file).')
  dims = struct.unpack(f'>{ndim}I', payload[4:4 + 4 * ndim])
  body = payload[4 + 4 * ndim:]
  if len(body) != int(np.prod(dims)):
    raise DatasetValidationError(
        f'{path}: header says shape {dims} ({int(np.prod(dims))} bytes) but the body has '
        f'{len(body)} bytes.')
  return np.frombuffer(body, np.uint8).reshape(dims)


def _load_npz_array(path: str) -> np.ndarray:
  try:
    with np.load(path) as z:
      if 'arr_0' not in z.files:
        raise DatasetValidationError(f'{path}: no array "arr_0" (has {z.files}).')
      return np.asarray(z['arr_0'])
  except DatasetValidationError:
    raise
  except Exception as e:  # zipfile.BadZipFile, CRC errors, pickle refusals, ...
    raise DatasetValidationError(f'{path}: cannot read .npz file ({e}).') from e


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
    expected_count: number of examples required; None means no count check (use the
      official count, `dataset_info(dataset).num_examples(split)`, for real data).

  Returns:
    images uint8 [N, H, W, C] and labels int32 [N], in file order.

  Raises:
    DatasetValidationError: corrupt file, wrong magic/shape/count/dtype, label out of
      range, or a published checksum that does not match.
  """
  info = dataset_info(dataset)
  h, w, c = info.image_shape
  if images_path.endswith('.npz'):
    for p in (images_path, labels_path):
      published = _NPZ_MD5.get(dataset, {}).get(os.path.basename(p))
      if published and _file_digest(p, 'md5') != published:
        logging.warning('%s: md5 differs from the published release file; accepted after '
                        'structural checks only.', p)
    images, labels = _load_npz_array(images_path), _load_npz_array(labels_path)
    for p, a in ((images_path, images), (labels_path, labels)):
      if a.dtype != np.uint8:
        raise DatasetValidationError(f'{p}: dtype {a.dtype}, expected uint8.')
  else:
    img_payload = _read_idx_payload(images_path)
    lbl_payload = _read_idx_payload(labels_path)
    _verify_idx_checksum(dataset, images_path, img_payload)
    _verify_idx_checksum(dataset, labels_path, lbl_payload)
    images = _parse_idx(images_path, img_payload, 2051, 3)
    labels = _parse_idx(labels_path, lbl_payload, 2049, 1)
  if images.ndim == 3:
    images = images[..., None]  # [N, H, W, 1]
  if images.shape[1:] != (h, w, c):
    raise DatasetValidationError(
        f'{images_path}: image shape {images.shape[1:]}, expected {(h, w, c)}.')
  if labels.ndim != 1:
    raise DatasetValidationError(f'{labels_path}: labels shape {labels.shape}, expected [N].')
  if len(images) != len(labels):
    raise DatasetValidationError(
        f'{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels.')
  if expected_count is not None and len(images) != expected_count:
    raise DatasetValidationError(
        f'{images_path}: {len(images)} examples, expected {expected_count}.')
  if len(labels) and int(labels.max()) >= info.num_classes:
    raise DatasetValidationError(
        f'{labels_path}: label {int(labels.max())} out of range [0, {info.num_classes}).')
  return images, labels.astype(np.int32)


# ----------------------------------------------------------------------------------------
# Offline TFDS builders (same name and version as the official ones, no TensorFlow).
# ----------------------------------------------------------------------------------------


def _png_file(image: np.ndarray) -> io.BytesIO:
  """[H, W, C] uint8 -> PNG file object (what `tfds.features.Image` stores)."""
  f = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(f, format='PNG')
  f.seek(0)
  return f


class _OfflineMixin:
  """Replaces the download and the TF-based reading of the official MNIST-family builders.

  Given `source_files` ({split: (images_path, labels_path)}) it builds from those files;
  without them (`download=True`) it downloads the upstream IDX files with the TFDS download
  manager (which checks the registered checksums) and reads them with Python's gzip.
  Examples are keyed by file index, as in the official builder, so TFDS stores them in the
  same order.
  """

  def __init__(self, *, source_files: Mapping[str, tuple[str, str]] | None = None,
               expected_counts: Mapping[str, int] | None = None, **kwargs):
    self._source_files = dict(source_files) if source_files else None
    self._expected_counts = dict(expected_counts) if expected_counts else {}
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # The official module, so TFDS finds its url_checksums file.
    return epath.Path(tfds_mnist.__file__)

  def _split_generators(self, dl_manager):
    files = self._source_files
    if files is None:  # Online: the same URLs as the official builder.
      urls = {f'{s}_{k}': self.URL + n + '.gz'
              for s in SPLITS for k, n in zip(('images', 'labels'), _IDX_NAMES[s])}
      paths = {k: os.fspath(v) for k, v in dl_manager.download(urls).items()}
      files = {s: (paths[f'{s}_images'], paths[f'{s}_labels']) for s in SPLITS}
    return {split: self._generate_examples(split, *paths) for split, paths in files.items()}

  def _generate_examples(self, split, images_path, labels_path):
    images, labels = read_original_split(
        self.name, images_path, labels_path,
        expected_count=self._expected_counts.get(split))
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {'image': _png_file(image), 'label': int(label)}


with registered.skip_registration():

  class _OfflineMNIST(_OfflineMixin, tfds_mnist.MNIST):
    name = 'mnist'

  class _OfflineFashionMNIST(_OfflineMixin, tfds_mnist.FashionMNIST):
    name = 'fashion_mnist'

  class _OfflineKMNIST(_OfflineMixin, tfds_mnist.KMNIST):
    name = 'kmnist'

_OFFLINE_BUILDERS = {'mnist': _OfflineMNIST, 'fashion_mnist': _OfflineFashionMNIST,
                     'kmnist': _OfflineKMNIST}


def _version(dataset: str) -> str:
  return str(tfds.builder_cls(dataset).VERSION)


def default_data_dir(data_dir: str | os.PathLike | None = None) -> str:
  """`data_dir`, else $TFDS_DATA_DIR, else TFDS's default (~/tensorflow_datasets)."""
  if data_dir is not None:
    return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
  from tensorflow_datasets.core import constants  # pylint: disable=g-import-not-at-top
  return os.path.abspath(os.path.expanduser(
      os.environ.get('TFDS_DATA_DIR') or constants.DATA_DIR))


def _prepared_dir(data_dir: str, dataset: str) -> str | None:
  path = os.path.join(data_dir, dataset, _version(dataset))
  return path if os.path.isfile(os.path.join(path, 'dataset_info.json')) else None


def prepare_offline(
    dataset: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    source_files: Mapping[str, tuple[str, str]] | None = None,
    expected_counts: Mapping[str, int] | None = None,
) -> str:
  """Builds the official TFDS array_record dataset from the original files, without TF.

  Args:
    dataset: one of `OFFLINE_DATASETS`.
    data_dir: TFDS data dir (see `default_data_dir`).
    manual_dir: where to look for the original files (plus $CAPSJAX_MANUAL_DIR and the
      dataset's default directories); ignored when `source_files` is given.
    source_files: {split: (images_path, labels_path)} for EVERY split, to skip the search.
    expected_counts: {split: N}; defaults to the official counts (60000/10000). Tests
      with tiny fixtures pass their own.

  Returns:
    The prepared directory `<data_dir>/<dataset>/<version>`; afterwards
    `tfds.data_source(dataset, split=..., data_dir=data_dir)` reads it.

  Raises:
    DatasetNotFoundError: the files of some split are missing.
    DatasetValidationError: see `read_original_split`. Nothing is written in that case.
  """
  if dataset not in OFFLINE_DATASETS:
    raise ValueError(f'No offline build for {dataset!r}; offline datasets: {OFFLINE_DATASETS}.')
  root = default_data_dir(data_dir)
  if source_files is None:
    source_files = {s: find_original_files(dataset, s, manual_dir=manual_dir) for s in SPLITS}
  missing = [s for s in SPLITS if not source_files.get(s)]
  if missing:
    raise DatasetNotFoundError(_not_found_message(
        dataset, missing[0], root, manual_dir,
        extra=f'(prepare_offline needs every split; missing: {missing})'))
  info = dataset_info(dataset)
  if expected_counts is None:
    expected_counts = {s: info.num_examples(s) for s in SPLITS}
  builder = _OFFLINE_BUILDERS[dataset](
      source_files=source_files, expected_counts=expected_counts, data_dir=root,
      file_format='array_record')
  logging.info('Building TFDS %s/%s in %s from %s', dataset, builder.version, root,
               dict(source_files))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return os.fspath(builder.data_dir)


def _download(dataset: str, root: str) -> None:
  """Explicit, opt-in network download (TFDS verifies the published checksums)."""
  logging.info('Downloading %s into %s (download=True).', dataset, root)
  if dataset in _OFFLINE_BUILDERS:
    builder = _OFFLINE_BUILDERS[dataset](data_dir=root, file_format='array_record')
    builder.download_and_prepare()
  else:  # Plain TFDS: the official builder (its PNG encoding may need TensorFlow).
    tfds.builder(dataset, data_dir=root, file_format='array_record').download_and_prepare()


# ----------------------------------------------------------------------------------------
# Loading with a decoded-array cache.
# ----------------------------------------------------------------------------------------


def _cache_path(data_dir: str, dataset: str, split: str) -> str:
  return os.path.join(data_dir, CACHE_DIRNAME, dataset, _version(dataset), f'{split}.npz')


def _stat_fingerprint(paths: Sequence[str]) -> list[list[Any]]:
  out = []
  for p in paths:
    st = os.stat(p)
    out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
  return out


def _tfds_fingerprint(prepared: str | None) -> str | None:
  if prepared is None:  # Nothing on disk to fingerprint: never cached.
    return None
  return json.dumps({'source': 'tfds', 'files': _stat_fingerprint(
      [os.path.join(prepared, 'dataset_info.json')])})


def _files_fingerprint(paths: Sequence[str]) -> str:
  return json.dumps({'source': 'files', 'files': _stat_fingerprint(paths)})


def _read_cache(path: str, fingerprint: str | None) -> tuple[np.ndarray, np.ndarray] | None:
  if fingerprint is None or not os.path.isfile(path):
    return None
  try:
    with np.load(path) as z:
      if str(z['fingerprint']) != fingerprint:
        logging.info('Cache %s is stale (its source changed); rebuilding it.', path)
        return None
      return z['image'], z['label']
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('Ignoring unreadable cache %s (%s).', path, e)
    return None


def _write_cache(path: str, images: np.ndarray, labels: np.ndarray, fingerprint: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}.npz'
  try:
    np.savez(tmp, image=images, label=labels, fingerprint=np.array(fingerprint))
    os.replace(tmp, path)
  except OSError as e:  # Read-only data_dir: work without a cache.
    logging.warning('Could not write cache %s (%s).', path, e)
    if os.path.exists(tmp):
      os.remove(tmp)


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
    for i, r in zip(idx, records):
      images[i] = np.asarray(r['image']).reshape(info.image_shape)
      labels[i] = int(r['label'])
  return images, labels


def load_split(
    dataset: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    download: bool = False,
    use_cache: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
  """Loads one split as NumPy arrays (see the module docstring for the search order).

  Args:
    dataset: one of `DATASETS`.
    split: 'train' or 'test'.
    data_dir: TFDS data dir; None = $TFDS_DATA_DIR or ~/tensorflow_datasets. The cache
      lives in `<data_dir>/capsjax_cache/`.
    manual_dir: directory with the original release files (also searched: `<dir>/<name>/`,
      $CAPSJAX_MANUAL_DIR, and Debian's Fashion-MNIST directory).
    download: allow a network download through TFDS when nothing is found locally. Off
      by default so that an offline machine fails in seconds instead of retrying.
    use_cache: read and write the decoded-array cache.

  Returns:
    images uint8 [N, H, W, C] and labels int32 [N].

  Raises:
    ValueError: unknown dataset or split.
    DatasetNotFoundError (a FileNotFoundError): nothing found; the message lists every
      place looked in and how to fix it.
    DatasetValidationError (a ValueError): original files found but invalid.
  """
  info = dataset_info(dataset)
  _check_split(split)
  root = default_data_dir(data_dir)
  cache = _cache_path(root, dataset, split)
  prepared = _prepared_dir(root, dataset)
  files = None
  if prepared is None and dataset in OFFLINE_DATASETS:
    files = {s: find_original_files(dataset, s, manual_dir=manual_dir) for s in SPLITS}

  # 1. Cache, if it was built from the source we would read now.
  if prepared is not None or not (files and files[split]):
    fingerprint = _tfds_fingerprint(prepared)
  else:
    fingerprint = _files_fingerprint(files[split])
  if use_cache:
    hit = _read_cache(cache, fingerprint)
    if hit is not None:
      logging.info('Loaded %s/%s from cache %s', dataset, split, cache)
      return hit

  # 2./3. TFDS dataset, built from original files if all splits are present.
  if prepared is None and files and all(files.values()):
    prepared = prepare_offline(dataset, data_dir=root, source_files=files)
  if prepared is None and files and files[split]:
    logging.info('Only splits %s of %s found offline: reading %s from the original files '
                 '(no TFDS dataset written).', [s for s in SPLITS if files[s]], dataset,
                 files[split])
    images, labels = read_original_split(dataset, *files[split],
                                         expected_count=info.num_examples(split))
  else:
    builder = tfds.builder(dataset, data_dir=root, file_format='array_record')
    if prepared is not None:
      file_format = getattr(builder.info.file_format, 'value', builder.info.file_format)
      if file_format is not None and file_format != 'array_record':
        raise DatasetNotFoundError(
            f'{prepared} is prepared as {file_format}, which has no random access. '
            f'Rebuild it: `tfds build {dataset} --file_format=array_record '
            f'--data_dir={root}`, or delete it to let capsjax build it offline.')
    elif download:
      _download(dataset, root)
      prepared = _prepared_dir(root, dataset)
      builder = tfds.builder(dataset, data_dir=root, file_format='array_record')
    try:  # Not prepared: only works where TFDS serves data itself (mock_data).
      ds = builder.as_data_source(split=split)
    except Exception as e:  # pylint: disable=broad-except
      if prepared is not None and split not in builder.info.splits:
        raise DatasetNotFoundError(
            f'{prepared} has no split {split!r} (has {list(builder.info.splits)}).') from e
      raise DatasetNotFoundError(_not_found_message(dataset, split, root, manual_dir)) from e
    images, labels = _read_data_source(ds, info)
    if prepared is None:  # Served by TFDS without files on disk (mock_data): no cache,
      return images, labels  # so fake data can never be mistaken for real data later.
    fingerprint = _tfds_fingerprint(prepared)
  if use_cache:
    _write_cache(cache, images, labels, fingerprint)
  return images, labels


# ----------------------------------------------------------------------------------------
# Batching.
# ----------------------------------------------------------------------------------------


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Training steps per epoch; the remainder is dropped."""
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
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
    raise ValueError(f'images has {len(images)} examples but labels has {n}.')
  if not 0 <= num_val < n:
    raise ValueError(
        f'config.val_examples must be in [0, {n}) for a training split of {n} examples, got '
        f'{num_val}.')
  if num_val == 0:
    return images, labels, images[:0], labels[:0]
  perm = np.random.default_rng(VAL_SPLIT_SEED).permutation(n)
  val_idx = np.sort(perm[n - num_val:])
  keep = np.ones(n, bool)
  keep[val_idx] = False
  return images[keep], labels[keep], images[val_idx], labels[val_idx]


def epoch_permutation(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
  """The example order of `epoch`: int64 [N], from `np.random.default_rng([seed, epoch])`."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


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
    raise ValueError(f'images has {len(images)} examples but labels has {len(labels)}.')
  steps = steps_per_epoch(len(images), batch_size)
  if not 0 <= start_step <= steps:
    raise ValueError(f'start_step must be in [0, {steps}], got {start_step}.')
  perm = epoch_permutation(len(images), seed=seed, epoch=epoch)
  for step in range(start_step, steps):
    idx = perm[step * batch_size:(step + 1) * batch_size]
    yield {'image': to_float(images[idx]),            # [B, H, W, C]
           'label': labels[idx].astype(np.int32)}     # [B]


def eval_batches(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields every example exactly once, in order; the last batch is padded.

  Yields:
    {'image': float32 [B, H, W, C], 'label': int32 [B], 'mask': bool [B]}; padding rows
    are zero images with label 0 and mask False.
  """
  if len(images) != len(labels):
    raise ValueError(f'images has {len(images)} examples but labels has {len(labels)}.')
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  n = len(images)
  for start in range(0, n, batch_size):
    count = min(batch_size, n - start)
    image = np.zeros((batch_size, *images.shape[1:]), np.float32)   # [B, H, W, C]
    label = np.zeros((batch_size,), np.int32)                        # [B]
    mask = np.zeros((batch_size,), bool)                             # [B]
    image[:count] = to_float(images[start:start + count])
    label[:count] = labels[start:start + count]
    mask[:count] = True
    yield {'image': image, 'label': label, 'mask': mask}
