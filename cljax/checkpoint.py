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
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

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
) -> bool:
  """Starts an asynchronous save; device arrays are copied before it returns."""
  args = ocp.args.Composite(
    state=ocp.args.StandardSave(state),
    data=grain.checkpoint.CheckpointSave(data_iterator),
    config=ocp.args.JsonSave(config.to_dict()),
  )
  return manager.save(step, args=args, force=force)


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


def saved_config(manager: ocp.CheckpointManager, step: int) -> dict:
  return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


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
  old = _flatten(saved)
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
  diffs = config_differences(saved_config(manager, step), config)
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
