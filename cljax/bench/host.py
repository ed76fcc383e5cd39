"""Host input-path throughput: decoding and cropping ImageNet-size JPEGs through grain workers."""

from __future__ import annotations

import io
import os
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from cljax.bench import timing
from cljax.data import pipeline, sources, views

_BICUBIC = Image.Resampling.BICUBIC


def host_cores() -> int:
  """CPU cores this process may run on."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def synthetic_jpegs(
  num_images: int, height: int, width: int, quality: int = 90, seed: int = 0
) -> sources.EncodedImages:
  """Photo-like JPEGs: smooth shapes, texture and sensor noise, encoded in memory.

  Pure noise would compress far worse (and decode slower) than photographs. At 400x350 and
  quality 90 these are about 90 KB, ImageNet's bytes per pixel (about 110 KB at its mean
  size of about 470x390).

  Args:
    num_images: how many (all different).
    height: image height.
    width: image width.
    quality: JPEG quality.
    seed: for the pixels.

  Returns:
    The encoded images, for ``sources.ArraySource``.
  """
  rng = np.random.default_rng(seed)
  blobs = []
  for _ in range(num_images):
    pixels = 128 + rng.normal(0, 20, (height, width, 3))
    for cells, amplitude in ((6, 80.0), (40, 30.0), (160, 30.0)):
      coarse = rng.normal(0, amplitude, (cells, cells, 3)).astype(np.float32)
      for c in range(3):
        layer = Image.fromarray(coarse[..., c]).resize((width, height), _BICUBIC)
        pixels[..., c] += np.asarray(layer)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
  offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])])
  return sources.EncodedImages(np.concatenate(blobs), offsets)


def bench_host_jpeg(
  *,
  worker_counts: Sequence[int],
  windows: int,
  num_images: int = 256,
  height: int = 350,
  width: int = 400,
  image_size: int = 224,
  batch_size: int = 64,
  warmup_s: float = 3.0,
  window_s: float = 2.0,
) -> list[dict[str, Any]]:
  """Decode + two random-resized crops per image through grain, one row per worker count.

  ``num_workers=0`` runs in this process with one read thread: one core. With workers each
  process is one core at most (Pillow's decode and resize are single-threaded), so
  ``cores_used = min(workers, host cores)``.

  Args:
    worker_counts: grain worker processes to measure, e.g. (0, 16).
    windows: timed windows per count (median reported).
    num_images: distinct JPEGs (each epoch decodes them all again).
    height: their height.
    width: their width.
    image_size: the crops' side.
    batch_size: images per batch.
    warmup_s: untimed seconds first (workers start, buffers fill).
    window_s: seconds per window at least.

  Returns:
    ``host_jpeg`` rows.
  """
  encoded = synthetic_jpegs(num_images, height, width)
  source = sources.ArraySource(encoded, np.zeros(num_images, np.int32), origin="synthetic_jpeg")
  kb = float(np.diff(encoded.offsets).mean()) / 1e3
  rows = []
  for workers in worker_counts:
    it = pipeline.create_pretrain_iterator(
      source,
      views.ViewSpec(image_size),
      seed=0,
      global_batch_size=batch_size,
      num_workers=workers,
      read_threads=1 if workers == 0 else None,
    )
    result = timing.time_iterator(it, windows=windows, warmup_s=warmup_s, window_s=window_s)
    it.close()
    used = 1 if workers == 0 else min(workers, host_cores())
    rates = [batch_size * r for r in result["steps_per_s"]]
    images_per_s = statistics.median(rates)
    rows.append(
      {
        "part": "host_jpeg",
        "source_hw": [height, width],
        "jpeg_kb_mean": round(kb, 1),
        "image_size": image_size,
        "num_workers": workers,
        "cores_used": used,
        "images_per_s": round(images_per_s, 2),
        "views_per_s": round(2 * images_per_s, 2),
        "images_per_s_per_core": round(images_per_s / used, 2),
        "window_images_per_s": [round(r, 2) for r in rates],
      }
    )
  return rows
