"""Tests for capsjax.data.input_pipeline: registry, load_split and its cache, batching.

No network and no real data, except `test_build_fashion_mnist_from_debian_files` (slow).
Fixture IDX/npz files are tiny and written to tmp_path (see `data_fixtures`).
"""

import dataclasses
import errno
import logging
import os
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from capsjax import errors
from capsjax.data import input_pipeline as ip
from capsjax.data import offline as od
from tests import data_fixtures as fx
from tests.data_fixtures import COUNTS, N_TEST, N_TRAIN

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(autouse=True)
def _isolate(monkeypatch):
  fx.isolate(monkeypatch)


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ---------------------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------------------


def test_dataset_info_and_unknown_name():
  info = ip.dataset_info("fashion_mnist")
  assert info.image_shape == (28, 28, 1) and info.num_classes == 10
  assert (info.num_train, info.num_test) == (60000, 10000)
  assert info.class_names[0] == "T-shirt/top" and len(info.class_names) == 10
  assert ip.dataset_info("cifar10").image_shape == (32, 32, 3)
  assert set(ip.DATASETS) == {"fashion_mnist", "kmnist", "mnist", "cifar10"}
  with pytest.raises(errors.ConfigError, match="fashion_mnist, kmnist, mnist, cifar10"):
    ip.dataset_info("emnist")
  with pytest.raises(dataclasses.FrozenInstanceError):
    info.num_train = 1


def test_registry_agrees_with_the_offline_release_format():
  for name in od.OFFLINE_DATASETS:
    info = ip.dataset_info(name)
    assert info.image_shape == od.IMAGE_SHAPE and info.num_classes == od.NUM_CLASSES
    assert {s: info.num_examples(s) for s in ip.SPLITS} == od.RELEASE_COUNTS


def test_bad_split_is_a_config_error(tmp_path):
  with pytest.raises(errors.ConfigError, match="split must be one of"):
    ip.load_split("mnist", "validation", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------
# Loading through TFDS (mock_data) and offline builds.
# ---------------------------------------------------------------------------------------


def test_load_split_under_mock_data_reads_tfds_and_never_caches_fake_data(tmp_path, monkeypatch):
  calls = []
  real_read = ip._read_data_source
  monkeypatch.setattr(
    ip, "_read_data_source", lambda ds, info: calls.append(1) or real_read(ds, info)
  )
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    for dataset in ("mnist", "kmnist", "fashion_mnist"):
      images, labels = ip.load_split(dataset, "train", data_dir=tmp_path)
      assert images.shape == (16, 28, 28, 1) and images.dtype == np.uint8
      assert labels.shape == (16,) and labels.dtype == np.int32
      assert labels.min() >= 0 and labels.max() < 10
    images, _ = ip.load_split("cifar10", "test", data_dir=tmp_path)
    assert images.shape == (16, 32, 32, 3)
    ip.load_split("mnist", "train", data_dir=tmp_path)
  assert len(calls) == 5  # every load went through tfds.data_source
  assert not (tmp_path / "capsjax_cache").exists()  # mock data is never cached
  with pytest.raises(errors.DatasetNotFoundError):  # ... so it cannot leak into a real load
    ip.load_split("mnist", "train", data_dir=tmp_path)


def test_load_split_reads_the_prepared_dataset_then_the_cache(tmp_path, monkeypatch):
  manual, data_dir = tmp_path / "manual", tmp_path / "tfds"
  fixture = fx.write_idx_dataset(manual)
  od.prepare_offline("mnist", data_dir=data_dir, manual_dir=manual, expected_counts=COUNTS)
  images, labels = ip.load_split("mnist", "test", data_dir=data_dir)
  assert (data_dir / "capsjax_cache" / "mnist" / "3.0.1" / "test.npz").is_file()
  assert fx.as_set(images, labels) == fx.as_set(*fixture["test"])
  monkeypatch.setattr(ip.tfds, "builder", lambda *a, **k: pytest.fail("TFDS used"))
  images2, labels2 = ip.load_split("mnist", "test", data_dir=data_dir)
  np.testing.assert_array_equal(images2, images)
  np.testing.assert_array_equal(labels2, labels)


def test_load_split_builds_offline_automatically_with_env_dir(tmp_path, monkeypatch):
  fx.small_counts(monkeypatch, "mnist")
  manual, data_dir = tmp_path / "manual", tmp_path / "tfds"
  fixture = fx.write_idx_dataset(manual)
  monkeypatch.setenv(od.MANUAL_DIR_ENV, str(manual))
  images, labels = ip.load_split("mnist", "train", data_dir=data_dir)
  assert images.shape == (N_TRAIN, 28, 28, 1) and labels.dtype == np.int32
  assert fx.as_set(images, labels) == fx.as_set(*fixture["train"])
  assert (data_dir / "mnist" / "3.0.1" / "dataset_info.json").is_file()


def test_kmnist_only_test_split_offline(tmp_path, monkeypatch):
  fx.small_counts(monkeypatch, "kmnist")
  manual, data_dir = tmp_path / "km", tmp_path / "tfds"
  fixture = fx.write_kmnist_npz(manual, splits=("test",))
  images, labels = ip.load_split("kmnist", "test", data_dir=data_dir, manual_dir=manual)
  # Read straight from the files, in file order; no half-built TFDS dataset is written.
  np.testing.assert_array_equal(images[..., 0], fixture["test"][0])
  np.testing.assert_array_equal(labels, fixture["test"][1])
  assert not (data_dir / "kmnist").exists()
  assert (data_dir / "capsjax_cache" / "kmnist" / "3.0.1" / "test.npz").is_file()
  with pytest.raises(errors.DatasetNotFoundError) as e:
    ip.load_split("kmnist", "train", data_dir=data_dir, manual_dir=manual)
  assert "kmnist-train-imgs.npz" in str(e.value) and str(manual) in str(e.value)


def test_load_split_validation_error_comes_before_any_tfds_output(tmp_path, capfd):
  fx.write_idx_dataset(tmp_path)  # fixture counts, while the registry expects 60000/10000
  capfd.readouterr()
  with pytest.raises(errors.DatasetValidationError, match="expected 60000") as e:
    ip.load_split("mnist", "test", data_dir=tmp_path / "tfds", manual_dir=tmp_path)
  out, err = capfd.readouterr()
  assert "\r" not in err and "Generating" not in err and "Downloading" not in out
  assert str(e.value).startswith(str(tmp_path / "train-images-idx3-ubyte.gz") + ":")


# ---------------------------------------------------------------------------------------
# The cache.
# ---------------------------------------------------------------------------------------


def _prepared_mnist(tmp_path):
  manual, data_dir = tmp_path / "manual", tmp_path / "tfds"
  fx.write_idx_dataset(manual)
  prepared = od.prepare_offline(
    "mnist", data_dir=data_dir, manual_dir=manual, expected_counts=COUNTS
  )
  return data_dir, prepared, data_dir / "capsjax_cache" / "mnist" / "3.0.1" / "test.npz"


def test_cache_is_invalidated_when_the_tfds_dataset_changes(tmp_path):
  data_dir, prepared, cache = _prepared_mnist(tmp_path)
  images, labels = ip.load_split("mnist", "test", data_dir=data_dir)
  # A self-consistent cache (right fingerprint and digest) of other arrays is trusted...
  fp = str(np.load(cache)["fingerprint"])
  np.savez(
    cache,
    image=images[:1],
    label=labels[:1],
    fingerprint=np.array(fp),
    digest=np.array(ip._array_digest(images[:1], labels[:1])),
  )
  assert len(ip.load_split("mnist", "test", data_dir=data_dir)[0]) == 1
  # ...until the dataset is rebuilt (dataset_info.json changes): then it is rebuilt.
  info_json = os.path.join(prepared, "dataset_info.json")
  st = os.stat(info_json)
  os.utime(info_json, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  images3, _ = ip.load_split("mnist", "test", data_dir=data_dir)
  assert len(images3) == N_TEST


def test_the_cache_is_reused_through_another_path_to_the_same_data_dir(tmp_path, monkeypatch):
  data_dir, _, cache = _prepared_mnist(tmp_path)
  images, labels = ip.load_split("mnist", "test", data_dir=data_dir)
  built = os.stat(cache).st_mtime_ns
  link = tmp_path / "link"
  os.symlink(data_dir, link)
  monkeypatch.chdir(tmp_path)
  for other in (str(link), "tfds", "./link/"):
    images2, labels2 = ip.load_split("mnist", "test", data_dir=other)
    np.testing.assert_array_equal(images2, images)
    np.testing.assert_array_equal(labels2, labels)
  assert os.stat(cache).st_mtime_ns == built  # read, never rewritten.


@pytest.mark.parametrize("tamper", ["zeros", "one_label", "no_digest"])
def test_cache_whose_arrays_changed_is_rebuilt_with_one_warning(tmp_path, caplog, tamper):
  data_dir, _, cache = _prepared_mnist(tmp_path)
  images, labels = ip.load_split("mnist", "test", data_dir=data_dir)
  assert images.any()
  with np.load(cache) as z:
    stored = {k: z[k] for k in z.files}
  if tamper == "zeros":  # same shapes, fingerprint and digest field; arrays zeroed
    stored["image"] = np.zeros_like(images)
  elif tamper == "no_digest":  # a cache file without a digest: rebuilt quietly
    stored["image"] = np.zeros_like(images)
    del stored["digest"]
  else:
    stored["label"] = stored["label"].copy()
    stored["label"][0] = (stored["label"][0] + 1) % 10
  np.savez(cache, **stored)
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="absl"):
    images2, labels2 = ip.load_split("mnist", "test", data_dir=data_dir)
  np.testing.assert_array_equal(images2, images)
  np.testing.assert_array_equal(labels2, labels)
  warnings = _warnings(caplog)
  if tamper == "no_digest":
    assert not warnings and "has no digest" in caplog.text
  else:
    assert len(warnings) == 1 and "does not match its stored digest" in warnings[0], warnings
  # The rebuilt cache is intact again: the next load uses it without a warning.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    np.testing.assert_array_equal(ip.load_split("mnist", "test", data_dir=data_dir)[0], images)
  assert not _warnings(caplog)


def test_array_digest_covers_bytes_shape_and_dtype():
  images, labels = fx.fake_split(4, seed=0)
  d = ip._array_digest(images, labels)
  assert d == ip._array_digest(images.copy(), labels.copy()) and len(d) == 64
  assert d != ip._array_digest(images.reshape(4, 28 * 28), labels)
  assert d != ip._array_digest(images, labels.astype(np.int32))
  changed = images.copy()
  changed[3, 27, 27] ^= 1
  assert d != ip._array_digest(changed, labels)


@pytest.mark.parametrize("how", ["cache_dir_is_a_file", "read_only_filesystem"])
def test_unwritable_cache_dir_warns_once_and_loads(tmp_path, monkeypatch, caplog, how):
  fx.small_counts(monkeypatch, "kmnist")
  manual, data_dir = tmp_path / "km", tmp_path / "tfds"
  fixture = fx.write_kmnist_npz(manual, splits=("test",))
  data_dir.mkdir()
  if how == "cache_dir_is_a_file":
    (data_dir / "capsjax_cache").write_text("")
  else:  # What os.makedirs meets on a read-only mount (chmod does not stop root).

    def makedirs(path, *args, **kwargs):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(ip.os, "makedirs", makedirs)
  with caplog.at_level(logging.WARNING):
    images, labels = ip.load_split("kmnist", "test", data_dir=data_dir, manual_dir=manual)
  np.testing.assert_array_equal(images[..., 0], fixture["test"][0])
  np.testing.assert_array_equal(labels, fixture["test"][1])
  warnings = [w for w in _warnings(caplog) if "md5" not in w]  # fixture != release
  assert len(warnings) == 1 and "Not caching decoded arrays" in warnings[0], warnings
  assert not list(data_dir.rglob("*.npz"))


def test_file_cache_is_invalidated_when_the_files_change(tmp_path, monkeypatch):
  fx.small_counts(monkeypatch, "kmnist")
  manual, data_dir = tmp_path / "km", tmp_path / "tfds"
  fx.write_kmnist_npz(manual, splits=("test",))
  ip.load_split("kmnist", "test", data_dir=data_dir, manual_dir=manual)
  new_images = np.full((N_TEST, 28, 28), 9, np.uint8)
  np.savez_compressed(manual / "kmnist-test-imgs.npz", new_images)
  os.utime(manual / "kmnist-test-imgs.npz", ns=(1, 2 * 10**18))
  images, _ = ip.load_split("kmnist", "test", data_dir=data_dir, manual_dir=manual)
  np.testing.assert_array_equal(images[..., 0], new_images)


# ---------------------------------------------------------------------------------------
# Not found.
# ---------------------------------------------------------------------------------------


def test_not_found_message_lists_every_place_and_is_fast(tmp_path, monkeypatch):
  env_dir, manual = tmp_path / "env", tmp_path / "manual"
  env_dir.mkdir()
  monkeypatch.setenv(od.MANUAL_DIR_ENV, str(env_dir))
  monkeypatch.setattr(od, "_DEFAULT_DIRS", {"fashion_mnist": (str(tmp_path / "debian"),)})
  data_dir = tmp_path / "tfds"
  t0 = time.perf_counter()
  with pytest.raises(errors.DatasetNotFoundError) as e:
    ip.load_split("fashion_mnist", "train", data_dir=data_dir, manual_dir=manual)
  assert time.perf_counter() - t0 < 2.0  # no network retries
  msg = str(e.value)
  assert "\n" not in msg  # the command line's one `capsjax: error:` line.
  assert msg.startswith("Dataset 'fashion_mnist' split 'train' not found (looked in: ")
  for expected in [
    str(data_dir / "capsjax_cache" / "fashion_mnist" / "3.0.1" / "train.npz"),
    str(data_dir / "fashion_mnist" / "3.0.1"),
    str(manual / "fashion_mnist"),
    str(manual),
    str(env_dir),
    str(tmp_path / "debian"),
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "apt-get install dataset-fashion-mnist",
    "CAPSJAX_MANUAL_DIR",
    "download=True",
  ]:
    assert expected in msg, expected
  assert "(does not exist)" in msg
  assert isinstance(e.value, FileNotFoundError)


def test_cifar10_not_prepared_fails_fast_with_tfds_command(tmp_path):
  t0 = time.perf_counter()
  with pytest.raises(
    errors.DatasetNotFoundError, match="tfds build cifar10 --file_format=array_record"
  ):
    ip.load_split("cifar10", "test", data_dir=tmp_path)
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
  with pytest.raises(ValueError, match="batch_size"):
    ip.steps_per_epoch(10, 0)


def test_train_batches_are_deterministic_per_seed_and_epoch():
  images, labels = _arrays(103)

  def order(**kw):
    return np.concatenate(
      [b["label"] for b in ip.train_batches(images, labels, batch_size=10, **kw)]
    )

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
  assert b["image"].dtype == np.float32 and b["image"].shape == (8, 4, 4, 1)
  assert b["label"].dtype == np.int32
  np.testing.assert_allclose(b["image"][:, 0, 0, 0], b["label"] / 255.0, rtol=1e-6)
  resumed = list(ip.train_batches(images, labels, batch_size=8, seed=3, epoch=2, start_step=4))
  assert len(resumed) == 2
  for x, y in zip(resumed, full[4:], strict=False):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert list(ip.train_batches(images, labels, batch_size=8, seed=3, epoch=2, start_step=6)) == []
  with pytest.raises(ValueError, match=r"start_step must be in \[0, 6\]"):
    next(ip.train_batches(images, labels, batch_size=8, seed=3, epoch=2, start_step=7))


@pytest.mark.parametrize("n,batch_size", [(23, 5), (5, 8), (16, 8), (1, 1)])
def test_eval_batches_cover_every_example_once(n, batch_size):
  images, labels = _arrays(n)
  batches = list(ip.eval_batches(images, labels, batch_size=batch_size))
  assert len(batches) == -(-n // batch_size)
  seen = np.concatenate([b["label"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(seen, np.arange(n))  # each once, in order
  for b in batches:
    assert b["image"].shape == (min(batch_size, n), 4, 4, 1) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["mask"].dtype == bool
    assert np.all(b["image"][~b["mask"]] == 0)
  assert int(sum(b["mask"].sum() for b in batches)) == n


def test_an_eval_batch_larger_than_the_split_shrinks_to_the_split():
  """A mistyped eval_batch_size pads to the split rounded up to the device count, never to
  itself (10**9 rows of zeros would be terabytes)."""
  images, labels = _arrays(10)
  (batch,) = ip.eval_batches(images, labels, batch_size=10**9, multiple_of=4)
  assert batch["image"].shape == (12, 4, 4, 1)
  np.testing.assert_array_equal(batch["label"][batch["mask"]], np.arange(10))
  assert not batch["mask"][10:].any()
  # A batch that fits is kept, so the compiled eval step is the one training used.
  assert [len(b["label"]) for b in ip.eval_batches(images, labels, batch_size=4)] == [4, 4, 4]


# ---------------------------------------------------------------------------------------
# Real data (slow).
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_build_fashion_mnist_from_debian_files(tmp_path, monkeypatch):
  if not os.path.isfile(os.path.join(DEBIAN_DIR, "train-images-idx3-ubyte.gz")):
    pytest.skip(f"{DEBIAN_DIR} is missing: apt-get install dataset-fashion-mnist")
  monkeypatch.setattr(od, "_DEFAULT_DIRS", {"fashion_mnist": (DEBIAN_DIR,)})
  for split, n in (("train", 60000), ("test", 10000)):
    images, labels = ip.load_split("fashion_mnist", split, data_dir=tmp_path)
    assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [n // 10] * 10)
  ds = tfds.data_source("fashion_mnist", split="test", data_dir=tmp_path, download=False)
  assert len(ds) == 10000
  np.testing.assert_array_equal(ds[0]["image"], images[0])
