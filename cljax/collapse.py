"""Collapse diagnostics of embeddings: per-dimension std, effective rank, alignment, uniformity.

Pure JAX functions of embedding arrays, usable on the host after feature extraction or inside
the sharded train step: with ``axis_name`` set (inside ``jax.shard_map`` or ``pmap``) every
statistic is over the global batch, gathered or summed across that axis.

    from cljax import collapse
    stats = collapse.collapse_metrics(z_view_a, z_view_b)
    warnings = collapse.collapse_warnings(stats)

All statistics are of L2-normalised embeddings (what a cosine-similarity loss sees), except
``effective_rank(..., normalize=False)``.

References:
  Chen and He, `Exploring Simple Siamese Representation Learning
  <https://arxiv.org/abs/2011.10566>`_, 2021 (std of normalised embeddings).
  Roy and Vetterli, `The effective rank: a measure of effective dimensionality
  <https://ieeexplore.ieee.org/document/7098875>`_, EUSIPCO 2007.
  Wang and Isola, `Understanding Contrastive Representation Learning through Alignment and
  Uniformity on the Hypersphere <https://arxiv.org/abs/2005.10242>`_, ICML 2020.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cljax import losses


def _check_2d(name: str, x: jax.Array) -> None:
  if x.ndim != 2 or x.shape[0] < 1:
    raise ValueError(f"{name} must have shape (batch, dim) with batch >= 1, got {x.shape}.")


def _sum(x: jax.Array, axis_name: str | None) -> jax.Array:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _mean_and_count(z: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
  count = _sum(jnp.asarray(z.shape[0], jnp.float32), axis_name)
  return _sum(jnp.sum(z, axis=0), axis_name) / count, count


def embedding_std(z: jax.Array, *, axis_name: str | None = None) -> jax.Array:
  """Per-dimension standard deviation of the L2-normalised embeddings over the batch.

  A healthy embedding spread over the sphere gives about ``1 / sqrt(dim)`` in every
  dimension; a collapsed one (all embeddings equal) gives 0. Since the variances sum to
  ``1 - |mean|^2 <= 1``, the mean over dimensions is at most ``1 / sqrt(dim)``.

  Args:
    z: (n, d) embeddings (this device's shard when ``axis_name`` is set).
    axis_name: mapped axis to reduce over, or None.

  Returns:
    (d,) float32 standard deviations.

  Raises:
    ValueError: if ``z`` is not a non-empty 2-D array.
  """
  _check_2d("z", z)
  z = losses.l2_normalize(z)
  mean, count = _mean_and_count(z, axis_name)
  # Two passes (mean, then squared deviations) keep float32 accurate when the std is tiny.
  var = _sum(jnp.sum(jnp.square(z - mean), axis=0), axis_name) / count
  return jnp.sqrt(var)


def covariance(z: jax.Array, *, axis_name: str | None = None) -> jax.Array:
  """(d, d) covariance of the embeddings ``z`` (n, d) over the (global) batch, in float32."""
  _check_2d("z", z)
  z = z.astype(jnp.float32)
  mean, count = _mean_and_count(z, axis_name)
  centered = z - mean
  # (d, n) @ (n, d) -> (d, d), summed over devices.
  return _sum(centered.T @ centered, axis_name) / count


def effective_rank(
  z: jax.Array, *, normalize: bool = True, axis_name: str | None = None
) -> jax.Array:
  """Roy and Vetterli's effective rank of the embedding covariance.

  ``exp(H(p))`` with ``p = s / sum(s)`` and ``s`` the singular values of the covariance (its
  eigenvalues, as it is symmetric positive semi-definite) and ``H`` the Shannon entropy. It
  lies in ``[1, d]``: ``d`` for an isotropic embedding, 1 for embeddings on a line, and 1 by
  convention for a constant embedding (zero covariance).

  Args:
    z: (n, d) embeddings (this device's shard when ``axis_name`` is set).
    normalize: L2-normalise the embeddings first.
    axis_name: mapped axis to reduce over, or None.

  Returns:
    () float32 effective rank.

  Raises:
    ValueError: if ``z`` is not a non-empty 2-D array.
  """
  _check_2d("z", z)
  z = losses.l2_normalize(z) if normalize else z.astype(jnp.float32)
  n, d = z.shape
  if axis_name is None and d > n:
    # Wide embeddings (DINO's 65,536 logits): the (n, n) Gram matrix of the centred rows
    # has the covariance's non-zero eigenvalues, without the (d, d) matrix. (Sharded, in
    # the step, the covariance is formed: d there is a head's output, a few hundred wide.)
    centered = z - jnp.mean(z, axis=0)
    s = jnp.linalg.eigvalsh(centered @ centered.T / n)
  else:
    s = jnp.linalg.eigvalsh(covariance(z, axis_name=axis_name))
  s = jnp.maximum(s, 0.0)
  total = jnp.sum(s)
  p = s / jnp.where(total > 0, total, 1.0)
  # 0 log 0 = 0; the inner where keeps log's argument positive so no NaN appears.
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return jnp.exp(entropy)


def alignment(
  z_a: jax.Array, z_b: jax.Array, *, alpha: float = 2.0, axis_name: str | None = None
) -> jax.Array:
  """Wang and Isola's alignment: ``E ||f(x) - f(y)||^alpha`` over positive pairs.

  Args:
    z_a: (n, d) embeddings of the first views.
    z_b: (n, d) embeddings of the second views; row i is row i's positive.
    alpha: the exponent (the paper's default, 2).
    axis_name: mapped axis to average over, or None.

  Returns:
    () float32, in [0, 2^alpha]: 0 when the two views of every example coincide.

  Raises:
    ValueError: on mismatched shapes.
  """
  _check_2d("z_a", z_a)
  if z_a.shape != z_b.shape:
    raise ValueError(f"z_a and z_b must have the same shape, got {z_a.shape} and {z_b.shape}.")
  dist = jnp.linalg.norm(losses.l2_normalize(z_a) - losses.l2_normalize(z_b), axis=-1)
  count = _sum(jnp.asarray(z_a.shape[0], jnp.float32), axis_name)
  return _sum(jnp.sum(dist**alpha), axis_name) / count


def uniformity(z: jax.Array, *, t: float = 2.0, axis_name: str | None = None) -> jax.Array:
  """Wang and Isola's uniformity: ``log E exp(-t ||f(x) - f(y)||^2)`` over distinct pairs.

  Lower is more uniform; ``0`` for a constant embedding, about ``-t * 2`` (``-4`` at t=2)
  for points spread uniformly on a high-dimensional sphere. With ``axis_name`` the pairs
  are those of the global batch (this device's rows against all gathered rows).

  Args:
    z: (n, d) embeddings; at least two in the (global) batch.
    t: the kernel's scale (the paper's default, 2).
    axis_name: mapped axis to gather over, or None.

  Returns:
    () float32 uniformity.

  Raises:
    ValueError: if ``z`` is not 2-D.
  """
  _check_2d("z", z)
  z = losses.l2_normalize(z)
  n = z.shape[0]
  keys = z if axis_name is None else jax.lax.all_gather(z, axis_name, tiled=True)
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * n
  # |a - b|^2 = 2 - 2 a.b for unit vectors; (n, d) @ (d, N) -> (n, N).
  sq_dist = jnp.maximum(2.0 - 2.0 * (z @ keys.T), 0.0)
  not_self = jnp.arange(keys.shape[0])[None, :] != (offset + jnp.arange(n))[:, None]
  # exp(-t d^2) >= exp(-4t) for unit vectors: no underflow at any sensible t, so no shift.
  total = _sum(jnp.sum(jnp.where(not_self, jnp.exp(-t * sq_dist), 0.0)), axis_name)
  big_n = keys.shape[0]
  return jnp.log(total / (big_n * (big_n - 1)))


@functools.partial(jax.jit, static_argnames=("axis_name",))
def collapse_metrics(
  z_a: jax.Array, z_b: jax.Array | None = None, *, axis_name: str | None = None
) -> dict[str, jax.Array]:
  """All diagnostics of one batch of embeddings, as scalars for logging.

  Args:
    z_a: (n, d) embeddings (of the first views, when there are two).
    z_b: optional (n, d) embeddings of the second views; adds alignment and averages the
      uniformity of both views, as Wang and Isola do.
    axis_name: mapped axis to reduce over, or None.

  Returns:
    ``embedding_std`` (mean over dimensions), ``embedding_std_ratio`` (that times
    ``sqrt(d)``: about 1 when healthy, 0 when collapsed), ``effective_rank``,
    ``effective_rank_ratio`` (over ``d``), ``uniformity`` and, with ``z_b``, ``alignment``.
  """
  z_a = jax.lax.stop_gradient(z_a)
  dim = z_a.shape[-1]
  std = jnp.mean(embedding_std(z_a, axis_name=axis_name))
  rank = effective_rank(z_a, axis_name=axis_name)
  out = {
    "embedding_std": std,
    "embedding_std_ratio": std * np.sqrt(dim),
    "effective_rank": rank,
    "effective_rank_ratio": rank / dim,
    "uniformity": uniformity(z_a, axis_name=axis_name),
  }
  if z_b is not None:
    z_b = jax.lax.stop_gradient(z_b)
    out["alignment"] = alignment(z_a, z_b, axis_name=axis_name)
    out["uniformity"] = 0.5 * (out["uniformity"] + uniformity(z_b, axis_name=axis_name))
  return out


def collapse_warnings(
  metrics: Mapping[str, float], *, min_std_ratio: float = 0.1, min_effective_rank: float = 2.0
) -> list[str]:
  """Human-readable warnings when ``collapse_metrics`` indicate a collapsed embedding.

  The thresholds are heuristics: complete collapse drives the std ratio to 0; dimensional
  collapse (embeddings confined to a few directions) drives the effective rank towards 1.

  Args:
    metrics: the output of ``collapse_metrics`` (host floats or arrays).
    min_std_ratio: below this ``embedding_std_ratio`` the embedding counts as collapsed.
    min_effective_rank: below this ``effective_rank`` it counts as dimensionally collapsed.

  Returns:
    A list of warnings, empty for a healthy embedding.
  """
  warnings = []
  ratio = float(metrics["embedding_std_ratio"])
  if not ratio >= min_std_ratio:  # `not >=` also flags NaN.
    warnings.append(
      f"complete collapse: embedding std is {ratio:.3g} of the healthy 1/sqrt(d) "
      f"(threshold {min_std_ratio})"
    )
  rank = float(metrics["effective_rank"])
  if not rank >= min_effective_rank:
    warnings.append(
      f"dimensional collapse: effective rank {rank:.3g} < {min_effective_rank} directions"
    )
  return warnings


def pair_similarities(z_a: jax.Array, z_b: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """Cosine similarities of positive pairs and of negative pairs, for histograms.

  Args:
    z_a: (n, d) embeddings of the first views.
    z_b: (n, d) embeddings of the second views; row i is row i's positive.

  Returns:
    ``(positive, negative)``: (n,) similarities of ``(z_a[i], z_b[i])`` and (n * (n - 1),)
    of ``(z_a[i], z_b[j])`` for ``i != j``, as NumPy float32.

  Raises:
    ValueError: on mismatched shapes.
  """
  _check_2d("z_a", z_a)
  if z_a.shape != z_b.shape:
    raise ValueError(f"z_a and z_b must have the same shape, got {z_a.shape} and {z_b.shape}.")
  # (n, d) @ (d, n) -> (n, n)
  sims = np.asarray(losses.l2_normalize(z_a) @ losses.l2_normalize(z_b).T)
  off_diagonal = ~np.eye(len(sims), dtype=bool)
  return np.diag(sims).copy(), sims[off_diagonal]
