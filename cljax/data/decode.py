"""The decode-only host path: JPEG -> a fixed canvas on the host, every crop on the device.

On ImageNet-size photos the host's crops cost more than its decoding: Pillow's two
antialiased bicubic resizes per image take longer than the decode itself, and a host core
then feeds about 240 images/s. Here the host only decodes (with libjpeg-turbo through
``simplejpeg``), draws each view's crop box and flip from the record's generator exactly as
the host path does (``pipeline.random_box_and_flip``), and ships the decoded image in a
fixed ``canvas x canvas`` array with the boxes. Inside the compiled step
``views_from_canvas`` cuts, resizes (Pillow's bicubic, ``crops.py``) and flips every view,
multi-crop's local views too::

  host:   bytes -> decode_to_canvas -> {"canvas", "image_hw", "boxes", "flips", "aug_seed"}
  device: views_from_canvas(batch, views) -> {"view_a", "view_b"[, "local_views"], ...}

Decoding. ``simplejpeg`` with its exact settings (``fastdct=False, fastupsample=False``)
gives Pillow's pixels bit for bit on the photos measured (docs/benchmarks.md) at about 1.4x
its speed; the fast settings gain about 13% more but move pixels by up to 37 levels (about
1.5 on average), so they are not used. An image larger than the canvas is shrunk while
decoding by libjpeg's DCT scaling (factors k/8), which costs nothing extra; one still larger
than 8 canvases, and any image that is not a JPEG (PNG, a JPEG that libjpeg-turbo refuses,
arrays from sources that hold decoded pixels) goes through Pillow and is resized down to fit
when needed. CMYK JPEGs (ImageNet has a few) libjpeg-turbo converts to RGB itself, within one
level of Pillow's conversion.

Resuming. A record's boxes, flips and ``aug_seed`` are drawn from the same per-record
generator as ``pipeline.TwoViews``, in the same order, so a batch depends on the seed and its
place in the stream only, and the iterator's state is the next batch number (as the host
path's). For an image that fits the canvas, the views equal the host path's views of the same
seed up to the roundings ``crops.py`` describes.

What the canvas costs: ``canvas^2 * 3`` bytes per image to the device (786 KB at 512, against
301 KB for two 224-pixel views), which the benchmark's ``host_jpeg`` rows state per image.
"""

from __future__ import annotations

from typing import Any

import grain
import jax
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


def decode(data: bytes | np.ndarray, canvas: int, what: str = "image") -> np.ndarray:
  """Decodes an encoded image to (h, w, 3) uint8 RGB no larger than ``canvas`` on a side.

  JPEGs decode with libjpeg-turbo (``simplejpeg``, exact DCT and upsampling: Pillow's
  pixels), DCT-scaled by the largest k/8 that fits; anything else, or a JPEG libjpeg-turbo
  refuses, goes through Pillow (``images.decode_image``).

  Raises:
    ValueError: the bytes are not an image (naming ``what``).
  """
  import simplejpeg  # A compiled extension: imported where it is used.

  buffer = memoryview(data).cast("B") if isinstance(data, np.ndarray) else data
  if bytes(buffer[:2]) == _JPEG_MAGIC:
    try:
      height, width, _, _ = simplejpeg.decode_jpeg_header(buffer)
      k = dct_eighths(height, width, canvas)
      # min_height/width make simplejpeg pick the smallest scale giving at least that size:
      # exactly k/8 here (8/8 decodes at full size; k = 0 decodes at 1/8 and _fit shrinks).
      k = k or 1
      image = simplejpeg.decode_jpeg(
        buffer,
        colorspace="RGB",
        fastdct=False,
        fastupsample=False,
        min_height=_scaled(height, k),
        min_width=_scaled(width, k),
      )
      return _fit(image, canvas)
    except ValueError:
      pass  # Pillow below decodes what libjpeg-turbo's RGB path does not, or says why not.
  return _fit(images.decode_image(bytes(buffer), what), canvas)


def place(image: np.ndarray, canvas: int) -> np.ndarray:
  """``image`` (h, w, 3), h and w <= canvas, in the top-left corner of a zero canvas."""
  out = np.zeros((canvas, canvas, 3), np.uint8)
  out[: image.shape[0], : image.shape[1]] = image
  return out


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

  def __init__(self, views: views_lib.ViewSpec, canvas: int):
    self.views, self.canvas = views, canvas

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if "encoded" in element:
      what = f"record {element['index']}"
      image = decode(element["encoded"], self.canvas, what)
    else:
      image = _fit(element["image"], self.canvas)
    height, width = image.shape[:2]
    v = self.views
    draw = lambda *settings: pipeline.random_box_and_flip(height, width, rng, *settings)
    draws = [draw(v.crop_area, v.crop_aspect, v.flip) for _ in range(2)]
    aug_seed = np.int32(rng.integers(0, 2**31 - 1))
    for _ in range(v.num_local_crops):
      draws.append(draw(v.local_crop_area, v.crop_aspect, v.flip))
    return {
      "canvas": place(image, self.canvas),
      "image_hw": np.array([height, width], np.int32),
      "boxes": np.array([box for box, _ in draws], np.int32),
      "flips": np.array([flipped for _, flipped in draws], bool),
      "label": np.int32(element["label"]),
      "aug_seed": aug_seed,
    }


def create_canvas_iterator(
  source: Any,
  views: views_lib.ViewSpec,
  *,
  canvas: int,
  seed: int,
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  num_workers: int = 0,
  num_epochs: int | None = None,
  read_threads: int | None = None,
) -> pipeline.BatchIterator:
  """This process's iterator of decode-only batches; the step cuts the views.

  The stream (order, sharding over processes, per-record generators) is
  ``pipeline.create_pretrain_iterator``'s; the arguments mean what they mean there.

  Args:
    canvas: side of the square canvas each image is placed in; larger images are shrunk
      to fit (by DCT scaling for JPEGs). 512 holds ImageNet's usual 500x375 whole.

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
  return pipeline.augmented_batches(
    EncodedRecords(source),
    CanvasViews(views, canvas),
    views,
    kind="pretrain_canvas",
    seed=seed,
    global_batch_size=global_batch_size,
    process_index=process_index,
    process_count=process_count,
    num_workers=num_workers,
    num_epochs=num_epochs,
    read_threads=read_threads,
    signature={"source": f"{type(source).__name__}[{len(source)}]", "canvas_size": int(canvas)},
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
  canvas, boxes, flips = batch["canvas"], batch["boxes"], batch["flips"]
  pair = crops.crop_views(canvas, boxes[:, :2], flips[:, :2], views.image_size)
  out["view_a"], out["view_b"] = pair[:, 0], pair[:, 1]
  if boxes.shape[1] > 2:
    out["local_views"] = crops.crop_views(canvas, boxes[:, 2:], flips[:, 2:], views.local_crop_size)
  return out


def canvas_bytes(canvas: int) -> int:
  """Bytes one image's canvas sends to the device (its boxes and flips add < 100)."""
  return canvas * canvas * 3


def create_host_iterator(
  source: Any,
  views: views_lib.ViewSpec,
  *,
  crop_on_device: bool,
  canvas: int,
  **kwargs: Any,
) -> pipeline.BatchIterator:
  """The host's training batches: decoded and cropped there (``pipeline``), or with
  ``crop_on_device`` decoded onto a canvas for the step to crop (``create_canvas_iterator``).

  ``kwargs`` are ``pipeline.create_pretrain_iterator``'s (seed, batch, processes, workers).
  """
  if crop_on_device:
    return create_canvas_iterator(source, views, canvas=canvas, **kwargs)
  return pipeline.create_pretrain_iterator(source, views, **kwargs)
