"""cljax.losses.barlow: the Barlow Twins loss against float64 NumPy and sharded."""

import chex
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from loss_references import DATA, RTOL, assert_grads_close, np_grad
from loss_references import data_mesh as _mesh
from loss_references import normal as _normal
from loss_references import sharded as _sharded
from loss_references import value_and_grads as _value_and_grads

from cljax.losses.barlow import barlow_twins_loss


def np_barlow(z_a, z_b, lam, eps=1e-5, scale=1.0):
  """Zbontar et al.: BatchNorm (biased variance) per dim, C = a^T b / N."""

  def bn(z):
    z = np.asarray(z, np.float64)
    return (z - z.mean(0)) / np.sqrt(z.var(0) + eps)

  n, d = z_a.shape
  c = bn(z_a).T @ bn(z_b) / n
  on = sum((1 - c[i, i]) ** 2 for i in range(d))
  off = sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j)
  return scale * (on + lam * off)


@pytest.mark.parametrize("lam,scale", [(5e-3, 1.0), (0.5, 1 / 32)])
def test_barlow_value_and_gradient_match_numpy(lam, scale):
  z_a, z_b = _normal(5, 6, 4), _normal(6, 6, 4)
  (value, metrics), grads = jax.jit(
    jax.value_and_grad(
      lambda a, b: barlow_twins_loss(a, b, lam, scale=scale, return_metrics=True),
      argnums=(0, 1),
      has_aux=True,
    )
  )(z_a, z_b)
  np.testing.assert_allclose(float(value), np_barlow(z_a, z_b, lam, scale=scale), rtol=RTOL)
  np.testing.assert_allclose(float(metrics["on_diagonal"]), np_barlow(z_a, z_b, 0.0), rtol=RTOL)
  off = (np_barlow(z_a, z_b, 1.0) - np_barlow(z_a, z_b, 0.0)) / 1.0
  np.testing.assert_allclose(float(metrics["off_diagonal"]), off, rtol=RTOL)
  expected = np_grad(lambda a, b: np_barlow(a, b, lam, scale=scale), z_a, z_b)
  assert_grads_close(grads, expected)


def test_sharded_barlow_uses_global_batch_statistics():
  mesh = _mesh()
  z_a, z_b = _normal(7, 16, 6), _normal(8, 16, 6)
  expected = _value_and_grads(lambda a, b: barlow_twins_loss(a, b, 0.1), z_a, z_b)
  sharded = _sharded(
    lambda a, b: barlow_twins_loss(a, b, 0.1, axis_name=DATA), mesh, (P(DATA), P(DATA))
  )
  got = _value_and_grads(sharded, z_a, z_b)
  np.testing.assert_allclose(float(got[0]), float(expected[0]), rtol=1e-5)
  chex.assert_trees_all_close(got[1], expected[1], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(expected[0]), np_barlow(z_a, z_b, 0.1), rtol=RTOL)

  # Teeth: per-device statistics (2 samples each) averaged over devices differ.
  per_device = jax.jit(
    _sharded(
      lambda a, b: jax.lax.pmean(barlow_twins_loss(a, b, 0.1), DATA), mesh, (P(DATA), P(DATA))
    )
  )
  assert abs(float(per_device(z_a, z_b)) - float(expected[0])) > 0.1
