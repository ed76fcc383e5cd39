"""Supervised contrastive loss (SupCon, L_out) over the (gathered) batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cljax.losses._common import (
  _MASK_VALUE,
  _check_2d,
  _check_temperature,
  _global_offset,
  l2_normalize,
)


def _global_sum(x: jax.Array, axis_name: str | None) -> jax.Array:
  total = jnp.sum(x)
  return total if axis_name is None else jax.lax.psum(total, axis_name)


def supcon_loss(
  embeddings: jax.Array,
  labels: jax.Array,
  temperature: float = 0.1,
  *,
  base_temperature: float | None = None,
  axis_name: str | None = None,
  return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
  r"""Supervised contrastive loss, the :math:`L^{sup}_{out}` form (eq. 2 of the paper).

  Every row of ``embeddings`` is an anchor. Its positives :math:`P(i)` are the
  other samples of the global batch with the same label, and its contrast set
  :math:`A(i)` is every sample of the global batch but itself:

  .. math::
     \ell_i = -\frac{\tau}{\tau_b} \frac{1}{|P(i)|} \sum_{p \in P(i)}
       \log \frac{\exp(s_{ip} / \tau)}{\sum_{a \in A(i)} \exp(s_{ia} / \tau)},
     \qquad L = \frac{1}{|I^+|} \sum_{i \in I^+} \ell_i ,

  with :math:`s` the cosine similarity, :math:`\tau_b` the base temperature
  and :math:`I^+` the anchors of the global batch with at least one positive.
  Anchors without a positive are left out of the mean, and the loss is 0 when
  no anchor has one. With two views per image and distinct labels per image,
  every anchor's only positive is its other view and the loss is SimCLR's
  NT-Xent.

  The caller builds the views: for views ``x_1, ..., x_V`` of a batch with
  labels ``y``, pass ``embeddings = concat([z_1, ..., z_V])`` and
  ``labels = tile(y, V)``. The order of rows does not matter.

  Args:
    embeddings: (m, d) embeddings of all views of the (local) batch, not
      necessarily normalised. With ``axis_name`` they are all-gathered into
      the (m * num_devices, d) contrast set.
    labels: (m,) integer class label of each row (gathered with the rows).
    temperature: :math:`\tau` > 0.
    base_temperature: :math:`\tau_b` > 0; None means :math:`\tau_b = \tau`
      (no rescaling). The paper's code uses 0.07.
    axis_name: mapped axis to gather the global batch over, or None.
    return_metrics: also return ``{"anchor_fraction", "positive_cosine",
      "negative_cosine"}``: the fraction of anchors that have a positive, and
      the mean cosine to positives (over those anchors) and to the other
      labels (over anchors that have one).

  Returns:
    The scalar float32 loss (the mean over anchors with a positive of the
    global batch, identical on every device), and the metrics dict when
    ``return_metrics``.

  Raises:
    ValueError: if ``embeddings`` is not 2-D, ``labels`` is not an integer
      (m,) array, or a temperature is <= 0.

  References:
    Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020.
    https://arxiv.org/abs/2004.11362
  """
  _check_2d("embeddings", embeddings)
  _check_temperature(temperature)
  if base_temperature is not None and not isinstance(base_temperature, jax.Array):
    if not base_temperature > 0:
      raise ValueError(f"base_temperature must be > 0 or None, got {base_temperature!r}.")
  labels = jnp.asarray(labels)
  m = embeddings.shape[0]
  if labels.shape != (m,):
    raise ValueError(f"labels must have shape ({m},) to match embeddings, got {labels.shape}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must have an integer dtype, got {labels.dtype}.")

  z = l2_normalize(embeddings)
  offset = _global_offset(m, axis_name)
  all_z, all_labels = z, labels
  if axis_name is not None:
    all_z = jax.lax.all_gather(z, axis_name, tiled=True)
    all_labels = jax.lax.all_gather(labels, axis_name, tiled=True)
  # (m, d) @ (d, M) -> (m, M)
  cos = jnp.einsum("md,nd->mn", z, all_z, precision=jax.lax.Precision.HIGHEST)
  cols = jnp.arange(all_z.shape[0])[None, :]
  is_self = cols == (jnp.arange(m) + offset)[:, None]
  same = labels[:, None] == all_labels[None, :]
  positive = same & ~is_self
  logits = jnp.where(is_self, _MASK_VALUE, cos / temperature)
  log_prob = logits - jax.nn.logsumexp(logits, axis=1, keepdims=True)
  num_pos = jnp.sum(positive, axis=1)
  has_pos = num_pos > 0
  mean_log_prob_pos = jnp.sum(jnp.where(positive, log_prob, 0.0), axis=1) / jnp.maximum(num_pos, 1)
  scale = 1.0 if base_temperature is None else temperature / base_temperature
  per_anchor = jnp.where(has_pos, -scale * mean_log_prob_pos, 0.0)
  count = _global_sum(has_pos.astype(jnp.float32), axis_name)
  loss = _global_sum(per_anchor, axis_name) / jnp.maximum(count, 1.0)
  if not return_metrics:
    return loss

  cos = jax.lax.stop_gradient(cos)
  negative = ~same
  num_neg = jnp.sum(negative, axis=1)
  has_neg = num_neg > 0
  pos_cos = jnp.sum(jnp.where(positive, cos, 0.0), axis=1) / jnp.maximum(num_pos, 1)
  neg_cos = jnp.sum(jnp.where(negative, cos, 0.0), axis=1) / jnp.maximum(num_neg, 1)
  count_neg = _global_sum(has_neg.astype(jnp.float32), axis_name)
  total = m if axis_name is None else m * jax.lax.psum(1, axis_name)
  metrics = {
    "anchor_fraction": count / total,
    "positive_cosine": _global_sum(jnp.where(has_pos, pos_cos, 0.0), axis_name)
    / jnp.maximum(count, 1.0),
    "negative_cosine": _global_sum(jnp.where(has_neg, neg_cos, 0.0), axis_name)
    / jnp.maximum(count_neg, 1.0),
  }
  return loss, metrics
