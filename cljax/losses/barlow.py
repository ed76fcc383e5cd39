"""Barlow Twins' redundancy-reduction loss, with global-batch statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cljax.losses._common import _check_2d


def _batch_sum(x: jax.Array, axis_name: str | None) -> jax.Array:
  """Sum over the leading (batch) axis of the global batch."""
  total = jnp.sum(x, axis=0)
  return total if axis_name is None else jax.lax.psum(total, axis_name)


def _standardize(z: jax.Array, n_global: int, eps: float, axis_name: str | None) -> jax.Array:
  """Per-dimension (z - mean) / sqrt(var + eps) with global mean and biased variance."""
  mean = _batch_sum(z, axis_name) / n_global
  centred = z - mean
  var = _batch_sum(centred * centred, axis_name) / n_global
  return centred * jax.lax.rsqrt(var + eps)


def barlow_twins_loss(
  z_a: jax.Array,
  z_b: jax.Array,
  lambda_: float = 5e-3,
  *,
  eps: float = 1e-5,
  axis_name: str | None = None,
  scale: float = 1.0,
  return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
  r"""Barlow Twins: push the cross-correlation of two views' embeddings to identity.

  Each embedding dimension is standardised over the global batch of N
  samples (a BatchNorm without affine parameters: mean and biased variance
  across devices, plus ``eps``), then

  .. math::
     \hat z = \frac{z - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad
     C = \frac{1}{N} \hat z_a^\top \hat z_b \in \mathbb{R}^{d \times d},

  .. math::
     L = s \Big( \sum_i (1 - C_{ii})^2 + \lambda \sum_i \sum_{j \ne i} C_{ij}^2 \Big)

  with :math:`s` = ``scale``. The statistics and :math:`C` are summed over
  all devices, so the loss (and its gradient) equals the single-device loss
  on the global batch; a per-device loss averaged over devices is a different
  quantity.

  Args:
    z_a: (n, d) projector outputs of the first views (local batch with
      ``axis_name``).
    z_b: (n, d) projector outputs of the second views, row i the same image.
    lambda_: :math:`\lambda` >= 0, the weight of the off-diagonal
      (redundancy) term; the paper uses 5e-3 for d = 8192.
    eps: :math:`\epsilon` > 0 added to the variance (BatchNorm's default).
    axis_name: mapped axis to sum the statistics over, or None.
    scale: :math:`s`, a factor on the loss (the paper's code first used
      1/32).
    return_metrics: also return ``{"on_diagonal", "off_diagonal"}``: the
      unweighted, unscaled sums :math:`\sum_i (1 - C_{ii})^2` and
      :math:`\sum_{i \ne j} C_{ij}^2`.

  Returns:
    The scalar float32 loss, identical on every device, and the metrics dict
    when ``return_metrics``.

  Raises:
    ValueError: if the shapes differ or are not 2-D, ``lambda_`` < 0 or
      ``eps`` <= 0.

  References:
    Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy
    Reduction", ICML 2021. https://arxiv.org/abs/2103.03230
  """
  _check_2d("z_a", z_a)
  _check_2d("z_b", z_b)
  if z_a.shape != z_b.shape:
    raise ValueError(f"z_a and z_b must have the same shape, got {z_a.shape} and {z_b.shape}.")
  if not isinstance(lambda_, jax.Array) and not lambda_ >= 0:
    raise ValueError(f"lambda_ must be >= 0, got {lambda_!r}.")
  if not isinstance(eps, jax.Array) and not eps > 0:
    raise ValueError(f"eps must be > 0, got {eps!r}.")
  n, d = z_a.shape
  n_global = n if axis_name is None else n * jax.lax.psum(1, axis_name)
  a = _standardize(z_a.astype(jnp.float32), n_global, eps, axis_name)
  b = _standardize(z_b.astype(jnp.float32), n_global, eps, axis_name)
  # (d, n) @ (n, d) -> (d, d), summed over devices.
  c = jnp.einsum("nd,ne->de", a, b, precision=jax.lax.Precision.HIGHEST)
  if axis_name is not None:
    c = jax.lax.psum(c, axis_name)
  c = c / n_global
  diag = jnp.diagonal(c)
  on_diag = jnp.sum((1.0 - diag) ** 2)
  # Masked rather than sum(C^2) - sum(diag^2), which cancels badly when C ~ I.
  off = jnp.where(jnp.eye(d, dtype=bool), 0.0, c)
  off_diag = jnp.sum(off * off)
  loss = scale * (on_diag + lambda_ * off_diag)
  if not return_metrics:
    return loss
  metrics = {
    "on_diagonal": jax.lax.stop_gradient(on_diag),
    "off_diagonal": jax.lax.stop_gradient(off_diag),
  }
  return loss, metrics
