"""Tests for cljax.collapse against float64 NumPy references."""

import chex
import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from cljax import collapse


def _normalize(z):
  z = np.asarray(z, np.float64)
  return z / np.linalg.norm(z, axis=1, keepdims=True)


def _ref_std(z):
  return _normalize(z).std(axis=0)  # Population std (ddof=0), as a batch statistic.


def _ref_effective_rank(z):
  cov = np.cov(_normalize(z), rowvar=False, bias=True)
  s = np.linalg.svd(cov, compute_uv=False)
  p = s / s.sum()
  p = p[p > 0]
  return np.exp(-(p * np.log(p)).sum())


def _ref_alignment(a, b, alpha=2.0):
  return (np.linalg.norm(_normalize(a) - _normalize(b), axis=1) ** alpha).mean()


def _ref_uniformity(z, t=2.0):
  # Wang and Isola's code: torch.pdist(x).pow(2).mul(-t).exp().mean().log(), pairs i < j.
  z = _normalize(z)
  i, j = np.triu_indices(len(z), k=1)
  sq = ((z[i] - z[j]) ** 2).sum(axis=1)
  return np.log(np.exp(-t * sq).mean())


def _gaussian(seed, n=256, d=32):
  return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_matches_numpy_references():
  a = _gaussian(0) + 0.5  # An offset makes the mean matter.
  b = a + 0.3 * _gaussian(1)
  np.testing.assert_allclose(collapse.embedding_std(a), _ref_std(a), rtol=1e-4)
  np.testing.assert_allclose(collapse.effective_rank(a), _ref_effective_rank(a), rtol=1e-4)
  np.testing.assert_allclose(collapse.alignment(a, b), _ref_alignment(a, b), rtol=1e-4)
  np.testing.assert_allclose(
    collapse.alignment(a, b, alpha=1.0), _ref_alignment(a, b, 1.0), rtol=1e-4
  )
  np.testing.assert_allclose(collapse.uniformity(a), _ref_uniformity(a), rtol=1e-4)
  np.testing.assert_allclose(collapse.uniformity(a, t=0.5), _ref_uniformity(a, 0.5), rtol=1e-4)
  np.testing.assert_allclose(
    collapse.effective_rank(a, normalize=False),
    _ref_effective_rank_unnormalized(a),
    rtol=1e-4,
  )


def _ref_effective_rank_unnormalized(z):
  s = np.linalg.svd(np.cov(np.asarray(z, np.float64), rowvar=False, bias=True), compute_uv=False)
  p = s / s.sum()
  return np.exp(-(p * np.log(p)).sum())


def test_effective_rank_of_embeddings_wider_than_the_batch_uses_the_gram_matrix():
  # 48 rows of 512-d (DINO's logits are 65,536 wide): the (d, d) covariance is never formed,
  # and the rank is still the covariance's, at most n - 1 after centring.
  z = _gaussian(3, n=48, d=512) + 0.2
  got = collapse.effective_rank(z)
  np.testing.assert_allclose(got, _ref_effective_rank(z), rtol=1e-4)
  assert got < 48
  jaxpr = str(jax.make_jaxpr(collapse.effective_rank)(z))
  assert "f32[48,48]" in jaxpr and "f32[512,512]" not in jaxpr
  low_rank = _gaussian(4, n=48, d=3) @ _gaussian(5, n=3, d=512)
  np.testing.assert_allclose(
    collapse.effective_rank(low_rank, normalize=False),
    _ref_effective_rank_unnormalized(low_rank),
    rtol=1e-3,
  )


def test_constant_encoder_is_flagged():
  z = np.tile(np.random.default_rng(2).normal(size=(1, 32)), (128, 1)).astype(np.float32)
  stats = {k: float(v) for k, v in collapse.collapse_metrics(z, z).items()}
  assert stats["embedding_std"] < 1e-4
  assert stats["effective_rank"] == pytest.approx(1.0, abs=1e-3)
  assert stats["alignment"] == pytest.approx(0.0, abs=1e-6)
  assert stats["uniformity"] == pytest.approx(0.0, abs=1e-5)  # log E exp(0)
  warnings = collapse.collapse_warnings(stats)
  assert len(warnings) == 2 and "complete collapse" in warnings[0]


def test_healthy_gaussian_passes():
  d = 32
  a, noise = _gaussian(3, n=512, d=d), _gaussian(4, n=512, d=d)
  stats = {k: float(v) for k, v in collapse.collapse_metrics(a, a + 0.1 * noise).items()}
  assert 0.9 < stats["embedding_std_ratio"] <= 1.0
  assert stats["effective_rank"] > 0.8 * d
  # Unit vectors with cosines ~ N(0, 1/d): log E exp(-2 |a - b|^2) ~ -4 + 8 / d.
  assert stats["uniformity"] == pytest.approx(-4 + 8 / d, abs=0.1)
  assert stats["alignment"] < 0.05
  assert collapse.collapse_warnings(stats) == []


def test_dimensional_collapse_is_flagged_by_rank_not_std():
  # Embeddings on one line (+-v): the per-dimension std stays large, the rank is 1.
  rng = np.random.default_rng(5)
  v = rng.normal(size=(1, 32))
  z = (np.sign(rng.normal(size=(256, 1))) * v + 1e-4 * rng.normal(size=(256, 32))).astype(
    np.float32
  )
  stats = collapse.collapse_metrics(z)
  assert float(stats["embedding_std_ratio"]) > 0.5
  assert float(stats["effective_rank"]) < 1.1
  warnings = collapse.collapse_warnings(stats)
  assert len(warnings) == 1 and "dimensional collapse" in warnings[0]


def test_sharded_equals_single_device():
  a, b = _gaussian(6, n=64) + 0.2, _gaussian(7, n=64)
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  sharded = jax.jit(
    jax.shard_map(
      lambda x, y: collapse.collapse_metrics(x, y, axis_name="data"),
      mesh=mesh,
      in_specs=(P("data"), P("data")),
      out_specs=P(),
    )
  )(a, b)
  assert jax.device_count() == 8
  chex.assert_trees_all_close(sharded, collapse.collapse_metrics(a, b), rtol=1e-4, atol=1e-6)


def test_pair_similarities():
  a, b = _gaussian(8, n=16), _gaussian(9, n=16)
  positive, negative = collapse.pair_similarities(a, b)
  sims = _normalize(a) @ _normalize(b).T
  np.testing.assert_allclose(positive, np.diag(sims), rtol=1e-5, atol=1e-6)
  assert negative.shape == (16 * 15,)
  np.testing.assert_allclose(np.sort(negative), np.sort(sims[~np.eye(16, dtype=bool)]), atol=1e-5)


def test_rejects_bad_shapes():
  with pytest.raises(ValueError, match=r"\(3,\)"):
    collapse.embedding_std(np.ones(3, np.float32))
  with pytest.raises(ValueError, match="same shape"):
    collapse.alignment(np.ones((4, 3)), np.ones((5, 3)))
