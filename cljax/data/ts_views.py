"""Views of time series: TS2Vec's overlapping random crops and TS-TCC's augmentations, in JAX.

TS2Vec (Yue et al., AAAI 2022, ``ts2vec.py`` ``fit()``) draws, once per step, an overlap
``[crop_left, crop_right)`` of length ``crop_l`` and its two extensions ``crop_eleft <=
crop_left`` and ``crop_eright >= crop_right``, and per series a shift ``crop_offset``. View
1 is ``[eleft, right)`` and view 2 ``[left, eright)`` (shifted), so after encoding the last
``crop_l`` outputs of view 1 and the first ``crop_l`` of view 2 are the same timestamps,
and the loss compares only those.

Static shapes. Every length above changes every step; under ``jax.jit`` each would be a
new compilation. Here a view is cut as a window of a static ``length`` at least its own
(``cut``): its ``size`` first positions hold the crop, the rest is invalid, filled with NaN
(TS2Vec's mark of a missing value) and flagged by a ``valid`` mask. Given ``valid``,
``cljax.models.ts2vec.TSEncoder`` treats positions outside it as the zero padding beyond the
ends of a shorter series, so at the valid positions its outputs are the official encoder's
on the variable-length crop. ``front`` then moves each output's overlap rows to the front
of a (B, length, C) array, zeros beyond ``crop_l``: ``losses.hierarchical_contrastive_loss``
with ``mask = arange(length) < crop_l`` equals the official loss on ``out1[:, -crop_l:]``
and ``out2[:, :crop_l]`` for any ``length >= crop_l``.

Which static length. The series length ``ts_l`` fits every crop (``crop_views`` and
``overlap`` cut both views and the overlap at ``ts_l``), but the official overlaps average
half of ``ts_l`` and the temporal loss is quadratic in the overlap's length: at ``ts_l``
it does three times the official work. ``bucket_lengths`` gives a few static lengths and
``switch_on_length`` runs a computation at the shortest that fits this step's length (one
``lax.switch``, every length compiled once): the loss on overlaps padded to the shortest
of 4 lengths does 0.47 of the full-length work, of 8 lengths 0.40.

Sharding: the scalars of ``Crops`` are shared by the whole global batch. Inside
``shard_map`` draw them on every device from the same key with the global batch size and
keep this device's rows of ``crop_offset``; or draw and crop on global arrays. Every device
then takes the same branch of ``switch_on_length``, so collectives may run inside it.

TS-TCC's augmentations (Eldele et al., IJCAI 2021, ``dataloader/augmentations.py``) for the
methods that contrast two augmented views of a whole series: ``jitter``, ``scaling``,
``permutation`` and their weak and strong combinations. Each takes a key and one (T, C)
series; ``jax.vmap`` them over a batch of keys and series.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Crops(NamedTuple):
  """One step's draws of the official ``fit()``, named as there.

  Attributes:
    crop_l: () int32, the length of the overlap.
    crop_left: () int32, the overlap's first timestamp before the shift.
    crop_right: () int32, ``crop_left + crop_l``.
    crop_eleft: () int32, view 1's first timestamp before the shift, <= crop_left.
    crop_eright: () int32, view 2's end before the shift, >= crop_right.
    crop_offset: (B,) int32, each series' shift of both views.
  """

  crop_l: jax.Array
  crop_left: jax.Array
  crop_right: jax.Array
  crop_eleft: jax.Array
  crop_eright: jax.Array
  crop_offset: jax.Array


class Window(NamedTuple):
  """Where one view lies in the series.

  Attributes:
    start: (B,) int32, each series' first timestamp of the view.
    size: () int32, the view's length.
    first: () int32, the view's position of the overlap's first timestamp.
  """

  start: jax.Array
  size: jax.Array
  first: jax.Array


class CropViews(NamedTuple):
  """The two crops as (B, ts_l, C) windows (see the module docstring).

  Attributes:
    view1: position p holds timestamp ``crop_offset + crop_eleft + p`` where ``valid1``,
      ``fill_value`` elsewhere.
    view2: position p holds timestamp ``crop_offset + crop_left + p`` where ``valid2``.
    valid1: (B, ts_l) bool, positions ``[0, crop_right - crop_eleft)``.
    valid2: (B, ts_l) bool, positions ``[0, crop_eright - crop_left)``.
  """

  view1: jax.Array
  view2: jax.Array
  valid1: jax.Array
  valid2: jax.Array


def sample_crops(key: jax.Array, batch_size: int, ts_l: int, temporal_unit: int = 0) -> Crops:
  """Draws one step's crops as the official ``fit()`` does, with ``np.random.randint``'s
  half-open ranges.

  Args:
    key: PRNG key.
    batch_size: B, the number of series (of the global batch; see the module docstring).
    ts_l: the series length.
    temporal_unit: the loss's ``temporal_unit``: the overlap is at least
      ``2 ** (temporal_unit + 1)`` long.

  Returns:
    The ``Crops``.

  Raises:
    ValueError: if ``ts_l < 2 ** (temporal_unit + 1)`` (no overlap long enough).
  """
  shortest = 2 ** (temporal_unit + 1)
  if ts_l < shortest:
    raise ValueError(
      f"ts_l={ts_l} is shorter than the shortest overlap 2 ** (temporal_unit + 1) = {shortest}."
    )
  k_len, k_left, k_eleft, k_eright, k_offset = jax.random.split(key, 5)
  crop_l = jax.random.randint(k_len, (), shortest, ts_l + 1)
  crop_left = jax.random.randint(k_left, (), 0, ts_l - crop_l + 1)
  crop_right = crop_left + crop_l
  crop_eleft = jax.random.randint(k_eleft, (), 0, crop_left + 1)
  crop_eright = jax.random.randint(k_eright, (), crop_right, ts_l + 1)
  crop_offset = jax.random.randint(k_offset, (batch_size,), -crop_eleft, ts_l - crop_eright + 1)
  return Crops(crop_l, crop_left, crop_right, crop_eleft, crop_eright, crop_offset)


def take_per_row(
  x: jax.Array, indx: jax.Array, num_elem: int, fill_value: float = jnp.nan
) -> jax.Array:
  """The official ``take_per_row``: ``x[b, indx[b] : indx[b] + num_elem]`` for every row b.

  Args:
    x: (B, T, ...) array.
    indx: (B,) int, each row's first timestamp.
    num_elem: the static number of timestamps taken.
    fill_value: the value of timestamps outside ``[0, T)`` (where the official indexing
      would raise or wrap around).

  Returns:
    (B, num_elem, ...) array.
  """
  steps = jnp.asarray(indx)[:, None] + jnp.arange(num_elem)  # (B, num_elem)
  steps = steps.reshape(steps.shape + (1,) * (x.ndim - 2))
  # Not mode="fill" alone: JAX wraps negative indices around before it fills.
  inside = (steps >= 0) & (steps < x.shape[1])
  taken = jnp.take_along_axis(x, jnp.clip(steps, 0, x.shape[1] - 1), axis=1)
  return jnp.where(inside, taken, jnp.asarray(fill_value, taken.dtype))


def windows(crops: Crops) -> tuple[Window, Window]:
  """The two views of ``crops``: view 1 ``[eleft, right)``, view 2 ``[left, eright)``,
  both shifted by ``crop_offset``."""
  view1 = Window(
    crops.crop_offset + crops.crop_eleft,
    crops.crop_right - crops.crop_eleft,
    crops.crop_left - crops.crop_eleft,
  )
  view2 = Window(
    crops.crop_offset + crops.crop_left,
    crops.crop_eright - crops.crop_left,
    jnp.zeros_like(crops.crop_l),
  )
  return view1, view2


def cut(
  x: jax.Array, window: Window, length: int, fill_value: float = jnp.nan
) -> tuple[jax.Array, jax.Array]:
  """One view of ``x`` as a window of static ``length`` (at least ``window.size``).

  Args:
    x: (B, ts_l, C) float series.
    window: the view (``windows``), with ``window.start`` of shape (B,).
    length: the window's static length.
    fill_value: of the invalid positions (NaN: missing, for ``TSEncoder``).

  Returns:
    ``(view, valid)``: (B, length, C) with timestamp ``window.start + p`` at position p <
    ``window.size`` and ``fill_value`` elsewhere, and the (B, length) bool mask of those
    positions; encode ``view`` with ``valid=valid``.
  """
  if x.ndim != 3 or window.start.shape != (x.shape[0],):
    raise ValueError(
      f"x must be (B, ts_l, C) and the window's start (B,), got {x.shape} and {window.start.shape}."
    )
  taken = take_per_row(x, window.start, length, fill_value)
  valid = jnp.broadcast_to(jnp.arange(length) < window.size, (x.shape[0], length))
  return jnp.where(valid[..., None], taken, fill_value), valid


def front(z: jax.Array, window: Window, crop_l: jax.Array, length: int) -> jax.Array:
  """The overlap rows of one encoded view, moved to the front.

  Args:
    z: (B, L, C) outputs for the view ``cut`` at length L.
    window: the view.
    crop_l: the overlap's length.
    length: the output's static length, at least ``crop_l``.

  Returns:
    (B, length, C): row i < crop_l is the timestamp ``crop_offset + crop_left + i`` (the
    official ``out1[:, -crop_l:]`` for view 1, ``out2[:, :crop_l]`` for view 2), zeros beyond.
  """
  if z.ndim != 3:
    raise ValueError(f"z must be (B, L, C), got {z.shape}.")
  steps = jnp.arange(length)
  # Rows past the end are clipped, then zeroed: the overlap never reaches past it.
  z = jnp.take(z, jnp.minimum(window.first + steps, z.shape[1] - 1), axis=1)
  return jnp.where((steps < crop_l)[:, None], z, 0)


def crop_views(x: jax.Array, crops: Crops, fill_value: float = jnp.nan) -> CropViews:
  """The two views of ``x`` for ``crops`` as windows of the series length.

  Args:
    x: (B, ts_l, C) float series.
    crops: from :func:`sample_crops` with this B and ts_l.
    fill_value: of the invalid positions (NaN: missing, for ``TSEncoder``).

  Returns:
    ``CropViews``; encode ``view1`` with ``valid=valid1`` and ``view2`` with
    ``valid=valid2``.
  """
  (view1, valid1), (view2, valid2) = (cut(x, w, x.shape[1], fill_value) for w in windows(crops))
  return CropViews(view1, view2, valid1, valid2)


def overlap(z1: jax.Array, z2: jax.Array, crops: Crops) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The encoded views on their shared timestamps, aligned and moved to the front.

  Args:
    z1: (B, ts_l, C) outputs for ``CropViews.view1``.
    z2: (B, ts_l, C) outputs for ``CropViews.view2``.
    crops: the crops of the views.

  Returns:
    ``(z1_overlap, z2_overlap, valid)``: (B, ts_l, C) arrays whose row i < crop_l is the
    timestamp ``crop_offset + crop_left + i`` in both, zeros beyond, and the (ts_l,) bool
    mask of those rows, for the loss's ``mask``.
  """
  if z1.ndim != 3 or z1.shape != z2.shape:
    raise ValueError(f"z1 and z2 must be (B, ts_l, C) of one shape, got {z1.shape}, {z2.shape}.")
  length = z1.shape[1]
  w1, w2 = windows(crops)
  valid = jnp.arange(length) < crops.crop_l
  return front(z1, w1, crops.crop_l, length), front(z2, w2, crops.crop_l, length), valid


def bucket_lengths(ts_l: int, count: int) -> tuple[int, ...]:
  """``count`` static lengths for crops of at most ``ts_l``: ``ceil(ts_l * k / count)``
  for k = 1 .. count (fewer where they coincide), the last ``ts_l``."""
  if count < 1 or ts_l < 1:
    raise ValueError(f"need count >= 1 and ts_l >= 1, got count={count}, ts_l={ts_l}.")
  return tuple(sorted({math.ceil(ts_l * k / count) for k in range(1, count + 1)}))


def switch_on_length(
  lengths: tuple[int, ...], n: jax.Array, branch: Callable[..., Any], *operands: Any
) -> Any:
  """``branch(length, *operands)`` at the shortest of ``lengths`` that is at least ``n``.

  The branches are rematerialised (``jax.checkpoint``): differentiating a ``lax.switch``
  makes its forward pass return the residuals of every branch (zeros for those not taken),
  and the temporal loss's (B, 2L, 2L) residuals at every length cost more than recomputing
  the taken branch's forward pass (measured on a 2-core CPU, T = 427: its gradient at the
  shortest of 4 lengths took 94 ms without, 15 ms with, 183 ms at the full length). The
  recomputation repeats the branch's collectives (the loss's all-gather) in the backward
  pass.

  Args:
    lengths: increasing static lengths (``bucket_lengths``); the last must hold every ``n``.
    n: () int, this step's length (the same on every device).
    branch: called with one static length and the operands; every length's call must
      return the same shapes and dtypes.
    *operands: the branches' arguments.

  Returns:
    What the chosen branch returns; with one length, ``branch(lengths[0], *operands)``
    without a ``lax.switch``.
  """
  if len(lengths) == 1:
    return branch(lengths[0], *operands)
  index = jnp.minimum(jnp.searchsorted(jnp.asarray(lengths), n), len(lengths) - 1)
  branches = [jax.checkpoint(functools.partial(branch, length)) for length in lengths]
  return jax.lax.switch(index, branches, *operands)


# -- TS-TCC's augmentations, on one (T, C) series. --


def _check_series(x: jax.Array) -> None:
  if x.ndim != 2:
    raise ValueError(f"x must be one series of shape (T, C), got {x.shape}; vmap over a batch.")


def jitter(key: jax.Array, x: jax.Array, sigma: float = 0.8) -> jax.Array:
  """TS-TCC's ``jitter``: ``x`` plus N(0, sigma^2) noise at every value."""
  _check_series(x)
  return x + sigma * jax.random.normal(key, x.shape, x.dtype)


def scaling(key: jax.Array, x: jax.Array, sigma: float = 1.1) -> jax.Array:
  """TS-TCC's ``scaling``: every channel times one factor ~ N(2, sigma^2) (mean 2, as there)."""
  _check_series(x)
  factor = 2.0 + sigma * jax.random.normal(key, (x.shape[1],), x.dtype)
  return x * factor


def permutation(key: jax.Array, x: jax.Array, max_segments: int = 5) -> jax.Array:
  """TS-TCC's ``permutation`` (its default ``seg_mode="random"``): the series cut into
  ``randint(1, max_segments)`` segments at distinct split points drawn from ``[0, T - 2)``,
  the segments shuffled, every channel alike.

  With static shapes: ``max_segments - 2`` distinct points are always drawn and the unused
  ones moved to T, where they cut off empty segments. Empty segments change nothing
  wherever they land, and a uniform shuffle of all ``max_segments - 1`` segments orders the
  used ones uniformly, as the official shuffle does.

  Raises:
    ValueError: if ``max_segments < 2`` or ``T < max_segments`` (too few split points).
  """
  _check_series(x)
  steps = x.shape[0]
  if max_segments < 2 or steps < max_segments:
    raise ValueError(
      f"permutation needs 2 <= max_segments <= T, got max_segments={max_segments}, T={steps}."
    )
  k_num, k_points, k_order = jax.random.split(key, 3)
  most = max_segments - 1
  num_segs = jax.random.randint(k_num, (), 1, max_segments)
  points = jax.random.permutation(k_points, steps - 2)[: most - 1]
  points = jnp.sort(jnp.where(jnp.arange(most - 1) < num_segs - 1, points, steps))
  bounds = jnp.concatenate([jnp.zeros(1, points.dtype), points, jnp.full(1, steps, points.dtype)])
  lengths = jnp.diff(bounds)  # (most,), empty segments included.
  order = jax.random.permutation(k_order, most)
  ends = jnp.cumsum(lengths[order])
  t = jnp.arange(steps)
  # Output step t lies in the k-th shuffled segment, the first whose end is past t.
  k = jnp.searchsorted(ends, t, side="right")
  source = bounds[order[k]] + t - (ends - lengths[order])[k]
  return x[source]


def weak_augment(
  key: jax.Array, x: jax.Array, scale_sigma: float = 1.1, jitter_sigma: float = 0.0
) -> jax.Array:
  """TS-TCC's weak augmentation. The official ``DataTransform`` applies ``scaling`` alone
  (``jitter_sigma=0``); the paper calls it jitter-and-scale: ``jitter_sigma > 0`` adds the
  noise before scaling."""
  k_jitter, k_scale = jax.random.split(key)
  if jitter_sigma:
    x = jitter(k_jitter, x, jitter_sigma)
  return scaling(k_scale, x, scale_sigma)


def strong_augment(
  key: jax.Array, x: jax.Array, jitter_sigma: float = 0.8, max_segments: int = 5
) -> jax.Array:
  """TS-TCC's strong augmentation: ``jitter(permutation(x))``."""
  k_perm, k_jitter = jax.random.split(key)
  return jitter(k_jitter, permutation(k_perm, x, max_segments), jitter_sigma)
