"""Digests of what a checkpoint holds, and the checks that tell corrupt from incompatible.

A checkpoint records (in its ``digests`` item, a JSON file beside ``state/``, ``data/`` and
``config/``, so plain ``orbax.checkpoint`` still restores the state) the SHA-256 of:

- each array of the train state, of its bytes as the step left them in memory, keyed by its
  path in the state, with its dtype and shape (what the state must fit);
- each process's data-iterator state, as parsed JSON (key order and indentation do not
  count);
- the config, as parsed JSON.

Computing them from memory at save time and again from the restored values covers the
whole path: a write that went wrong and storage that rotted afterwards both show. A
mismatch means the checkpoint is corrupt; a saved state whose arrays have other shapes than
the current config's means it is incompatible (a user error, see ``structure_differences``).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

# Bumped if what is hashed ever changes: a checkpoint's digests say how they were made.
VERSION = 1


def _path(keys: tuple) -> str:
  """A key path as 'params/encoder/conv_init/kernel', the same for a TrainState (attribute
  keys), the dicts orbax restores and its metadata (dict keys), and tuples (indices)."""
  parts = []
  for k in keys:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _host_array(x: Any) -> np.ndarray:
  """The whole value of ``x`` on this host (gathered when other processes hold parts)."""
  if isinstance(x, jax.Array):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    if not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def array_record(x: Any) -> dict[str, Any]:
  """An array's dtype, shape and SHA-256 (of the dtype, shape and C-order bytes)."""
  a = _host_array(x)
  a = np.ascontiguousarray(a).reshape(a.shape)  # ascontiguousarray makes a scalar 1-d.
  h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
  h.update(a.tobytes())
  return {"dtype": a.dtype.name, "shape": list(a.shape), "sha256": h.hexdigest()}


def state_digests(state: Any) -> dict[str, dict[str, Any]]:
  """``{path: array_record}`` of every array of ``state``."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {_path(keys): array_record(x) for keys, x in leaves}


def json_digest(value: Any) -> str:
  """SHA-256 of a JSON value, independent of key order and formatting."""
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def iterator_digests(data_iterator: Any) -> list[str]:
  """The digest of each process's iterator state, in process order (one collective)."""
  state = data_iterator.get_state()
  mine = hashlib.sha256(
    state if isinstance(state, bytes) else json.dumps(state, sort_keys=True).encode()
  ).digest()
  if jax.process_count() == 1:
    return [mine.hex()]
  every = multihost_utils.process_allgather(np.frombuffer(mine, np.uint8))
  return [bytes(np.asarray(row, np.uint8)).hex() for row in every]


def iterator_file(data_dir: str, index: int, count: int) -> str:
  """The file ``grain.checkpoint`` writes process ``index`` of ``count``'s iterator state to."""
  return os.path.join(data_dir, f"process_{index}-of-{count}.json")


def saved_iterator_digest(data_dir: str, index: int | None = None, count: int | None = None) -> str:
  """The digest of a saved iterator state (default: this process's, of this process count)."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  with open(iterator_file(data_dir, index, count), "rb") as f:
    text = f.read()
  try:
    return hashlib.sha256(json.dumps(json.loads(text), sort_keys=True).encode()).hexdigest()
  except ValueError:  # Not JSON: an iterator whose state is bytes.
    return hashlib.sha256(text).hexdigest()


def create(state: Any, data_iterator: Any, config: dict) -> dict[str, Any]:
  """The digests a checkpoint of ``(state, data_iterator, config)`` records."""
  return {
    "version": VERSION,
    "state": state_digests(state),
    "data": iterator_digests(data_iterator),
    "config": json_digest(config),
  }


def state_mismatches(digests: dict[str, Any], state: Any) -> list[str]:
  """The arrays of a restored ``state`` whose digest differs from the recorded one."""
  recorded = digests["state"]
  now = state_digests(state)
  return sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))


def recorded_table(digests: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{path: (shape, dtype)}`` of the state a checkpoint's digests describe."""
  return {k: (tuple(r["shape"]), r["dtype"]) for k, r in digests["state"].items()}


def tree_table(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{path: (shape, dtype)}`` of a tree whose leaves have ``shape`` and ``dtype``
  (an abstract state, or orbax's metadata of a saved one)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path(k): (tuple(x.shape), _dtype_name(x.dtype)) for k, x in leaves}


def structure_differences(old: dict, new: dict) -> list[str]:
  """How the arrays of two tables (``tree_table``) differ, as text: saved vs now."""
  diffs = []
  for key in sorted(set(old) | set(new)):
    if key not in new:
      diffs.append(f"{key}: saved {_describe(old[key])}, absent now")
    elif key not in old:
      diffs.append(f"{key}: absent in the checkpoint, now {_describe(new[key])}")
    elif old[key] != new[key]:
      diffs.append(f"{key}: saved {_describe(old[key])}, now {_describe(new[key])}")
  return diffs


def _dtype_name(dtype: Any) -> str:
  try:
    return np.dtype(dtype).name
  except TypeError:  # A PRNG key type.
    return str(dtype)


def _describe(shape_dtype: tuple) -> str:
  shape, dtype = shape_dtype
  return f"{dtype}{list(shape)}"
