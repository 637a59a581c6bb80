"""What a user sees, in a real `capsjax.main` process, when checkpoint storage fails or
`init_from` is wrong: one `capsjax: error:` line, exit code 2, no traceback, no hang. And
outside checkpoints/: a CSV that cannot be written is a WorkdirError, a plot a warning.

Real processes, because the failures under test happen at interpreter exit (Orbax
threads that keep a process alive for minutes, or print a traceback after the error).
Runs `experiments.fault_injection child` on TFDS mock MNIST with the `:smoke` config.

A read-only directory and a full disk are real: a read-only bind mount and a 2 MiB
tmpfs, mounted in a private mount namespace (`unshare -m`) that ends with the child.
File permissions cannot stand in for them, since root ignores permissions. Where mounts
are not allowed (not root, no user namespaces) those tests are skipped, saying so;
`checkpoint_test.py` covers the same errors in-process by refusing the system calls.
"""

import errno
import functools
import os
import shutil
import subprocess

import pytest

from experiments import fault_injection as fi

CONFIG = "configs/fashion.py:smoke"
OVERRIDES = ("--config.dataset=mnist", "--config.train_examples=32")
# A hang guard, not a timing assertion: a read-only checkpoints/ must not keep the process
# alive after its error (Orbax threads waiting on it would for about 300 s).
TIMEOUT = 200


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


@functools.lru_cache(maxsize=None)
def _mount_problem() -> str | None:
  """None if this process may mount in a private namespace, else why not."""
  if not shutil.which("unshare"):
    return "no `unshare` command"
  probe = subprocess.run(
    [
      "unshare",
      "-m",
      "--propagation",
      "private",
      "sh",
      "-c",
      "mount -t tmpfs -o size=1m tmpfs /mnt && umount /mnt",
    ],
    capture_output=True,
    text=True,
    check=False,
  )
  return None if probe.returncode == 0 else f"cannot mount: {probe.stderr.strip()[:200]}"


def _run(workdir, cache, *overrides, mount: str = ""):
  """Runs the child to completion; returns (exit code, its stdout+stderr)."""
  cmd = fi.child_cmd(CONFIG, workdir, *OVERRIDES, *overrides)
  if mount:
    cmd = [
      "unshare",
      "-m",
      "--propagation",
      "private",
      "sh",
      "-c",
      mount + ' && exec "$@"',
      "sh",
      *cmd,
    ]
  proc = subprocess.run(
    cmd,
    env=fi.child_env(devices=1, cache_dir=cache, mock_examples=48),
    cwd=fi.REPO,
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
    check=False,
  )
  return proc.returncode, proc.stdout + proc.stderr


def _assert_one_line_error(rc, out, *parts):
  lines = [ln for ln in out.splitlines() if ln.startswith("capsjax: error:")]
  assert rc == 2, out[-3000:]
  assert len(lines) == 1, out[-3000:]
  assert "Traceback" not in out, out[-5000:]
  for part in parts:
    assert part in lines[0], lines[0]
  return lines[0]


def test_read_only_checkpoints_fail_at_once_without_hang_or_traceback(tmp_path, jax_cache):
  if _mount_problem():
    pytest.skip(f"needs a read-only bind mount ({_mount_problem()}); chmod does not stop root")
  workdir = str(tmp_path / "run")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  os.makedirs(ckpt_dir)
  rc, out = _run(
    workdir,
    jax_cache,
    "--config.num_epochs=1",
    mount=f"mount --bind {ckpt_dir} {ckpt_dir} && mount -o remount,ro,bind {ckpt_dir}",
  )
  line = _assert_one_line_error(
    rc,
    out,
    f"could not write checkpoint in {ckpt_dir}",
    "the file system is read-only",
    "make it writable",
  )
  assert "free space" not in line
  # Refused when the run opened its checkpoints, before an epoch was trained.
  assert "epoch 1:" not in out


def test_full_disk_in_checkpoints_says_the_disk_is_full(tmp_path, jax_cache):
  if _mount_problem():
    pytest.skip(f"needs a small tmpfs ({_mount_problem()})")
  # Twice: the writes that fail race with the others (which tracebacks Orbax, asyncio and
  # TensorStore leave behind varies from run to run).
  for attempt in range(2):
    workdir = str(tmp_path / f"run{attempt}")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    os.makedirs(ckpt_dir)
    # 2 MiB holds the step-4 checkpoint (about 1.4 MB) but not the next one.
    rc, out = _run(
      workdir,
      jax_cache,
      "--config.num_epochs=3",
      mount=f"mount -t tmpfs -o size=2m tmpfs {ckpt_dir}",
    )
    _assert_one_line_error(
      rc,
      out,
      f"could not write checkpoint (step 8) in {ckpt_dir}: "
      "the disk is full. Earlier checkpoints are kept "
      "(steps [4]); free space and rerun the same command",
    )


@pytest.mark.slow
@pytest.mark.parametrize(
  "kind, mount, expected",
  [
    (
      "read-only",
      "mount --bind {w} {w} && mount -o remount,ro,bind {w}",
      "the file system is read-only",
    ),
    # A one-page tmpfs filled up before the run starts.
    ("full", "mount -t tmpfs -o size=4k tmpfs {w} && head -c 4096 /dev/zero > {w}/fill", "full"),
  ],
)
def test_a_read_only_or_full_workdir_is_one_line_at_start(
  tmp_path, jax_cache, kind, mount, expected
):
  if _mount_problem():
    pytest.skip(f"needs a mount ({_mount_problem()})")
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  rc, out = _run(workdir, jax_cache, "--config.num_epochs=1", mount=mount.format(w=workdir))
  line = _assert_one_line_error(
    rc, out, "cannot use the workdir: ", os.path.join(workdir, ".lock.0"), expected
  )
  assert "epoch 1" not in out, (kind, line)


def test_init_from_errors_end_with_one_line_and_no_orbax_traceback(tmp_path, jax_cache):
  # An Orbax thread left running can print a traceback ("cannot schedule new futures
  # after interpreter shutdown") after the error, in some runs only: run each twice.
  os.makedirs(tmp_path / "plain")
  os.makedirs(tmp_path / "empty" / "checkpoints")
  (tmp_path / "a_file").write_text("not a checkpoint")
  cases = {
    "missing": "does not exist",
    "plain": "no checkpoints under",
    "a_file": "no checkpoints under",
    "empty": "holds no complete checkpoint",
  }
  for attempt in range(2):
    for name, expected in cases.items():
      workdir = str(tmp_path / f"run_{name}_{attempt}")
      rc, out = _run(
        workdir, jax_cache, "--config.num_epochs=1", f"--config.init_from={tmp_path / name}"
      )
      _assert_one_line_error(rc, out, expected)
      # Refused before the workdir was made: nothing to clean up, nothing to mistake
      # for a run.
      assert not os.path.exists(workdir), os.listdir(workdir)
      assert "epoch 1" not in out


# ----------------------------------------------------------------------------------------
# Outside checkpoints/: the run's record (CSV, TensorBoard) and its plot.
# ----------------------------------------------------------------------------------------
def _no_space(*args, **kwargs):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_metrics_csv_on_a_full_disk_is_a_workdir_error(tmp_path, monkeypatch):
  from capsjax import errors  # pylint: disable=g-import-not-at-top
  from capsjax import metrics  # pylint: disable=g-import-not-at-top

  writer = metrics.MetricWriter(str(tmp_path))
  monkeypatch.setattr(metrics, "open", _no_space, raising=False)
  with pytest.raises(
    errors.WorkdirError,
    match=rf"could not write {tmp_path}/metrics.csv: the disk is full\. "
    r"Checkpoints already saved are kept",
  ):
    writer.write(1, 0.25, "train", {"loss": 1.0})
  with pytest.raises(errors.WorkdirError, match=r"epochs.csv: the disk is full"):
    writer.write_epoch(1, 4, {"loss": 1.0}, {"loss": 1.0}, seconds=1.0, images=8)
  writer.close()


def test_a_plot_on_a_full_disk_warns_and_training_goes_on(tmp_path, monkeypatch, caplog):
  import matplotlib.figure  # pylint: disable=g-import-not-at-top
  from capsjax import metrics  # pylint: disable=g-import-not-at-top

  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(4, 1.0, "train", {"loss": 1.0, "accuracy": 0.5})
  writer.close()
  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _no_space)
  with caplog.at_level("WARNING"):
    assert metrics.plot_curves(writer.path, str(tmp_path / "plots" / "curves.png")) is None
  assert "could not write the plot" in caplog.text and "the disk is full" in caplog.text


def test_full_disk_for_plots_does_not_stop_training(tmp_path, jax_cache):
  if _mount_problem():
    pytest.skip(f"needs a small tmpfs ({_mount_problem()})")
  workdir = str(tmp_path / "run")
  plots = os.path.join(workdir, "plots")
  os.makedirs(plots)
  # 8 KiB: too small for curves.png (about 50 KB).
  rc, out = _run(
    workdir, jax_cache, "--config.num_epochs=1", mount=f"mount -t tmpfs -o size=8k tmpfs {plots}"
  )
  assert rc == 0, out[-3000:]
  assert "Traceback" not in out and "could not write the plot" in out, out[-3000:]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
