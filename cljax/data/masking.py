"""DINOv2's block-wise patch masks for iBOT, drawn on device from a key.

A JAX port of DINOv2's ``MaskingGenerator`` (``dinov2/data/masking.py``) and of the way
``collate_data_and_cast`` (``dinov2/data/collate.py``) calls it, with the values DINOv2's
``dinov2/train/train.py`` and default config pass (``max_num_patches = 0.5 * num_patches``,
``mask_ratio_min_max = (0.1, 0.5)``, ``mask_sample_probability = 0.5``):

- Which images: of the B images of the global batch, exactly ``int(B * mask_probability)``
  are masked; masked image j (in a random order) targets ``int(N * U(r_j, r_{j + 1}))`` of
  its N patches, with ``r = linspace(*mask_ratio, int(B * mask_probability) + 1)``, so the
  targets are stratified over the ratio range; the other images are not masked. The official
  code shuffles the list of masks; here a random permutation of the B positions, drawn from
  the key, assigns them, which gives the same joint distribution.
- Each mask: rectangles are added until the target is reached. A rectangle has an area
  ~ U(min_num_patches, min(remaining, max_num_patches)) and a log-aspect ~ U(log min_aspect,
  log max_aspect); up to ``BLOCK_ATTEMPTS`` rectangles are tried and the first that fits
  strictly inside the grid and adds between 1 and ``remaining`` new patches is kept; if none
  does, the mask stops short of its target (as the official loop does).

Randomness: image i's draws come from ``fold_in(example_key, i)`` with i its position in the
global batch, and the permutation from the key alone, so the masks are a pure function of
(key, batch size, i) whatever the sharding of the batch; the caller folds in the step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Rectangles tried per block before a mask gives up (``MaskingGenerator._mask``'s loop).
BLOCK_ATTEMPTS = 10
# Uniforms per attempt: area, log-aspect, top, left.
_UNIFORMS_PER_ATTEMPT = 4


def _grid_shape(grid: int | tuple[int, int]) -> tuple[int, int]:
  shape = (grid, grid) if isinstance(grid, int) else tuple(grid)
  if len(shape) != 2 or not all(isinstance(s, int) and s > 0 for s in shape):
    raise ValueError(f"grid must be a positive int or (height, width) of them, got {grid!r}.")
  return shape


def _validate(
  batch_size: int,
  mask_ratio: tuple[float, float],
  mask_probability: float,
  min_num_patches: float,
  max_num_patches: float,
  min_aspect: float,
  max_aspect: float,
) -> None:
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
  if len(mask_ratio) != 2 or not 0.0 <= mask_ratio[0] <= mask_ratio[1] <= 1.0:
    raise ValueError(
      f"mask_ratio must be (low, high) with 0 <= low <= high <= 1, got {mask_ratio!r}."
    )
  if not 0.0 <= mask_probability <= 1.0:
    raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability!r}.")
  if not min_num_patches >= 1:
    raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches!r}.")
  if not max_num_patches >= 1:
    raise ValueError(f"max_num_patches must be >= 1, got {max_num_patches!r}.")
  if not min_aspect > 0:
    raise ValueError(f"min_aspect must be > 0, got {min_aspect!r}.")
  if max_aspect is None or not max_aspect >= min_aspect:
    raise ValueError(f"max_aspect must be >= min_aspect ({min_aspect!r}), got {max_aspect!r}.")


def add_block(
  mask: jax.Array,
  u: jax.Array,
  max_mask_patches: jax.Array,
  min_num_patches: float,
  log_aspect: tuple[float, float],
) -> tuple[jax.Array, jax.Array]:
  """One call of ``MaskingGenerator._mask``: adds the first fitting of up to 10 rectangles.

  Attempt ``a`` reads its area from ``u[a, 0]``, its log-aspect from ``u[a, 1]``, and its top
  and left from ``u[a, 2]`` and ``u[a, 3]`` (as ``floor(u * (range + 1))``, ``randint``'s
  law). The attempts all see the same mask, since the official loop stops at the first
  rectangle that adds patches, so they are evaluated at once and the first valid one kept.

  Args:
    mask: (H, W) bool, the patches masked so far.
    u: (BLOCK_ATTEMPTS, 4) uniforms in [0, 1).
    max_mask_patches: () the most new patches the rectangle may add.
    min_num_patches: the smallest target area.
    log_aspect: (log min_aspect, log max_aspect); the aspect is height / width.

  Returns:
    The updated (H, W) mask and () int32 number of patches added (0 when no attempt fits).
  """
  height, width = mask.shape
  max_mask_patches = jnp.asarray(max_mask_patches, jnp.float32)
  # random.uniform(a, b) is a + (b - a) * u, also when b < a (few patches left).
  area = min_num_patches + (max_mask_patches - min_num_patches) * u[:, 0]
  aspect = jnp.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u[:, 1])
  # jnp.round rounds half to even, as Python's round.
  h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  # Strict: the official rule never lets a rectangle span the whole grid.
  fits = (h < height) & (w < width)
  top = jnp.minimum(jnp.floor(u[:, 2] * (height - h + 1)).astype(jnp.int32), height - h)
  left = jnp.minimum(jnp.floor(u[:, 3] * (width - w + 1)).astype(jnp.int32), width - w)
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  rect = (
    (rows >= top[:, None, None])
    & (rows < (top + h)[:, None, None])
    & (cols >= left[:, None, None])
    & (cols < (left + w)[:, None, None])
  )  # (A, H, W)
  new = jnp.sum(rect & ~mask, axis=(1, 2))  # h * w - already masked, for rectangles that fit
  ok = fits & (new > 0) & (new <= max_mask_patches)
  first = jnp.argmax(ok)
  found = jnp.any(ok)
  return jnp.where(found, mask | rect[first], mask), jnp.where(found, new[first], 0)


def block_mask(
  key: jax.Array,
  num_masking_patches: jax.Array,
  grid: tuple[int, int],
  min_num_patches: float,
  max_num_patches: float,
  log_aspect: tuple[float, float],
) -> jax.Array:
  """``MaskingGenerator.__call__``: rectangles until ``num_masking_patches`` are masked.

  Block t draws its uniforms from ``fold_in(key, t)``. Every block but the last adds at least
  one patch, so the loop runs at most ``num_masking_patches + 1`` times.

  Args:
    key: the image's key.
    num_masking_patches: () int32 target count (0 gives an empty mask).
    grid: (H, W) patches (static).
    min_num_patches: the smallest target area of a rectangle.
    max_num_patches: the largest target area of a rectangle.
    log_aspect: (log min_aspect, log max_aspect).

  Returns:
    (H, W) bool mask with at most ``num_masking_patches`` patches set.
  """

  def cond(state):
    _, count, delta, _ = state
    return (count < num_masking_patches) & (delta > 0)

  def body(state):
    mask, count, _, t = state
    u = jax.random.uniform(jax.random.fold_in(key, t), (BLOCK_ATTEMPTS, _UNIFORMS_PER_ATTEMPT))
    remaining = jnp.minimum((num_masking_patches - count).astype(jnp.float32), max_num_patches)
    mask, delta = add_block(mask, u, remaining, min_num_patches, log_aspect)
    delta = delta.astype(jnp.int32)  # int64 where x64 is on.
    return mask, count + delta, delta, t + 1

  # Zero, typed like the key and the target: inside shard_map, where they vary over the
  # mesh axis (a device's own rows), the loop's carry must vary too.
  zero = num_masking_patches.astype(jnp.int32) * 0
  zero = zero + (jax.random.bits(key, (), jnp.uint32) * 0).astype(jnp.int32)
  init = (jnp.zeros(grid, bool) | (zero > 0), zero, zero + 1, zero)
  return jax.lax.while_loop(cond, body, init)[0]


def _target_count(key: jax.Array, entry: jax.Array, bounds: jax.Array, num_patches: int):
  """Entry ``entry`` of collate's list: ``int(N * U(r_e, r_{e + 1}))`` if it is masked, else 0."""
  num_masked = bounds.shape[0] - 1
  stratum = jnp.minimum(entry, num_masked - 1)
  ratio = jax.random.uniform(key, (), jnp.float32, bounds[stratum], bounds[stratum + 1])
  return jnp.where(entry < num_masked, (num_patches * ratio).astype(jnp.int32), 0)


def block_masks(
  key: jax.Array,
  batch_size: int,
  grid: int | tuple[int, int],
  *,
  index: jax.Array | None = None,
  mask_ratio: tuple[float, float] = (0.1, 0.5),
  mask_probability: float = 0.5,
  min_num_patches: int = 4,
  max_num_patches: float | None = None,
  min_aspect: float = 0.3,
  max_aspect: float | None = None,
) -> jax.Array:
  """DINOv2's iBOT masks for the images at positions ``index`` of a global batch.

  ``collate_data_and_cast``'s batch rule with ``MaskingGenerator``'s masks (see the module
  docstring). Jittable with every argument but ``key`` and ``index`` static. In DINOv2 the
  batch is the global crops of all examples (2 per example), masked as one batch.

  Args:
    key: a PRNG key; fold the step in before calling.
    batch_size: B, the number of images in the GLOBAL batch (static).
    grid: the patch grid, H or (H, W) (static).
    index: (b,) integer positions in [0, B) of the rows to return, e.g. this device's rows of
      the global batch; default ``arange(B)``. Row i's mask depends only on the key, B and i.
    mask_ratio: (low, high) range of the masked fraction of a masked image.
    mask_probability: the fraction of the B images that are masked, ``int(B * p)`` of them.
    min_num_patches: the smallest target area of a rectangle.
    max_num_patches: the largest target area of a rectangle; default half the grid
      (DINOv2's ``dinov2/train/train.py``).
    min_aspect: the smallest height / width of a rectangle.
    max_aspect: the largest; default ``1 / min_aspect``.

  Returns:
    (b, H * W) bool, True where a patch is masked, patches in row-major order.

  Raises:
    ValueError: if an argument is out of range or ``index`` is not a vector of integers.
  """
  height, width = _grid_shape(grid)
  num_patches = height * width
  if max_num_patches is None:
    max_num_patches = 0.5 * num_patches
  if max_aspect is None and min_aspect > 0:
    max_aspect = 1.0 / min_aspect
  _validate(
    batch_size,
    mask_ratio,
    mask_probability,
    min_num_patches,
    max_num_patches,
    min_aspect,
    max_aspect,
  )
  if index is None:
    index = jnp.arange(batch_size, dtype=jnp.int32)
  index = jnp.asarray(index)
  if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
    raise ValueError(f"index must be a (b,) integer vector, got {index.dtype} {index.shape}.")
  num_masked = int(batch_size * mask_probability)
  if num_masked == 0:
    return jnp.zeros((index.shape[0], num_patches), bool)
  order_key, example_key = jax.random.split(key)
  # Position i holds entry order[i] of the official list of masks: the first num_masked
  # entries have stratified ratios, the rest are empty.
  order = jax.random.permutation(order_key, batch_size)[index]
  # torch.linspace in collate_data_and_cast: float32.
  bounds = jnp.linspace(mask_ratio[0], mask_ratio[1], num_masked + 1, dtype=jnp.float32)
  log_aspect = (math.log(min_aspect), math.log(max_aspect))

  def one(i, entry):
    ratio_key, mask_key = jax.random.split(jax.random.fold_in(example_key, i))
    target = _target_count(ratio_key, entry, bounds, num_patches)
    mask = block_mask(
      mask_key, target, (height, width), min_num_patches, max_num_patches, log_aspect
    )
    return mask.reshape(num_patches)

  return jax.vmap(one)(index, order)


def max_masked_patches(
  batch_size: int,
  rows: int,
  num_patches: int,
  mask_ratio: tuple[float, float] = (0.1, 0.5),
  mask_probability: float = 0.5,
) -> int:
  """The most patches ``block_masks`` can mask in ``rows`` rows of a batch of ``batch_size``.

  At most ``int(batch_size * mask_probability)`` images of the batch are masked, each with
  at most ``int(num_patches * mask_ratio[1])`` patches (a mask never passes its target), so
  a buffer of this many tokens holds every masked token of any ``rows`` rows: the static
  size of the official ``upperbound`` for a device's share of the global batch.
  """
  masked_images = min(rows, int(batch_size * mask_probability))
  return masked_images * int(num_patches * mask_ratio[1])


def masked_tokens(masks: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """The masked patches of ``masks`` as a fixed-size list: flat indices and token weights.

  The official collate's ``mask_indices_list`` and ``masks_weight``: the flat positions
  ``i * P + p`` of the True entries, in order, padded to ``capacity`` with index 0, and for
  each the weight ``1 / m_i`` (``m_i`` its image's masked count), 0 on padding.

  Args:
    masks: (b, P) bool.
    capacity: the buffer's length (static), at least the number of True entries
      (``max_masked_patches``); entries past it would be dropped.

  Returns:
    ``(indices, weights)``: (capacity,) int32 indices into ``masks.reshape(-1)`` and
    (capacity,) float32 weights.
  """
  flat = masks.reshape(-1)
  (indices,) = jnp.nonzero(flat, size=capacity, fill_value=0)
  valid = jnp.arange(capacity) < jnp.sum(flat)
  per_image = jnp.maximum(jnp.sum(masks, axis=-1), 1).astype(jnp.float32)
  weights = jnp.where(valid, 1.0 / per_image[indices // masks.shape[1]], 0.0)
  return indices.astype(jnp.int32), weights
