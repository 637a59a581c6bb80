"""What a checkpoint must match before its arrays are trusted: content digests and
parameter shapes. Plain JAX and NumPy, no Orbax (`checkpoint.py` reads and writes).

Integrity: each save records a sha256 digest of every state entry (each leaf's name,
dtype, shape and bytes) and of the meta JSON; each restore recomputes them. Orbax and
TensorStore notice missing or truncated files but not changed bytes, which would
otherwise restore as silently wrong parameters. The digests cost one pass over the host
arrays per save (about 0.2 s for the full model's 94 MB state on a CPU) and per restore.

Compatibility: the meta JSON also records every parameter's shape, so a checkpoint of
another architecture is refused naming the first parameter that differs, before Orbax
reads any array.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from capsjax import errors

# The saved state is `nnx.split((model, optimizer))[1]` (`steps.create_model_and_optimizer`),
# keyed by position: the model's variables are entry 0.
MODEL_ITEM = 0
# The meta field holding the content digests: {state entry: sha256 hex, 'meta': sha256 hex}.
DIGESTS = "digests"

# Orbax writes a step into `<step>.orbax-checkpoint-tmp-<time>/` and renames it when done.
_TMP_RE = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
# BatchNorm's running statistics: the only entries a checkpoint of the same architecture
# can lack (one written by a BatchNorm that kept none).
_RUNNING_STAT = re.compile(r"(^|/)norms/\d+/(mean|var)$")


def _host_array(x) -> np.ndarray | None:
  """The value of one state leaf as a host NumPy array; None if no process holds it all."""
  if isinstance(x, jax.Array):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if not x.is_fully_addressable:
      if not x.sharding.is_fully_replicated:
        return None
      # Replicated across processes (capsjax's state, P()): a local shard is the array.
      x = x.addressable_data(0)
  return np.asarray(x)


def _key_name(entry) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def param_shapes(tree: Any) -> dict[str, list[int]]:
  """{'0/digit_caps/w': [1152, 10, 8, 16], ...} for every array leaf of `tree`.

  Args:
    tree: a pytree of arrays or `jax.ShapeDtypeStruct`s (NNX `Variable`s contribute their
      value, without a '/value' suffix).

  Returns:
    {'/'-joined path of the leaf: its shape as a list}.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    "/".join(n for n in map(_key_name, path) if n != "value"): list(np.shape(x)) for path, x in flat
  }


def content_digests(tree: Any) -> dict[str, str]:
  """sha256 of the arrays of each top-level entry of `tree`: {'0': hex, '1': hex}.

  Each leaf adds its name (as in `param_shapes`), dtype, shape and bytes, in sorted
  name order, so the digest depends on values only, not on pytree flattening order or
  where the arrays live.

  Args:
    tree: a pytree of arrays (`jax.Array`, NumPy); for a saved state, entry '0' is the
      model and '1' the optimizer.

  Returns:
    {entry name: 64 hex digits, or None for an entry with an array sharded across
    processes, which no single process can digest}.
  """
  entries: dict[str, list[tuple[str, Any]]] = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [n for n in map(_key_name, path) if n != "value"]
    entries.setdefault(names[0] if names else "", []).append(("/".join(names), x))
  digests = {}
  for entry, leaves in entries.items():
    h = hashlib.sha256()
    for name, x in sorted(leaves, key=lambda t: t[0]):
      a = _host_array(x)
      if a is None:
        h = None
        break
      a = np.ascontiguousarray(a)
      h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
      h.update(a.data)
    digests[entry] = None if h is None else h.hexdigest()
  return digests


def meta_digest(meta: dict) -> str:
  """sha256 of `meta` as canonical JSON, leaving out its DIGESTS field."""
  meta = {k: v for k, v in meta.items() if k != DIGESTS}
  # Through JSON first: a tuple saved comes back as a list.
  text = json.dumps(json.loads(json.dumps(meta)), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


def meta_mismatch(meta: Any) -> str | None:
  """Why the meta JSON read back does not match the digest saved in it; None if it does
  (or if it holds no digest)."""
  saved = (meta.get(DIGESTS) or {}).get("meta") if isinstance(meta, dict) else None
  if saved is not None and saved != meta_digest(meta):
    return (
      "its metadata (meta/) does not match the digest saved with it: "
      "the file was changed or damaged after the save"
    )
  return None


def state_mismatch(saved: Mapping[str, str | None], tree: Any) -> str | None:
  """Why the restored `tree` does not match the digests `saved` with it; None if it does.

  Only the entries in `tree` are checked (a model-only restore has just entry 0); an
  entry not digested at save or now (sharded across processes) passes.

  Args:
    saved: the meta's DIGESTS field, {state entry: hex or None}.
    tree: the restored state, entries keyed as at the save.
  """
  for entry, digest in content_digests(tree).items():
    if saved.get(entry) is None or digest is None:
      continue
    if saved.get(entry) != digest:
      return (
        f"the content digest of state entry {entry} is {digest[:12]}... but "
        f"{str(saved.get(entry))[:12]}... was saved: its files were changed or "
        "damaged after the save"
      )
  return None


def check_compatible(saved_shapes: dict[str, list[int]], target: Any, *, source: str) -> None:
  """Raises CheckpointMismatchError naming the first parameter whose shape differs.

  Args:
    saved_shapes: {'name/of/param': shape} as saved in a checkpoint's meta.
    target: a pytree of arrays or `jax.ShapeDtypeStruct`s, named the same way.
    source: the checkpoint's path, for the message.
  """
  want = param_shapes(target)
  missing = [name for name in want if name not in saved_shapes]
  if missing and all(_RUNNING_STAT.search(name) for name in missing):
    raise errors.CheckpointMismatchError(
      f"checkpoint {source} has no BatchNorm running statistics ({missing[0]}): it was "
      "saved before capsjax's BatchNorm kept them (Efficient-CapsNet), and this model "
      "evaluates with them; train it again with this version"
    )
  for name, shape in want.items():
    if name not in saved_shapes:
      raise errors.CheckpointMismatchError(
        f"checkpoint {source} has no parameter {name} (expected shape {tuple(shape)}): it "
        "was saved from a different architecture"
      )
    if list(saved_shapes[name]) != list(shape):
      raise errors.CheckpointMismatchError(
        f"checkpoint {source} does not fit this model: parameter {name} has shape "
        f"{tuple(saved_shapes[name])} in the checkpoint but {tuple(shape)} in the model"
      )
  extra = sorted(set(saved_shapes) - set(want))
  if extra:
    raise errors.CheckpointMismatchError(
      f"checkpoint {source} has parameters this model lacks, e.g. {extra[0]}: it was "
      "saved from a different architecture"
    )


def incomplete_checkpoints(directory: str) -> list[str]:
  """Temporary directories of saves that never finished (a crash or kill mid-save).

  Args:
    directory: a `checkpoints/` directory (it need not exist).

  Returns:
    Their paths, sorted; [] if there are none.
  """
  if not os.path.isdir(directory):
    return []
  return sorted(os.path.join(directory, n) for n in os.listdir(directory) if _TMP_RE.match(n))
