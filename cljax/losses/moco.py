"""MoCo's InfoNCE losses: v1/v2 against a (sharded) queue, v3 against the global batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cljax.losses._common import (
  _check_2d,
  _check_temperature,
  _global_offset,
  _mean_over_batch,
  l2_normalize,
)
from cljax.losses.contrastive import contrastive_logits, positive_accuracy, softmax_cross_entropy

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_queries_and_keys(queries: jax.Array, keys: jax.Array) -> None:
  _check_2d("queries", queries)
  _check_2d("keys", keys)
  if queries.shape != keys.shape:
    raise ValueError(
      f"queries and keys must have the same shape (n, d), got {queries.shape} and {keys.shape}."
    )


def moco_v2_loss(
  queries: jax.Array,
  keys: jax.Array,
  queue: jax.Array,
  temperature: float = 0.2,
  *,
  axis_name: str | None = None,
  return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
  r"""MoCo v1/v2 InfoNCE of each query against its key and a queue of negatives.

  With :math:`q_i, k_i, u_j` the L2-normalised query, positive key and queue
  entries, and :math:`\tau` the temperature, each query has the
  :math:`1 + K` logits :math:`[q_i \cdot k_i, q_i \cdot u_1, \dots,
  q_i \cdot u_K] / \tau` with label 0:

  .. math::
     \ell_i = -\log \frac{\exp(q_i \cdot k_i / \tau)}
       {\exp(q_i \cdot k_i / \tau) + \sum_{j=1}^{K} \exp(q_i \cdot u_j / \tau)},
     \qquad L = \frac{1}{N} \sum_{i=1}^{N} \ell_i

  over the N queries of the global batch. ``keys`` and ``queue`` come from
  the momentum encoder and receive no gradient (``stop_gradient``).

  With ``axis_name`` set (inside ``jax.shard_map``), ``queries`` and ``keys``
  are this device's (n, d) rows of the global batch and ``queue`` is this
  device's (K / num_devices, d) shard of a queue sharded over the same axis;
  every query is scored against the whole queue. The full queue is never
  gathered: the (n, d) queries are all-gathered, each device computes the
  (N, K_local) logits against its own shard, the per-query log-sum-exp is
  combined across devices with a ``pmax`` (stop-gradient shift) and a
  ``psum_scatter`` that leaves each device its own rows, and the positive
  logit is added locally. Value and gradient equal the single-device loss
  with the concatenated queue (gradients reach other devices' queries
  through the transpose of the gather).

  Args:
    queries: (n, d) query embeddings from the online encoder (any float
      dtype; not necessarily normalised).
    keys: (n, d) positive keys from the momentum encoder, row i for query i.
    queue: (K, d) negative keys, row-major (the official code stores the
      transpose, (d, K)); with ``axis_name`` this device's (K / D, d) shard.
      Normalised here too, which is a no-op for a queue of normalised keys.
    temperature: :math:`\tau` > 0 (0.07 in MoCo v1, 0.2 in MoCo v2).
    axis_name: mapped mesh axis of the batch and the queue shards, or None.
    return_metrics: also return ``{"accuracy", "positive_cosine",
      "negative_cosine"}``: top-1 accuracy of the positive among the
      1 + K candidates, mean :math:`q_i \cdot k_i`, and mean
      :math:`q_i \cdot u_j` over the queue.

  Returns:
    The scalar float32 mean loss over the global batch (identical on every
    device), and the metrics dict when ``return_metrics``.

  Raises:
    ValueError: if queries and keys are not the same (n, d) shape, the queue
      is not (K, d) with K >= 1, or temperature <= 0.

  References:
    He et al., "Momentum Contrast for Unsupervised Visual Representation
    Learning", CVPR 2020. https://arxiv.org/abs/1911.05722

    Chen et al., "Improved Baselines with Momentum Contrastive Learning",
    2020. https://arxiv.org/abs/2003.04297
  """
  _check_queries_and_keys(queries, keys)
  _check_2d("queue", queue)
  _check_temperature(temperature)
  if queue.shape[1] != queries.shape[1]:
    raise ValueError(
      f"queue must have shape (K, {queries.shape[1]}) to match the queries' embedding dim, "
      f"got {queue.shape}."
    )
  if queue.shape[0] == 0:
    raise ValueError("queue must hold at least one negative, got shape (0, d).")
  n = queries.shape[0]
  q = l2_normalize(queries)
  k = l2_normalize(jax.lax.stop_gradient(keys))
  u = l2_normalize(jax.lax.stop_gradient(queue))
  # (n,) positive logits, local.
  pos = jnp.sum(q * k, axis=-1) / temperature
  q_all = q if axis_name is None else jax.lax.all_gather(q, axis_name, tiled=True)
  # (N, d) @ (d, K_local) -> (N, K_local): every global query against this shard.
  neg = jnp.einsum("nd,kd->nk", q_all, u, precision=_HIGHEST) / temperature
  # Log-sum-exp over all K negatives, shifted by the global row max (no
  # gradient needed through the shift: it cancels exactly).
  shift = jax.lax.stop_gradient(jnp.max(neg, axis=-1))
  if axis_name is not None:
    shift = jax.lax.pmax(shift, axis_name)
  sum_exp = jnp.sum(jnp.exp(neg - shift[:, None]), axis=-1)
  offset = _global_offset(n, axis_name)
  if axis_name is None:
    shift_local = shift
  else:
    # Each device keeps the summed terms of its own n rows.
    sum_exp = jax.lax.psum_scatter(sum_exp, axis_name, tiled=True)
    shift_local = jax.lax.dynamic_slice_in_dim(shift, offset, n)
  neg_lse = shift_local + jnp.log(sum_exp)
  nll = jnp.logaddexp(pos, neg_lse) - pos
  loss = _mean_over_batch(nll, axis_name)
  if not return_metrics:
    return loss
  pos_sg = jax.lax.stop_gradient(pos)
  # argmax picks index 0 (the positive) on ties, hence >=.
  correct = (pos_sg >= jax.lax.stop_gradient(shift_local)).astype(jnp.float32)
  # Sum over this shard's queue columns for the local rows, then over shards.
  neg_sum = jnp.sum(jax.lax.stop_gradient(neg), axis=-1) * temperature
  num_negatives = queue.shape[0]
  if axis_name is not None:
    neg_sum = jax.lax.psum_scatter(neg_sum, axis_name, tiled=True)
    num_negatives = num_negatives * jax.lax.axis_size(axis_name)
  metrics = {
    "accuracy": _mean_over_batch(correct, axis_name),
    "positive_cosine": _mean_over_batch(pos_sg * temperature, axis_name),
    "negative_cosine": _mean_over_batch(neg_sum / num_negatives, axis_name),
  }
  return loss, metrics


def moco_v3_loss(
  queries: jax.Array,
  keys: jax.Array,
  temperature: float = 0.2,
  *,
  axis_name: str | None = None,
  return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
  r"""MoCo v3's contrastive loss of queries against the keys of the global batch.

  Algorithm 1 of the paper (``ctr``), with :math:`q_i, k_j` L2-normalised,
  the keys of all N images of the global batch (all-gathered, no gradient)
  and the label of query i its own global index:

  .. math::
     L = 2\tau \cdot \frac{1}{N} \sum_{i=1}^{N}
       -\log \frac{\exp(q_i \cdot k_i / \tau)}{\sum_{j=1}^{N} \exp(q_i \cdot k_j / \tau)} .

  The factor :math:`2\tau` is the paper's pseudo-code. The caller
  symmetrises: ``moco_v3_loss(q1, k2) + moco_v3_loss(q2, k1)`` with ``q``
  from the online predictor and ``k`` from the momentum encoder.

  Args:
    queries: (n, d) online predictions (local rows with ``axis_name``).
    keys: (n, d) momentum-encoder keys of the same images, row i for query i.
    temperature: :math:`\tau` > 0 (0.2 in the paper's ViT recipe).
    axis_name: mapped mesh axis to gather the keys over, or None.
    return_metrics: also return ``{"accuracy", "positive_cosine"}``.

  Returns:
    The scalar float32 loss (global mean, identical on every device), and
    the metrics dict when ``return_metrics``.

  Raises:
    ValueError: if queries and keys are not the same (n, d) shape, or
      temperature <= 0.

  References:
    Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision
    Transformers", ICCV 2021. https://arxiv.org/abs/2104.02057
  """
  _check_queries_and_keys(queries, keys)
  logits, labels = contrastive_logits(
    queries,
    jax.lax.stop_gradient(keys),
    jnp.arange(queries.shape[0]),
    temperature,
    axis_name=axis_name,
  )
  loss = softmax_cross_entropy(logits, labels, axis_name) * (2.0 * temperature)
  if not return_metrics:
    return loss
  logits = jax.lax.stop_gradient(logits)
  pos = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0] * temperature
  metrics = {
    "accuracy": positive_accuracy(logits, labels, axis_name),
    "positive_cosine": _mean_over_batch(pos, axis_name),
  }
  return loss, metrics
