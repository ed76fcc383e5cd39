"""Non-contrastive regression losses: BYOL and SimSiam (cosine between prediction and target)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cljax.losses._common import _check_2d, _mean_over_batch, l2_normalize


def _check_pair(predictions: jax.Array, targets: jax.Array) -> None:
  _check_2d("predictions", predictions)
  _check_2d("targets", targets)
  if predictions.shape != targets.shape:
    raise ValueError(
      f"predictions and targets must have the same shape (n, d), got {predictions.shape} "
      f"and {targets.shape}."
    )


def _cosine(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  """(n,) float32 cosine similarity of matching rows."""
  return jnp.sum(l2_normalize(predictions) * l2_normalize(targets), axis=-1)


def byol_loss(
  predictions: jax.Array, targets: jax.Array, *, axis_name: str | None = None
) -> jax.Array:
  r"""BYOL's normalised regression loss (eq. 2 of the paper).

  With :math:`p_i` the online prediction and :math:`z_i` the target
  projection of the other view of image i:

  .. math::
     L = \frac{1}{N} \sum_{i=1}^{N}
       \Big\| \frac{p_i}{\|p_i\|} - \frac{\bar z_i}{\|\bar z_i\|} \Big\|_2^2
       = \frac{1}{N} \sum_{i=1}^{N} \big(2 - 2 \cos(p_i, \bar z_i)\big),
     \qquad \bar z_i = \mathrm{stop\_gradient}(z_i),

  the mean over the N images of the global batch. The caller symmetrises
  over the two views: ``byol_loss(p1, z2) + byol_loss(p2, z1)``.

  Args:
    predictions: (n, d) online predictor outputs (local rows with ``axis_name``).
    targets: (n, d) target-network projections, row i for prediction i; they
      receive no gradient.
    axis_name: mapped mesh axis to average over, or None.

  Returns:
    The scalar float32 mean loss over the global batch, in [0, 4].

  Raises:
    ValueError: if the inputs are not both (n, d) of the same shape.

  References:
    Grill et al., "Bootstrap Your Own Latent: A New Approach to
    Self-Supervised Learning", NeurIPS 2020. https://arxiv.org/abs/2006.07733
  """
  _check_pair(predictions, targets)
  cos = _cosine(predictions, jax.lax.stop_gradient(targets))
  return _mean_over_batch(2.0 - 2.0 * cos, axis_name)


def simsiam_loss(
  predictions: jax.Array,
  targets: jax.Array,
  *,
  stop_gradient: bool = True,
  axis_name: str | None = None,
) -> jax.Array:
  r"""SimSiam's negative cosine similarity (eq. 1 of the paper).

  .. math::
     \mathcal{D}(p_i, z_i) = -\frac{p_i}{\|p_i\|_2} \cdot \frac{z_i}{\|z_i\|_2},
     \qquad L = \frac{1}{N} \sum_{i=1}^{N} \mathcal{D}(p_i, \mathrm{stopgrad}(z_i)),

  the mean over the N images of the global batch. The caller symmetrises:
  ``simsiam_loss(p1, z2) / 2 + simsiam_loss(p2, z1) / 2`` as in the paper.

  Args:
    predictions: (n, d) predictor outputs (local rows with ``axis_name``).
    targets: (n, d) projector outputs of the other view, row i for prediction i.
    stop_gradient: apply ``stop_gradient`` to ``targets`` (the paper's
      method). ``False`` lets the gradient flow into the targets too; the
      paper (Sec. 4.1, Fig. 2) shows that this variant collapses to a
      constant representation (loss -> -1, output std -> 0). It exists only
      to demonstrate that collapse; do not train with it.
    axis_name: mapped mesh axis to average over, or None.

  Returns:
    The scalar float32 mean loss over the global batch, in [-1, 1].

  Raises:
    ValueError: if the inputs are not both (n, d) of the same shape.

  References:
    Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021.
    https://arxiv.org/abs/2011.10566
  """
  _check_pair(predictions, targets)
  if stop_gradient:
    targets = jax.lax.stop_gradient(targets)
  return _mean_over_batch(-_cosine(predictions, targets), axis_name)
