"""Device-resident data: the whole uint8 train set on the accelerator, crops and flips there.

For data sets that fit in device memory (CIFAR-10's 50,000 32x32 images are 154 MB) the host
pipeline's per-step work (fetch, decode, crop, transfer) is the part that can stall an
accelerator that runs a step in milliseconds. Here the data set is copied to every device once
and each step's two-view batch is a jitted, pure function of ``(seed, step)``::

    data = device.DeviceData.create(source, mesh)           # decode + copy, once
    batch_fn = device.make_batch_fn(data, views.ViewSpec(32), seed=0, global_batch_size=512)
    batch = batch_fn(step)   # uint8 views (512, 32, 32, 3), aug_seed, label; sharded on 'data'

The batch goes to the compiled train step (``step.make_train_step``) unchanged, which applies the
photometric augmentation and normalisation as for host batches. ``DeviceBatchIterator``
wraps ``batch_fn`` in grain's iterator protocol so the training loop and its orbax
checkpoints treat both modes alike; its state is only the step number, and because a batch
depends on nothing but ``(seed, step)`` a resumed run gets exactly the batches of an
uninterrupted one.

What is sampled, and how it relates to the host path (``pipeline.create_pretrain_iterator``):

- Order: the global stream of positions ``p = step * B + i`` is cut into epochs of N; epoch
  ``e`` visits the examples in a uniformly random order keyed by ``(seed, e)``
  (``epoch_order``), so every epoch covers every example exactly once and batches straddle
  epochs, as on the host path with one process (which drops no remainder either).
- Crops and resize: ``crops.py``, the host path's crop rule driven by uniform numbers and
  Pillow's bicubic resize as batched matmuls (same boxes, same pixels up to rare roundings).
- Multi-crop (SwAV, DINO): with ``num_local_crops`` = L > 0 the batch also holds
  ``local_views`` (B, L, s, s, 3), L more crops of each example at side s, with their own
  area range and flips, drawn from numbers separate from the global views' (which do not
  change when L does).
- Per-example randomness (boxes, flips, local views and the ``aug_seed`` of the step's
  photometric augmentation) comes from the example's stream position ``(epoch, offset)``,
  never from its place on a device, so batches do not depend on the device or process count.

Why the batches are not bitwise those of the host path for the same seed: the host path
draws each record's numbers from a NumPy generator seeded by grain from ``(seed, position)``
and orders examples with grain's index shuffle, host code that a jitted function cannot
reproduce; drawing the numbers on the host would bring back the per-step host work this
mode removes. So the modes share the distribution of orders, boxes and flips, not the draws;
given the same boxes they produce the same pixels (within the roundings ``crops.py``
describes).

The set is replicated, not sharded: a step gathers arbitrary examples, which from a sharded
set would take an all-to-all of images per step; a replica costs N * H * W * 3 bytes per
device (0.2% of an 80 GB GPU for CIFAR-10).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from cljax import sharding, xla_options
from cljax.data import crops, pipeline
from cljax.data import views as views_lib

# fold_in tags separating the data streams from each other and from the run's other keys.
_DATA_TAG, _ORDER_TAG, _CROP_TAG = 0x64617461, 0, 1
# Under an example's key: the aug_seed's bits, then the local views' uniforms.
_AUG_SEED_TAG, _LOCAL_TAG = 1, 2

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class DeviceData:
  """A uint8 image set held on every device of a mesh.

  Attributes:
    images: (N, H, W, 3) uint8, replicated over ``mesh``.
    labels: (N,) int32 (-1 when unlabelled), replicated.
    mesh: the 'data' mesh the batches are sharded over.
  """

  images: jax.Array
  labels: jax.Array
  mesh: Mesh

  @classmethod
  def create(
    cls, source: Any, mesh: Mesh, *, max_bytes: int | None = None, num_threads: int = 8
  ) -> DeviceData:
    """Reads every example of ``source`` and copies the set to each device of ``mesh``.

    Every process reads the whole source (device-resident sets are small).

    Args:
      source: a random-access source of {"image": uint8 (H, W, 3), "label"} (sources.py),
        all images of one size.
      mesh: the 'data' mesh (``sharding.create_mesh``).
      max_bytes: refuse larger sets; default a quarter of a device's memory where JAX
        reports it, else no limit.
      num_threads: threads decoding encoded sources (Pillow releases the GIL).

    Returns:
      The device-resident data set.

    Raises:
      ValueError: the images differ in size, or the set is larger than ``max_bytes``.
    """
    images, labels = load_arrays(source, num_threads=num_threads)
    limit = max_bytes
    stats = mesh.devices.flat[0].memory_stats() or {}
    if limit is None and "bytes_limit" in stats:
      limit = stats["bytes_limit"] // 4
    if limit is not None and images.nbytes > limit:
      raise ValueError(
        f"{source!r} is {images.nbytes / 2**20:.0f} MiB as uint8, over the device-resident "
        f"limit of {limit / 2**20:.0f} MiB per device; use the host pipeline"
      )
    replicated = sharding.replicated(mesh)
    return cls(
      images=_replicate(images, replicated),
      labels=_replicate(labels, replicated),
      mesh=mesh,
    )

  def __len__(self) -> int:
    return self.images.shape[0]


def _replicate(array: np.ndarray, replicated: jax.sharding.Sharding) -> jax.Array:
  # From a callback, so that it also works when the mesh spans several processes.
  return jax.make_array_from_callback(array.shape, replicated, lambda index: array[index])


def load_arrays(source: Any, num_threads: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """All of ``source`` as (N, H, W, 3) uint8 images and (N,) int32 labels.

  Args:
    source: a random-access source (sources.py).
    num_threads: threads reading it (decoding in Pillow releases the GIL).

  Returns:
    ``(images, labels)``.

  Raises:
    ValueError: the images are not all of one size.
  """
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    examples = list(pool.map(source.__getitem__, range(len(source)), chunksize=256))
  shapes = {e["image"].shape for e in examples}
  if len(shapes) != 1:
    raise ValueError(
      f"device-resident data needs images of one size; {source!r} has {sorted(shapes)[:4]}..."
      " (resize them once beforehand, or use the host pipeline)"
    )
  images = np.stack([e["image"] for e in examples])
  return images, np.array([e["label"] for e in examples], np.int32)


def stream_positions(
  step: jax.Array, index: jax.Array, batch_size: int, num_examples: int
) -> tuple[jax.Array, jax.Array]:
  """The epoch and in-epoch offset of global batch entry ``index`` at ``step``.

  Position ``p = step * batch_size + index`` in a stream of epochs of ``num_examples``;
  computed without forming ``p``, which would overflow int32 in long runs: the offsets
  repeat every ``num_examples // g`` steps, ``g = gcd(batch_size, num_examples)``.

  Args:
    step: () integer step.
    index: (b,) integer positions in the global batch.
    batch_size: the global batch size B (static).
    num_examples: N (static).

  Returns:
    ``(epoch, offset)``, each (b,) int32.
  """
  g = math.gcd(batch_size, num_examples)
  period = num_examples // g
  cycle, rest = jnp.divmod(jnp.asarray(step, jnp.int32), period)
  position = rest * batch_size + index  # < period * batch_size + batch_size < 2**31.
  return cycle * (batch_size // g) + position // num_examples, position % num_examples


def epoch_order(key: jax.Array, epoch: jax.Array, num_examples: int) -> jax.Array:
  """The examples in epoch ``epoch``'s order: a uniformly random permutation of range(N).

  One sort by 64 random bits per example: ties, which a stable sort would leave in index
  order, have probability about N^2 / 2^65. (``jax.random.permutation`` sorts twice by 32
  bits for the same guarantee, at twice the cost.)

  Args:
    key: the order's key.
    epoch: () integer epoch.
    num_examples: N (static).

  Returns:
    (N,) int32 permutation.
  """
  bits = jax.random.bits(jax.random.fold_in(key, epoch), (2, num_examples), jnp.uint32)
  keys = (bits[0], bits[1], jnp.arange(num_examples, dtype=jnp.int32))
  return jax.lax.sort(keys, num_keys=2)[2]


def _local_batch(
  images: jax.Array,
  labels: jax.Array,
  step: jax.Array,
  key: jax.Array,
  *,
  views: views_lib.ViewSpec,
  batch_size: int,
  num_shards: int,
  return_index: bool,
) -> Batch:
  """This device's rows of the step's batch; runs inside ``shard_map`` over 'data'."""
  num_examples = images.shape[0]
  n = batch_size // num_shards
  index = jax.lax.axis_index(sharding.DATA_AXIS) * n + jnp.arange(n)
  epoch, offset = stream_positions(step, index, batch_size, num_examples)
  # A batch spans at most two epochs (batch_size <= N): the first entry's and the next,
  # whose order is only computed (a second sort of N keys) when the batch reaches it.
  (first_epoch,), (first_offset,) = stream_positions(
    step, jnp.zeros((1,), jnp.int32), batch_size, num_examples
  )
  order_key = jax.random.fold_in(key, _ORDER_TAG)
  order = epoch_order(order_key, first_epoch, num_examples)
  next_order = jax.lax.cond(
    first_offset + batch_size > num_examples,
    lambda: epoch_order(order_key, first_epoch + 1, num_examples),
    lambda: order,
  )
  example = jnp.where(epoch == first_epoch, order[offset], next_order[offset])
  crop_key = jax.random.fold_in(key, _CROP_TAG)

  def draws(e, j):
    example_key = jax.random.fold_in(jax.random.fold_in(crop_key, e), j)
    # One threefry call for both views' numbers (separate calls compile slowly), and one
    # for the seed of the step's photometric augmentation (31 random bits, like the host's).
    u = jax.random.uniform(example_key, (2, crops.NUM_VIEW_UNIFORMS))
    bits = jax.random.bits(jax.random.fold_in(example_key, _AUG_SEED_TAG), (), jnp.uint32)
    # The local views' numbers come from a key of their own: the global views and aug_seed
    # are the same with or without them.
    u_local = None
    if views.num_local_crops:
      local_key = jax.random.fold_in(example_key, _LOCAL_TAG)
      u_local = jax.random.uniform(local_key, (views.num_local_crops, crops.NUM_VIEW_UNIFORMS))
    return u, (bits >> 1).astype(jnp.int32), u_local

  u, aug_seed, u_local = jax.vmap(draws)(epoch, offset)
  pixels = images[example]
  batch = {"aug_seed": aug_seed, "label": labels[example]}
  v = views
  for i, name in enumerate(("view_a", "view_b")):
    batch[name] = crops.views_from_uniforms(
      pixels, u[:, i], v.image_size, v.crop_area, v.crop_aspect, v.flip
    )
  if v.num_local_crops:
    # Every (example, local view) pair is one row of the same batched crop.
    local = crops.views_from_uniforms(
      images[jnp.repeat(example, v.num_local_crops)],
      u_local.reshape(n * v.num_local_crops, crops.NUM_VIEW_UNIFORMS),
      v.local_crop_size,
      v.local_crop_area,
      v.crop_aspect,
      v.flip,
    )
    batch["local_views"] = local.reshape(n, v.num_local_crops, *local.shape[1:])
  if return_index:
    batch["index"] = example.astype(jnp.int32)
  return batch


def make_batch_fn(
  data: DeviceData,
  views: views_lib.ViewSpec,
  *,
  seed: int,
  global_batch_size: int,
  return_index: bool = False,
) -> Callable[[Any], Batch]:
  """A jitted ``step -> batch`` over ``data``: order, crop and flip all on device.

  Args:
    data: the device-resident set.
    views: how the views are cut (``views.ViewSpec``), global and local.
    seed: the run's seed (order and crops).
    global_batch_size: examples per step over all devices.
    return_index: also return "index", the source index of each example.

  Returns:
    ``batch_fn(step)`` -> {"view_a", "view_b": uint8 (B, S, S, 3), "aug_seed", "label":
    int32 (B,)}, and with L > 0 local crops "local_views": uint8 (B, L, s, s, 3); sharded
    over 'data': the keys the train step reads from host batches. ``step`` is an int or a
    () int array; new values do not recompile.

  Raises:
    ValueError: the batch does not split over the devices or exceeds the data set.
  """
  num_examples = len(data)
  sharding.check_global_batch(global_batch_size, data.mesh)
  if not 0 < global_batch_size <= num_examples:
    raise ValueError(
      f"global_batch_size={global_batch_size} must be in [1, {num_examples}] (the data set)"
    )
  if num_examples // math.gcd(global_batch_size, num_examples) * global_batch_size >= 2**30:
    raise ValueError(f"{num_examples} examples x batch {global_batch_size} overflow int32 offsets")
  local = functools.partial(
    _local_batch,
    views=views,
    batch_size=global_batch_size,
    num_shards=data.mesh.devices.size,
    return_index=return_index,
  )
  rep, data_spec = PartitionSpec(), PartitionSpec(sharding.DATA_AXIS)
  mapped = jax.shard_map(
    local, mesh=data.mesh, in_specs=(rep, rep, rep, rep), out_specs=data_spec, check_vma=True
  )
  # The data set is an argument, not a closed-over constant that jit would embed.
  jitted = jax.jit(
    mapped,
    out_shardings=sharding.batch_sharded(data.mesh),
    compiler_options=xla_options.for_mesh(data.mesh),
  )
  key = jax.random.fold_in(jax.random.key(seed), _DATA_TAG)

  def batch_fn(step: Any) -> Batch:
    return jitted(data.images, data.labels, jnp.asarray(step, jnp.int32), key)

  batch_fn.jitted = jitted  # For compile-time and cache inspection (bench, tests).
  return batch_fn


class DeviceBatchIterator(grain.DatasetIterator):
  """Device-resident batches in grain's iterator protocol; the state is the next step.

  ``next()`` returns ``batch_fn(k)`` for k = 0, 1, ... as global arrays (no
  ``host_to_global`` needed). grain's orbax handler saves and restores it like the host
  iterator, so checkpoints keep one layout; restoring a host-path state is refused.
  """

  def __init__(self, batch_fn: Callable[[Any], Batch], signature: dict[str, Any]):
    super().__init__()
    self._batch_fn, self._signature = batch_fn, signature
    self._next_batch = 0

  def __next__(self) -> Batch:
    self._assert_not_closed()
    batch = self._batch_fn(self._next_batch)
    self._next_batch += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"pipeline": self._signature, "next_batch": self._next_batch}

  def set_state(self, state: dict[str, Any]) -> None:
    pipeline.check_state(state, self._signature)
    self._next_batch = int(state["next_batch"])


def create_device_iterator(
  source: Any, mesh: Mesh, views: views_lib.ViewSpec, *, seed: int, global_batch_size: int
) -> DeviceBatchIterator:
  """Loads ``source`` onto ``mesh`` and returns the iterator of its two-view batches.

  The arguments mean what they mean for ``pipeline.create_pretrain_iterator``; with
  ``views.num_local_crops`` > 0 batches also hold "local_views" (``make_batch_fn``).

  Raises:
    ValueError: as ``make_batch_fn``.
  """
  data = DeviceData.create(source, mesh)
  batch_fn = make_batch_fn(data, views, seed=seed, global_batch_size=global_batch_size)
  signature = pipeline.state_signature(
    "device_resident",
    source,
    seed=int(seed),
    global_batch_size=int(global_batch_size),
    **views.signature(),
  )
  return DeviceBatchIterator(batch_fn, signature)
