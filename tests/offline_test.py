"""Tests for capsjax.data.offline: finding, validating and building from original files.

No network and no real data: the IDX/npz fixtures are tiny and written to tmp_path.
"""

import gzip
import hashlib
import os
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds

from capsjax import errors
from capsjax.data import offline as od
from tests import data_fixtures as fx
from tests.data_fixtures import COUNTS, N_TEST, N_TRAIN


@pytest.fixture(autouse=True)
def _isolate(monkeypatch):
  fx.isolate(monkeypatch)


def _read(d, split="test", count=N_TEST, dataset="mnist"):
  paths = od.find_original_files(dataset, split, manual_dir=d)
  assert paths is not None
  return od.read_original_split(dataset, *paths, expected_count=count)


# ---------------------------------------------------------------------------------------
# Building TFDS datasets offline.
# ---------------------------------------------------------------------------------------


def test_offline_build_from_idx_is_read_by_plain_tfds(tmp_path):
  manual, data_dir = tmp_path / "manual", tmp_path / "tfds"
  fixture = fx.write_idx_dataset(manual / "mnist")  # the <dir>/<name>/ layout
  prepared = od.prepare_offline(
    "mnist", data_dir=data_dir, manual_dir=manual, expected_counts=COUNTS
  )
  assert prepared == str(data_dir / "mnist" / "3.0.1")
  # Any tool can now read it through plain TFDS (no TensorFlow involved).
  for split in ("train", "test"):
    ds = tfds.data_source("mnist", split=split, data_dir=data_dir, download=False)
    assert len(ds) == COUNTS[split]
    rec = [ds[i] for i in range(len(ds))]
    assert rec[0]["image"].shape == (28, 28, 1) and rec[0]["image"].dtype == np.uint8
    assert fx.as_set([r["image"] for r in rec], [r["label"] for r in rec]) == fx.as_set(
      *fixture[split]
    )


def test_a_damaged_array_record_file_is_named_with_how_to_rebuild(tmp_path, monkeypatch):
  from capsjax.data import input_pipeline as ip  # pylint: disable=g-import-not-at-top

  manual, data_dir = tmp_path / "manual", tmp_path / "tfds"
  fx.write_idx_dataset(manual / "mnist")
  prepared = od.prepare_offline(
    "mnist", data_dir=data_dir, manual_dir=manual, expected_counts=COUNTS
  )
  (name,) = [n for n in os.listdir(prepared) if "-train.array_record" in n]
  path = os.path.join(prepared, name)
  data = bytearray(open(path, "rb").read())
  for i in range(64, len(data) - 64, 7):  # flip bytes all through the file.
    data[i] ^= 0xFF
  with open(path, "wb") as f:
    f.write(bytes(data))
  with pytest.raises(errors.DatasetValidationError) as e:
    ip.load_split("mnist", "train", data_dir=data_dir)
  msg = str(e.value)
  assert msg.startswith(f"{prepared}: the 'train' split's files ({name}) cannot be read (")
  assert f"Move {prepared} aside and rerun" in msg and "\n" not in msg
  # The advice holds: with the damaged build moved aside, the split is rebuilt offline.
  os.rename(prepared, f"{prepared}.damaged")
  fx.small_counts(monkeypatch, "mnist")
  images, labels = ip.load_split("mnist", "train", data_dir=data_dir, manual_dir=manual)
  assert len(labels) == N_TRAIN


def test_kmnist_npz_full_build(tmp_path):
  manual, data_dir = tmp_path / "km", tmp_path / "tfds"
  fixture = fx.write_kmnist_npz(manual)
  od.prepare_offline("kmnist", data_dir=data_dir, manual_dir=manual, expected_counts=COUNTS)
  ds = tfds.data_source("kmnist", split="train", data_dir=data_dir, download=False)
  assert len(ds) == N_TRAIN
  got = fx.as_set(
    [ds[i]["image"] for i in range(len(ds))], [ds[i]["label"] for i in range(len(ds))]
  )
  assert got == fx.as_set(*fixture["train"])


def test_prepare_offline_needs_every_split_and_an_offline_dataset(tmp_path):
  manual = tmp_path / "km"
  fx.write_kmnist_npz(manual, splits=("test",))
  with pytest.raises(errors.DatasetNotFoundError, match="missing: \\['train'\\]") as e:
    od.prepare_offline("kmnist", data_dir=tmp_path / "tfds", manual_dir=manual)
  assert "kmnist-train-imgs.npz" in str(e.value) and str(manual) in str(e.value)
  assert not (tmp_path / "tfds" / "kmnist").exists()
  # A user asking for an offline build of a dataset that has none gets a CapsjaxError.
  with pytest.raises(errors.ConfigError, match="No offline build for 'cifar10'"):
    od.prepare_offline("cifar10", data_dir=tmp_path / "tfds")


def test_validation_error_is_raised_before_tfds_prints_anything(tmp_path, capfd):
  fx.write_idx_dataset(tmp_path)  # fixture counts, not the official 60000/10000
  capfd.readouterr()
  with pytest.raises(errors.DatasetValidationError) as e:
    od.prepare_offline("mnist", data_dir=tmp_path / "tfds", manual_dir=tmp_path)
  out, err = capfd.readouterr()
  # TFDS progress bars end in carriage returns, not newlines: had one been drawn, the
  # caller's error line would be glued onto it.
  assert "Generating" not in err and "\r" not in err, err
  assert "Downloading and preparing" not in out, out
  msg = str(e.value)
  assert msg.splitlines()[0] == (
    f"{tmp_path / 'train-images-idx3-ubyte.gz'}: {N_TRAIN} examples, expected 60000."
  )
  assert "\r" not in msg
  assert not (tmp_path / "tfds" / "mnist").exists()  # nothing written


def test_find_original_files_prefers_the_dataset_subdir_and_takes_uncompressed_idx(tmp_path):
  d = tmp_path / "raw"
  d.mkdir()
  images, labels = fx.fake_split(5, seed=3)
  fx.write_idx(d / "t10k-images-idx3-ubyte", images, 2051, compress=False)
  fx.write_idx(d / "t10k-labels-idx1-ubyte", labels, 2049, compress=False)
  paths = od.find_original_files("mnist", "test", manual_dir=d)
  assert paths == (str(d / "t10k-images-idx3-ubyte"), str(d / "t10k-labels-idx1-ubyte"))
  x, y = od.read_original_split("mnist", *paths, expected_count=5)
  np.testing.assert_array_equal(x[..., 0], images)
  np.testing.assert_array_equal(y, labels)
  assert x.shape == (5, 28, 28, 1) and y.dtype == np.int32
  fx.write_idx_dataset(d / "mnist", splits=("test",))
  assert od.find_original_files("mnist", "test", manual_dir=d)[0] == str(
    d / "mnist" / "t10k-images-idx3-ubyte.gz"
  )
  assert od.find_original_files("mnist", "train", manual_dir=d) is None
  with pytest.raises(errors.ConfigError, match="split must be one of"):
    od.find_original_files("mnist", "validation", manual_dir=d)


# ---------------------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------------------


def test_validation_wrong_count(tmp_path):
  fx.write_idx_dataset(tmp_path, splits=("test",))
  with pytest.raises(errors.DatasetValidationError, match=f"{N_TEST} examples, expected 10000"):
    _read(tmp_path, count=10000)
  # ... and prepare_offline with the official counts refuses, writing nothing.
  fx.write_idx_dataset(tmp_path)
  with pytest.raises(errors.DatasetValidationError, match="expected 60000"):
    od.prepare_offline("mnist", data_dir=tmp_path / "tfds", manual_dir=tmp_path)
  assert not (tmp_path / "tfds" / "mnist").exists()


def test_validation_corrupt_gzip(tmp_path):
  fx.write_idx_dataset(tmp_path, splits=("test",))
  p = tmp_path / "t10k-images-idx3-ubyte.gz"
  p.write_bytes(p.read_bytes()[:-40])  # truncated
  with pytest.raises(errors.DatasetValidationError, match="corrupt or truncated gzip"):
    _read(tmp_path)
  p.write_bytes(b"not a gzip file at all")
  with pytest.raises(errors.DatasetValidationError, match="corrupt or truncated gzip"):
    _read(tmp_path)


def test_validation_wrong_shape_and_header(tmp_path):
  images, labels = fx.fake_split(N_TEST, seed=0, h=27)
  fx.write_idx_dataset(tmp_path, splits=("test",), test=(images, labels))
  with pytest.raises(
    errors.DatasetValidationError, match=r"image shape \(27, 28, 1\), expected \(28, 28, 1\)"
  ):
    _read(tmp_path)
  # Header / body size disagreement and a swapped magic number.
  img = tmp_path / "t10k-images-idx3-ubyte.gz"
  with gzip.open(img, "wb") as f:
    f.write(struct.pack(">IIII", 2051, N_TEST, 28, 28) + b"\0" * 100)
  with pytest.raises(errors.DatasetValidationError, match="body has 100 bytes"):
    _read(tmp_path)
  fx.write_idx(img, fx.fake_split(N_TEST, 0)[0], 2049)
  with pytest.raises(errors.DatasetValidationError, match="magic number 2049, expected 2051"):
    _read(tmp_path)


def test_validation_label_out_of_range_and_count_mismatch(tmp_path):
  images, labels = fx.fake_split(N_TEST, seed=0)
  labels[3] = 10
  fx.write_idx_dataset(tmp_path, splits=("test",), test=(images, labels))
  with pytest.raises(errors.DatasetValidationError, match=r"label 10 out of range \[0, 10\)"):
    _read(tmp_path)
  fx.write_idx_dataset(tmp_path, splits=("test",), test=(images, labels[:-1] % 10))
  with pytest.raises(errors.DatasetValidationError, match="6 labels"):
    _read(tmp_path, count=None)


def test_validation_npz_errors(tmp_path):
  fx.write_kmnist_npz(tmp_path, splits=("test",))
  np.savez(tmp_path / "kmnist-test-imgs.npz", np.zeros((N_TEST, 28, 28), np.float32))
  with pytest.raises(errors.DatasetValidationError, match="dtype float32, expected uint8"):
    _read(tmp_path, dataset="kmnist")
  (tmp_path / "kmnist-test-imgs.npz").write_bytes(b"PK\x03\x04garbage")
  with pytest.raises(errors.DatasetValidationError, match="cannot read .npz"):
    _read(tmp_path, dataset="kmnist")


def test_checksums_same_size_as_published_but_different_is_corrupt(tmp_path):
  fx.write_idx_dataset(tmp_path, splits=("test",))
  p = tmp_path / "t10k-labels-idx1-ubyte.gz"
  size = od._GZ_SHA256["mnist"]["t10k-labels-idx1-ubyte.gz"][0]
  data = p.read_bytes()
  p.write_bytes(data + b"\0" * (size - len(data)))  # gzip ignores zero padding
  with pytest.raises(errors.DatasetValidationError, match="does not match the published"):
    _read(tmp_path)


def test_checksums_of_another_dataset_are_rejected(tmp_path, monkeypatch):
  fx.write_idx_dataset(tmp_path, splits=("test",))
  p = tmp_path / "t10k-images-idx3-ubyte.gz"
  digest = od._file_digest(str(p), "sha256")
  table = {k: dict(v) for k, v in od._GZ_SHA256.items()}
  table["fashion_mnist"]["t10k-images-idx3-ubyte.gz"] = (p.stat().st_size, digest)
  monkeypatch.setattr(od, "_GZ_SHA256", table)
  monkeypatch.setattr(od, "_PAYLOAD_SHA256", {})  # the fixture labels are not the real ones
  _read(tmp_path, dataset="fashion_mnist")  # byte-identical to the "published" file: OK
  with pytest.raises(errors.DatasetValidationError, match="is the 'fashion_mnist' file"):
    _read(tmp_path, dataset="mnist")


def test_fashion_content_digest_mismatch_is_rejected(tmp_path):
  fx.write_idx_dataset(tmp_path, splits=("test",))  # fake content under real file names
  with pytest.raises(errors.DatasetValidationError, match="does not match the published content"):
    _read(tmp_path, dataset="fashion_mnist")


def test_swapped_train_and_test_files_are_named_as_such(tmp_path, monkeypatch):
  # Re-compressed copies (Debian's) are checked on their payload: the test images written
  # under the train name must be called the test file, not just "does not match".
  fixture = fx.write_idx_dataset(tmp_path / "orig")
  payload = {}
  for split in ("train", "test"):
    for name, magic, array in zip(od._IDX_NAMES[split], (2051, 2049), fixture[split], strict=False):
      header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
      payload[name] = hashlib.sha256(header + array.tobytes()).hexdigest()
  monkeypatch.setattr(od, "_PAYLOAD_SHA256", {"fashion_mnist": payload})
  swapped = tmp_path / "swapped"
  swapped.mkdir()
  for a, b in zip(od._IDX_NAMES["train"], od._IDX_NAMES["test"], strict=False):
    (swapped / f"{a}.gz").write_bytes((tmp_path / "orig" / f"{b}.gz").read_bytes())
    (swapped / f"{b}.gz").write_bytes((tmp_path / "orig" / f"{a}.gz").read_bytes())
  _read(tmp_path / "orig", split="train", count=N_TRAIN, dataset="fashion_mnist")  # OK
  with pytest.raises(errors.DatasetValidationError) as e:
    _read(swapped, split="train", count=N_TRAIN, dataset="fashion_mnist")
  assert str(e.value) == (
    f"{swapped / 'train-images-idx3-ubyte.gz'}: this looks like the test images file "
    "(t10k-images-idx3-ubyte of 'fashion_mnist'), not train-images-idx3-ubyte.gz: are the "
    "train and test files swapped or misnamed?"
  )
  with pytest.raises(errors.DatasetValidationError, match="looks like the train images file"):
    _read(swapped, split="test", count=N_TEST, dataset="fashion_mnist")


@pytest.mark.skipif(
  not os.path.isdir("/usr/share/datasets/fashion-mnist"),
  reason="Debian's dataset-fashion-mnist is not installed",
)
def test_swapped_debian_fashion_mnist_files(tmp_path):
  src = "/usr/share/datasets/fashion-mnist"
  for a, b in zip(od._IDX_NAMES["train"], od._IDX_NAMES["test"], strict=False):
    os.symlink(os.path.join(src, f"{b}.gz"), tmp_path / f"{a}.gz")
  paths = od.find_original_files("fashion_mnist", "train", manual_dir=tmp_path)
  with pytest.raises(
    errors.DatasetValidationError,
    match=r"this looks like the test images file \(t10k-images-idx3-ubyte",
  ):
    od.read_original_split("fashion_mnist", *paths, expected_count=60000)


# ---------------------------------------------------------------------------------------
# The not-found message.
# ---------------------------------------------------------------------------------------


def test_not_found_message_for_a_dataset_without_offline_build():
  msg = od.not_found_message(
    "cifar10",
    "test",
    data_dir="/d",
    manual_dir=None,
    looked_in=["TFDS array_record dataset: /d/cifar10/3.0.2"],
  )
  assert msg == (
    "Dataset 'cifar10' split 'test' not found (looked in: TFDS array_record dataset: "
    "/d/cifar10/3.0.2; no offline build for 'cifar10': it is available through plain TFDS "
    "only). To fix: with internet, --config.download=True (load_split(..., download=True)), "
    "or prepare it with `tfds build cifar10 --file_format=array_record --data_dir=/d`."
  )
