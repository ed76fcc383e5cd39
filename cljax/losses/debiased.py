"""NT-Xent variants: debiased (DCL), hard-negative (HCL) and decoupled contrastive losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cljax.losses._common import _MASK_VALUE, _global_offset, _mean_over_batch
from cljax.losses.contrastive import nt_xent_logits, positive_accuracy

# All three losses use the two-view batch of nt_xent: each of the 2N views of
# the global batch is an anchor, its partner view the positive, and the other
# M = 2N - 2 views its negatives. Sums of exponentials are done as
# log-sum-exps, since logits reach 1/T = 10 or more.


def _split_logits(
  z_a: jax.Array, z_b: jax.Array, temperature: float, axis_name: str | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, int]:
  """NT-Xent logits, labels, positive logits, negative mask and negatives per anchor."""
  logits, labels = nt_xent_logits(z_a, z_b, temperature, axis_name)
  num_neg = logits.shape[1] - 2
  if num_neg < 1:
    raise ValueError(
      "these losses need at least one negative per anchor, i.e. a global batch of at least 2 "
      f"pairs; got z_a of shape {z_a.shape} ({logits.shape[1] // 2} pair(s) in all)."
    )
  rows = logits.shape[0]
  cols = jnp.arange(logits.shape[1])[None, :]
  is_self = cols == (jnp.arange(rows) + _global_offset(rows, axis_name))[:, None]
  negative = ~is_self & (cols != labels[:, None])
  pos = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  return logits, labels, pos, negative, num_neg


def _masked_logsumexp(x: jax.Array, mask: jax.Array) -> jax.Array:
  return jax.nn.logsumexp(jnp.where(mask, x, _MASK_VALUE), axis=-1)


def _check_tau_plus(tau_plus: float) -> None:
  if not isinstance(tau_plus, jax.Array) and not 0 <= tau_plus < 1:
    raise ValueError(f"tau_plus must be in [0, 1), got {tau_plus!r}.")


def _debiased_from_log_sum(
  pos: jax.Array,
  log_neg_sum: jax.Array,
  num_neg: int,
  tau_plus: float,
  temperature: float,
) -> tuple[jax.Array, jax.Array]:
  """Per-anchor ``-log(pos / (pos + Ng))`` from ``log(sum_neg)``, and where Ng is clamped.

  ``Ng = max((S - M tau+ e^pos) / (1 - tau+), M e^(-1/T))`` in log space.
  """
  log_bound = jnp.log(num_neg) - 1.0 / temperature
  if not isinstance(tau_plus, jax.Array) and tau_plus == 0:
    log_raw = log_neg_sum
  else:
    # log(S - M tau+ e^pos) = log S + log(1 - r) with r = M tau+ e^pos / S; r >= 1 means the
    # estimate is <= 0 and the clamp takes over.
    log_r = jnp.log(num_neg * tau_plus) + pos - log_neg_sum
    valid = log_r < 0
    log_r = jnp.where(valid, log_r, -1.0)
    log_raw = log_neg_sum + jnp.log1p(-jnp.exp(log_r)) - jnp.log1p(-tau_plus)
    log_raw = jnp.where(valid, log_raw, -jnp.inf)
  clamped = log_raw < log_bound
  log_ng = jnp.maximum(log_raw, log_bound)
  return jnp.logaddexp(pos, log_ng) - pos, clamped


def _metrics(logits, labels, pos, negative, num_neg, temperature, axis_name):
  logits = jax.lax.stop_gradient(logits)
  neg_cos = jnp.sum(jnp.where(negative, logits, 0.0), axis=-1) * temperature / num_neg
  return {
    "accuracy": positive_accuracy(logits, labels, axis_name),
    "positive_cosine": _mean_over_batch(jax.lax.stop_gradient(pos) * temperature, axis_name),
    "negative_cosine": _mean_over_batch(neg_cos, axis_name),
  }


def debiased_nt_xent(
  z_a: jax.Array,
  z_b: jax.Array,
  temperature: float = 0.5,
  tau_plus: float = 0.1,
  *,
  axis_name: str | None = None,
  return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
  r"""Debiased contrastive loss (DCL): NT-Xent corrected for same-class negatives.

  With :math:`M = 2N - 2` negatives per anchor, :math:`p_i = \exp(s_i^+ / \tau)`
  and :math:`\tau^+` the class prior (the chance that a "negative" shares the
  anchor's class):

  .. math::
     N_g = \max\Big(\frac{\sum_{j \in \mathrm{neg}(i)} e^{s_{ij} / \tau}
       - M \tau^+ p_i}{1 - \tau^+},\ M e^{-1/\tau}\Big), \qquad
     \ell_i = -\log \frac{p_i}{p_i + N_g},

  averaged over the 2N anchors of the global batch; :math:`s` is the cosine
  similarity. The views and their order are those of :func:`nt_xent`.

  The clamp :math:`M e^{-1/\tau}` is the smallest value the negative sum can
  take (all cosines -1). With ``tau_plus=0`` the raw estimate is the plain
  negative sum, which is never below it, so the clamp is inactive (it can at
  most tie, for antipodal negatives) and the loss equals :func:`nt_xent`
  exactly. With ``tau_plus > 0`` the clamp bites when the positive is much
  closer than the negatives; the clamped anchor then gets gradient only
  through :math:`p_i`.

  Args:
    z_a: (n, d) embeddings of the first views (local batch with axis_name).
    z_b: (n, d) embeddings of the second views.
    temperature: :math:`\tau` > 0.
    tau_plus: :math:`\tau^+` in [0, 1).
    axis_name: mapped axis to gather the global batch over, or None.
    return_metrics: also return ``{"accuracy", "positive_cosine",
      "negative_cosine", "clamp_fraction"}``, the last the fraction of
      anchors whose :math:`N_g` is clamped.

  Returns:
    The scalar float32 mean loss over the 2N anchors, and the metrics dict
    when ``return_metrics``.

  Raises:
    ValueError: on shapes that differ or are not 2-D, a global batch of one
      pair (no negatives), temperature <= 0 or ``tau_plus`` outside [0, 1).

  References:
    Chuang et al., "Debiased Contrastive Learning", NeurIPS 2020.
    https://arxiv.org/abs/2007.00224
  """
  _check_tau_plus(tau_plus)
  logits, labels, pos, negative, num_neg = _split_logits(z_a, z_b, temperature, axis_name)
  log_neg_sum = _masked_logsumexp(logits, negative)
  per_anchor, clamped = _debiased_from_log_sum(pos, log_neg_sum, num_neg, tau_plus, temperature)
  loss = _mean_over_batch(per_anchor, axis_name)
  if not return_metrics:
    return loss
  metrics = _metrics(logits, labels, pos, negative, num_neg, temperature, axis_name)
  metrics["clamp_fraction"] = _mean_over_batch(clamped.astype(jnp.float32), axis_name)
  return loss, metrics


def hard_negative_nt_xent(
  z_a: jax.Array,
  z_b: jax.Array,
  temperature: float = 0.5,
  tau_plus: float = 0.1,
  beta: float = 1.0,
  *,
  axis_name: str | None = None,
  return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
  r"""Hard-negative contrastive loss (HCL): DCL with negatives reweighted by hardness.

  Each negative's :math:`e^{s_{ij}/\tau}` is importance-weighted by
  :math:`w_{ij} = e^{\beta s_{ij} / \tau}`, so closer negatives weigh more,
  and the reweighted sum replaces the negative sum of
  :func:`debiased_nt_xent`:

  .. math::
     R_i = M \frac{\sum_j w_{ij} e^{s_{ij}/\tau}}{\sum_j w_{ij}}, \qquad
     N_g = \max\Big(\frac{R_i - M \tau^+ p_i}{1 - \tau^+},\ M e^{-1/\tau}\Big),
     \qquad \ell_i = -\log \frac{p_i}{p_i + N_g},

  as in the paper's official code (``imp = neg ** beta``,
  ``reweight_neg = (imp * neg).sum() / imp.mean()``). With ``beta=0``,
  :math:`R_i` is the plain negative sum and the loss is
  :func:`debiased_nt_xent`; with ``beta=0, tau_plus=0`` it is
  :func:`nt_xent`. :math:`R_i` is a weighted mean of values
  :math:`\ge e^{-1/\tau}` times M, so with ``tau_plus=0`` the clamp is again
  inactive (at most a tie); see :func:`debiased_nt_xent` for when it bites.

  Args:
    z_a: (n, d) embeddings of the first views (local batch with axis_name).
    z_b: (n, d) embeddings of the second views.
    temperature: :math:`\tau` > 0.
    tau_plus: :math:`\tau^+` in [0, 1).
    beta: concentration :math:`\beta` >= 0 on hard negatives.
    axis_name: mapped axis to gather the global batch over, or None.
    return_metrics: as in :func:`debiased_nt_xent`.

  Returns:
    The scalar float32 mean loss over the 2N anchors, and the metrics dict
    when ``return_metrics``.

  Raises:
    ValueError: as :func:`debiased_nt_xent`, and if ``beta`` < 0.

  References:
    Robinson et al., "Contrastive Learning with Hard Negative Samples", ICLR
    2021. https://arxiv.org/abs/2010.04592
  """
  _check_tau_plus(tau_plus)
  if not isinstance(beta, jax.Array) and not beta >= 0:
    raise ValueError(f"beta must be >= 0, got {beta!r}.")
  logits, labels, pos, negative, num_neg = _split_logits(z_a, z_b, temperature, axis_name)
  # log R = log M + logsumexp((1 + beta) s / T) - logsumexp(beta s / T), over negatives.
  log_weighted = _masked_logsumexp((1.0 + beta) * logits, negative)
  log_weights = _masked_logsumexp(beta * logits, negative)
  log_neg_sum = jnp.log(num_neg) + log_weighted - log_weights
  per_anchor, clamped = _debiased_from_log_sum(pos, log_neg_sum, num_neg, tau_plus, temperature)
  loss = _mean_over_batch(per_anchor, axis_name)
  if not return_metrics:
    return loss
  metrics = _metrics(logits, labels, pos, negative, num_neg, temperature, axis_name)
  metrics["clamp_fraction"] = _mean_over_batch(clamped.astype(jnp.float32), axis_name)
  return loss, metrics


def decoupled_nt_xent(
  z_a: jax.Array,
  z_b: jax.Array,
  temperature: float = 0.1,
  *,
  axis_name: str | None = None,
  return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
  r"""Decoupled contrastive loss (DCL of Yeh et al.): NT-Xent without the positive below.

  .. math::
     \ell_i = -\frac{s_i^+}{\tau}
       + \log \sum_{j \in \mathrm{neg}(i)} e^{s_{ij} / \tau},

  averaged over the 2N anchors of the global batch, with the M = 2N - 2
  negatives of :func:`nt_xent`. Removing the positive from the denominator
  removes the negative-positive coupling of the gradient, which makes the
  loss less sensitive to the batch size. It can be negative.

  Args:
    z_a: (n, d) embeddings of the first views (local batch with axis_name).
    z_b: (n, d) embeddings of the second views.
    temperature: :math:`\tau` > 0.
    axis_name: mapped axis to gather the global batch over, or None.
    return_metrics: also return ``{"accuracy", "positive_cosine",
      "negative_cosine"}``.

  Returns:
    The scalar float32 mean loss over the 2N anchors, and the metrics dict
    when ``return_metrics``.

  Raises:
    ValueError: on shapes that differ or are not 2-D, a global batch of one
      pair (no negatives), or temperature <= 0.

  References:
    Yeh et al., "Decoupled Contrastive Learning", ECCV 2022.
    https://arxiv.org/abs/2110.06848
  """
  logits, labels, pos, negative, num_neg = _split_logits(z_a, z_b, temperature, axis_name)
  per_anchor = _masked_logsumexp(logits, negative) - pos
  loss = _mean_over_batch(per_anchor, axis_name)
  if not return_metrics:
    return loss
  return loss, _metrics(logits, labels, pos, negative, num_neg, temperature, axis_name)
