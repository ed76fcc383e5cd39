"""Orbax checkpoints under ``WORKDIR/checkpoints``: train state, data iterator, config.

Layout (one folder per saved step, written by ``orbax.checkpoint``)::

    WORKDIR/checkpoints/<step>/state/    the TrainState arrays (StandardSave)
    WORKDIR/checkpoints/<step>/data/     the grain iterator state, one JSON per process
    WORKDIR/checkpoints/<step>/config/   the run config (JsonSave)

The state restores with plain orbax, on any device count, e.g.
``ocp.StandardCheckpointer().restore(WORKDIR/checkpoints/<step>/state)``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

# Keys that may change between a run and its resumption without changing
# what is computed: bookkeeping, not the model, data order or optimiser.
RESUMABLE_CHANGES = (
  "train.log_every_steps",
  "train.checkpoint_every_steps",
  "train.max_to_keep",
  "train.stop_at_step",
  "data.num_workers",
  "data.data_dir",
  "evals",
)

# Config keys added after runs were already saved without them, with the value that does
# what those runs did: a saved config that lacks one of them means that value.
ADDED_KEYS = {
  "head.hidden_norm": "bn",
  "data.augment.blur_prob_local": -1.0,
  "optim.weight_decay_end": -1.0,
  "data.crop_on_device": False,
  "data.canvas_size": 512,
}


def check_workdir(workdir: str) -> None:
  """Fails early, with the path, when ``workdir`` cannot be created or written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-test-{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(
      f"The workdir {os.path.abspath(workdir)!r} cannot be created or written ({e}). "
      "Pass a --workdir on a writable disk."
    ) from e


def create_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """An async CheckpointManager keeping ``config.train.max_to_keep`` checkpoints."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=config.train.max_to_keep,
    create=True,
    enable_async_checkpointing=True,
  )
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), "checkpoints"),
    options=options,
    item_names=("state", "data", "config"),
  )


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  data_iterator: Any,
  config: ml_collections.ConfigDict,
  *,
  force: bool = False,
) -> int | None:
  """Starts an asynchronous save of ``step``; returns ``step``, or None if not due.

  Device arrays are copied to the host before this returns, so the caller may
  donate ``state`` to the next step. A failure of the previous asynchronous
  save surfaces here (see :func:`wait`).
  """
  args = ocp.args.Composite(
    state=ocp.args.StandardSave(state),
    data=grain.checkpoint.CheckpointSave(data_iterator),
    config=ocp.args.JsonSave(config.to_dict()),
  )
  try:
    saved = manager.save(step, args=args, force=force)
  except Exception as e:
    raise _save_error(manager, step, e) from e
  return step if saved else None


def wait(manager: ocp.CheckpointManager, step: int | None) -> None:
  """Blocks until the pending save is on disk; raises a clear error if it failed."""
  try:
    manager.wait_until_finished()
  except Exception as e:
    raise _save_error(manager, step, e) from e


def _save_error(manager: ocp.CheckpointManager, step: int | None, error: Exception) -> Exception:
  # Orbax writes into a temporary folder and renames it only when complete,
  # and deletes old checkpoints only after that: a failed save leaves every
  # earlier checkpoint as it was.
  complete = [s for s in manager.all_steps() if s != step]
  return RuntimeError(
    f"Saving the checkpoint of step {step} to {manager.directory} failed: {error!r}. "
    f"Earlier checkpoints are intact (steps {complete}); free disk space and restart "
    "with the same --workdir to resume from the latest of them."
  )


def restore_latest(
  manager: ocp.CheckpointManager,
  state: Any,
  data_iterator: Any,
  config: ml_collections.ConfigDict,
  force_resume: bool,
) -> tuple[Any, int]:
  """Restores the newest readable checkpoint; returns ``(state, step)``, step 0 if none.

  A checkpoint that fails to restore (partial or corrupted files) is moved
  aside to ``checkpoints_unreadable/`` with a warning, never deleted, and the
  previous one is tried. Folders of saves that never completed carry orbax's
  temporary suffix and are not checkpoints at all.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    check_resumable(manager, step, config, force_resume)
    try:
      restored = restore(manager, step, state, data_iterator)
    except Exception as e:  # Any failure to read means this checkpoint is unusable.
      aside = _move_aside(manager, step)
      logging.warning(
        "The checkpoint at step %d cannot be restored (%r); moved it to %s and trying the "
        "previous one.",
        step,
        e,
        aside,
      )
      continue
    logging.info("Resumed from %s at step %d.", manager.directory, step)
    return restored, step
  return state, 0


def _move_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves an unreadable step folder out of the manager's sight, keeping its files."""
  source = os.path.join(str(manager.directory), str(step))
  target_dir = os.path.join(os.path.dirname(str(manager.directory)), "checkpoints_unreadable")
  target = os.path.join(target_dir, f"{step}-{int(time.time())}")
  if jax.process_index() == 0:
    os.makedirs(target_dir, exist_ok=True)
    os.rename(source, target)
  multihost_utils.sync_global_devices(f"cljax_move_aside_{step}")
  manager.reload()
  return target


def restore(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any) -> Any:
  """Restores ``state`` (as its abstract shape and sharding) and the iterator in place."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract),
      data=grain.checkpoint.CheckpointRestore(data_iterator),
    ),
  )
  return restored["state"]


def saved_config(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The config saved with ``step``, or None if it cannot be read."""
  try:
    args = ocp.args.Composite(config=ocp.args.JsonRestore())
    return manager.restore(step, args=args)["config"]
  except Exception as e:  # A damaged config file: the state restore decides what to do.
    logging.warning("Cannot read the config saved at step %d: %r", step, e)
    return None


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def config_differences(saved: dict, current: ml_collections.ConfigDict) -> list[str]:
  """Keys whose values differ between the saved and the current config, as text."""
  old = {**ADDED_KEYS, **_flatten(saved)}
  new = _flatten(json.loads(json.dumps(current.to_dict())))
  diffs = []
  for key in sorted(set(old) | set(new)):
    if any(key == r or key.startswith(r + ".") for r in RESUMABLE_CHANGES):
      continue
    if old.get(key, "<absent>") != new.get(key, "<absent>"):
      diffs.append(f"{key}: saved {old.get(key, '<absent>')!r}, now {new.get(key, '<absent>')!r}")
  return diffs


def check_resumable(
  manager: ocp.CheckpointManager, step: int, config: ml_collections.ConfigDict, force: bool
) -> None:
  """Refuses to resume a workdir written with a different config unless forced."""
  saved = saved_config(manager, step)
  diffs = [] if saved is None else config_differences(saved, config)
  if not diffs:
    return
  message = (
    f"The workdir's checkpoint at step {step} was written with a different config:\n  "
    + "\n  ".join(diffs)
    + "\nUse a new --workdir, or pass --force_resume to continue with the new config."
  )
  if not force:
    raise ValueError(message)
  logging.warning("%s\nResuming anyway (--force_resume).", message)
