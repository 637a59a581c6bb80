"""Tests for capsjax.input_pipeline: loading, offline builds, validation, cache, batching.

No network and no real data, except `test_build_fashion_mnist_from_debian_files` (slow).
Fixture IDX/npz files are tiny and written to tmp_path.
"""
import dataclasses
import gzip
import os
import struct
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from capsjax import input_pipeline as ip

N_TRAIN, N_TEST = 12, 7
COUNTS = {'train': N_TRAIN, 'test': N_TEST}
DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'


@pytest.fixture(autouse=True)
def _isolate(monkeypatch):
  """No user manual dir and no system default dirs unless a test asks for them."""
  monkeypatch.delenv(ip.MANUAL_DIR_ENV, raising=False)
  monkeypatch.setattr(ip, '_DEFAULT_DIRS', {})


def _fake_split(n, seed, h=28, w=28, num_classes=10):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, h, w), dtype=np.uint8)
  labels = (np.arange(n) % num_classes).astype(np.uint8)
  return images, labels


def _write_idx(path, array, magic, compress=True):
  header = struct.pack(f'>I{array.ndim}I', magic, *array.shape)
  data = header + np.ascontiguousarray(array, np.uint8).tobytes()
  if compress:
    with gzip.open(path, 'wb') as f:
      f.write(data)
  else:
    with open(path, 'wb') as f:
      f.write(data)


def _write_idx_dataset(d, splits=('train', 'test'), **overrides):
  """IDX fixture in dir d; returns {split: (images [N,28,28], labels [N])}."""
  os.makedirs(d, exist_ok=True)
  out = {}
  for i, split in enumerate(splits):
    images, labels = overrides.get(split) or _fake_split(COUNTS[split], seed=i)
    img_name, lbl_name = ip._IDX_NAMES[split]
    _write_idx(os.path.join(d, img_name + '.gz'), images, 2051)
    _write_idx(os.path.join(d, lbl_name + '.gz'), labels, 2049)
    out[split] = (images, labels)
  return out


def _write_kmnist_npz(d, splits=('train', 'test')):
  os.makedirs(d, exist_ok=True)
  out = {}
  for i, split in enumerate(splits):
    images, labels = _fake_split(COUNTS[split], seed=10 + i)
    img_name, lbl_name = ip._NPZ_NAMES[split]
    np.savez_compressed(os.path.join(d, img_name), images)
    np.savez_compressed(os.path.join(d, lbl_name), labels)
    out[split] = (images, labels)
  return out


def _small_counts(monkeypatch, name):
  info = ip.dataset_info(name)
  monkeypatch.setitem(ip._DATASET_INFOS, name,
                      dataclasses.replace(info, num_train=N_TRAIN, num_test=N_TEST))


def _as_set(images, labels):
  """Order-free view of a split: TFDS stores examples in hashed-key order."""
  images = np.asarray(images).reshape(len(images), -1)
  return sorted((x.tobytes(), int(y)) for x, y in zip(images, labels))


# ---------------------------------------------------------------------------------------
# Metadata.
# ---------------------------------------------------------------------------------------


def test_dataset_info_and_unknown_name():
  info = ip.dataset_info('fashion_mnist')
  assert info.image_shape == (28, 28, 1) and info.num_classes == 10
  assert (info.num_train, info.num_test) == (60000, 10000)
  assert info.class_names[0] == 'T-shirt/top' and len(info.class_names) == 10
  assert ip.dataset_info('cifar10').image_shape == (32, 32, 3)
  assert set(ip.DATASETS) == {'fashion_mnist', 'kmnist', 'mnist', 'cifar10'}
  with pytest.raises(ValueError, match='fashion_mnist, kmnist, mnist, cifar10'):
    ip.dataset_info('emnist')
  with dataclasses_frozen():
    info.num_train = 1


class dataclasses_frozen:  # pylint: disable=invalid-name
  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    assert exc_type is dataclasses.FrozenInstanceError
    return True


def test_bad_split_is_a_value_error(tmp_path):
  with pytest.raises(ValueError, match="split must be one of"):
    ip.load_split('mnist', 'validation', data_dir=tmp_path)


# ---------------------------------------------------------------------------------------
# Loading through TFDS (mock_data) and the cache.
# ---------------------------------------------------------------------------------------


def test_load_split_under_mock_data_reads_tfds_and_never_caches_fake_data(tmp_path, monkeypatch):
  calls = []
  real_read = ip._read_data_source
  monkeypatch.setattr(ip, '_read_data_source',
                      lambda ds, info: calls.append(1) or real_read(ds, info))
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    for dataset in ('mnist', 'kmnist', 'fashion_mnist'):
      images, labels = ip.load_split(dataset, 'train', data_dir=tmp_path)
      assert images.shape == (16, 28, 28, 1) and images.dtype == np.uint8
      assert labels.shape == (16,) and labels.dtype == np.int32
      assert labels.min() >= 0 and labels.max() < 10
    images, _ = ip.load_split('cifar10', 'test', data_dir=tmp_path)
    assert images.shape == (16, 32, 32, 3)
    ip.load_split('mnist', 'train', data_dir=tmp_path)
  assert len(calls) == 5  # every load went through tfds.data_source
  assert not (tmp_path / 'capsjax_cache').exists()  # mock data is never cached
  with pytest.raises(ip.DatasetNotFoundError):  # ... so it cannot leak into a real load
    ip.load_split('mnist', 'train', data_dir=tmp_path)


def test_offline_build_from_idx_then_tfds_data_source_and_cache(tmp_path, monkeypatch):
  manual = tmp_path / 'manual'
  data_dir = tmp_path / 'tfds'
  fixture = _write_idx_dataset(manual / 'mnist')  # the <dir>/<name>/ layout
  prepared = ip.prepare_offline('mnist', data_dir=data_dir, manual_dir=manual,
                                expected_counts=COUNTS)
  assert prepared == str(data_dir / 'mnist' / '3.0.1')
  # Any tool can now read it through plain TFDS (no TensorFlow involved).
  for split in ('train', 'test'):
    ds = tfds.data_source('mnist', split=split, data_dir=data_dir, download=False)
    assert len(ds) == COUNTS[split]
    rec = [ds[i] for i in range(len(ds))]
    assert rec[0]['image'].shape == (28, 28, 1) and rec[0]['image'].dtype == np.uint8
    assert _as_set([r['image'] for r in rec], [r['label'] for r in rec]) == _as_set(*fixture[split])

  # load_split reads the prepared dataset, then the cache (TFDS untouched).
  images, labels = ip.load_split('mnist', 'test', data_dir=data_dir)
  assert (data_dir / 'capsjax_cache' / 'mnist' / '3.0.1' / 'test.npz').is_file()
  assert _as_set(images, labels) == _as_set(*fixture['test'])
  monkeypatch.setattr(ip.tfds, 'builder', lambda *a, **k: pytest.fail('TFDS used'))
  t0 = time.perf_counter()
  images2, labels2 = ip.load_split('mnist', 'test', data_dir=data_dir)
  assert time.perf_counter() - t0 < 1.0
  np.testing.assert_array_equal(images2, images)
  np.testing.assert_array_equal(labels2, labels)


def test_cache_is_invalidated_when_the_tfds_dataset_changes(tmp_path):
  manual, data_dir = tmp_path / 'manual', tmp_path / 'tfds'
  _write_idx_dataset(manual)
  prepared = ip.prepare_offline('mnist', data_dir=data_dir, manual_dir=manual,
                                expected_counts=COUNTS)
  images, labels = ip.load_split('mnist', 'test', data_dir=data_dir)
  cache = data_dir / 'capsjax_cache' / 'mnist' / '3.0.1' / 'test.npz'
  # Plant a wrong cache with the right fingerprint: it is used as-is...
  fp = str(np.load(cache)['fingerprint'])
  np.savez(cache, image=images[:1], label=labels[:1], fingerprint=np.array(fp))
  assert len(ip.load_split('mnist', 'test', data_dir=data_dir)[0]) == 1
  # ...until the dataset is rebuilt (dataset_info.json changes): then it is rebuilt.
  info_json = os.path.join(prepared, 'dataset_info.json')
  st = os.stat(info_json)
  os.utime(info_json, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  images3, _ = ip.load_split('mnist', 'test', data_dir=data_dir)
  assert len(images3) == N_TEST


def test_load_split_builds_offline_automatically_with_env_dir(tmp_path, monkeypatch):
  _small_counts(monkeypatch, 'mnist')
  manual, data_dir = tmp_path / 'manual', tmp_path / 'tfds'
  fixture = _write_idx_dataset(manual)
  monkeypatch.setenv(ip.MANUAL_DIR_ENV, str(manual))
  images, labels = ip.load_split('mnist', 'train', data_dir=data_dir)
  assert images.shape == (N_TRAIN, 28, 28, 1) and labels.dtype == np.int32
  assert _as_set(images, labels) == _as_set(*fixture['train'])
  assert (data_dir / 'mnist' / '3.0.1' / 'dataset_info.json').is_file()


def test_uncompressed_idx_files_are_accepted(tmp_path):
  d = tmp_path / 'raw'
  d.mkdir()
  images, labels = _fake_split(5, seed=3)
  _write_idx(d / 't10k-images-idx3-ubyte', images, 2051, compress=False)
  _write_idx(d / 't10k-labels-idx1-ubyte', labels, 2049, compress=False)
  paths = ip.find_original_files('mnist', 'test', manual_dir=d)
  x, y = ip.read_original_split('mnist', *paths, expected_count=5)
  np.testing.assert_array_equal(x[..., 0], images)
  np.testing.assert_array_equal(y, labels)


def test_kmnist_npz_full_build(tmp_path):
  manual, data_dir = tmp_path / 'km', tmp_path / 'tfds'
  fixture = _write_kmnist_npz(manual)
  ip.prepare_offline('kmnist', data_dir=data_dir, manual_dir=manual, expected_counts=COUNTS)
  ds = tfds.data_source('kmnist', split='train', data_dir=data_dir, download=False)
  assert len(ds) == N_TRAIN
  got = _as_set([ds[i]['image'] for i in range(len(ds))], [ds[i]['label'] for i in range(len(ds))])
  assert got == _as_set(*fixture['train'])


def test_kmnist_only_test_split_offline(tmp_path, monkeypatch):
  _small_counts(monkeypatch, 'kmnist')
  manual, data_dir = tmp_path / 'km', tmp_path / 'tfds'
  fixture = _write_kmnist_npz(manual, splits=('test',))
  images, labels = ip.load_split('kmnist', 'test', data_dir=data_dir, manual_dir=manual)
  # Read straight from the files, in file order; no half-built TFDS dataset is written.
  np.testing.assert_array_equal(images[..., 0], fixture['test'][0])
  np.testing.assert_array_equal(labels, fixture['test'][1])
  assert not (data_dir / 'kmnist').exists()
  assert (data_dir / 'capsjax_cache' / 'kmnist' / '3.0.1' / 'test.npz').is_file()
  with pytest.raises(ip.DatasetNotFoundError) as e:
    ip.load_split('kmnist', 'train', data_dir=data_dir, manual_dir=manual)
  assert 'kmnist-train-imgs.npz' in str(e.value) and str(manual) in str(e.value)
  with pytest.raises(ip.DatasetNotFoundError, match="missing: \\['train'\\]"):
    ip.prepare_offline('kmnist', data_dir=data_dir, manual_dir=manual)


def test_file_cache_is_invalidated_when_the_files_change(tmp_path, monkeypatch):
  _small_counts(monkeypatch, 'kmnist')
  manual, data_dir = tmp_path / 'km', tmp_path / 'tfds'
  _write_kmnist_npz(manual, splits=('test',))
  ip.load_split('kmnist', 'test', data_dir=data_dir, manual_dir=manual)
  new_images = np.full((N_TEST, 28, 28), 9, np.uint8)
  np.savez_compressed(manual / 'kmnist-test-imgs.npz', new_images)
  os.utime(manual / 'kmnist-test-imgs.npz', ns=(1, 2 * 10**18))
  images, _ = ip.load_split('kmnist', 'test', data_dir=data_dir, manual_dir=manual)
  np.testing.assert_array_equal(images[..., 0], new_images)


# ---------------------------------------------------------------------------------------
# Validation errors and the not-found message.
# ---------------------------------------------------------------------------------------


def _read(d, split='test', count=N_TEST, dataset='mnist'):
  paths = ip.find_original_files(dataset, split, manual_dir=d)
  assert paths is not None
  return ip.read_original_split(dataset, *paths, expected_count=count)


def test_validation_wrong_count(tmp_path):
  _write_idx_dataset(tmp_path, splits=('test',))
  with pytest.raises(ip.DatasetValidationError, match=f'{N_TEST} examples, expected 10000'):
    _read(tmp_path, count=10000)
  # ... and prepare_offline with the official counts refuses, writing nothing.
  _write_idx_dataset(tmp_path)
  with pytest.raises(ip.DatasetValidationError, match='expected 60000'):
    ip.prepare_offline('mnist', data_dir=tmp_path / 'tfds', manual_dir=tmp_path)
  assert ip._prepared_dir(str(tmp_path / 'tfds'), 'mnist') is None


def test_validation_corrupt_gzip(tmp_path):
  _write_idx_dataset(tmp_path, splits=('test',))
  p = tmp_path / 't10k-images-idx3-ubyte.gz'
  p.write_bytes(p.read_bytes()[:-40])  # truncated
  with pytest.raises(ip.DatasetValidationError, match='corrupt or truncated gzip'):
    _read(tmp_path)
  p.write_bytes(b'not a gzip file at all')
  with pytest.raises(ip.DatasetValidationError, match='corrupt or truncated gzip'):
    _read(tmp_path)


def test_validation_wrong_shape_and_header(tmp_path):
  images, labels = _fake_split(N_TEST, seed=0, h=27)
  _write_idx_dataset(tmp_path, splits=('test',), test=(images, labels))
  with pytest.raises(ip.DatasetValidationError, match=r'image shape \(27, 28, 1\), expected \(28, 28, 1\)'):
    _read(tmp_path)
  # Header / body size disagreement and a swapped magic number.
  img = tmp_path / 't10k-images-idx3-ubyte.gz'
  with gzip.open(img, 'wb') as f:
    f.write(struct.pack('>IIII', 2051, N_TEST, 28, 28) + b'\0' * 100)
  with pytest.raises(ip.DatasetValidationError, match='body has 100 bytes'):
    _read(tmp_path)
  _write_idx(img, _fake_split(N_TEST, 0)[0], 2049)
  with pytest.raises(ip.DatasetValidationError, match='magic number 2049, expected 2051'):
    _read(tmp_path)


def test_validation_label_out_of_range_and_count_mismatch(tmp_path):
  images, labels = _fake_split(N_TEST, seed=0)
  labels[3] = 10
  _write_idx_dataset(tmp_path, splits=('test',), test=(images, labels))
  with pytest.raises(ip.DatasetValidationError, match=r'label 10 out of range \[0, 10\)'):
    _read(tmp_path)
  _write_idx_dataset(tmp_path, splits=('test',), test=(images, labels[:-1] % 10))
  with pytest.raises(ip.DatasetValidationError, match='6 labels'):
    _read(tmp_path, count=None)


def test_validation_npz_errors(tmp_path):
  _write_kmnist_npz(tmp_path, splits=('test',))
  np.savez(tmp_path / 'kmnist-test-imgs.npz', np.zeros((N_TEST, 28, 28), np.float32))
  with pytest.raises(ip.DatasetValidationError, match='dtype float32, expected uint8'):
    _read(tmp_path, dataset='kmnist')
  (tmp_path / 'kmnist-test-imgs.npz').write_bytes(b'PK\x03\x04garbage')
  with pytest.raises(ip.DatasetValidationError, match='cannot read .npz'):
    _read(tmp_path, dataset='kmnist')


def test_checksums_same_size_as_published_but_different_is_corrupt(tmp_path):
  _write_idx_dataset(tmp_path, splits=('test',))
  p = tmp_path / 't10k-labels-idx1-ubyte.gz'
  size = ip._GZ_SHA256['mnist']['t10k-labels-idx1-ubyte.gz'][0]
  data = p.read_bytes()
  p.write_bytes(data + b'\0' * (size - len(data)))  # gzip ignores zero padding
  with pytest.raises(ip.DatasetValidationError, match='does not match the published'):
    _read(tmp_path)


def test_checksums_of_another_dataset_are_rejected(tmp_path, monkeypatch):
  _write_idx_dataset(tmp_path, splits=('test',))
  p = tmp_path / 't10k-images-idx3-ubyte.gz'
  digest = ip._file_digest(str(p), 'sha256')
  table = {k: dict(v) for k, v in ip._GZ_SHA256.items()}
  table['fashion_mnist']['t10k-images-idx3-ubyte.gz'] = (p.stat().st_size, digest)
  monkeypatch.setattr(ip, '_GZ_SHA256', table)
  monkeypatch.setattr(ip, '_PAYLOAD_SHA256', {})  # the fixture labels are not the real ones
  _read(tmp_path, dataset='fashion_mnist')  # byte-identical to the "published" file: OK
  with pytest.raises(ip.DatasetValidationError, match="is the 'fashion_mnist' file"):
    _read(tmp_path, dataset='mnist')


def test_fashion_content_digest_mismatch_is_rejected(tmp_path):
  _write_idx_dataset(tmp_path, splits=('test',))  # fake content under real file names
  with pytest.raises(ip.DatasetValidationError, match='does not match the published content'):
    _read(tmp_path, dataset='fashion_mnist')


def test_not_found_message_lists_every_place_and_is_fast(tmp_path, monkeypatch):
  env_dir, manual = tmp_path / 'env', tmp_path / 'manual'
  env_dir.mkdir()
  monkeypatch.setenv(ip.MANUAL_DIR_ENV, str(env_dir))
  monkeypatch.setattr(ip, '_DEFAULT_DIRS', {'fashion_mnist': (str(tmp_path / 'debian'),)})
  data_dir = tmp_path / 'tfds'
  t0 = time.perf_counter()
  with pytest.raises(FileNotFoundError) as e:
    ip.load_split('fashion_mnist', 'train', data_dir=data_dir, manual_dir=manual)
  assert time.perf_counter() - t0 < 2.0
  msg = str(e.value)
  for expected in [
      str(data_dir / 'capsjax_cache' / 'fashion_mnist' / '3.0.1' / 'train.npz'),
      str(data_dir / 'fashion_mnist' / '3.0.1'),
      str(manual / 'fashion_mnist'), str(manual), str(env_dir), str(tmp_path / 'debian'),
      'train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
      'apt-get install dataset-fashion-mnist', 'CAPSJAX_MANUAL_DIR', 'download=True']:
    assert expected in msg, expected
  assert '(does not exist)' in msg
  assert isinstance(e.value, ip.DatasetNotFoundError)


def test_cifar10_not_prepared_fails_fast_with_tfds_command(tmp_path):
  t0 = time.perf_counter()
  with pytest.raises(ip.DatasetNotFoundError, match='tfds build cifar10 --file_format=array_record'):
    ip.load_split('cifar10', 'test', data_dir=tmp_path)
  assert time.perf_counter() - t0 < 2.0


# ---------------------------------------------------------------------------------------
# Batching.
# ---------------------------------------------------------------------------------------


def _arrays(n):
  images = (np.arange(n)[:, None, None, None] % 256 * np.ones((1, 4, 4, 1))).astype(np.uint8)
  return images, np.arange(n, dtype=np.int64)


def test_steps_per_epoch_drops_remainder():
  assert ip.steps_per_epoch(60000, 128) == 468
  assert ip.steps_per_epoch(10, 5) == 2
  assert ip.steps_per_epoch(4, 5) == 0
  with pytest.raises(ValueError, match='batch_size'):
    ip.steps_per_epoch(10, 0)


def test_train_batches_are_deterministic_per_seed_and_epoch():
  images, labels = _arrays(103)
  order = lambda **kw: np.concatenate(
      [b['label'] for b in ip.train_batches(images, labels, batch_size=10, **kw)])
  a = order(seed=1, epoch=0)
  assert a.shape == (100,) and len(set(a)) == 100  # 10 batches, remainder dropped
  np.testing.assert_array_equal(a, order(seed=1, epoch=0))
  assert not np.array_equal(a, order(seed=1, epoch=1))
  assert not np.array_equal(a, order(seed=2, epoch=0))
  np.testing.assert_array_equal(a, np.random.default_rng([1, 0]).permutation(103)[:100])


def test_train_batches_dtype_values_and_resumption():
  images, labels = _arrays(50)
  full = list(ip.train_batches(images, labels, batch_size=8, seed=3, epoch=2))
  assert len(full) == 6
  b = full[0]
  assert b['image'].dtype == np.float32 and b['image'].shape == (8, 4, 4, 1)
  assert b['label'].dtype == np.int32
  np.testing.assert_allclose(b['image'][:, 0, 0, 0], b['label'] / 255.0, rtol=1e-6)
  resumed = list(ip.train_batches(images, labels, batch_size=8, seed=3, epoch=2, start_step=4))
  assert len(resumed) == 2
  for x, y in zip(resumed, full[4:]):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  assert list(ip.train_batches(images, labels, batch_size=8, seed=3, epoch=2, start_step=6)) == []
  with pytest.raises(ValueError, match=r'start_step must be in \[0, 6\]'):
    next(ip.train_batches(images, labels, batch_size=8, seed=3, epoch=2, start_step=7))


@pytest.mark.parametrize('n,batch_size', [(23, 5), (5, 8), (16, 8), (1, 1)])
def test_eval_batches_cover_every_example_once(n, batch_size):
  images, labels = _arrays(n)
  batches = list(ip.eval_batches(images, labels, batch_size=batch_size))
  assert len(batches) == -(-n // batch_size)
  seen = np.concatenate([b['label'][b['mask']] for b in batches])
  np.testing.assert_array_equal(seen, np.arange(n))  # each once, in order
  for b in batches:
    assert b['image'].shape == (batch_size, 4, 4, 1) and b['image'].dtype == np.float32
    assert b['label'].dtype == np.int32 and b['mask'].dtype == bool
    assert np.all(b['image'][~b['mask']] == 0)
  assert int(sum(b['mask'].sum() for b in batches)) == n


# ---------------------------------------------------------------------------------------
# Real data (slow).
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_build_fashion_mnist_from_debian_files(tmp_path, monkeypatch):
  if not os.path.isfile(os.path.join(DEBIAN_DIR, 'train-images-idx3-ubyte.gz')):
    pytest.skip(f'{DEBIAN_DIR} is missing: apt-get install dataset-fashion-mnist')
  monkeypatch.setattr(ip, '_DEFAULT_DIRS', {'fashion_mnist': (DEBIAN_DIR,)})
  for split, n in (('train', 60000), ('test', 10000)):
    images, labels = ip.load_split('fashion_mnist', split, data_dir=tmp_path)
    assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [n // 10] * 10)
  ds = tfds.data_source('fashion_mnist', split='test', data_dir=tmp_path, download=False)
  assert len(ds) == 10000
  np.testing.assert_array_equal(ds[0]['image'], images[0])
