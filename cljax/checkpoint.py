"""Orbax checkpoints under ``WORKDIR/checkpoints``: train state, data iterator, config.

Layout (one folder per saved step, written by ``orbax.checkpoint``)::

    WORKDIR/checkpoints/<step>/state/    the TrainState arrays (StandardSave)
    WORKDIR/checkpoints/<step>/data/     the grain iterator state, one JSON per process
    WORKDIR/checkpoints/<step>/config/   the run config (JsonSave)
    WORKDIR/checkpoints/<step>/digests/  SHA-256 of each state array, iterator state and
                                         the config (JsonSave; ``cljax.integrity``)

The state restores with plain orbax, on any device count, e.g.
``ocp.StandardCheckpointer().restore(WORKDIR/checkpoints/<step>/state)``.

Restoring tells two failures apart. A checkpoint that cannot be read, or whose digests or
saved config do not verify, is *unusable*: it is moved aside to ``checkpoints_unreadable/``
(kept) and the previous one is tried. A checkpoint that verifies but does not fit the
current config (other array shapes, another tree) is *incompatible*: a user error, raised as
``IncompatibleCheckpointError``, with every checkpoint left where it is.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from cljax import errors, integrity, validate
from cljax import step as step_lib
from cljax.data import pipeline

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
  # The state's layout on the devices: a checkpoint restores onto any (step.state_specs).
  "mesh",
)

# Config keys added after runs were already saved without them, with the value that does
# what those runs did: a saved config that lacks one of them means that value.
ADDED_KEYS = {
  "head.hidden_norm": "bn",
  "data.augment.blur_prob_local": -1.0,
  "optim.weight_decay_end": -1.0,
  "data.crop_on_device": False,
  "data.canvas_size": 512,
  "data.jpeg_fast_dct": False,
  "optim.lars_order": "lr_then_momentum",
}


def check_workdir(workdir: str) -> None:
  """Fails early, with the path, when ``workdir`` cannot be created or written.

  Raises:
    NotADirectoryError: ``workdir`` (or a folder above it) is a file.
    PermissionError: it cannot be created or written.
  """
  validate.check_workdir_path(workdir)
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


class IncompatibleCheckpointError(errors.UserInputError, ValueError):
  """An intact checkpoint that does not fit the current config: a user error, not corruption."""


class UnusableCheckpointError(errors.UserInputError):
  """A checkpoint that cannot be read or does not verify against its digests."""


def create_manager(
  workdir: str, config: ml_collections.ConfigDict, *, read_only: bool = False
) -> ocp.CheckpointManager:
  """An async CheckpointManager keeping ``config.train.max_to_keep`` checkpoints.

  ``read_only`` (evaluation) creates nothing and deletes nothing.
  """
  options = ocp.CheckpointManagerOptions(
    max_to_keep=None if read_only else config.train.max_to_keep,
    create=not read_only,
    read_only=read_only,
    enable_async_checkpointing=not read_only,
  )
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), "checkpoints"),
    options=options,
    item_names=("state", "data", "config", "digests"),
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
  donate ``state`` to the next step; so are the digests (``cljax.integrity``), computed
  from the values in memory. A failure of the previous asynchronous save surfaces here
  (see :func:`wait`).
  """
  config_dict = config.to_dict()
  args = ocp.args.Composite(
    state=ocp.args.StandardSave(state),
    data=grain.checkpoint.CheckpointSave(data_iterator),
    config=ocp.args.JsonSave(config_dict),
    digests=ocp.args.JsonSave(integrity.create(state, data_iterator, config_dict)),
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
  """Restores the newest usable checkpoint; returns ``(state, step)``, step 0 if none.

  An unusable checkpoint (partial or corrupted files, digests that do not match, a saved
  config that cannot be read, a non-finite state) is moved aside to
  ``checkpoints_unreadable/`` with a warning, never deleted, and the previous one is
  tried. Folders of saves that never completed carry orbax's temporary suffix and are not
  checkpoints at all.

  Raises:
    ValueError: the checkpoint was written with a different config (without
      ``force_resume``); IncompatibleCheckpointError: its arrays do not fit ``state``.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = restore_verified(
        manager,
        step,
        config,
        lambda: jax.tree.map(ocp.utils.to_shape_dtype_struct, state),
        data_iterator=data_iterator,
        force_resume=force_resume,
      )
    except UnusableCheckpointError as e:
      aside = _move_aside(manager, step)
      logging.warning(
        "The checkpoint at step %d cannot be restored (%s); moved it to %s and trying the "
        "previous one.",
        step,
        e,
        aside,
      )
      continue
    logging.info("Resumed from %s at step %d.", manager.directory, step)
    return restored, step
  return state, 0


def restore_verified(
  manager: ocp.CheckpointManager,
  step: int,
  config: ml_collections.ConfigDict,
  target_fn: Callable[[], Any],
  *,
  data_iterator: Any = None,
  force_resume: bool | None = None,
) -> Any:
  """The state of ``step``, with its saved config, shapes and digests checked around the restore.

  Training's resumption and evaluation both restore through here.

  Args:
    manager: the workdir's manager.
    step: the checkpoint's step.
    config: the current run config.
    target_fn: returns the restore target (shapes, dtypes, shardings); called once the saved
      config has been checked.
    data_iterator: restored in place too, and checked against its digest (resuming
      training); None restores the state alone (evaluation).
    force_resume: resuming training: a saved config that differs is refused unless True
      (``check_resumable``). None (evaluation): a differing config is only logged.

  Returns:
    The restored state.

  Raises:
    UnusableCheckpointError: on every process, if any cannot read or verify it.
    IncompatibleCheckpointError: it verifies but does not fit ``target_fn()``.
    ValueError: as ``check_resumable``.
  """
  digests = read_digests(manager, step)
  saved = verified_config(manager, step, digests)
  diffs = config_differences(saved, config)
  if force_resume is not None:
    check_resumable(step, saved, config, force_resume)
  elif diffs:
    logging.warning("The checkpoint was written with another config:\n  %s", "\n  ".join(diffs))
  abstract = target_fn()
  check_fits(manager, step, digests, abstract, config_changed=bool(diffs))
  saved_processes = jax.process_count()
  iterator_states = None
  try:
    if data_iterator is None:
      restored = _restore_state(manager, step, abstract)
    else:
      saved_processes = saved_process_count(manager, step, digests)
      if saved_processes == jax.process_count():
        restored = restore(manager, step, abstract, data_iterator)
      else:
        restored = _restore_state(manager, step, abstract)
        iterator_states = _read_iterator_states(manager, step, saved_processes)
  except Exception as e:  # Any failure to read means this checkpoint is unusable.
    raise UnusableCheckpointError(repr(e)) from e
  problems = state_problems(digests, restored)
  if digests is not None and data_iterator is not None:
    data_dir = _item_dir(manager, step, "data")
    # Every saving process's file when the count changed (all of them are read), else ours.
    indices = range(saved_processes) if iterator_states else [jax.process_index()]
    if any(
      integrity.saved_iterator_digest(data_dir, i, saved_processes) != digests["data"][i]
      for i in indices
    ):
      problems.append("the data-iterator state differs from its digest")
  _raise_if_any_process(problems, step)
  if iterator_states:
    _continue_stream(manager, step, data_iterator, iterator_states)
  return restored


def saved_process_count(manager: ocp.CheckpointManager, step: int, digests: dict | None) -> int:
  """How many processes wrote ``step``: its digests' iterator entries, else its data files.

  Raises:
    ValueError: the data folder holds no iterator state, or states of several counts.
  """
  if digests is not None:
    return len(digests["data"])
  data_dir = _item_dir(manager, step, "data")
  counts = {
    int(m.group(1))
    for name in os.listdir(data_dir)
    if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", name))
  }
  if len(counts) != 1:
    raise ValueError(f"{data_dir} holds iterator states of process counts {sorted(counts)}")
  return counts.pop()


def _restore_state(manager: ocp.CheckpointManager, step: int, abstract: Any) -> Any:
  """The state item alone, as ``abstract`` (shapes and shardings): orbax reads each device's
  part of every array, whatever mesh and process count wrote it."""
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(_item_dir(manager, step, "state"), abstract)


def _read_iterator_states(manager: ocp.CheckpointManager, step: int, count: int) -> list:
  data_dir = _item_dir(manager, step, "data")
  states = []
  for index in range(count):
    with open(integrity.iterator_file(data_dir, index, count)) as f:
      states.append(json.load(f))
  return states


def _continue_stream(
  manager: ocp.CheckpointManager, step: int, data_iterator: Any, saved: list
) -> None:
  """Sets ``data_iterator`` to continue the global stream ``len(saved)`` processes saved.

  Raises:
    IncompatibleCheckpointError: the saved states are not one stream this pipeline continues.
  """
  try:
    data_iterator.set_state(pipeline.remap_state(saved, data_iterator.get_state()))
  except ValueError as e:
    raise IncompatibleCheckpointError(
      f"The checkpoint at step {step} in {manager.directory} was written by {len(saved)} "
      f"processes and its data stream cannot continue on {jax.process_count()}: {e}. Resume "
      f"it on {len(saved)} processes; the checkpoints were left as they are."
    ) from e
  logging.info(
    "The checkpoint at step %d was written by %d process(es); %d continue its data stream.",
    step,
    len(saved),
    jax.process_count(),
  )


def restore(manager: ocp.CheckpointManager, step: int, abstract: Any, data_iterator: Any) -> Any:
  """Restores the state as ``abstract`` (shapes and shardings) and the iterator in place,
  both written by as many processes as run now (else ``restore_verified``)."""
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract),
      data=grain.checkpoint.CheckpointRestore(data_iterator),
    ),
  )
  return restored["state"]


def _item_dir(manager: ocp.CheckpointManager, step: int, item: str) -> str:
  return os.path.join(str(manager.directory), str(step), item)


def read_digests(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The digests saved with ``step``; None for a checkpoint written before they existed.

  Raises:
    UnusableCheckpointError: they exist but cannot be read.
  """
  if not os.path.isdir(_item_dir(manager, step, "digests")):
    logging.warning(
      "The checkpoint at step %d has no digests (written before cljax recorded them): it is "
      "restored without verifying its contents.",
      step,
    )
    return None
  try:
    args = ocp.args.Composite(digests=ocp.args.JsonRestore())
    digests = manager.restore(step, args=args)["digests"]
    if digests.get("version") != integrity.VERSION:
      raise ValueError(f"digest version {digests.get('version')!r}, expected {integrity.VERSION}")
    return digests
  except Exception as e:
    raise UnusableCheckpointError(f"its digests cannot be read: {e!r}") from e


def verified_config(manager: ocp.CheckpointManager, step: int, digests: dict | None) -> dict:
  """The config saved with ``step``, checked against its digest.

  Raises:
    UnusableCheckpointError: it cannot be read or does not match its digest; the
      checkpoint then cannot be checked against the current config, so it is not used.
  """
  try:
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    saved = saved["config"]
    if not isinstance(saved, dict):
      raise ValueError(f"expected a JSON object, got {type(saved).__name__}")
  except Exception as e:
    raise UnusableCheckpointError(
      f"its saved config cannot be read ({e!r}), so it cannot be checked against the current config"
    ) from e
  if digests is not None and integrity.json_digest(saved) != digests["config"]:
    raise UnusableCheckpointError("its saved config differs from its digest")
  return saved


def saved_state_metadata(manager: ocp.CheckpointManager, step: int) -> Any:
  """The shapes and dtypes of the saved state (orbax metadata), read without the arrays."""
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.metadata(_item_dir(manager, step, "state")).item_metadata
  except Exception as e:
    raise UnusableCheckpointError(f"its state's metadata cannot be read: {e!r}") from e


def check_fits(
  manager: ocp.CheckpointManager,
  step: int,
  digests: dict | None,
  abstract: Any,
  *,
  config_changed: bool,
) -> None:
  """Raises ``IncompatibleCheckpointError``, naming the arrays, when ``step``'s saved state
  does not fit ``abstract``.

  The shapes come from the digests, verified JSON. A checkpoint without them has only
  orbax's metadata, which a damaged file also changes: there a mismatch is a config's
  doing only when the config changed; otherwise the checkpoint is unusable.
  """
  if digests is not None:
    saved = integrity.recorded_table(digests)
  else:
    saved = integrity.tree_table(saved_state_metadata(manager, step))
  diffs = integrity.structure_differences(saved, integrity.tree_table(abstract))
  if not diffs:
    return
  if digests is None and not config_changed:
    raise UnusableCheckpointError(f"its state's metadata does not match: {diffs[:3]}")
  shown = diffs[:20] + ([f"... and {len(diffs) - 20} more"] if len(diffs) > 20 else [])
  raise IncompatibleCheckpointError(
    f"The checkpoint at step {step} in {manager.directory} is intact but its train state "
    f"does not fit the current config ({len(diffs)} arrays differ, saved vs now):\n  "
    + "\n  ".join(shown)
    + "\n--force_resume continues only with configs whose state has the same structure "
    "(schedule, data or logging changes). Train this config in a new --workdir; the "
    "checkpoints were left as they are."
  )


def state_problems(digests: dict | None, state: Any) -> list[str]:
  """Why a restored ``state`` cannot be trusted: digest mismatches, NaN or Inf."""
  problems = []
  if digests is not None:
    bad = integrity.state_mismatches(digests, state)
    if bad:
      problems.append(
        f"{len(bad)} arrays differ from their digests ({', '.join(bad[:5])}"
        + (", ..." if len(bad) > 5 else "")
        + ")"
      )
  if not bool(jax.jit(step_lib.all_finite)(state)):
    problems.append("the state holds a NaN or Inf")
  return problems


def _raise_if_any_process(problems: list[str], step: int) -> None:
  """Raises ``UnusableCheckpointError`` on every process if any found a problem."""
  bad = bool(problems)
  if jax.process_count() > 1:
    bad = bool(np.any(multihost_utils.process_allgather(np.asarray(bad))))
  if bad:
    raise UnusableCheckpointError(
      "; ".join(problems) or f"another process found step {step} corrupt"
    )


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


def check_resumable(step: int, saved: dict, config: ml_collections.ConfigDict, force: bool) -> None:
  """Refuses to resume a checkpoint written with a different config unless forced."""
  diffs = config_differences(saved, config)
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
