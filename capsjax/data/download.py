"""Downloading a dataset with TFDS, and finding out at once when there is no network.

Offline, TFDS retries a download for minutes before it fails with a traceback; `download`
first tries one TCP connection to the download host (or its proxy), bounded by
`DOWNLOAD_CHECK_TIMEOUT_S`, and fails within seconds with one line naming the ways to get
the dataset without a network (`offline_routes`). The MNIST family is fetched through
`offline.release_builder`, so no TensorFlow is needed.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request

from absl import logging
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from capsjax import errors
from capsjax.data import offline

# Where each download starts; the first host is tried before TFDS is handed the download.
_DOWNLOAD_URLS = {
  "mnist": tfds_mnist.MNIST.URL,
  "fashion_mnist": tfds_mnist.FashionMNIST.URL,
  "kmnist": tfds_mnist.KMNIST.URL,
  "cifar10": "https://www.cs.toronto.edu/~kriz/",
}
# Seconds to wait for a TCP connection to the download host (or proxy), DNS included.
DOWNLOAD_CHECK_TIMEOUT_S = 5.0


def _unreachable(url: str, timeout: float = DOWNLOAD_CHECK_TIMEOUT_S) -> str | None:
  """Why `url`'s host (or the proxy for it) takes no TCP connection; None if it does.

  Offline, TFDS retries a download for minutes before it fails with a traceback; one
  connection attempt tells within seconds. It runs in a thread so that a hanging DNS
  lookup, which socket timeouts do not cover, is bounded too.
  """
  parts = urllib.parse.urlsplit(url)
  host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
  proxy = urllib.request.getproxies().get(parts.scheme)
  if proxy and not urllib.request.proxy_bypass(host):
    proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host, port = proxy_parts.hostname, proxy_parts.port or 80
  result = {}

  def connect():
    try:
      socket.create_connection((host, port), timeout=timeout).close()
      result["ok"] = True
    except OSError as e:
      result["error"] = e

  thread = threading.Thread(target=connect, daemon=True)
  thread.start()
  thread.join(timeout)
  if result.get("ok"):
    return None
  why = result.get("error") or f"no answer within {timeout:.0f} s"
  return f"cannot connect to {host}:{port} ({why})"


def offline_routes(dataset: str, data_dir: str) -> str:
  """One sentence naming the ways to get `dataset` without a network."""
  routes = []
  if dataset in offline.OFFLINE_DATASETS:
    routes.append(
      f"copy the original release files into a directory and pass "
      f"--config.manual_dir=DIR (or set {offline.MANUAL_DIR_ENV}=DIR)"
    )
  if dataset == "fashion_mnist":
    routes.append(
      "install them with `sudo apt-get install dataset-fashion-mnist` (Debian/"
      "Ubuntu; found in /usr/share/datasets/fashion-mnist)"
    )
  routes.append(
    f"on a connected machine run `tfds build {dataset} --file_format=array_record "
    f"--data_dir=D` and copy D to {data_dir} (or pass --config.data_dir=D)"
  )
  return "offline, either " + "; or ".join(routes)


def download(dataset: str, *, data_dir: str | os.PathLike) -> None:
  """Downloads and prepares `dataset` as array_record in `data_dir`; needs internet.

  TFDS verifies the published checksums. The MNIST family goes through
  `offline.release_builder` (no TensorFlow); other datasets use the official builder,
  whose PNG encoding may need TensorFlow.

  Raises:
    DatasetNotFoundError: the download host cannot be reached (found out within
      `DOWNLOAD_CHECK_TIMEOUT_S`, before TFDS starts retrying) or the download failed on
      the network; one line naming the offline routes.
  """
  url = _DOWNLOAD_URLS.get(dataset)
  why = _unreachable(url) if url else None
  if why:
    raise errors.DatasetNotFoundError(
      f"--config.download=True: {why}, so {dataset!r} cannot be downloaded; "
      f"{offline_routes(dataset, data_dir)}."
    )
  logging.info("Downloading %s into %s (download=True).", dataset, data_dir)
  if dataset in offline.OFFLINE_DATASETS:
    builder = offline.release_builder(dataset, data_dir=data_dir)
  else:
    builder = tfds.builder(dataset, data_dir=data_dir, file_format="array_record")
  import requests  # pylint: disable=g-import-not-at-top  # TFDS's own download client.

  try:
    builder.download_and_prepare()
  except (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    urllib.error.URLError,
    # A server that answers, but not with the file (HTTP 404, 403, 5xx).
    tfds.download.DownloadError,
  ) as e:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise errors.DatasetNotFoundError(
      f"--config.download=True: downloading {dataset!r} failed on the network "
      f"({type(e).__name__}: {first[:300]}); {offline_routes(dataset, data_dir)}."
    ) from e
