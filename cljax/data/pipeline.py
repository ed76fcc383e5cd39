"""grain input pipelines: shuffled, sharded two-view crops for pretraining; ordered evaluation.

Pretraining batches may also carry multi-crop local views (SwAV, DINO): ``num_local_crops``
smaller crops of each example, from the same per-record generator, after the two global
views and ``aug_seed``, which are therefore the same with or without them.

Checkpointing the pretraining iterator with orbax (grain registers its handler with orbax)::

  import grain, orbax.checkpoint as ocp
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(iterator)))  # sets `iterator`'s state in place

Each process writes its own `process_<i>-of-<n>.json`. Without orbax, `iterator.get_state()`
is a small JSON-serialisable dict (the settings and the next batch number) and
`iterator.set_state(state)` resumes from it, with any number of workers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import grain
import numpy as np
from absl import flags
from PIL import Image

from cljax.data import views as views_lib

# Bicubic, as SimCLR resizes its crops; Pillow's resize also antialiases when shrinking.
_RESAMPLE = Image.Resampling.BICUBIC


def random_resized_crop_box(
  height: int,
  width: int,
  rng: np.random.Generator,
  area: tuple[float, float] = (0.08, 1.0),
  aspect: tuple[float, float] = (3 / 4, 4 / 3),
  attempts: int = 10,
) -> tuple[int, int, int, int]:
  """Samples a crop as torchvision's RandomResizedCrop and SimCLR do.

  Up to `attempts` times: area fraction ~ U(area), aspect ratio (w / h) ~ log-U(aspect); the
  first box that fits is placed uniformly. Otherwise the centre crop with the aspect ratio
  clamped into `aspect`.

  Args:
    height: image height.
    width: image width.
    rng: the per-record generator.
    area: range of the crop's area as a fraction of the image's.
    aspect: range of the crop's width / height.
    attempts: tries before the centre-crop fallback.

  Returns:
    (top, left, crop_height, crop_width).
  """
  log_aspect = np.log(aspect)
  for _ in range(attempts):
    target_area = height * width * rng.uniform(*area)
    ratio = np.exp(rng.uniform(*log_aspect))
    w = int(round(np.sqrt(target_area * ratio)))
    h = int(round(np.sqrt(target_area / ratio)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  if width / height < min(aspect):
    w, h = width, min(height, int(round(width / min(aspect))))
  elif width / height > max(aspect):
    h, w = height, min(width, int(round(height * max(aspect))))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def crop_and_resize(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
  """Cuts `box` (top, left, h, w) out of a uint8 (H, W, 3) image and resizes it to (size, size).

  Crops smaller than `size` are upscaled.
  """
  top, left, h, w = box
  # Cut first: resize(box=...) would let the filter read pixels from outside the box.
  crop = Image.fromarray(np.ascontiguousarray(image[top : top + h, left : left + w]))
  return np.asarray(crop.resize((size, size), _RESAMPLE))


def random_box_and_flip(
  height: int,
  width: int,
  rng: np.random.Generator,
  area: tuple[float, float],
  aspect: tuple[float, float],
  flip: bool,
) -> tuple[tuple[int, int, int, int], bool]:
  """A view's random draws: its crop box, then its flip coin (drawn even when ``flip`` is
  off, so turning flips off changes no crop). The host crops (``random_view``) and the
  device crops of the decode-only path (``decode.CanvasViews``) both draw through here, so
  the same seed gives both the same boxes and flips."""
  box = random_resized_crop_box(height, width, rng, area, aspect)
  return box, bool(rng.random() < 0.5 and flip)


def random_view(
  image: np.ndarray,
  rng: np.random.Generator,
  size: int,
  area: tuple[float, float],
  aspect: tuple[float, float],
  flip: bool,
) -> np.ndarray:
  """The host's one crop-and-flip: a random resized crop of side ``size``, flipped at random
  (draws as ``random_box_and_flip``)."""
  box, flipped = random_box_and_flip(*image.shape[:2], rng, area, aspect, flip)
  view = crop_and_resize(image, box, size)
  return view[:, ::-1] if flipped else view


def global_view(
  image: np.ndarray, rng: np.random.Generator, views: views_lib.ViewSpec
) -> np.ndarray:
  """One global view of ``image`` as ``views`` cuts it (``random_view`` at its image size)."""
  return random_view(image, rng, views.image_size, views.crop_area, views.crop_aspect, views.flip)


class TwoViews(grain.transforms.RandomMap):
  """Example -> two independent random-resized-crop (+ flip) views, from the per-record rng.

  With ``views.num_local_crops`` > 0 also "local_views": that many more crops (+ flips) of
  side ``views.local_crop_size``, their area from ``views.local_crop_area``, drawn after
  everything else.
  """

  def __init__(self, views: views_lib.ViewSpec):
    self.views = views

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image, v = element["image"], self.views
    view_a, view_b = global_view(image, rng, v), global_view(image, rng, v)
    # Seeds the on-device photometric augmentation of this record. Drawn from
    # the record's rng, it depends on the record's place in the global shuffled
    # stream only: not on the process, device or batch layout.
    aug_seed = np.int32(rng.integers(0, 2**31 - 1))
    out = {
      "view_a": view_a,
      "view_b": view_b,
      "label": np.int32(element["label"]),
      "aug_seed": aug_seed,
    }
    if v.num_local_crops:
      # Last, so that the draws above do not depend on the multi-crop settings.
      local = v.local_crop_size, v.local_crop_area, v.crop_aspect, v.flip
      out["local_views"] = np.stack(
        [random_view(image, rng, *local) for _ in range(v.num_local_crops)]
      )
    return out


class CentreView(grain.transforms.Map):
  """Padded position i -> the centre-cropped, resized source example it stands for, or padding."""

  def __init__(self, source: Any, image_size: int, crop_fraction: float, start: int, stop: int):
    self.source, self.image_size, self.crop_fraction = source, image_size, crop_fraction
    self.start, self.stop = start, stop

  def map(self, position: int) -> dict[str, Any]:
    index = self.start + int(position)
    if index >= self.stop:
      blank = np.zeros((self.image_size, self.image_size, 3), np.uint8)
      return {"image": blank, "label": np.int32(-1), "mask": False, "index": np.int32(-1)}
    example = self.source[index]
    height, width = example["image"].shape[:2]
    short = min(height, width)
    # Never crop below image_size pixels: images that small (CIFAR at 32) are used whole.
    side = max(1, int(round(min(short, max(self.crop_fraction * short, self.image_size)))))
    box = ((height - side) // 2, (width - side) // 2, side, side)
    image = crop_and_resize(example["image"], box, self.image_size)
    return {"image": image, "label": example["label"], "mask": True, "index": np.int32(index)}


class BatchIterator(grain.DatasetIterator):
  """Iterates a batched grain MapDataset from a batch number; the state is that number.

  Batch k is a pure function of k and the pipeline's settings, so the state needs nothing
  else: `{"pipeline": settings, "next_batch": k}`. Restoring opens a fresh grain iterator
  over batches k, k+1, ... That keeps checkpoints independent of num_workers, read threads
  and grain's internal state format (which grain may change between versions), and a state
  saved by a differently built pipeline is refused instead of silently giving other batches.
  """

  def __init__(
    self,
    batches: grain.MapDataset,
    signature: dict[str, Any],
    num_workers: int,
    read_threads: int | None,
  ):
    # No grain parents: the inner iterator is opened lazily and replaced on restore.
    super().__init__()
    self._batches, self._signature = batches, signature
    self._num_workers = num_workers
    # Each read thread builds one whole batch. More threads help large JPEGs (Pillow drops the
    # GIL while decoding) but slow small images down (measured: CIFAR 1 > 2 > 8 threads).
    self._threads = read_threads or 2
    self._next_batch = 0
    self._inner: grain.DatasetIterator | None = None

  def _iterator(self) -> grain.DatasetIterator:
    if self._inner is None:
      ds = self._batches[self._next_batch :] if self._next_batch else self._batches
      options = grain.ReadOptions(num_threads=self._threads, prefetch_buffer_size=self._threads)
      iter_ds = ds.to_iter_dataset(options)
      if self._num_workers > 0:
        # Workers slice the batched MapDataset, so they hand out whole batches in order and
        # the stream does not depend on the number of workers.
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
      self._inner = iter(iter_ds)
    return self._inner

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    batch = next(self._iterator())
    self._next_batch += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"pipeline": self._signature, "next_batch": self._next_batch}

  def set_state(self, state: dict[str, Any]) -> None:
    check_state(state, self._signature)
    self._close_inner()
    self._next_batch = int(state["next_batch"])

  def start_prefetch(self) -> None:
    self._iterator().start_prefetch()

  def _close_inner(self) -> None:
    if self._inner is not None:
      self._inner.close()
      self._inner = None

  def close(self) -> None:
    self._close_inner()
    super().close()

  def __str__(self) -> str:
    return f"BatchIterator(next_batch={self._next_batch})"


# How the training streams deal global batches to processes (``augmented_batches``): each
# process a block of consecutive positions. States saved before the key existed dealt the
# positions round-robin, the same stream on one process only (``_with_dealing``).
DEALING = "blocks"
# The settings that say which share of the global stream a process reads, not which stream.
PROCESS_KEYS = ("process_index", "process_count")


def _with_dealing(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved signature with its ``dealing`` (absent in states saved before it existed)."""
  if "dealing" in saved or "process_count" not in saved:
    return saved
  return {**saved, "dealing": DEALING if saved["process_count"] == 1 else "round_robin"}


def check_state(state: dict[str, Any], signature: dict[str, Any]) -> None:
  """Refuses an iterator state saved by a pipeline other than the one ``signature`` describes.

  Every setting either side has must match: one that only one side has (the multi-crop
  settings, present only with local views) counts as a difference.

  Args:
    state: a saved ``get_state()``.
    signature: the restoring pipeline's settings.

  Raises:
    ValueError: the settings differ, or the state has no "next_batch".
  """
  saved = _with_dealing(state.get("pipeline", {}))
  keys = [*signature, *(k for k in saved if k not in signature)]
  diff = {k: (saved.get(k), signature.get(k)) for k in keys if saved.get(k) != signature.get(k)}
  if diff or "next_batch" not in state:
    raise ValueError(
      "the saved data-iterator state belongs to a different pipeline; its batches would "
      f"not continue the saved run. Differences (saved, now): {diff}; state: {state}"
    )


def remap_state(saved: list[dict[str, Any]], current: dict[str, Any]) -> dict[str, Any]:
  """The state that continues, on this process, the global stream other processes saved.

  A checkpoint written by P processes holds P states, one per process, that differ only in
  ``process_index``/``process_count`` and agree on ``next_batch``: the global batches
  consumed. Global batch k is the same on any process count (``augmented_batches``; the
  device-resident stream does not depend on it either), so resuming on another count is
  the saved ``next_batch`` under this process's signature.

  Args:
    saved: every saving process's ``get_state()``, in process order.
    current: this process's iterator's ``get_state()`` (its signature).

  Returns:
    The state to ``set_state``.

  Raises:
    ValueError: the saved states disagree on ``next_batch``, or differ from ``current`` in
      a setting other than the process keys (``check_state``), or dealt round-robin.
  """
  batches = {int(s.get("next_batch", -1)) for s in saved}
  if len(batches) != 1 or -1 in batches:
    raise ValueError(
      f"the saved data-iterator states of the {len(saved)} processes disagree on the batches "
      f"consumed ({sorted(batches)}): they do not describe one global stream"
    )
  drop = lambda signature: {k: v for k, v in signature.items() if k not in PROCESS_KEYS}
  for state in saved:
    check_state(
      {**state, "pipeline": drop(_with_dealing(state.get("pipeline", {})))},
      drop(current["pipeline"]),
    )
  return {"pipeline": current["pipeline"], "next_batch": batches.pop()}


def _per_process_batch(global_batch_size: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
      f"need 0 <= process_index < process_count, got {process_index}, {process_count}"
    )
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
      f"global batch size {global_batch_size} must be a positive multiple of the process "
      f"count {process_count}: each process reads global_batch_size // process_count examples"
    )
  return global_batch_size // process_count


def _check_workers(num_workers: int) -> None:
  if num_workers < 0:
    raise ValueError(f"num_workers must be >= 0, got {num_workers}")
  if num_workers > 0 and not flags.FLAGS.is_parsed():
    # Otherwise grain fails later, inside its worker start-up, with UnparsedFlagAccessError.
    raise RuntimeError(
      "grain worker processes read absl flags: run under absl.app.run, or call "
      "absl.flags.FLAGS.mark_as_parsed() before creating the iterator (or use num_workers=0)"
    )


def source_name(source: Any) -> str:
  """How an iterator's state signature names its source: type and length."""
  return f"{type(source).__name__}[{len(source)}]"


def state_signature(kind: str, source: Any, **settings: Any) -> dict[str, Any]:
  """The settings an iterator's state carries, which ``check_state`` compares on restore.

  Args:
    kind: names the iterator ("pretrain", "eval", "device_resident", ...).
    source: the source it reads, named by ``source_name``.
    **settings: the rest, JSON-ready (Python ints, floats, lists).

  Returns:
    ``{"kind": kind, "source": source_name(source), **settings}``.
  """
  return {"kind": kind, "source": source_name(source), **settings}


@dataclasses.dataclass(frozen=True)
class StreamSpec:
  """How a training iterator deals out the records of its source: every setting but the views.

  The training iterators (``create_pretrain_iterator``, ``decode.create_canvas_iterator``,
  ``captions.create_caption_iterator``, the classifier's) take these as keyword arguments.

  Attributes:
    seed: the run's seed: order and augmentations.
    global_batch_size: examples per step over all processes.
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()).
    num_workers: grain worker processes (0: read in this process, with threads).
    num_epochs: passes over the data; None repeats forever.
    read_threads: threads building batches, per worker (or in this process); default 2.

  Raises:
    ValueError: on construction, when the global batch does not split evenly over the
      processes or a setting is out of range; RuntimeError: worker processes without parsed
      absl flags.
  """

  seed: int
  global_batch_size: int
  process_index: int = 0
  process_count: int = 1
  num_workers: int = 0
  num_epochs: int | None = None
  read_threads: int | None = None

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Raises as the class says."""
    _per_process_batch(self.global_batch_size, self.process_index, self.process_count)
    _check_workers(self.num_workers)

  @property
  def batch_size(self) -> int:
    """Examples per batch of this process."""
    return self.global_batch_size // self.process_count

  def signature(self) -> dict[str, Any]:
    """The stream's part of an iterator's state signature (JSON-ready)."""
    return {
      "seed": int(self.seed),
      "global_batch_size": int(self.global_batch_size),
      "process_index": int(self.process_index),
      "process_count": int(self.process_count),
      "num_epochs": self.num_epochs,
      "dealing": DEALING,
    }


def create_pretrain_iterator(
  source: Any, views: views_lib.ViewSpec, **stream: Any
) -> BatchIterator:
  """Returns this process's iterator of two-view pretraining batches.

  Every epoch is a global shuffle of the source (reshuffled each epoch, from `seed`); the
  epochs follow each other in one global stream, whose global batch k is its positions
  k B .. (k + 1) B - 1 whatever the process count; process i reads the i-th block of b = B /
  process_count of them (``augmented_batches``). Each example becomes two views, each a random
  resized crop (then resized to ``views.image_size``) and a random horizontal flip, drawn from
  a generator seeded by (seed, position in the global stream): the same on any number of
  processes or workers. Batches may straddle epochs; the last partial one is dropped.

  Multi-crop (SwAV, DINO): with ``views.num_local_crops`` = L > 0 each example also gets L
  local views, independent random resized crops resized to ``views.local_crop_size`` and
  flipped as the global views, drawn from the same generator after the global views (which
  do not change with L).

  Args:
    source: a random-access source of {"image": uint8 (H, W, 3), "label": int32} (sources.py).
    views: how the views are cut (``views.ViewSpec``).
    **stream: how the records are dealt out, ``StreamSpec``'s fields: ``seed`` and
      ``global_batch_size``, and optionally ``process_index``, ``process_count``,
      ``num_workers``, ``num_epochs`` and ``read_threads``.

  Returns:
    A grain DatasetIterator of {"view_a": uint8 (b, S, S, 3), "view_b": uint8 (b, S, S, 3),
    "label": int32 (b,), "aug_seed": int32 (b,)}, and with L > 0 "local_views": uint8
    (b, L, s, s, 3); b = global_batch_size // process_count. With get_state/set_state.

  Raises:
    ValueError: the global batch does not split evenly over the processes, a process's share
      of an epoch is smaller than one batch, or an argument is out of range.
  """
  return augmented_batches(source, TwoViews(views), views, StreamSpec(**stream), kind="pretrain")


def augmented_batches(
  source: Any,
  transform: grain.transforms.RandomMap,
  views: views_lib.ViewSpec,
  stream: StreamSpec,
  *,
  kind: str,
  signature: dict[str, Any] | None = None,
  batch_fn: Callable[[list[Any]], Any] | None = None,
) -> BatchIterator:
  """The stream every training iterator shares: shuffle, ``transform``, shard, batch.

  Each epoch is a global shuffle of ``source`` (from ``stream.seed``); ``transform`` (a grain
  random map cutting ``views``: crops, captions) runs before sharding, so a record's rng
  depends on its global stream position only. The epochs follow each other in one stream,
  cut into global batches of ``stream.global_batch_size`` (B) positions; process i reads the
  i-th block of B / process_count positions of each. Global batch k is therefore the same
  examples in the same order on any number of processes, and a state saved by one process
  count continues the stream on another (``remap_state``). The iterator's state
  carries a signature of these settings (``kind`` names the iterator; ``signature`` adds
  its own fields, or replaces some), and refuses a state saved under others. ``batch_fn``
  makes a batch of records (default: grain's, stacking each entry).

  Raises:
    ValueError: the source is smaller than one global batch.
  """
  if len(source) < stream.global_batch_size:
    raise ValueError(
      f"{len(source)} examples are fewer than one global batch of {stream.global_batch_size}"
    )
  ds = grain.MapDataset.source(source).seed(stream.seed).shuffle()
  # Augment before sharding: the record's rng then depends on its global stream position.
  ds = ds.random_map(transform)
  # The repeat passes each epoch's index up, so every epoch is reshuffled. Blocks of b
  # consecutive positions, every process_count-th from this process's: the i-th block of
  # each global batch.
  ds = ds.repeat(stream.num_epochs).batch(stream.batch_size, drop_remainder=True, batch_fn=batch_fn)
  if stream.num_epochs is not None:  # Whole global batches only: each process as many.
    ds = ds[: len(ds) - len(ds) % stream.process_count]
  ds = ds[stream.process_index :: stream.process_count]
  full_signature = state_signature(kind, source, **stream.signature(), **views.signature())
  full_signature |= signature or {}
  return BatchIterator(ds, full_signature, stream.num_workers, stream.read_threads)


def create_eval_iterator(
  source: Any,
  *,
  batch_size: int,
  image_size: int,
  process_index: int = 0,
  process_count: int = 1,
  num_workers: int = 0,
  crop_fraction: float = 0.875,
  read_threads: int | None = None,
) -> BatchIterator:
  """Returns an iterator over the whole source once, in order, one centre view per example.

  Process p reads the p-th contiguous block of ceil(len(source) / process_count) examples.
  Every process yields the same number of batches; rows past the end are padding (zeros,
  label -1, index -1) with mask False.

  Args:
    source: a random-access source (sources.py).
    batch_size: examples per step over all processes (split evenly over processes).
    image_size: side S of the square images.
    process_index: this process.
    process_count: number of processes.
    num_workers: grain worker processes.
    crop_fraction: side of the centre square crop as a fraction of the shorter side, before
      resizing (0.875: ImageNet's usual 224 of 256), but never fewer than image_size pixels,
      so images no larger than image_size (CIFAR, Fashion-MNIST) are used whole.
    read_threads: threads building batches, per worker (or in this process); default 2.

  Returns:
    A grain DatasetIterator of {"image": uint8 (b, S, S, 3), "label": int32 (b,),
    "mask": bool (b,), "index": int32 (b,) (the source index)}.

  Raises:
    ValueError: the batch does not split evenly over the processes, or bad arguments.
  """
  local_batch = _per_process_batch(batch_size, process_index, process_count)
  _check_workers(num_workers)
  if not 0.0 < crop_fraction <= 1.0:
    raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
  per_process = -(-len(source) // process_count)
  start = min(len(source), process_index * per_process)
  stop = min(len(source), start + per_process)
  steps = max(1, -(-per_process // local_batch))
  view = CentreView(source, image_size, crop_fraction, start, stop)
  ds = grain.MapDataset.range(steps * local_batch).map(view).batch(local_batch)
  signature = state_signature(
    "eval",
    source,
    batch_size=int(batch_size),
    image_size=int(image_size),
    process_index=int(process_index),
    process_count=int(process_count),
    crop_fraction=float(crop_fraction),
  )
  return BatchIterator(ds, signature, num_workers, read_threads)
