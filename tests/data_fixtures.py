"""Tiny original-release fixtures (IDX and K-MNIST npz files) written to a test's tmp dir."""

import dataclasses
import gzip
import os
import struct

import numpy as np

from capsjax.data import input_pipeline as ip
from capsjax.data import offline as od

N_TRAIN, N_TEST = 12, 7
COUNTS = {"train": N_TRAIN, "test": N_TEST}


def fake_split(n, seed, h=28, w=28, num_classes=10):
  """images uint8 [n, h, w] (random), labels uint8 [n] (0, 1, ..., cycling)."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, h, w), dtype=np.uint8)
  labels = (np.arange(n) % num_classes).astype(np.uint8)
  return images, labels


def write_idx(path, array, magic, compress=True):
  header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
  data = header + np.ascontiguousarray(array, np.uint8).tobytes()
  with gzip.open(path, "wb") if compress else open(path, "wb") as f:
    f.write(data)


def write_idx_dataset(d, splits=("train", "test"), **overrides):
  """IDX fixture in dir d; returns {split: (images [N, 28, 28], labels [N])}."""
  os.makedirs(d, exist_ok=True)
  out = {}
  for i, split in enumerate(splits):
    images, labels = overrides.get(split) or fake_split(COUNTS[split], seed=i)
    img_name, lbl_name = od._IDX_NAMES[split]
    write_idx(os.path.join(d, img_name + ".gz"), images, 2051)
    write_idx(os.path.join(d, lbl_name + ".gz"), labels, 2049)
    out[split] = (images, labels)
  return out


def write_kmnist_npz(d, splits=("train", "test")):
  """K-MNIST npz fixture in dir d; returns {split: (images [N, 28, 28], labels [N])}."""
  os.makedirs(d, exist_ok=True)
  out = {}
  for i, split in enumerate(splits):
    images, labels = fake_split(COUNTS[split], seed=10 + i)
    img_name, lbl_name = od._NPZ_NAMES[split]
    np.savez_compressed(os.path.join(d, img_name), images)
    np.savez_compressed(os.path.join(d, lbl_name), labels)
    out[split] = (images, labels)
  return out


def small_counts(monkeypatch, name):
  """Makes the registry expect the fixtures' example counts for dataset `name`."""
  info = ip.dataset_info(name)
  monkeypatch.setitem(
    ip._DATASET_INFOS, name, dataclasses.replace(info, num_train=N_TRAIN, num_test=N_TEST)
  )


def as_set(images, labels):
  """Order-free view of a split: TFDS stores examples in hashed-key order."""
  images = np.asarray(images).reshape(len(images), -1)
  return sorted((x.tobytes(), int(y)) for x, y in zip(images, labels, strict=False))


def isolate(monkeypatch):
  """No user manual dir and no system default dirs unless a test asks for them."""
  monkeypatch.delenv(od.MANUAL_DIR_ENV, raising=False)
  monkeypatch.setattr(od, "_DEFAULT_DIRS", {})
