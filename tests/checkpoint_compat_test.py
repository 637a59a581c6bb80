"""Content digests, meta digests and parameter-shape checks of saved state (no Orbax)."""

import hashlib
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from capsjax import errors
from capsjax.run import checkpoint_compat as compat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sha256_of(leaves):
  """Reference digest: sha256 over 'name|dtype|shape\\n' + bytes of (name, array) leaves."""
  h = hashlib.sha256()
  for name, a in sorted(leaves, key=lambda t: t[0]):
    a = np.ascontiguousarray(a)
    h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def test_content_digest_depends_on_values_only():
  state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": {"c": np.int32(3)}}
  digests = compat.content_digests(state)
  assert digests == {
    "a": _sha256_of([("a", state["a"])]),
    "b": _sha256_of([("b/c", np.asarray(state["b"]["c"]))]),
  }
  # The same values on a device, or flattened in another order, digest the same.
  assert compat.content_digests(jax.device_put(state)) == digests
  assert compat.content_digests({"b": state["b"], "a": state["a"]}) == digests
  changed = dict(state, a=state["a"].copy())
  changed["a"][1, 2] = np.nextafter(changed["a"][1, 2], np.float32(9))  # one ulp
  assert compat.content_digests(changed)["a"] != digests["a"]
  assert compat.content_digests(changed)["b"] == digests["b"]
  assert compat.content_digests({"a": state["a"].astype(np.int32), "b": state["b"]}) != digests


def test_state_mismatch_names_the_entry_and_skips_entries_without_a_digest():
  state = {"0": np.ones(3, np.float32), "1": np.zeros(2, np.float32)}
  saved = compat.content_digests(state)
  assert compat.state_mismatch(saved, state) is None
  # A model-only restore checks entry 0 alone.
  assert compat.state_mismatch(saved, {"0": state["0"]}) is None
  damaged = {"0": state["0"], "1": np.array([0.0, 1.0], np.float32)}
  why = compat.state_mismatch(saved, damaged)
  assert why == (
    f"the content digest of state entry 1 is {compat.content_digests(damaged)['1'][:12]}... "
    f"but {saved['1'][:12]}... was saved: its files were changed or damaged after the save"
  )
  # An entry not digested at save (sharded across processes) is not checked.
  assert compat.state_mismatch(dict(saved, **{"1": None}), damaged) is None


def test_meta_digest_ignores_the_digest_field_and_tuple_vs_list():
  meta = {"step": 4, "image_shape": (28, 28, 1), "model": {"digit_dim": 16}}
  text = '{"image_shape":[28,28,1],"model":{"digit_dim":16},"step":4}'
  assert compat.meta_digest(meta) == hashlib.sha256(text.encode()).hexdigest()
  assert compat.meta_digest(dict(meta, digests={"0": "x"})) == compat.meta_digest(meta)
  saved = dict(meta, digests={"meta": compat.meta_digest(meta)})
  assert compat.meta_mismatch(saved) is None
  assert compat.meta_mismatch(dict(meta)) is None  # no digest recorded: unchecked.
  assert "does not match the digest saved with it" in compat.meta_mismatch(dict(saved, step=5))


def test_check_compatible_names_the_first_parameter_that_differs():
  target = {"0": {"conv": np.zeros((9, 9, 1, 8)), "caps": np.zeros((4, 3))}}
  saved = {"0/conv": [9, 9, 1, 8], "0/caps": [4, 3]}
  compat.check_compatible(saved, target, source="/w/checkpoints/4")
  with pytest.raises(
    errors.CheckpointMismatchError,
    match=re.escape(
      "checkpoint /w/checkpoints/4 does not fit this model: parameter 0/caps has shape "
      "(4, 5) in the checkpoint but (4, 3) in the model"
    ),
  ):
    compat.check_compatible(dict(saved, **{"0/caps": [4, 5]}), target, source="/w/checkpoints/4")
  with pytest.raises(errors.CheckpointMismatchError, match=r"has no parameter 0/caps \(expected"):
    compat.check_compatible({"0/conv": [9, 9, 1, 8]}, target, source="/w/4")
  with pytest.raises(errors.CheckpointMismatchError, match="lacks, e.g. 0/extra"):
    compat.check_compatible(dict(saved, **{"0/extra": [1]}), target, source="/w/4")


def test_a_checkpoint_without_batchnorm_running_stats_is_named_as_such():
  """An Efficient-CapsNet checkpoint written by a BatchNorm that kept no running stats."""
  from capsjax import models  # pylint: disable=g-import-not-at-top
  from configs import efficient_capsnet  # pylint: disable=g-import-not-at-top

  config = efficient_capsnet.get_config("smoke")
  target = nnx.split(
    nnx.eval_shape(
      lambda: models.create_model(
        config.model,
        image_shape=(28, 28, 1),
        num_classes=10,
        rngs=nnx.Rngs(0),
        conv_impl="xla",
      )
    )
  )[1]
  shapes = compat.param_shapes(target)
  old = {k: v for k, v in shapes.items() if not re.search(r"norms/\d+/(mean|var)$", k)}
  assert len(shapes) - len(old) == 2 * len(config.model.conv_channels)
  with pytest.raises(errors.CheckpointMismatchError, match=r"no BatchNorm running statistics"):
    compat.check_compatible(old, target, source="/x/4")
  # Any other missing entry is a different architecture.
  del old[next(k for k in old if k.endswith("scale"))]
  with pytest.raises(errors.CheckpointMismatchError, match=r"saved from a different architecture"):
    compat.check_compatible(old, target, source="/x/4")
  compat.check_compatible(shapes, target, source="/x/4")  # the current layout fits


def test_incomplete_checkpoints_are_orbax_temporary_directories(tmp_path):
  assert compat.incomplete_checkpoints(str(tmp_path / "missing")) == []
  for name in ("4", "8.orbax-checkpoint-tmp-1712", "12.orbax-checkpoint-tmp-1713", "x.tmp"):
    os.makedirs(tmp_path / name)
  assert compat.incomplete_checkpoints(str(tmp_path)) == [
    str(tmp_path / "12.orbax-checkpoint-tmp-1713"),
    str(tmp_path / "8.orbax-checkpoint-tmp-1712"),
  ]


def test_digests_and_storage_messages_need_no_orbax():
  code = (
    "import sys; from capsjax.run import checkpoint_compat, storage; "
    "print(sorted(m for m in sys.modules if m.split('.')[0] in ('orbax', 'tensorstore')))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == "[]", out.stdout
