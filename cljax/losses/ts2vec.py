"""TS2Vec's hierarchical contrastive loss: instance and temporal contrast at every time scale.

A port of ``models/losses.py`` of the official TS2Vec code (Yue et al., AAAI 2022).
``z1`` and ``z2`` are (B, T, C) per-timestamp representations of two crops of the same B
series, restricted to the timestamps the crops share and aligned (row t of both is the
same absolute timestamp). As in the official code the similarities are raw dot products:
no normalisation, no temperature.

Static shapes. In the official training loop the overlap length ``crop_l`` is drawn anew
every step, so the loss sees a different T every step; under ``jax.jit`` that would be one
compilation per length. Here the arrays keep a static length T at least the overlap's (the
series length, ``cljax.data.ts_views.overlap``, or one of a few lengths,
``ts_views.switch_on_length``) and a validity ``mask`` says which timestamps exist.
The mask travels with the representations through the hierarchy: max-pooling by 2 pools
positions (2k, 2k + 1) into k, valid when both are (for a prefix of length L that is a
prefix of length floor(L / 2), what ``F.max_pool1d(kernel_size=2)`` does to an array of
length L), and the static loop runs over the levels of T. Invalid timestamps are zeroed on
entry, are never anchors, and are removed from every softmax like the anchor itself is, so
a level whose valid prefix has length L_d gives exactly the official losses on the
unpadded (B, L_d, C) arrays; a level with no valid timestamp adds nothing and is not
counted. The number of levels counted, the official ``d``, is floor(log2 L) + 1 for a
prefix of length L. Without a mask nothing is padded and the computation is the official
one.

Sharding. With ``axis_name`` the batch is split over that axis: every device all-gathers
the other devices' representations, so the instance loss contrasts each anchor with the
2N - 2 others of the global batch N at its timestamp, and both losses are means over the
anchors of the global batch, identical on every device; 8 devices equal 1 device holding
the global batch. The temporal loss stays within each series and gathers nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cljax.losses._common import _MASK_VALUE, _global_offset

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_pair(z1: jax.Array, z2: jax.Array) -> None:
  if z1.ndim != 3 or z1.shape != z2.shape:
    raise ValueError(
      "z1 and z2 must both have shape (batch, time, channels), the same shape, got "
      f"{z1.shape} and {z2.shape}."
    )


def _check_mask(mask: jax.Array | None, z: jax.Array) -> jax.Array | None:
  """The mask as (B, T) bool, or None; raises unless it is (T,) or (B, T)."""
  if mask is None:
    return None
  batch, length = z.shape[:2]
  if mask.shape not in ((length,), (batch, length)):
    raise ValueError(
      f"mask must have shape (T,) = ({length},) or (B, T) = ({batch}, {length}), got {mask.shape}."
    )
  return jnp.broadcast_to(jnp.asarray(mask, bool), (batch, length))


def _global_mean(total: jax.Array, count: jax.Array, axis_name: str | None) -> jax.Array:
  """``total / count`` summed over the devices, 0 where nothing was counted."""
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
    count = jax.lax.psum(count, axis_name)
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def _anchor_nll(
  sim: jax.Array, excluded: jax.Array, positives: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Sum and count over the anchors of ``-log softmax`` at each anchor's positive.

  ``sim`` (..., A, K) similarities of A anchors to K candidates, ``excluded`` (broadcast to
  sim) the candidates left out of an anchor's softmax (itself, invalid timestamps),
  ``positives`` (A,) the index of each anchor's positive, ``weights`` (..., A) 1 for a
  valid anchor, 0 otherwise.
  """
  logits = jnp.where(excluded, _MASK_VALUE, sim)
  positive = jnp.take_along_axis(
    sim, jnp.broadcast_to(positives[:, None], sim.shape[:-1] + (1,)), axis=-1
  )[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - positive
  return jnp.sum(nll * weights), jnp.sum(weights)


def _instance_terms(
  z1: jax.Array, z2: jax.Array, mask: jax.Array | None, axis_name: str | None
) -> tuple[jax.Array, jax.Array]:
  """Sum and count of the instance-contrast losses of the local anchors."""
  batch, length = z1.shape[:2]
  weights = jnp.ones((batch, length), jnp.float32) if mask is None else mask.astype(jnp.float32)
  keys1, keys2, key_weights = z1, z2, weights
  if axis_name is not None:
    keys1, keys2 = (jax.lax.all_gather(a, axis_name, tiled=True) for a in (z1, z2))
    if mask is not None:
      key_weights = jax.lax.all_gather(weights, axis_name, tiled=True)
  global_batch = keys1.shape[0]
  if global_batch == 1:
    # The official guard: a single series has no negatives.
    zero = jnp.zeros((), jnp.float32)
    return zero, zero
  queries = jnp.concatenate([z1, z2], axis=0)
  keys = jnp.concatenate([keys1, keys2], axis=0)
  # (2B, T, C) x (2N, T, C) -> (T, 2B, 2N): at each timestamp, every anchor against all views.
  sim = jnp.einsum("atc,ktc->tak", queries, keys, precision=_HIGHEST)
  own = jnp.arange(batch) + _global_offset(batch, axis_name)
  self_index = jnp.concatenate([own, own + global_batch])
  positives = jnp.concatenate([own + global_batch, own])
  excluded = jnp.arange(2 * global_batch)[None, :] == self_index[:, None]  # (2B, 2N)
  if mask is not None:
    key_valid = jnp.concatenate([key_weights, key_weights], axis=0).T > 0  # (T, 2N)
    excluded = excluded[None] | ~key_valid[:, None, :]
  anchor_weights = jnp.concatenate([weights, weights], axis=0).T  # (T, 2B)
  return _anchor_nll(sim, excluded, positives, anchor_weights)


def _temporal_terms(
  z1: jax.Array, z2: jax.Array, mask: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
  """Sum and count of the temporal-contrast losses of the local anchors."""
  batch, length = z1.shape[:2]
  weights = jnp.ones((batch, length), jnp.float32) if mask is None else mask.astype(jnp.float32)
  if length == 1:
    # The official guard: a single timestamp has no negatives.
    zero = jnp.zeros((), jnp.float32)
    return zero, zero
  z = jnp.concatenate([z1, z2], axis=1)
  # (B, 2T, C) x (B, C, 2T) -> (B, 2T, 2T): within each series, every timestamp of both views.
  sim = jnp.einsum("bsc,buc->bsu", z, z, precision=_HIGHEST)
  steps = jnp.arange(length)
  positives = jnp.concatenate([steps + length, steps])
  excluded = jnp.eye(2 * length, dtype=bool)[None]
  weights2 = jnp.concatenate([weights, weights], axis=1)  # (B, 2T)
  if mask is not None:
    excluded = excluded | (weights2 == 0)[:, None, :]
  return _anchor_nll(sim, excluded, positives, weights2)


def instance_contrastive_loss(
  z1: jax.Array,
  z2: jax.Array,
  axis_name: str | None = None,
  *,
  mask: jax.Array | None = None,
) -> jax.Array:
  r"""TS2Vec's instance-wise contrastive loss.

  At every timestamp t the 2N representations of the N series of the (global) batch in
  both views are contrasted: the anchor :math:`r_{i,t}` of series i in view 1 has the
  positive :math:`r'_{i,t}` and the other 2N - 2 representations at t as negatives,

  .. math::
     \ell_{i,t} = -\log \frac{\exp(r_{i,t} \cdot r'_{i,t})}
       {\sum_{j=1}^{N} \big(\exp(r_{i,t} \cdot r'_{j,t})
        + \mathbb{1}_{i \ne j} \exp(r_{i,t} \cdot r_{j,t})\big)},

  and symmetrically for view 2; the loss is the mean over the 2NT anchors (the official
  ``(logits[:, i, B + i - 1].mean() + logits[:, B + i, i].mean()) / 2``). Zero when N = 1,
  as in the official code.

  Args:
    z1: (B, T, C) representations of the first crop (the local batch with ``axis_name``).
    z2: (B, T, C) representations of the second crop at the same timestamps.
    axis_name: mapped axis of the batch, or None. When given the negatives are the global
      batch (all-gathered) and the loss is the global mean, identical on every device.
    mask: optional (T,) or (B, T) bool, the timestamps that exist (see the module
      docstring); the loss is the mean over the valid anchors, each against the valid
      representations at its timestamp.

  Returns:
    The scalar float32 loss.

  Raises:
    ValueError: if z1 and z2 are not both (B, T, C) of one shape, or the mask's shape is
      neither (T,) nor (B, T).

  References:
    Yue et al., "TS2Vec: Towards Universal Representation of Time Series", AAAI 2022.
    https://arxiv.org/abs/2106.10466
  """
  _check_pair(z1, z2)
  mask = _check_mask(mask, z1)
  z1, z2 = (_zero_invalid(z.astype(jnp.float32), mask) for z in (z1, z2))
  return _global_mean(*_instance_terms(z1, z2, mask, axis_name), axis_name)


def temporal_contrastive_loss(
  z1: jax.Array,
  z2: jax.Array,
  axis_name: str | None = None,
  *,
  mask: jax.Array | None = None,
) -> jax.Array:
  r"""TS2Vec's temporal contrastive loss.

  Within each series i the 2T representations of both views are contrasted: the anchor
  :math:`r_{i,t}` has the positive :math:`r'_{i,t}` (the same timestamp in the other view)
  and the other 2T - 2 as negatives,

  .. math::
     \ell_{i,t} = -\log \frac{\exp(r_{i,t} \cdot r'_{i,t})}
       {\sum_{s=1}^{T} \big(\exp(r_{i,t} \cdot r'_{i,s})
        + \mathbb{1}_{t \ne s} \exp(r_{i,t} \cdot r_{i,s})\big)},

  and symmetrically for view 2; the loss is the mean over the 2NT anchors of the (global)
  batch. Zero when T = 1, as in the official code.

  Args:
    z1: (B, T, C) representations of the first crop (the local batch with ``axis_name``).
    z2: (B, T, C) representations of the second crop at the same timestamps.
    axis_name: mapped axis of the batch, or None. Nothing is gathered (each series is
      contrasted with itself); the axis only makes the result the global mean.
    mask: optional (T,) or (B, T) bool, the timestamps that exist; the loss is the mean over
      the valid anchors, each against its series' valid timestamps.

  Returns:
    The scalar float32 loss.

  Raises:
    ValueError: as :func:`instance_contrastive_loss`.

  References:
    Yue et al., "TS2Vec: Towards Universal Representation of Time Series", AAAI 2022.
    https://arxiv.org/abs/2106.10466
  """
  _check_pair(z1, z2)
  mask = _check_mask(mask, z1)
  z1, z2 = (_zero_invalid(z.astype(jnp.float32), mask) for z in (z1, z2))
  return _global_mean(*_temporal_terms(z1, z2, mask), axis_name)


def _zero_invalid(z: jax.Array, mask: jax.Array | None) -> jax.Array:
  # Zeroed, not only left out: garbage (NaN) in an invalid row would reach the gradients
  # of the valid ones through the similarity matmuls.
  return z if mask is None else jnp.where(mask[..., None], z, 0.0)


def _max_pool2(z: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
  """``F.max_pool1d(kernel_size=2)`` along time: T -> floor(T / 2), the last odd step dropped."""
  batch, length, channels = z.shape
  half = length // 2
  z = jnp.max(z[:, : 2 * half].reshape(batch, half, 2, channels), axis=2)
  if mask is not None:
    mask = jnp.all(mask[:, : 2 * half].reshape(batch, half, 2), axis=2)
  return z, mask


def _level_present(mask: jax.Array | None, axis_name: str | None) -> jax.Array:
  """1 when the level has a valid timestamp anywhere in the global batch, else 0."""
  if mask is None:
    return jnp.ones((), jnp.float32)
  present = jnp.any(mask).astype(jnp.float32)
  return present if axis_name is None else jax.lax.pmax(present, axis_name)


def hierarchical_contrastive_loss(
  z1: jax.Array,
  z2: jax.Array,
  alpha: float = 0.5,
  temporal_unit: int = 0,
  axis_name: str | None = None,
  *,
  mask: jax.Array | None = None,
) -> jax.Array:
  r"""TS2Vec's hierarchical contrastive loss.

  Level d = 0, 1, ... holds the representations max-pooled d times by 2 along time, until
  one timestamp is left. Every level adds :math:`\alpha` times the instance loss and, from
  level ``temporal_unit`` on while more than one timestamp is left, :math:`1 - \alpha`
  times the temporal loss; the sum is divided by the number of levels:

  .. math::
     L = \frac{1}{D} \sum_{d=0}^{D-1} \Big(\alpha\, L_{inst}^{(d)}
       + (1 - \alpha)\, \mathbb{1}_{d \ge u,\, T_d > 1}\, L_{temp}^{(d)}\Big),
     \qquad T_d = \lfloor T / 2^d \rfloor,\ D = \lfloor \log_2 T \rfloor + 1,

  as the official ``hierarchical_contrastive_loss``. With a ``mask`` the levels and their
  lengths are those of each level's valid timestamps (see the module docstring): for a
  prefix mask of length L the value equals the official loss on ``z[:, :L]``.

  Args:
    z1: (B, T, C) representations of the first crop on the overlap of the two crops (the
      local batch with ``axis_name``).
    z2: (B, T, C) representations of the second crop at the same timestamps.
    alpha: :math:`\alpha`, the weight of the instance loss (0.5 in the paper); the temporal
      loss has weight 1 - alpha. A term whose weight is 0 is not computed.
    temporal_unit: :math:`u` >= 0, the first level with a temporal loss (0 in the paper;
      larger saves time and memory on long series).
    axis_name: mapped axis of the batch, or None; see :func:`instance_contrastive_loss`.
    mask: optional (T,) or (B, T) bool, the timestamps that exist.

  Returns:
    The scalar float32 loss (the global mean, identical on every device).

  Raises:
    ValueError: on the shapes of :func:`instance_contrastive_loss`, or a negative
      ``temporal_unit``.

  References:
    Yue et al., "TS2Vec: Towards Universal Representation of Time Series", AAAI 2022.
    https://arxiv.org/abs/2106.10466
  """
  _check_pair(z1, z2)
  if temporal_unit < 0:
    raise ValueError(f"temporal_unit must be >= 0, got {temporal_unit!r}.")
  mask = _check_mask(mask, z1)
  z1, z2 = (_zero_invalid(z.astype(jnp.float32), mask) for z in (z1, z2))
  total = jnp.zeros((), jnp.float32)
  levels = jnp.zeros((), jnp.float32)
  depth = 0
  while True:
    if alpha != 0:
      total += alpha * _global_mean(*_instance_terms(z1, z2, mask, axis_name), axis_name)
    # At one timestamp the official loop stops before the temporal loss; with a mask a level
    # whose valid length is 1 gives a temporal loss of exactly 0 (its only candidate is the
    # positive), the same.
    if depth >= temporal_unit and alpha != 1 and z1.shape[1] > 1:
      total += (1 - alpha) * _global_mean(*_temporal_terms(z1, z2, mask), axis_name)
    levels += _level_present(mask, axis_name)
    if z1.shape[1] == 1:
      break
    (z1, mask1), (z2, _) = _max_pool2(z1, mask), _max_pool2(z2, None)
    mask = mask1
    depth += 1
  return jnp.where(levels > 0, total / jnp.maximum(levels, 1.0), 0.0)
