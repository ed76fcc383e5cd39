"""Device-resident data: the whole uint8 train set on the accelerator, crops and flips there.

For data sets that fit in device memory (CIFAR-10's 50,000 32x32 images are 154 MB) the host
pipeline's per-step work (fetch, decode, crop, transfer) is the part that can stall an
accelerator that runs a step in milliseconds. Here the data set is copied to every device once
and each step's two-view batch is a jitted, pure function of ``(seed, step)``::

    data = device.DeviceData.create(source, mesh)           # decode + copy, once
    batch_fn = device.make_batch_fn(data, seed=0, global_batch_size=512, image_size=32)
    batch = batch_fn(step)   # uint8 views (512, 32, 32, 3), aug_seed, label; sharded on 'data'

The batch goes to ``train.make_train_step``'s function unchanged, which applies the
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
- Crops: ``random_resized_crop_box``'s rule exactly (up to 10 attempts of area ~ U(area),
  log-aspect ~ U(log aspect), the first box that fits placed uniformly, else the clamped
  centre crop), fed by uniform numbers instead of NumPy calls; ``boxes_from_uniforms``
  returns the same boxes as that function given the same numbers (tested against it).
- Resize: Pillow's bicubic resampling of the cut-out crop (Keys a = -0.5, antialiased when
  shrinking, horizontal pass then vertical, each rounded to uint8) as separable weight
  matrices applied with batched matmuls; the flip reverses the column weights. Given the
  same box, an enlarged crop (every CIFAR crop) has Pillow's pixels but for rare off-by-one
  roundings (Pillow's coefficients are 22-bit fixed point); when shrinking, Pillow 13 may
  run the vertical pass first, which moves about 5% of pixels by a few levels.
- Per-example randomness (boxes, flips and the ``aug_seed`` of the step's photometric
  augmentation) comes from the example's stream position ``(epoch, offset)``, never from its
  place on a device, so batches do not depend on the device or process count.

Why the batches are not bitwise those of the host path for the same seed: the host path
draws each record's numbers from a NumPy generator seeded by grain from ``(seed, position)``
and orders examples with grain's index shuffle, host code that a jitted function cannot
reproduce; drawing the numbers on the host would bring back the per-step host work this
mode removes. So the modes share the distribution of orders, boxes and flips, not the draws;
given the same boxes they produce the same pixels (within the rounding above).

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

from cljax import sharding

# random_resized_crop_box's attempts before its centre-crop fallback.
CROP_ATTEMPTS = 10
# Uniform numbers per view: (area, log-aspect) per attempt, then top, left and the flip coin.
NUM_VIEW_UNIFORMS = 2 * CROP_ATTEMPTS + 3
# fold_in tags separating the data streams from each other and from the run's other keys.
_DATA_TAG, _ORDER_TAG, _CROP_TAG = 0x64617461, 0, 1
# Pillow's bicubic filter constant.
_BICUBIC_A = -0.5

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


def boxes_from_uniforms(
  u: jax.Array,
  height: int,
  width: int,
  area: tuple[float, float] = (0.08, 1.0),
  aspect: tuple[float, float] = (3 / 4, 4 / 3),
) -> jax.Array:
  """``pipeline.random_resized_crop_box``'s rule, driven by uniform numbers in [0, 1).

  Attempt ``a`` reads its area fraction from ``u[2a]`` and its log-aspect from ``u[2a + 1]``;
  the chosen box's top and left come from ``u[2 * CROP_ATTEMPTS]`` and the next one (as
  ``floor(u * (range + 1))``, NumPy's ``integers``).

  Args:
    u: (..., k) uniforms, k >= 2 * CROP_ATTEMPTS + 2.
    height: image height (static).
    width: image width (static).
    area: range of the crop's area fraction.
    aspect: range of the crop's width / height.

  Returns:
    (..., 4) int32 boxes (top, left, crop_height, crop_width).
  """
  n = CROP_ATTEMPTS
  log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
  target = height * width * (area[0] + (area[1] - area[0]) * u[..., 0 : 2 * n : 2])
  ratio = jnp.exp(log_lo + (log_hi - log_lo) * u[..., 1 : 2 * n : 2])
  w = jnp.round(jnp.sqrt(target * ratio)).astype(jnp.int32)
  h = jnp.round(jnp.sqrt(target / ratio)).astype(jnp.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(fits, axis=-1)[..., None]
  found = jnp.any(fits, axis=-1)
  fallback_h, fallback_w = _centre_crop_size(height, width, aspect)
  h = jnp.where(found, jnp.take_along_axis(h, first, -1)[..., 0], fallback_h)
  w = jnp.where(found, jnp.take_along_axis(w, first, -1)[..., 0], fallback_w)
  top = jnp.minimum(jnp.floor(u[..., 2 * n] * (height - h + 1)).astype(jnp.int32), height - h)
  left = jnp.minimum(jnp.floor(u[..., 2 * n + 1] * (width - w + 1)).astype(jnp.int32), width - w)
  # The fallback is centred, not placed at random.
  top = jnp.where(found, top, (height - h) // 2)
  left = jnp.where(found, left, (width - w) // 2)
  return jnp.stack([top, left, h, w], axis=-1)


def _centre_crop_size(height: int, width: int, aspect: tuple[float, float]) -> tuple[int, int]:
  if width / height < min(aspect):
    return min(height, int(round(width / min(aspect)))), width
  if width / height > max(aspect):
    return height, min(width, int(round(height * max(aspect))))
  return height, width


def _bicubic(x: jax.Array) -> jax.Array:
  """Pillow's bicubic kernel (Keys, a = -0.5)."""
  x = jnp.abs(x)
  a = _BICUBIC_A
  inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  outer = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return jnp.where(x < 1.0, inner, jnp.where(x < 2.0, outer, 0.0))


def resize_weights(start: jax.Array, length: jax.Array, in_size: int, out_size: int) -> jax.Array:
  """Pillow's bicubic resampling matrices for the crops ``[start, start + length)``.

  Output pixel ``o`` of a crop of ``length`` pixels samples the crop at
  ``(o + 0.5) * length / out_size``; the kernel widens by ``length / out_size`` when
  shrinking (antialiasing); weights are normalised over the pixels inside the crop only, as
  Pillow does for an image cut out before resizing.

  Args:
    start: (b,) int32 first pixel of each crop.
    length: (b,) int32 crop lengths (>= 1).
    in_size: the image's length along this axis (static).
    out_size: the output length (static).

  Returns:
    (b, out_size, in_size) float32 weights whose rows sum to 1.
  """
  scale = length.astype(jnp.float32) / out_size
  widen = jnp.maximum(scale, 1.0)[:, None, None]
  center = (jnp.arange(out_size, dtype=jnp.float32) + 0.5)[None, :] * scale[:, None]
  local = (jnp.arange(in_size)[None, :] - start[:, None]).astype(jnp.float32)[:, None, :]
  inside = (local >= 0) & (local < length[:, None, None])
  weights = jnp.where(inside, _bicubic((local + 0.5 - center[..., None]) / widen), 0.0)
  return weights / jnp.sum(weights, axis=-1, keepdims=True)


def _round_to_uint8_range(x: jax.Array) -> jax.Array:
  # Pillow rounds half up and clips after each pass.
  return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


def crop_resize_flip(images: jax.Array, boxes: jax.Array, flips: jax.Array, size: int) -> jax.Array:
  """Cuts ``boxes`` out of ``images``, resizes them to ``size`` (bicubic) and flips some.

  Args:
    images: (b, H, W, 3) uint8.
    boxes: (b, 4) int32 (top, left, crop_height, crop_width).
    flips: (b,) bool, flip horizontally.
    size: the output side S (static).

  Returns:
    (b, S, S, 3) uint8, as ``pipeline.crop_and_resize`` (+ ``[:, ::-1]``) per image.
  """
  _, height, width, _ = images.shape
  rows = resize_weights(boxes[:, 0], boxes[:, 2], height, size)  # (b, S, H)
  cols = resize_weights(boxes[:, 1], boxes[:, 3], width, size)  # (b, S, W)
  cols = jnp.where(flips[:, None, None], cols[:, ::-1], cols)
  x = images.astype(jnp.float32)
  # Full precision: TF32 or bf16 passes would change the rounded pixels.
  einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)
  # Horizontal pass first, as Pillow: (b, H, W, 3) x (b, S, W) -> (b, H, S, 3).
  x = _round_to_uint8_range(einsum("byxc,box->byoc", x, cols))
  # Then vertical: (b, S, H) x (b, H, S, 3) -> (b, S, S, 3).
  x = _round_to_uint8_range(einsum("bpy,byoc->bpoc", rows, x))
  return x.astype(jnp.uint8)


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
  batch_size: int,
  num_shards: int,
  image_size: int,
  area: tuple[float, float],
  aspect: tuple[float, float],
  flip: bool,
  return_index: bool,
) -> Batch:
  """This device's rows of the step's batch; runs inside ``shard_map`` over 'data'."""
  num_examples, height, width, _ = images.shape
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
    u = jax.random.uniform(example_key, (2, NUM_VIEW_UNIFORMS))
    bits = jax.random.bits(jax.random.fold_in(example_key, 1), (), jnp.uint32)
    return u, (bits >> 1).astype(jnp.int32)

  u, aug_seed = jax.vmap(draws)(epoch, offset)
  pixels = images[example]
  batch = {"aug_seed": aug_seed, "label": labels[example]}
  for v, name in enumerate(("view_a", "view_b")):
    boxes = boxes_from_uniforms(u[:, v], height, width, area, aspect)
    # The coin is drawn even when flip is off, so turning it off changes no crop.
    flips = (u[:, v, -1] < 0.5) & flip
    batch[name] = crop_resize_flip(pixels, boxes, flips, image_size)
  if return_index:
    batch["index"] = example.astype(jnp.int32)
  return batch


def make_batch_fn(
  data: DeviceData,
  *,
  seed: int,
  global_batch_size: int,
  image_size: int,
  crop_area: tuple[float, float] = (0.08, 1.0),
  crop_aspect: tuple[float, float] = (3 / 4, 4 / 3),
  flip: bool = True,
  return_index: bool = False,
) -> Callable[[Any], Batch]:
  """A jitted ``step -> batch`` over ``data``: order, crop and flip all on device.

  Args:
    data: the device-resident set.
    seed: the run's seed (order and crops).
    global_batch_size: examples per step over all devices.
    image_size: side S of the square views.
    crop_area: range of the crop's area fraction.
    crop_aspect: range of the crop's width / height (sampled log-uniformly).
    flip: random horizontal flips with probability 1/2.
    return_index: also return "index", the source index of each example.

  Returns:
    ``batch_fn(step)`` -> {"view_a", "view_b": uint8 (B, S, S, 3), "aug_seed", "label":
    int32 (B,)}, sharded over 'data': the keys the train step reads from host batches.
    ``step`` is an int or a () int array; new values do not recompile.

  Raises:
    ValueError: the batch does not split over the devices, exceeds the data set, or the
      ranges are invalid.
  """
  num_examples = len(data)
  sharding.check_global_batch(global_batch_size, data.mesh)
  if not 0 < global_batch_size <= num_examples:
    raise ValueError(
      f"global_batch_size={global_batch_size} must be in [1, {num_examples}] (the data set)"
    )
  if num_examples // math.gcd(global_batch_size, num_examples) * global_batch_size >= 2**30:
    raise ValueError(f"{num_examples} examples x batch {global_batch_size} overflow int32 offsets")
  if not 0 < crop_area[0] <= crop_area[1] <= 1 or not 0 < crop_aspect[0] <= crop_aspect[1]:
    raise ValueError(f"bad crop_area {crop_area} or crop_aspect {crop_aspect}")
  if image_size < 1:
    raise ValueError(f"image_size must be positive, got {image_size}")
  local = functools.partial(
    _local_batch,
    batch_size=global_batch_size,
    num_shards=data.mesh.devices.size,
    image_size=image_size,
    area=tuple(crop_area),
    aspect=tuple(crop_aspect),
    flip=bool(flip),
    return_index=return_index,
  )
  rep, data_spec = PartitionSpec(), PartitionSpec(sharding.DATA_AXIS)
  mapped = jax.shard_map(
    local, mesh=data.mesh, in_specs=(rep, rep, rep, rep), out_specs=data_spec, check_vma=True
  )
  # The data set is an argument, not a closed-over constant that jit would embed.
  jitted = jax.jit(mapped, out_shardings=sharding.batch_sharded(data.mesh))
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
    saved = state.get("pipeline", {})
    diff = {k: (saved.get(k), v) for k, v in self._signature.items() if saved.get(k) != v}
    if diff or "next_batch" not in state:
      raise ValueError(
        "the saved data-iterator state belongs to a different pipeline; its batches would "
        f"not continue the saved run. Differences (saved, now): {diff}; state: {state}"
      )
    self._next_batch = int(state["next_batch"])


def create_device_iterator(
  source: Any,
  mesh: Mesh,
  *,
  seed: int,
  global_batch_size: int,
  image_size: int,
  crop_area: tuple[float, float] = (0.08, 1.0),
  crop_aspect: tuple[float, float] = (3 / 4, 4 / 3),
  flip: bool = True,
) -> DeviceBatchIterator:
  """Loads ``source`` onto ``mesh`` and returns the iterator of its two-view batches.

  The arguments mean what they mean for ``pipeline.create_pretrain_iterator``.
  """
  data = DeviceData.create(source, mesh)
  batch_fn = make_batch_fn(
    data,
    seed=seed,
    global_batch_size=global_batch_size,
    image_size=image_size,
    crop_area=crop_area,
    crop_aspect=crop_aspect,
    flip=flip,
  )
  signature = {
    "kind": "device_resident",
    "source": f"{type(source).__name__}[{len(source)}]",
    "seed": int(seed),
    "global_batch_size": int(global_batch_size),
    "image_size": int(image_size),
    "crop_area": [float(x) for x in crop_area],
    "crop_aspect": [float(x) for x in crop_aspect],
    "flip": bool(flip),
  }
  return DeviceBatchIterator(batch_fn, signature)
