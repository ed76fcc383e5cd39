"""Time series (``data.modality = "series"``): sensor, telemetry and signal recordings.

The data are (T, C) float series (``cljax.data.timeseries``: the UCR/UEA archives' files,
NaN where a value is missing or a shorter series is padded). Training batches are drawn on
the device from the whole set, held on every device (the archives' sets are small):
shuffled epochs cut into whole batches (a ``DataLoader`` with ``drop_last=True``, as the
official TS2Vec and TS-TCC train), a function of the step alone, so a batch does not depend
on the device count and resumes exactly. The instance-level methods (SimCLR,
BYOL, ...) see two views per series, TS-TCC's weak (scaling) and strong (permutation +
jitter) augmentations (``cljax.data.ts_views``); TS2Vec draws its own overlapping crops.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec

from cljax import sharding, xla_options
from cljax.data import device as device_data
from cljax.data import pipeline, sources, ts_views
from cljax.modalities.base import Modality

_DATA_TAG, _ORDER_TAG, _AUG_TAG = 53, 1, 2


def _local_batch(series, labels, step, key, *, batch_size: int, num_shards: int) -> dict:
  """This device's rows of the step's global batch; inside ``shard_map`` over 'data'.

  Epoch e's batches are its shuffled order cut into ``N // batch_size`` batches, the last
  ``N % batch_size`` series of the order left out (a PyTorch ``DataLoader`` with
  ``shuffle=True, drop_last=True``, as TS2Vec and TS-TCC train): a batch never spans two
  epochs, so it never holds one series twice, which would make a series its own negative.
  """
  num_examples = series.shape[0]
  n = batch_size // num_shards
  index = jax.lax.axis_index(sharding.DATA_AXIS) * n + jnp.arange(n)
  epoch, batch = jnp.divmod(jnp.asarray(step, jnp.int32), num_examples // batch_size)
  offset = batch * batch_size + index
  order = device_data.epoch_order(jax.random.fold_in(key, _ORDER_TAG), epoch, num_examples)
  example = order[offset]
  epoch = jnp.broadcast_to(epoch, offset.shape)
  aug_key = jax.random.fold_in(key, _AUG_TAG)
  seeds = jax.vmap(
    lambda e, j: jax.random.bits(
      jax.random.fold_in(jax.random.fold_in(aug_key, e), j), (), jnp.uint32
    )
  )(epoch, offset)
  return {
    "series": series[example],
    "label": labels[example],
    "aug_seed": (seeds >> 1).astype(jnp.int32),
  }


def create_series_iterator(
  source: Any, mesh: Any, *, seed: int, global_batch_size: int
) -> device_data.DeviceBatchIterator:
  """The training batches of a series source (its ``train_series``), drawn on the device:
  ``{"series": (B, T, C), "label", "aug_seed"}`` as global arrays, epoch after shuffled epoch
  (the last ``N % B`` series of each epoch's order left out; see ``_local_batch``).

  Raises:
    ValueError: the batch does not split over the devices or exceeds the data set.
  """
  num_examples = len(source)
  sharding.check_global_batch(global_batch_size, mesh)
  if not 0 < global_batch_size <= num_examples:
    raise ValueError(
      f"data.global_batch_size={global_batch_size} must be in [1, {num_examples}] (the "
      "training split's series)."
    )
  rep = sharding.replicated(mesh)
  series = jax.device_put(source.train_series, rep)
  labels = jax.device_put(source.labels, rep)
  local = functools.partial(
    _local_batch, batch_size=global_batch_size, num_shards=mesh.devices.size
  )
  mapped = jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(PartitionSpec(),) * 4,
    out_specs=PartitionSpec(sharding.DATA_AXIS),
  )
  jitted = jax.jit(
    mapped,
    out_shardings=sharding.batch_sharded(mesh),
    compiler_options=xla_options.for_mesh(mesh),
  )
  key = jax.random.fold_in(jax.random.key(seed), _DATA_TAG)
  batch_fn = lambda step: jitted(series, labels, jnp.asarray(step, jnp.int32), key)
  # "order": states saved before batches were whole epochs (2026-12-07) are refused, not
  # continued on another order.
  signature = pipeline.state_signature(
    "series", source, seed=int(seed), global_batch_size=int(global_batch_size), order="epochs"
  )
  return device_data.DeviceBatchIterator(batch_fn, signature)


def eval_batches(source: Any, batch_size: int, process_index: int = 0, process_count: int = 1):
  """``source`` once, in order: this process's ``{"series", "label", "mask", "index"}``
  batches of ``batch_size / process_count``, the last padded (mask False, label -1)."""
  per_process = -(-len(source) // process_count)
  start = process_index * per_process
  stop = min(start + per_process, len(source))
  local = batch_size // process_count
  num_batches = max(1, -(-per_process // local))
  for b in range(num_batches):
    index = np.arange(start + b * local, start + (b + 1) * local)
    mask = index < stop
    safe = np.where(mask, index, 0)
    yield {
      "series": np.where(mask[:, None, None], source.series[safe], 0.0).astype(np.float32),
      "label": np.where(mask, source.labels[safe], -1).astype(np.int32),
      "mask": mask,
      "index": np.where(mask, index, -1).astype(np.int32),
    }


class Series(Modality):
  """(T, C) float series; see the module docstring."""

  name = "series"
  batch_keys = ("series", "label", "aug_seed")
  input_key = "series"

  def input_shape(self, config: ml_collections.ConfigDict, source: Any = None) -> tuple:
    source = source if source is not None else sources.create_source(config.data, "train")
    return source.series_shape

  def train_iterator(
    self,
    config: ml_collections.ConfigDict,
    source: Any,
    mesh: Any,
    views: Any,
    *,
    device_resident: bool,
    read_threads: int | None = None,
  ) -> Any:
    del views, device_resident, read_threads  # Always on the device; no crops here.
    return create_series_iterator(
      source, mesh, seed=config.train.seed, global_batch_size=config.data.global_batch_size
    )

  def views(
    self, config: ml_collections.ConfigDict, batch: dict, rng: jax.Array, step: jax.Array
  ) -> dict[str, jax.Array]:
    """TS-TCC's two views of each series: weak (scaling) and strong (permutation + jitter),
    each example's keys from its ``aug_seed`` (independent of the batch's split)."""
    del rng, step
    x = batch["series"]
    keys = jax.vmap(jax.random.key)(batch["aug_seed"])
    a = jax.vmap(lambda k, s: ts_views.weak_augment(jax.random.fold_in(k, 0), s))(keys, x)
    b = jax.vmap(lambda k, s: ts_views.strong_augment(jax.random.fold_in(k, 1), s))(keys, x)
    return {"global": jnp.concatenate([a, b])}

  def eval_iterator(
    self, config: ml_collections.ConfigDict, source: Any, *, num_workers: int = 0
  ) -> Any:
    del num_workers
    return eval_batches(source, config.evals.batch_size, jax.process_index(), jax.process_count())

  def raw_features(self, x: jax.Array) -> jax.Array:
    """The raw series, flattened, missing values as 0 (the normalised mean)."""
    return jnp.nan_to_num(x.reshape(x.shape[0], -1).astype(jnp.float32))


SERIES = Series()
