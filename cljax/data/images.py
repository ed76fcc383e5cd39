"""Decoding images of any common mode to (H, W, 3) uint8 RGB examples."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

# Every source returns examples of this form; the pipeline relies on nothing else.
Example = dict[str, np.ndarray]


def pil_to_rgb(image: Image.Image) -> np.ndarray:
  """Decodes a PIL image of any common mode (L, P, RGBA, CMYK, I;16, ...) to (H, W, 3) uint8."""
  if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
    # convert("RGB") would clip 16-bit values at 255; keep the top 8 bits instead.
    return array_to_rgb(np.clip(np.asarray(image), 0, 65535).astype(np.uint16))
  if image.mode == "P" and "transparency" in image.info:
    # Going through RGBA avoids Pillow's transparency warning and keeps the palette colours.
    image = image.convert("RGBA")
  if image.mode != "RGB":
    image = image.convert("RGB")
  return np.asarray(image, dtype=np.uint8)


def array_to_rgb(array: np.ndarray) -> np.ndarray:
  """Converts a (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image to (H, W, 3) uint8.

  uint16 pixels keep their top 8 bits, bool ones become 0/255, and alpha is dropped; other
  dtypes and shapes raise ValueError.
  """
  if array.dtype == np.uint16:
    array = (array >> 8).astype(np.uint8)
  elif array.dtype == np.bool_:
    array = array.astype(np.uint8) * 255
  elif array.dtype != np.uint8:
    raise ValueError(f"images must be uint8 or uint16, got {array.dtype}")
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise ValueError(f"image shape must be (H, W[, 1|3|4]), got {array.shape}")
  if array.shape[-1] == 1:
    return np.repeat(array, 3, axis=-1)
  return np.ascontiguousarray(array[..., :3])


def decode_image(data: bytes | np.ndarray, what: str = "image") -> np.ndarray:
  """Decodes a JPEG, PNG, ... file's bytes to (H, W, 3) uint8; ValueError naming `what` if bad."""
  try:
    with Image.open(io.BytesIO(memoryview(data))) as image:
      return pil_to_rgb(image)
  except (OSError, ValueError, SyntaxError) as e:
    raise ValueError(f"cannot decode {what}: {e}") from e


def _example(image: np.ndarray, label: Any) -> Example:
  return {"image": image, "label": np.int32(-1 if label is None else label)}
