"""Random-resized crops on the accelerator: the host path's crop rule and Pillow's resize.

``pipeline.random_resized_crop_box`` and ``pipeline.crop_and_resize`` (+ flip), as jittable
batched functions, for the device-resident data path (``device.py``):

- Boxes: ``random_resized_crop_box``'s rule exactly (up to 10 attempts of area ~ U(area),
  log-aspect ~ U(log aspect), the first box that fits placed uniformly, else the clamped
  centre crop), fed by uniform numbers instead of NumPy calls; ``boxes_from_uniforms``
  returns the same boxes as that function given the same numbers (tested against it).
- Resize: Pillow's bicubic resampling of the cut-out crop (Keys a = -0.5, antialiased when
  shrinking, horizontal pass then vertical, each rounded to uint8) as separable weight
  matrices applied with batched matmuls; the flip reverses the column weights. Given the
  same box, an enlarged crop (every CIFAR crop) has Pillow's pixels but for rare off-by-one
  roundings (Pillow's coefficients are 22-bit fixed point); when shrinking, Pillow 13 may
  run the vertical pass first, which moves about 5% of pixels by a few levels.

Global and multi-crop local views use the same functions, with their own sizes and areas.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# random_resized_crop_box's attempts before its centre-crop fallback.
CROP_ATTEMPTS = 10
# Uniform numbers per view: (area, log-aspect) per attempt, then top, left and the flip coin.
NUM_VIEW_UNIFORMS = 2 * CROP_ATTEMPTS + 3
# Pillow's bicubic filter constant.
_BICUBIC_A = -0.5


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
  return crop_views(images, boxes[:, None], flips[:, None], size)[:, 0]


def crop_views(images: jax.Array, boxes: jax.Array, flips: jax.Array, size: int) -> jax.Array:
  """``crop_resize_flip`` with V crops of each image, without copying the image V times.

  Args:
    images: (b, H, W, 3) uint8 (a decoded image in the top-left corner of a larger canvas
      is fine: the weights never reach outside a box).
    boxes: (b, V, 4) int32 (top, left, crop_height, crop_width).
    flips: (b, V) bool, flip horizontally.
    size: the output side S (static).

  Returns:
    (b, V, S, S, 3) uint8.
  """
  b, height, width, _ = images.shape
  views = boxes.shape[1]
  flat_boxes = boxes.reshape(b * views, 4)
  rows = resize_weights(flat_boxes[:, 0], flat_boxes[:, 2], height, size)  # (bV, S, H)
  cols = resize_weights(flat_boxes[:, 1], flat_boxes[:, 3], width, size)  # (bV, S, W)
  cols = jnp.where(flips.reshape(-1)[:, None, None], cols[:, ::-1], cols)
  rows = rows.reshape(b, views, size, height)
  cols = cols.reshape(b, views, size, width)
  x = images.astype(jnp.float32)
  # Full precision: TF32 or bf16 passes would change the rounded pixels.
  einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)
  # Horizontal pass first, as Pillow: (b, H, W, 3) x (b, V, S, W) -> (b, V, H, S, 3).
  x = _round_to_uint8_range(einsum("byxc,bvox->bvyoc", x, cols))
  # Then vertical: (b, V, S, H) x (b, V, H, S, 3) -> (b, V, S, S, 3).
  x = _round_to_uint8_range(einsum("bvpy,bvyoc->bvpoc", rows, x))
  return x.astype(jnp.uint8)


def views_from_uniforms(
  images: jax.Array,
  u: jax.Array,
  size: int,
  area: tuple[float, float],
  aspect: tuple[float, float],
  flip: bool,
) -> jax.Array:
  """One random-resized crop (+ flip) per image, from its ``NUM_VIEW_UNIFORMS`` uniforms.

  Args:
    images: (b, H, W, 3) uint8.
    u: (b, NUM_VIEW_UNIFORMS) uniforms in [0, 1): the box's (``boxes_from_uniforms``), then
      the flip coin (flip when < 0.5).
    size: the output side S (static).
    area: range of the crop's area fraction.
    aspect: range of the crop's width / height.
    flip: random horizontal flips; the coin is read even when off, so turning flips off
      changes no crop.

  Returns:
    (b, S, S, 3) uint8.
  """
  _, height, width, _ = images.shape
  boxes = boxes_from_uniforms(u, height, width, area, aspect)
  flips = (u[:, -1] < 0.5) & flip
  return crop_resize_flip(images, boxes, flips, size)
