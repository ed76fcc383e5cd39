"""Blockwise InfoNCE/NT-Xent: the same values and gradients without the full logits."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cljax.losses._common import (
  _MASK_VALUE,
  _check_2d,
  _check_temperature,
  _global_offset,
  _mean_over_batch,
  l2_normalize,
)

# Memory-bounded InfoNCE. The forward pass scans over blocks of the gathered
# keys with a running max and sum per query (an online log-sum-exp, as in flash
# attention); the custom backward pass recomputes each block's logits. Neither
# holds more than O(n * block_size) logits, besides the O(K * d) keys.


def _check_block_size(block_size: int) -> None:
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}.")


def _key_blocks(keys: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
  """Zero-pads (K, d) keys to whole blocks: (nb, b, d) blocks and their (nb,) first columns."""
  num_keys, dim = keys.shape
  b = min(block_size, num_keys)
  num_blocks = -(-num_keys // b)
  padded = jnp.pad(keys, ((0, num_blocks * b - num_keys), (0, 0)))
  return padded.reshape(num_blocks, b, dim), jnp.arange(num_blocks) * b


def _block_logits(q, k_block, start, labels, exclude, num_keys):
  """One block's (n, b) logits, and masks of its softmax columns and positives."""
  # (n, d) @ (d, b) -> (n, b)
  logits = jnp.einsum("nd,bd->nb", q, k_block, precision=jax.lax.Precision.HIGHEST)
  col = (start + jnp.arange(k_block.shape[0]))[None, :]
  valid = (col < num_keys) & (col != exclude[:, None])
  return logits, valid, col == labels[:, None]


def _stream_forward(
  q: jax.Array, keys: jax.Array, labels: jax.Array, exclude: jax.Array, block_size: int
) -> tuple[jax.Array, ...]:
  """Per query: log-sum-exp, positive logit, best negative logit, sum of logits."""
  blocks, starts = _key_blocks(keys, block_size)
  zero = jnp.zeros_like(q[:, 0])

  def body(carry, block):
    run_max, run_sum, pos, neg_max, total = carry
    logits, valid, positive = _block_logits(q, *block, labels, exclude, keys.shape[0])
    masked = jnp.where(valid, logits, _MASK_VALUE)
    new_max = jnp.maximum(run_max, jnp.max(masked, axis=1))
    p = jnp.where(valid, jnp.exp(masked - new_max[:, None]), 0.0)
    run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.sum(p, axis=1)
    pos = pos + jnp.sum(jnp.where(positive, logits, 0.0), axis=1)
    negative = jnp.where(valid & ~positive, logits, _MASK_VALUE)
    neg_max = jnp.maximum(neg_max, jnp.max(negative, axis=1))
    total = total + jnp.sum(jnp.where(valid, logits, 0.0), axis=1)
    return (new_max, run_sum, pos, neg_max, total), None

  init = (zero + _MASK_VALUE, zero, zero, zero + _MASK_VALUE, zero)
  (run_max, run_sum, pos, neg_max, total), _ = jax.lax.scan(body, init, (blocks, starts))
  return run_max + jnp.log(run_sum), pos, neg_max, total


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _streamed_softmax(
  q: jax.Array,
  keys: jax.Array,
  labels: jax.Array,
  exclude: jax.Array,
  block_size: int,
  axis_name: str | None,
) -> tuple[jax.Array, ...]:
  """Streamed softmax statistics of ``q @ gather(keys).T``; see ``_stream_forward``.

  ``q`` is (n, d) and already divided by the temperature, ``keys`` (m, d) are
  the local keys, ``labels`` and ``exclude`` (n,) global column indices (-1
  for none). Only the log-sum-exp and the positive logit are differentiable;
  callers must ``stop_gradient`` the other two outputs (their cotangents are
  ignored).
  """
  return _streamed_softmax_fwd(q, keys, labels, exclude, block_size, axis_name)[0]


def _streamed_softmax_fwd(q, keys, labels, exclude, block_size, axis_name):
  if axis_name is not None:
    keys = jax.lax.all_gather(keys, axis_name, tiled=True)
  stats = _stream_forward(q, keys, labels, exclude, block_size)
  return stats, (q, keys, labels, exclude, stats[0])


def _streamed_softmax_bwd(block_size, axis_name, residuals, cotangents):
  q, keys, labels, exclude, lse = residuals
  g_lse, g_pos = cotangents[0], cotangents[1]
  blocks, starts = _key_blocks(keys, block_size)

  def body(dq, block):
    k_block, _ = block
    logits, valid, positive = _block_logits(q, *block, labels, exclude, keys.shape[0])
    softmax = jnp.where(valid, jnp.exp(jnp.where(valid, logits, _MASK_VALUE) - lse[:, None]), 0.0)
    # d lse / d logits is the softmax; d pos / d logits the positive's one-hot.
    g = g_lse[:, None] * softmax + jnp.where(positive, g_pos[:, None], 0.0)
    # (n, b) @ (b, d) -> (n, d) and (b, n) @ (n, d) -> (b, d)
    dq = dq + jnp.einsum("nb,bd->nd", g, k_block, precision=jax.lax.Precision.HIGHEST)
    return dq, jnp.einsum("nb,nd->bd", g, q, precision=jax.lax.Precision.HIGHEST)

  dq, dk = jax.lax.scan(body, jnp.zeros_like(q), (blocks, starts))
  dk = dk.reshape(-1, keys.shape[1])[: keys.shape[0]]
  if axis_name is not None:
    dk = _return_key_gradients(dk, axis_name)
  return dq, dk, None, None


def _return_key_gradients(dk: jax.Array, axis_name: str) -> jax.Array:
  """(K, d) gathered-key gradients -> (m, d) gradients of this device's keys.

  The transpose of the all-gather: every device's keys receive the sum of
  the gradients that all devices computed for them.
  """
  return jax.lax.psum_scatter(dk, axis_name, scatter_dimension=0, tiled=True)


_streamed_softmax.defvjp(_streamed_softmax_fwd, _streamed_softmax_bwd)


def _no_index(n: int) -> jax.Array:  # -1 matches no key column.
  return jnp.full((n,), -1, jnp.int32)


def info_nce_blockwise(
  queries: jax.Array,
  keys: jax.Array,
  positive_indices: jax.Array,
  temperature: float = 0.1,
  *,
  extra_negatives: jax.Array | None = None,
  exclude_indices: jax.Array | None = None,
  axis_name: str | None = None,
  block_size: int = 1024,
) -> jax.Array:
  """:func:`info_nce` streamed over blocks of ``block_size`` keys.

  Same value and gradient as :func:`info_nce`, but never holds the (n, K)
  logits: memory is O(n * block_size + K * d) instead of O(n * K). Extra
  negatives are streamed the same way and joined with a log-add-exp.

  Args:
    queries, keys, positive_indices, temperature, extra_negatives,
      exclude_indices, axis_name: as for :func:`contrastive_logits`.
    block_size: keys per block; a last partial block is padded and masked.

  Returns:
    The scalar mean loss over the global batch (float32).

  Raises:
    ValueError: on mismatched shapes, a temperature <= 0 or a block_size <= 0.

  References:
    van den Oord et al., "Representation Learning with Contrastive Predictive
    Coding", 2018. https://arxiv.org/abs/1807.03748
    Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention
    with IO-Awareness", NeurIPS 2022 (the online softmax).
    https://arxiv.org/abs/2205.14135
  """
  _check_2d("queries", queries)
  _check_2d("keys", keys)
  _check_temperature(temperature)
  _check_block_size(block_size)
  n = queries.shape[0]
  if queries.shape[1] != keys.shape[1]:
    raise ValueError(
      f"queries and keys must share the embedding dim, got {queries.shape} and {keys.shape}."
    )
  if positive_indices.shape != (n,):
    raise ValueError(f"positive_indices must have shape ({n},), got {positive_indices.shape}.")
  q = l2_normalize(queries) / temperature
  offset = _global_offset(keys.shape[0], axis_name)
  labels = (positive_indices + offset).astype(jnp.int32)
  exclude = (
    _no_index(n) if exclude_indices is None else (exclude_indices + offset).astype(jnp.int32)
  )
  lse, pos, _, _ = _streamed_softmax(q, l2_normalize(keys), labels, exclude, block_size, axis_name)
  if extra_negatives is not None:
    _check_2d("extra_negatives", extra_negatives)
    neg = l2_normalize(extra_negatives)
    lse_neg = _streamed_softmax(q, neg, _no_index(n), _no_index(n), block_size, None)[0]
    lse = jnp.logaddexp(lse, lse_neg)
  return _mean_over_batch(lse - pos, axis_name)


def nt_xent_blockwise(
  z_a: jax.Array,
  z_b: jax.Array,
  temperature: float = 0.1,
  axis_name: str | None = None,
  *,
  block_size: int = 1024,
  return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
  r""":func:`nt_xent` streamed over blocks of ``block_size`` gathered views.

  Same value, gradient and metrics as :func:`nt_xent`, but each device holds
  O(2n * block_size) logits at a time plus the (2N, d) gathered unit views,
  never the (2n, 2N) logits. A custom VJP recomputes each block's logits for
  the gradients and reduce-scatters the key gradients to their devices.

  Args:
    z_a: (n, d) embeddings of the first views (local batch with axis_name).
    z_b: (n, d) embeddings of the second views.
    temperature: :math:`\tau` > 0.
    axis_name: mapped axis to gather the global batch over, or None.
    block_size: number of gathered views per block; the last block is padded
      and masked when it does not divide 2N.
    return_metrics: also return :func:`nt_xent`'s metrics, from the streamed
      statistics (a positive tied with the best negative counts as wrong).

  Returns:
    The scalar mean loss over the 2N anchors (float32), and the metrics dict
    when ``return_metrics``.

  Raises:
    ValueError: if the shapes differ or are not 2-D, temperature <= 0 or
      block_size <= 0.

  References:
    Chen et al., "A Simple Framework for Contrastive Learning of Visual
    Representations", ICML 2020. https://arxiv.org/abs/2002.05709
    Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention
    with IO-Awareness", NeurIPS 2022. https://arxiv.org/abs/2205.14135
  """
  _check_2d("z_a", z_a)
  _check_2d("z_b", z_b)
  if z_a.shape != z_b.shape:
    raise ValueError(f"z_a and z_b must have the same shape, got {z_a.shape} and {z_b.shape}.")
  _check_temperature(temperature)
  _check_block_size(block_size)
  n = z_a.shape[0]
  z = l2_normalize(jnp.concatenate([z_a, z_b], axis=0))
  offset = _global_offset(2 * n, axis_name)
  local = jnp.arange(2 * n, dtype=jnp.int32) + offset
  partner = jnp.concatenate([local[n:], local[:n]])
  q = z / temperature
  lse, pos, neg_max, total = _streamed_softmax(q, z, partner, local, block_size, axis_name)
  loss = _mean_over_batch(lse - pos, axis_name)
  if not return_metrics:
    return loss
  pos, neg_max, total = jax.lax.stop_gradient((pos, neg_max, total))
  num_views = 2 * n if axis_name is None else 2 * n * jax.lax.psum(1, axis_name)
  metrics = {
    "accuracy": _mean_over_batch((pos > neg_max).astype(jnp.float32), axis_name),
    "positive_cosine": _mean_over_batch(pos * temperature, axis_name),
    "negative_cosine": _mean_over_batch((total - pos) * temperature / (num_views - 2), axis_name),
  }
  return loss, metrics
