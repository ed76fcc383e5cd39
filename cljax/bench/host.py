"""Host input-path throughput on ImageNet-size JPEGs through grain workers: Pillow's decode and
crops (the reference path) against libjpeg-turbo's decode onto a canvas (crops on the device)."""

from __future__ import annotations

import io
import os
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from cljax import run as run_lib
from cljax.bench import timing
from cljax.data import decode, sources, views

_BICUBIC = Image.Resampling.BICUBIC


def host_cores() -> int:
  """CPU cores this process may run on."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def photo_jpegs(
  num_images: int, height: int = 375, width: int = 500, quality: int = 90, seed: int = 0
) -> sources.EncodedImages:
  """ImageNet-size JPEGs of real photographs, encoded in memory.

  Each is a random ``width``:``height`` crop of one of scikit-learn's two sample
  photographs (427x640, shipped with it) covering 40-100% of the largest such crop, maybe
  mirrored, resized with Pillow's bicubic to ``height`` x ``width`` and encoded at
  ``quality``: real photo statistics, all different.

  Args:
    num_images: how many.
    height: image height (ImageNet's most common: 375).
    width: image width (ImageNet's most common: 500).
    quality: JPEG quality.
    seed: for the crops and flips.

  Returns:
    The encoded images, for ``sources.ArraySource``.
  """
  from sklearn.datasets import load_sample_images  # Only the benchmark needs the photos.

  photos = load_sample_images().images
  rng = np.random.default_rng(seed)
  blobs = []
  for i in range(num_images):
    photo = photos[i % len(photos)]
    full_h = min(photo.shape[0], photo.shape[1] * height // width)
    crop_h = int(full_h * np.sqrt(rng.uniform(0.4, 1.0)))
    crop_w = crop_h * width // height
    top = rng.integers(0, photo.shape[0] - crop_h + 1)
    left = rng.integers(0, photo.shape[1] - crop_w + 1)
    image = Image.fromarray(photo[top : top + crop_h, left : left + crop_w])
    if rng.random() < 0.5:
      image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    image.resize((width, height), _BICUBIC).save(buf, "JPEG", quality=quality)
    blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
  offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])])
  return sources.EncodedImages(np.concatenate(blobs), offsets)


# ImageNet's training split: the benchmark's photos are served as a source of this length.
IMAGENET_TRAIN_RECORDS = 1_281_167


class CycledSource:
  """``source``'s records repeated to ``length`` records: record i is record i mod len(source).

  So a few hundred photos stand for a data set of ImageNet's length, as grain sees it: its
  global shuffle walks cycles of a block cipher over at least 2^16 indices, which costs
  about 115 us per record on a 256-record source and 5 us on ImageNet's 1.28M (2-core AMD
  EPYC), a cost a real data set does not pay.
  """

  def __init__(self, source: sources.ArraySource, length: int):
    self.source, self.length = source, length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> Any:
    return self.source[index % len(self.source)]

  def encoded(self, index: int) -> tuple[np.ndarray, np.int32]:
    """The encoded bytes and label of record ``index`` (``decode.EncodedRecords``)."""
    return self.source.encoded(index % len(self.source))

  @property
  def is_encoded(self) -> bool:
    return self.source.is_encoded

  def __repr__(self) -> str:
    return f"CycledSource({self.source!r}, length={self.length})"


# The host paths ``host_jpeg`` compares: Pillow decodes and crops (``pipeline``), or
# libjpeg-turbo decodes onto a canvas and the step crops (``decode``).
HOST_PATHS = ("pil_crops", "decode_only")


def bench_host_jpeg(
  *,
  worker_counts: Sequence[int],
  windows: int,
  paths: Sequence[str] = HOST_PATHS,
  num_images: int = 256,
  num_records: int = IMAGENET_TRAIN_RECORDS,
  height: int = 375,
  width: int = 500,
  image_size: int = 224,
  canvas_size: int = 512,
  batch_size: int = 64,
  fast_dct: bool = False,
  warmup_s: float = 3.0,
  window_s: float = 2.0,
) -> list[dict[str, Any]]:
  """Each host path through grain on the same photo JPEGs, one row per path and worker count.

  ``pil_crops`` decodes with Pillow and cuts two random-resized crops per image on the host
  (the reference path); ``decode_only`` decodes with libjpeg-turbo onto a
  ``canvas_size``-square canvas and draws the two crops' boxes and flips, which the step
  cuts on the device (``data.crop_on_device``). For each worker count the paths run one
  after the other, each from a fresh iterator, so that no other iterator's workers run
  during a window. Every process reads with one thread, so that it is one core at most (both
  decoders release the GIL, so more threads would use more cores): ``num_workers=0`` runs in
  this process, one core; with workers ``cores_used = min(workers, host cores)``, the main
  process (which only maps the workers' batches) not counted. Pin the process to one core
  (``taskset -c 0``) for a per-core figure free of other processes' noise.

  Args:
    worker_counts: grain worker processes to measure, e.g. (0, 16).
    windows: timed windows per path and count (median reported).
    paths: any of ``HOST_PATHS``; rows after the first carry their ratio to it.
    num_images: distinct JPEGs (``photo_jpegs``).
    num_records: the length of the source they are served as (``CycledSource``; default
      ImageNet's), so that grain's per-record shuffle costs what it costs on a data set of
      that length.
    height: their height.
    width: their width.
    image_size: the views' side.
    canvas_size: the decode-only path's canvas side.
    batch_size: images per batch.
    fast_dct: the decode-only path decodes with libjpeg-turbo's fast DCT and upsampling
      (``data.jpeg_fast_dct``).
    warmup_s: untimed seconds first (workers start, buffers fill).
    window_s: seconds per window at least.

  Returns:
    ``host_jpeg`` rows, with ``bytes_to_device_per_image``: the bytes of a batch's arrays
    that the training loop sends to the devices, per image.

  Raises:
    ValueError: an unknown path.
  """
  if bad := set(paths) - set(HOST_PATHS):
    raise ValueError(f"unknown host paths {sorted(bad)}; known: {HOST_PATHS}")
  encoded = photo_jpegs(num_images, height, width)
  photos = sources.ArraySource(encoded, np.zeros(num_images, np.int32), origin="photo_jpeg")
  source = CycledSource(photos, max(num_records, num_images))
  kb = float(np.diff(encoded.offsets).mean()) / 1e3
  spec = views.ViewSpec(image_size)
  rows = []
  for workers in worker_counts:
    for path in paths:
      it = decode.create_host_iterator(
        source,
        spec,
        crop_on_device=path == "decode_only",
        canvas=canvas_size,
        jpeg_fast_dct=fast_dct,
        seed=0,
        global_batch_size=batch_size,
        num_workers=workers,
        read_threads=1,
      )
      first = next(it)
      sent = sum(first[k].nbytes for k in run_lib.BATCH_KEYS if k in first) / batch_size
      result = timing.time_iterator(
        it, windows=windows, warmup_s=warmup_s, window_s=window_s, desc=f"{path} x{workers}"
      )
      it.close()
      used = 1 if workers == 0 else min(workers, host_cores())
      rates = [batch_size * r for r in result["steps_per_s"]]
      images_per_s = statistics.median(rates)
      row = {
        "part": "host_jpeg",
        "path": path,
        "source_hw": [height, width],
        "jpeg_kb_mean": round(kb, 1),
        "num_records": len(source),
        "image_size": image_size,
        "canvas_size": canvas_size if path == "decode_only" else None,
        "jpeg_fast_dct": fast_dct if path == "decode_only" else None,
        "num_workers": workers,
        "cores_used": used,
        "images_per_s": round(images_per_s, 2),
        "views_per_s": round(2 * images_per_s, 2),
        "images_per_s_per_core": round(images_per_s / used, 2),
        "bytes_to_device_per_image": round(sent),
        "window_images_per_s": [round(r, 2) for r in rates],
      }
      if path != paths[0]:
        reference = next(r for r in rows if r["num_workers"] == workers)["images_per_s_per_core"]
        row[f"over_{paths[0]}"] = round(row["images_per_s_per_core"] / reference, 3)
      rows.append(row)
  return rows
