"""InfoNCE and SimCLR's NT-Xent over the (gathered) batch, materialising the logits."""

from __future__ import annotations

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


def contrastive_logits(
  queries: jax.Array,
  keys: jax.Array,
  positive_indices: jax.Array,
  temperature: float,
  *,
  extra_negatives: jax.Array | None = None,
  exclude_indices: jax.Array | None = None,
  axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Cosine-similarity logits of queries against keys, and the positive labels.

  Args:
    queries: (n, d) query embeddings (not necessarily normalised).
    keys: (m, d) key embeddings. With ``axis_name`` these are the local keys;
      the function gathers them into (m * num_devices, d).
    positive_indices: (n,) int index of each query's positive in the local
      ``keys`` (offset to the global index when ``axis_name`` is set).
    temperature: softmax temperature, > 0.
    extra_negatives: optional (q, d) negatives appended after the keys, used
      as given on every device (e.g. a MoCo queue).
    exclude_indices: optional (n,) int index of one local key per query to
      leave out of the softmax (e.g. the query itself in SimCLR).
    axis_name: mapped axis to gather keys over, or None.

  Returns:
    ``(logits, labels)``: (n, K) float32 logits where K is the number of
    global keys plus extra negatives, and (n,) int32 labels.

  Raises:
    ValueError: on mismatched shapes or a temperature <= 0.
  """
  _check_2d("queries", queries)
  _check_2d("keys", keys)
  _check_temperature(temperature)
  if queries.shape[1] != keys.shape[1]:
    raise ValueError(
      f"queries and keys must share the embedding dim, got {queries.shape} and {keys.shape}."
    )
  if positive_indices.shape != (queries.shape[0],):
    raise ValueError(
      f"positive_indices must have shape ({queries.shape[0]},), got {positive_indices.shape}."
    )
  q = l2_normalize(queries)
  k = l2_normalize(keys)
  offset = _global_offset(keys.shape[0], axis_name)
  if axis_name is not None:
    k = jax.lax.all_gather(k, axis_name, tiled=True)
  # (n, d) @ (d, K) -> (n, K)
  logits = jnp.einsum("nd,kd->nk", q, k, precision=jax.lax.Precision.HIGHEST) / temperature
  if exclude_indices is not None:
    mask = jnp.arange(k.shape[0])[None, :] == (exclude_indices + offset)[:, None]
    logits = jnp.where(mask, _MASK_VALUE, logits)
  if extra_negatives is not None:
    _check_2d("extra_negatives", extra_negatives)
    neg = l2_normalize(extra_negatives)
    # (n, d) @ (d, q) -> (n, q)
    neg_logits = jnp.einsum("nd,qd->nq", q, neg, precision=jax.lax.Precision.HIGHEST)
    logits = jnp.concatenate([logits, neg_logits / temperature], axis=1)
  labels = (positive_indices + offset).astype(jnp.int32)
  return logits, labels


def softmax_cross_entropy(
  logits: jax.Array, labels: jax.Array, axis_name: str | None = None
) -> jax.Array:
  """Mean of ``-log softmax(logits)[label]`` over the (global) batch, in float32."""
  logits = logits.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  return _mean_over_batch(nll, axis_name)


def positive_accuracy(
  logits: jax.Array, labels: jax.Array, axis_name: str | None = None
) -> jax.Array:
  """Fraction of queries whose positive has the highest logit (top-1)."""
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return _mean_over_batch(correct, axis_name)


def info_nce(
  queries: jax.Array,
  keys: jax.Array,
  positive_indices: jax.Array,
  temperature: float = 0.1,
  *,
  extra_negatives: jax.Array | None = None,
  exclude_indices: jax.Array | None = None,
  axis_name: str | None = None,
) -> jax.Array:
  r"""InfoNCE of queries against a key set, each query with one positive key.

  .. math::
     \ell_i = -\log \frac{\exp(s(q_i, k_{p(i)}) / \tau)}
                         {\sum_{j \in K \setminus E(i)} \exp(s(q_i, k_j) / \tau)}

  with :math:`s` the cosine similarity, :math:`K` all (gathered) keys plus any
  extra negatives and :math:`E(i)` the optionally excluded key. Returns the
  mean of :math:`\ell_i` over all queries of the global batch. Arguments are
  those of :func:`contrastive_logits`.

  References:
    van den Oord et al., "Representation Learning with Contrastive Predictive
    Coding", 2018. https://arxiv.org/abs/1807.03748
  """
  logits, labels = contrastive_logits(
    queries,
    keys,
    positive_indices,
    temperature,
    extra_negatives=extra_negatives,
    exclude_indices=exclude_indices,
    axis_name=axis_name,
  )
  return softmax_cross_entropy(logits, labels, axis_name)


def nt_xent_logits(
  z_a: jax.Array, z_b: jax.Array, temperature: float = 0.1, axis_name: str | None = None
) -> tuple[jax.Array, jax.Array]:
  """The (2n, 2N) NT-Xent logits with self-similarity masked, and the labels.

  Local rows are ordered ``[z_a; z_b]``; gathered columns are ordered device
  by device, each device's block being its own ``[z_a; z_b]``.
  """
  _check_2d("z_a", z_a)
  _check_2d("z_b", z_b)
  if z_a.shape != z_b.shape:
    raise ValueError(f"z_a and z_b must have the same shape, got {z_a.shape} and {z_b.shape}.")
  n = z_a.shape[0]
  z = jnp.concatenate([z_a, z_b], axis=0)
  local = jnp.arange(2 * n)
  partner = jnp.concatenate([local[n:], local[:n]])
  return contrastive_logits(z, z, partner, temperature, exclude_indices=local, axis_name=axis_name)


def nt_xent(
  z_a: jax.Array,
  z_b: jax.Array,
  temperature: float = 0.1,
  axis_name: str | None = None,
  *,
  return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
  r"""SimCLR's normalised temperature-scaled cross entropy (NT-Xent).

  ``z_a[i]`` and ``z_b[i]`` embed two views of image ``i``. Each of the 2N
  views of the global batch is an anchor whose positive is its partner view
  and whose negatives are the other 2N - 2 views:

  .. math::
     \ell_{i} = -\log \frac{\exp(\cos(z_i, z_{p(i)}) / \tau)}
                         {\sum_{j \ne i} \exp(\cos(z_i, z_j) / \tau)},
     \qquad L = \frac{1}{2N} \sum_i \ell_i .

  Args:
    z_a: (n, d) embeddings of the first views (local batch with axis_name).
    z_b: (n, d) embeddings of the second views.
    temperature: :math:`\tau` > 0.
    axis_name: mapped axis to gather the global batch over, or None.
    return_metrics: also return ``{"accuracy", "positive_cosine",
      "negative_cosine"}``, computed from the same logits.

  Returns:
    The scalar mean loss over the 2N anchors (float32), and the metrics dict
    when ``return_metrics``.

  Raises:
    ValueError: if the shapes differ or are not 2-D, or temperature <= 0.

  References:
    Chen et al., "A Simple Framework for Contrastive Learning of Visual
    Representations", ICML 2020. https://arxiv.org/abs/2002.05709
  """
  logits, labels = nt_xent_logits(z_a, z_b, temperature, axis_name)
  loss = softmax_cross_entropy(logits, labels, axis_name)
  if not return_metrics:
    return loss
  logits = jax.lax.stop_gradient(logits)
  unmasked = logits > _MASK_VALUE / 2
  cos = jnp.where(unmasked, logits * temperature, 0.0)
  pos = jnp.take_along_axis(cos, labels[:, None], axis=-1)[:, 0]
  # Each row holds one positive, one masked self entry and 2N - 2 negatives.
  neg = (jnp.sum(cos, axis=-1) - pos) / (cos.shape[1] - 2)
  metrics = {
    "accuracy": positive_accuracy(logits, labels, axis_name),
    "positive_cosine": _mean_over_batch(pos, axis_name),
    "negative_cosine": _mean_over_batch(neg, axis_name),
  }
  return loss, metrics
