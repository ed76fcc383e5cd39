"""The decode-only host path: JPEG -> a fixed canvas on the host, every crop on the device.

On ImageNet-size photos the host's crops cost more than its decoding: Pillow's two
antialiased bicubic resizes per image take longer than the decode itself, and a host core
then feeds about 200-270 images/s. Here the host only decodes (with libjpeg-turbo through
``simplejpeg``), draws each view's crop box and flip from the record's generator exactly as
the host path does (``pipeline.random_box_and_flip``), and ships the decoded image in a
fixed ``canvas x canvas`` slot of the batch with the boxes: packed (rows of the image's own
width), because JPEGs decode straight into the batch (``CanvasBatch``), so the host never
copies an image. Inside the compiled step ``views_from_canvas`` unpacks the rows, then
cuts, resizes (Pillow's bicubic, ``crops.py``) and flips every view, multi-crop's local
views too::

  host:   header -> sizes, boxes, flips (CanvasViews) -> decode into the batch (CanvasBatch)
          -> {"canvas", "image_hw", "boxes", "flips", "label", "aug_seed"}
  device: views_from_canvas(batch, views) -> {"view_a", "view_b"[, "local_views"], ...}

One host core so feeds about 4.5x the images of Pillow's decode-and-crop (docs/benchmarks.md).

Decoding. ``simplejpeg`` with its exact settings (``fastdct=False, fastupsample=False``)
gives Pillow's pixels bit for bit on the photos measured (docs/benchmarks.md) at about 1.4x
its speed. An image larger than the canvas is shrunk while decoding by libjpeg's DCT scaling
(factors k/8), which costs nothing extra; one still larger than 8 canvases, and any image
that is not a JPEG (PNG, a JPEG that libjpeg-turbo refuses, arrays from sources that hold
decoded pixels) goes through Pillow and is resized down to fit when needed. CMYK JPEGs
(ImageNet has a few) libjpeg-turbo converts to RGB itself, within one level of Pillow's
conversion.

``fast_dct`` (``data.jpeg_fast_dct``, off by default) takes libjpeg-turbo's fast integer DCT
and merged upsampling instead. On a 2-core AMD EPYC (AVX-512) the decode alone was about 10%
faster on the benchmark's 500x375 photos (8% for the whole path) and no faster on CIFAR-10's
32x32 JPEGs (0.88-1.06x); pixels moved by up to 42 levels (mean 1.6) on those photos and up
to 91 (mean 1.7) over CIFAR-10's train split, the large moves at sharp colour edges of 4:2:0
JPEGs, whose chroma the merged upsampling does not interpolate. DCT-scaled decodes (images
larger than the canvas) move little (measured on a photo: not at all at 6/8, at most 2
levels at 4/8): libjpeg-turbo's reduced-size IDCTs have no fast variant.

Resuming. A record's boxes, flips and ``aug_seed`` are drawn from the same per-record
generator as ``pipeline.TwoViews``, in the same order, so a batch depends on the seed and its
place in the stream only, and the iterator's state is the next batch number (as the host
path's). For an image that fits the canvas, the views equal the host path's views of the same
seed up to the roundings ``crops.py`` describes.

What the canvas costs: ``canvas^2 * 3`` bytes per image to the device (786 KB at 512, against
301 KB for two 224-pixel views), which the benchmark's ``host_jpeg`` rows state per image,
and on the device two separable resize passes per view over the canvas (0.5 GFLOP for a
224-pixel view from 512).
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cljax.data import crops, images, pipeline
from cljax.data import views as views_lib

# JPEG files start with the SOI marker.
_JPEG_MAGIC = b"\xff\xd8"
# libjpeg's DCT scaling factors are k/8, k = 1..8 (shrinking only, here).
_DCT_EIGHTHS = range(8, 0, -1)
# The batch entries of this path that ``views_from_canvas`` replaces by views.
CANVAS_KEYS = ("canvas", "image_hw", "boxes", "flips")
# A record's entries that CanvasBatch writes into the canvas rather than stacking.
_RECORD_ONLY = ("image", "encoded", "what")


def _scaled(length: int, eighths: int) -> int:
  # libjpeg's scaled size: ceil(length * k / 8).
  return -(-length * eighths // 8)


def dct_eighths(height: int, width: int, canvas: int) -> int:
  """The largest libjpeg scale k/8 (k = 8..1) at which the image fits the canvas (0: none)."""
  for k in _DCT_EIGHTHS:
    if _scaled(height, k) <= canvas and _scaled(width, k) <= canvas:
      return k
  return 0


def _fit(image: np.ndarray, canvas: int) -> np.ndarray:
  """``image`` shrunk with Pillow (bicubic, antialiased) to fit the canvas, aspect kept."""
  height, width = image.shape[:2]
  if height <= canvas and width <= canvas:
    return image
  scale = canvas / max(height, width)
  size = (max(1, min(canvas, round(width * scale))), max(1, min(canvas, round(height * scale))))
  return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))


def _buffer(data: bytes | np.ndarray) -> bytes | memoryview:
  return memoryview(data).cast("B") if isinstance(data, np.ndarray) else data


def _header_size(buffer: Any) -> tuple[int, int] | None:
  """A JPEG's (height, width) from its header; None for anything else or a header refused."""
  import simplejpeg  # A compiled extension: imported where it is used.

  if bytes(buffer[:2]) != _JPEG_MAGIC:
    return None
  try:
    height, width, _, _ = simplejpeg.decode_jpeg_header(buffer)
  except ValueError:
    return None
  return height, width


def _fitting_size(height: int, width: int, canvas: int) -> tuple[int, int] | None:
  k = dct_eighths(height, width, canvas)
  return (_scaled(height, k), _scaled(width, k)) if k else None


def jpeg_size(data: bytes | np.ndarray, canvas: int) -> tuple[int, int] | None:
  """The (height, width) libjpeg-turbo decodes a JPEG to, DCT-scaled by the largest k/8 that
  fits the canvas, from its header alone; None for anything else (not a JPEG, a header
  libjpeg-turbo refuses, an image larger than 8 canvases), which ``decode`` handles."""
  size = _header_size(_buffer(data))
  return None if size is None else _fitting_size(*size, canvas)


def _decode_jpeg(
  buffer: Any, height: int, width: int, out: np.ndarray | None = None, fast_dct: bool = False
):
  import simplejpeg

  # min_height/width make simplejpeg pick the smallest k/8 scale giving at least that size;
  # exact DCT and upsampling give Pillow's pixels, the fast ones trade them for speed.
  return simplejpeg.decode_jpeg(
    buffer,
    colorspace="RGB",
    fastdct=fast_dct,
    fastupsample=fast_dct,
    min_height=height,
    min_width=width,
    buffer=out,
  )


def decode(
  data: bytes | np.ndarray, canvas: int, what: str = "image", fast_dct: bool = False
) -> np.ndarray:
  """Decodes an encoded image to (h, w, 3) uint8 RGB no larger than ``canvas`` on a side.

  JPEGs decode with libjpeg-turbo (``simplejpeg``; exact DCT and upsampling: Pillow's
  pixels, unless ``fast_dct``), DCT-scaled by the largest k/8 that fits (``jpeg_size``);
  anything else, or a JPEG libjpeg-turbo refuses, goes through Pillow
  (``images.decode_image``), then shrinks to fit.

  Raises:
    ValueError: the bytes are not an image (naming ``what``).
  """
  buffer = _buffer(data)
  if header := _header_size(buffer):
    # Larger than 8 canvases: decoded at 1/8, then shrunk by _fit.
    size = _fitting_size(*header, canvas) or (_scaled(header[0], 1), _scaled(header[1], 1))
    try:
      return _fit(_decode_jpeg(buffer, *size, fast_dct=fast_dct), canvas)
    except ValueError:
      pass  # Pillow below decodes what libjpeg-turbo's RGB path does not, or says why not.
  return _fit(images.decode_image(bytes(buffer), what), canvas)


def decode_into(
  data: bytes | np.ndarray,
  out: np.ndarray,
  size: tuple[int, int],
  what: str,
  fast_dct: bool = False,
):
  """Decodes a JPEG of ``jpeg_size`` ``size`` straight into ``out[: h * w * 3]`` (flat).

  A JPEG whose body libjpeg-turbo then refuses goes through ``decode`` (Pillow), resized to
  ``size`` if it came out otherwise, so the views drawn for ``size`` stay inside it.
  ``fast_dct``: libjpeg-turbo's fast DCT and upsampling (the module's docstring).
  """
  height, width = size
  target = out[: height * width * 3]
  try:
    decoded = _decode_jpeg(_buffer(data), height, width, target, fast_dct)
    if decoded.shape[:2] == (height, width):
      return
  except ValueError:
    pass  # A body libjpeg-turbo refuses (its header was fine): Pillow below, or its error.
  image = decode(data, max(size), what, fast_dct)
  if image.shape[:2] != (height, width):
    image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))
  target[:] = image.reshape(-1)


class _WorkerCanvas(grain.multiprocessing.SharedMemoryArray):
  """A batch's canvas in shared memory, made in a grain worker: the worker owns (unlinks) the
  block until grain hands it to the main process, which then owns it.

  grain sends a shared-memory leaf as its ``metadata`` (the block's name) and the receiver
  unlinks it once used, or when it clears its queue. A batch the worker made but never sent
  (its prefetch buffer, when the iterator closes) had no owner: its block outlived the run
  and Python's resource tracker warned of it at exit. Asking for the metadata is the hand-over.
  """

  @property
  def metadata(self):
    self._unlink_on_del = False  # The receiver unlinks it from now on.
    return super().metadata


class CanvasBatch:
  """grain's batch function for this path: every image written once, packed, into its slot of
  one zeroed ``(b, canvas, canvas, 3)`` array; the other entries stacked.

  Packed: the slot's first ``h * w * 3`` bytes are the (h, w, 3) image with rows of ``w``
  pixels, not ``canvas`` (``unpack`` restores the rows on the device). So JPEGs decode
  straight into the batch (``decode_into``), and an image is never copied on the host.
  """

  def __init__(self, canvas: int, shared_memory: bool = False, fast_dct: bool = False):
    """Args: canvas: the canvas side; shared_memory: make each batch's canvas in shared
    memory, which the main process maps instead of receiving a copy (as grain's own batching
    does in workers). Only for batches made in grain worker processes (grain 0.2.18's
    ``mp_prefetch`` after ``to_iter_dataset`` never calls a batch function's
    ``enable_shared_memory_output`` hook, so the iterator sets this); fast_dct: decode with
    libjpeg-turbo's fast DCT and upsampling (the module's docstring)."""
    self.canvas = canvas
    self.shared_memory = shared_memory
    self.fast_dct = fast_dct

  def __call__(self, records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    shape = (len(records), self.canvas, self.canvas, 3)
    # Both come from the OS as zero pages (a new shared memory block is zero-filled): only
    # what is written costs.
    if self.shared_memory:
      canvas = _WorkerCanvas(shape, np.uint8)
      canvas.unlink_on_del()  # Until handed over (_WorkerCanvas).
    else:
      canvas = np.zeros(shape, np.uint8)
    for slot, record in zip(canvas.reshape(len(records), -1), records, strict=True):
      if "encoded" in record:
        size = tuple(record["image_hw"])
        decode_into(record["encoded"], slot, size, record["what"], self.fast_dct)
      else:
        slot[: record["image"].size] = record["image"].reshape(-1)
    batch = {"canvas": canvas}
    for key in records[0]:
      if key not in _RECORD_ONLY:
        batch[key] = np.stack([record[key] for record in records])
    return batch


class EncodedRecords:
  """A source seen as its encoded records: ``{"encoded": bytes, "label"}`` where the source
  can give its files' bytes (``source.encoded(i)``: JPEG folders, encoded npz, tfds, prepared
  copies), else its decoded ``{"image", "label"}`` (arrays, synthetic data)."""

  def __init__(self, source: Any):
    self.source = source
    # A source may have the method but not the bytes (ArraySource of decoded arrays).
    self._encoded = callable(getattr(source, "encoded", None)) and getattr(
      source, "is_encoded", True
    )

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if self._encoded:
      data, label = self.source.encoded(index)
      return {"encoded": data, "label": np.int32(label), "index": int(index)}
    return dict(self.source[index])

  def __repr__(self) -> str:
    return f"EncodedRecords({self.source!r})"


class CanvasViews(grain.transforms.RandomMap):
  """Record -> its image on a canvas, its true size, and every view's box and flip.

  Draws from the record's generator in ``pipeline.TwoViews``'s order: view a's box and flip,
  view b's, ``aug_seed``, then each local view's; the boxes are those of the decoded image
  (the original, unless it was shrunk to fit the canvas).
  """

  def __init__(self, views: views_lib.ViewSpec, canvas: int, fast_dct: bool = False):
    self.views, self.canvas, self.fast_dct = views, canvas, fast_dct

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    encoded = element.get("encoded")
    size = None if encoded is None else jpeg_size(encoded, self.canvas)
    if size:  # A JPEG: decoded later, straight into the batch (CanvasBatch).
      out = {"encoded": encoded, "what": f"record {element['index']}"}
    elif encoded is not None:
      out = {"image": decode(encoded, self.canvas, f"record {element['index']}", self.fast_dct)}
    else:
      out = {"image": _fit(element["image"], self.canvas)}
    height, width = size or out["image"].shape[:2]
    v = self.views
    draw = lambda *settings: pipeline.random_box_and_flip(height, width, rng, *settings)
    draws = [draw(v.crop_area, v.crop_aspect, v.flip) for _ in range(2)]
    aug_seed = np.int32(rng.integers(0, 2**31 - 1))
    for _ in range(v.num_local_crops):
      draws.append(draw(v.local_crop_area, v.crop_aspect, v.flip))
    return out | {
      "image_hw": np.array([height, width], np.int32),
      "boxes": np.array([box for box, _ in draws], np.int32),
      "flips": np.array([flipped for _, flipped in draws], bool),
      "label": np.int32(element["label"]),
      "aug_seed": aug_seed,
    }


def create_canvas_iterator(
  source: Any, views: views_lib.ViewSpec, *, canvas: int, fast_dct: bool = False, **stream: Any
) -> pipeline.BatchIterator:
  """This process's iterator of decode-only batches; the step cuts the views.

  The stream (order, sharding over processes, per-record generators) is
  ``pipeline.create_pretrain_iterator``'s; the arguments mean what they mean there.

  Args:
    canvas: side of the square canvas each image is placed in; larger images are shrunk
      to fit (by DCT scaling for JPEGs). 512 holds ImageNet's usual 500x375 whole.
    fast_dct: decode JPEGs with libjpeg-turbo's fast DCT and upsampling
      (``data.jpeg_fast_dct``): about 10% faster on ImageNet-size JPEGs, pixels 1.6-1.7
      levels off on average, at most 91 (the module's docstring). The boxes, flips and
      stream do not change.

  Returns:
    A grain iterator of {"canvas": uint8 (b, C, C, 3), "image_hw": int32 (b, 2),
    "boxes": int32 (b, V, 4), "flips": bool (b, V), "label", "aug_seed": int32 (b,)},
    V = 2 + ``views.num_local_crops``. ``views_from_canvas`` turns it into the host path's
    batch, inside the step.

  Raises:
    ValueError: as ``create_pretrain_iterator``, or a canvas smaller than a view.
  """
  if canvas < 1:
    raise ValueError(f"data.canvas_size must be >= 1, got {canvas}")
  spec = pipeline.StreamSpec(**stream)
  return pipeline.augmented_batches(
    EncodedRecords(source),
    CanvasViews(views, canvas, fast_dct),
    views,
    spec,
    kind="pretrain_canvas",
    # Named after the source, not the EncodedRecords wrapping it.
    signature={"source": pipeline.source_name(source), "canvas_size": int(canvas)},
    # Worker processes build batches straight in shared memory (see CanvasBatch).
    batch_fn=CanvasBatch(canvas, shared_memory=spec.num_workers > 0, fast_dct=fast_dct),
  )


def views_from_canvas(batch: dict[str, jax.Array], views: views_lib.ViewSpec) -> dict:
  """A decode-only batch as the host path's batch: every view cut, resized and flipped here.

  Runs on the device, inside the step (jit or shard_map alike). A batch without a canvas
  (host crops, device-resident data) is returned unchanged.

  Args:
    batch: {"canvas": uint8 (b, C, C, 3), "boxes": (b, V, 4), "flips": (b, V), ...}.
    views: the run's views (their sizes; the areas and aspects were drawn on the host).

  Returns:
    The batch with "view_a", "view_b": uint8 (b, S, S, 3), "local_views": (b, L, s, s, 3)
    when L > 0, and the other entries ("label", "aug_seed") as they were.
  """
  if "canvas" not in batch:
    return batch
  out = {k: x for k, x in batch.items() if k not in CANVAS_KEYS}
  canvas = unpack(batch["canvas"], batch["image_hw"][:, 1])
  boxes, flips = batch["boxes"], batch["flips"]
  pair = crops.crop_views(canvas, boxes[:, :2], flips[:, :2], views.image_size)
  out["view_a"], out["view_b"] = pair[:, 0], pair[:, 1]
  if boxes.shape[1] > 2:
    out["local_views"] = crops.crop_views(canvas, boxes[:, 2:], flips[:, 2:], views.local_crop_size)
  return out


def unpack(canvas: jax.Array, widths: jax.Array) -> jax.Array:
  """Packed canvases (``CanvasBatch``) -> each image in the top-left corner of its canvas.

  Row y of an image of width w starts at byte ``3 * w * y`` of its slot; each output row is
  the ``canvas`` pixels from there. What lies right of or below the image is other rows'
  pixels or zeros, which no crop reads (``crops.crop_views``' weights stay inside a box).

  Args:
    canvas: (b, C, C, 3) uint8, packed.
    widths: (b,) int32, the images' widths.

  Returns:
    (b, C, C, 3) uint8.
  """
  b, side = canvas.shape[0], canvas.shape[1]
  flat = canvas.reshape(b, side * side * 3)
  starts = jnp.arange(side, dtype=jnp.int32)[None, :] * (3 * widths.astype(jnp.int32))[:, None]
  row = lambda f, start: jax.lax.dynamic_slice(f, (start,), (side * 3,))
  rows = jax.vmap(jax.vmap(row, in_axes=(None, 0)))(flat, starts)
  return rows.reshape(b, side, side, 3)


def create_host_iterator(
  source: Any,
  views: views_lib.ViewSpec,
  *,
  crop_on_device: bool,
  canvas: int,
  jpeg_fast_dct: bool = False,
  **kwargs: Any,
) -> pipeline.BatchIterator:
  """The host's training batches: decoded and cropped there (``pipeline``), or with
  ``crop_on_device`` decoded onto a canvas for the step to crop (``create_canvas_iterator``,
  with libjpeg-turbo's fast DCT and upsampling if ``jpeg_fast_dct``; the host path decodes
  with Pillow, exactly, either way).

  ``kwargs`` are ``pipeline.create_pretrain_iterator``'s (seed, batch, processes, workers).
  """
  if crop_on_device:
    return create_canvas_iterator(source, views, canvas=canvas, fast_dct=jpeg_fast_dct, **kwargs)
  return pipeline.create_pretrain_iterator(source, views, **kwargs)
