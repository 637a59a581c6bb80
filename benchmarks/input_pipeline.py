"""Input-pipeline benchmark: load time (cold build/decode vs cached) and augmentation speed.

Run from the repo root:
  python -m benchmarks.input_pipeline [--manual_dir DIR] [--data_dir DIR] [--batch_size 128]

Cold loads use a fresh temporary TFDS data_dir (unless --data_dir is given), so they
include the offline TFDS build from the original files (Fashion-MNIST from Debian's
dataset-fashion-mnist or --manual_dir; K-MNIST from --manual_dir) and the PNG decode.
Prints a table; the last line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import tempfile
import time

import jax
import numpy as np
import tensorflow_datasets as tfds

from capsjax import augment
from capsjax.data import input_pipeline

AUG_CONFIGS = {
  "none": dict(),
  "fashion (shift 2 + flip)": dict(max_shift=2, flip=True),
  "kmnist (shift 2 + cutout 8)": dict(max_shift=2, cutout_size=8),
  "all (shift 2 + flip + cutout 8)": dict(max_shift=2, flip=True, cutout_size=8),
}


def _time(fn):
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def bench_loading(data_dir, manual_dir):
  rows = []
  for dataset, split in [
    ("fashion_mnist", "train"),
    ("fashion_mnist", "test"),
    ("kmnist", "test"),
    ("kmnist", "train"),
  ]:
    load = functools.partial(
      input_pipeline.load_split, dataset, split, data_dir=data_dir, manual_dir=manual_dir
    )
    try:
      cold, (images, _) = _time(load)
      cached, _ = _time(load)
      rows.append(
        dict(
          dataset=dataset,
          split=split,
          n=len(images),
          cold_s=round(cold, 3),
          cached_s=round(cached, 3),
        )
      )
    except FileNotFoundError as e:
      rows.append(
        dict(
          dataset=dataset,
          split=split,
          n=0,
          cold_s=None,
          cached_s=None,
          error=str(e).splitlines()[0],
        )
      )
  return rows


def bench_batching(images, labels, batch_size):
  steps = input_pipeline.steps_per_epoch(len(images), batch_size)
  t, n = _time(
    lambda: sum(
      len(b["label"])
      for b in input_pipeline.train_batches(images, labels, batch_size=batch_size, seed=0, epoch=0)
    )
  )
  return dict(steps=steps, images_per_s=round(n / t))


def bench_augment(batch_size, iters):
  images = jax.device_put(
    np.random.default_rng(0).random((batch_size, 28, 28, 1), dtype=np.float32)
  )
  key = jax.random.key(0)
  rows = []
  for name, cfg in AUG_CONFIGS.items():
    fn = jax.jit(
      lambda k, step, x, cfg=cfg: augment.augment_batch(jax.random.fold_in(k, step), x, **cfg)
    )
    compile_s, _ = _time(lambda: fn(key, 0, images).block_until_ready())  # noqa: B023 (called now)
    t0 = time.perf_counter()
    for step in range(iters):
      out = fn(key, step, images)
    out.block_until_ready()
    t = time.perf_counter() - t0
    rows.append(
      dict(
        config=name,
        compile_s=round(compile_s, 3),
        ms_per_batch=round(1e3 * t / iters, 3),
        images_per_s=round(batch_size * iters / t),
      )
    )
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: fresh tmp dir)")
  parser.add_argument("--manual_dir", default=None, help="original files (e.g. K-MNIST npz)")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--iters", type=int, default=200)
  args = parser.parse_args()
  from capsjax.run import cpu_runtime  # pylint: disable=g-import-not-at-top

  cpu_runtime.configure_cpu_runtime()  # as capsjax.main does, before JAX starts its backends.
  tfds.disable_progress_bar()

  tmp = None
  data_dir = args.data_dir or (tmp := tempfile.mkdtemp(prefix="capsjax_bench_tfds_"))
  try:
    load_rows = bench_loading(data_dir, args.manual_dir)
    batch_row = None
    ok = [r for r in load_rows if r["n"]]
    if ok:
      images, labels = input_pipeline.load_split(
        ok[0]["dataset"], ok[0]["split"], data_dir=data_dir, manual_dir=args.manual_dir
      )
      batch_row = dict(
        dataset=ok[0]["dataset"],
        split=ok[0]["split"],
        **bench_batching(images, labels, args.batch_size),
      )
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  aug_rows = bench_augment(args.batch_size, args.iters)

  print(
    f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), batch {args.batch_size}"
  )
  print(
    "\ncold = first load in an empty data_dir (offline TFDS build of all splits when the "
    "original files are complete, else direct file read) + decode; cached = second load"
  )
  print(f"{'dataset/split':<22}{'N':>7}{'cold (s)':>10}{'cached (s)':>12}")
  for r in load_rows:
    if r["n"]:
      print(
        f"{r['dataset'] + '/' + r['split']:<22}{r['n']:>7}{r['cold_s']:>10.2f}"
        f"{r['cached_s']:>12.3f}"
      )
    else:
      print(f"{r['dataset'] + '/' + r['split']:<22}{'-':>7}  not available: {r['error']}")
  if batch_row:
    print(
      f"\nhost train_batches ({batch_row['dataset']}/{batch_row['split']}, uint8 -> "
      f"float32): {batch_row['images_per_s']:,} images/s"
    )
  print(f"\n{'augmentation (jitted)':<34}{'compile (s)':>12}{'ms/batch':>10}{'images/s':>12}")
  for r in aug_rows:
    print(
      f"{r['config']:<34}{r['compile_s']:>12.2f}{r['ms_per_batch']:>10.3f}{r['images_per_s']:>12,}"
    )
  print(
    json.dumps(
      dict(
        device=jax.devices()[0].device_kind,
        backend=jax.default_backend(),
        batch_size=args.batch_size,
        load=load_rows,
        batching=batch_row,
        augment=aug_rows,
      )
    )
  )


if __name__ == "__main__":
  main()
