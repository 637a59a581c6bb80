"""Tests for capsjax.data.download: the quick network check and one-line failures.

No network: connections are refused or answered by stand-ins, and TFDS's download is
replaced by what it raises offline.
"""

import errno
import threading

import pytest
import requests

from capsjax import errors
from capsjax.data import download as dl
from capsjax.data import input_pipeline as ip
from capsjax.data import offline as od
from tests import data_fixtures as fx


@pytest.fixture(autouse=True)
def _isolate(monkeypatch):
  fx.isolate(monkeypatch)


def _offline(monkeypatch):
  """No host answers, as on a machine without a network; records TFDS download calls."""

  def refuse(address, *args, **kwargs):
    raise OSError(errno.ENETUNREACH, "Network is unreachable")

  monkeypatch.setattr(dl.socket, "create_connection", refuse)
  calls = []

  def download_and_prepare(self, *args, **kwargs):
    # What TFDS raises offline, after minutes of retries.
    calls.append(self.name)
    raise requests.exceptions.ConnectionError(
      "HTTPConnectionPool(host='fashion-mnist.s3-website.eu-central-1.amazonaws.com', "
      "port=80): Max retries exceeded"
    )

  for cls in od._OFFLINE_BUILDERS.values():
    monkeypatch.setattr(cls, "download_and_prepare", download_and_prepare)
  return calls


@pytest.mark.parametrize("dataset", ["fashion_mnist", "kmnist"])
def test_download_offline_fails_at_once_naming_the_offline_routes(tmp_path, monkeypatch, dataset):
  calls = _offline(monkeypatch)
  with pytest.raises(errors.DatasetNotFoundError) as e:
    ip.load_split(dataset, "train", data_dir=tmp_path, download=True)
  assert calls == []  # TFDS never started: no minutes of retries.
  msg = str(e.value)
  assert "\n" not in msg, msg  # one line.
  host = {
    "fashion_mnist": "fashion-mnist.s3-website.eu-central-1.amazonaws.com:80",
    "kmnist": "codh.rois.ac.jp:80",
  }[dataset]
  assert msg.startswith(f"--config.download=True: cannot connect to {host} (")
  assert "--config.manual_dir=DIR" in msg
  assert f"`tfds build {dataset} --file_format=array_record --data_dir=D`" in msg
  assert ("apt-get install dataset-fashion-mnist" in msg) == (dataset == "fashion_mnist")


def test_download_failing_on_the_network_later_is_one_line_too(tmp_path, monkeypatch):
  calls = _offline(monkeypatch)
  monkeypatch.setattr(dl, "_unreachable", lambda url: None)  # e.g. the host answers, the
  with pytest.raises(errors.DatasetNotFoundError) as e:  # transfer then fails.
    ip.load_split("fashion_mnist", "train", data_dir=tmp_path, download=True)
  assert calls == ["fashion_mnist"]
  assert str(e.value).startswith(
    "--config.download=True: downloading 'fashion_mnist' failed on the network (ConnectionError: "
  )
  assert "\n" not in str(e.value) and "offline, either copy" in str(e.value)


def test_a_server_answering_404_is_one_line(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(dl, "_unreachable", lambda url: None)

  def not_there(self, *args, **kwargs):  # what TFDS raises for an HTTP error status.
    raise tfds.download.DownloadError(
      "Failed to get url http://example.org/train-images-idx3-ubyte.gz. HTTP code: 404."
    )

  for cls in od._OFFLINE_BUILDERS.values():
    monkeypatch.setattr(cls, "download_and_prepare", not_there)
  with pytest.raises(errors.DatasetNotFoundError) as e:
    ip.load_split("fashion_mnist", "train", data_dir=tmp_path, download=True)
  assert str(e.value).startswith(
    "--config.download=True: downloading 'fashion_mnist' failed on the network "
    "(DownloadError: Failed to get url http://example.org/train-images-idx3-ubyte.gz. "
    "HTTP code: 404.); "
  )
  assert "\n" not in str(e.value)


def test_download_check_follows_a_proxy(monkeypatch):
  seen = []

  def connect(address, *args, **kwargs):
    seen.append(address)
    raise OSError(errno.ECONNREFUSED, "Connection refused")

  monkeypatch.setattr(dl.socket, "create_connection", connect)
  monkeypatch.setenv("http_proxy", "http://proxy.example:3128")
  monkeypatch.delenv("no_proxy", raising=False)
  monkeypatch.delenv("NO_PROXY", raising=False)
  assert dl._unreachable("http://fashion-mnist.example/") == (
    "cannot connect to proxy.example:3128 ([Errno 111] Connection refused)"
  )
  assert seen == [("proxy.example", 3128)]


def test_download_check_is_bounded_when_the_connection_hangs(monkeypatch):
  # A DNS lookup that hangs is not covered by the socket timeout: the thread bounds it.
  release = threading.Event()

  def hang(address, *args, **kwargs):
    release.wait(30)
    raise OSError(errno.ETIMEDOUT, "timed out")

  monkeypatch.setattr(dl.socket, "create_connection", hang)
  monkeypatch.delenv("http_proxy", raising=False)
  try:
    assert dl._unreachable("http://fashion-mnist.example/", timeout=1.0) == (
      "cannot connect to fashion-mnist.example:80 (no answer within 1 s)"
    )
  finally:
    release.set()
