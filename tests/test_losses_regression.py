"""cljax.losses.regression: BYOL and SimSiam losses against float64 NumPy and sharded."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from loss_references import assert_close as _assert_close
from loss_references import assert_zero as _assert_zero
from loss_references import fd_grad
from loss_references import normal as _normal
from loss_references import sharded_pair as _sharded_pair
from loss_references import unit as _unit
from loss_references import value_and_grads as _value_and_grads

from cljax import sharding
from cljax.losses import moco, regression


def np_byol(p, z):
  return float(np.mean(np.sum((_unit(p) - _unit(z)) ** 2, axis=1)))


def np_simsiam(p, z):
  return float(np.mean(-np.sum(_unit(p) * _unit(z), axis=1)))


def test_byol_value_gradient_and_stop_gradient_match_numpy():
  p, z = _normal(12, 3, 4), _normal(13, 3, 4)
  value, (dp, dz) = _value_and_grads(regression.byol_loss, p, z)
  _assert_close(value, np_byol(p, z))
  # 2 - 2 cos written the other way round: the paper's squared distance.
  _assert_close(value, np.mean(2 - 2 * np.sum(_unit(p) * _unit(z), axis=1)))
  _assert_close(dp, fd_grad(lambda x: np_byol(x, z), p), rtol=1e-4)
  _assert_zero(dz)


def test_simsiam_value_gradient_and_stop_gradient_match_numpy():
  p, z = _normal(14, 3, 4), _normal(15, 3, 4)
  value, (dp, dz) = _value_and_grads(regression.simsiam_loss, p, z)
  _assert_close(value, np_simsiam(p, z))
  _assert_close(dp, fd_grad(lambda x: np_simsiam(x, z), p), rtol=1e-4, atol=1e-6)
  _assert_zero(dz)
  # Without the stop-gradient (the collapsing variant) the target gets a gradient.
  value, (dp2, dz2) = _value_and_grads(
    lambda a, b: regression.simsiam_loss(a, b, stop_gradient=False), p, z
  )
  _assert_close(value, np_simsiam(p, z))
  chex.assert_trees_all_close(dp2, dp)
  _assert_close(dz2, fd_grad(lambda x: np_simsiam(p, x), z), rtol=1e-4, atol=1e-6)
  assert np.abs(np.asarray(dz2)).max() > 1e-2


@pytest.mark.parametrize("loss_fn", [regression.byol_loss, regression.simsiam_loss])
def test_regression_losses_reject_bad_shapes_and_compute_in_float32(loss_fn):
  with pytest.raises(ValueError, match="same shape"):
    loss_fn(np.ones((4, 8)), np.ones((4, 6)))
  with pytest.raises(ValueError, match="shape"):
    loss_fn(np.ones(8), np.ones(8))
  p, z = (jnp.asarray(_normal(s, 4, 8), jnp.bfloat16) for s in (16, 17))
  assert loss_fn(p, z).dtype == jnp.float32


@pytest.mark.parametrize(
  "loss_fn",
  [
    lambda a, b, ax: moco.moco_v3_loss(a, b, 0.2, axis_name=ax),
    lambda a, b, ax: regression.byol_loss(a, b, axis_name=ax),
    lambda a, b, ax: regression.simsiam_loss(a, b, axis_name=ax),
    lambda a, b, ax: regression.simsiam_loss(a, b, stop_gradient=False, axis_name=ax),
  ],
  ids=["moco_v3", "byol", "simsiam", "simsiam_no_stop_gradient"],
)
def test_sharded_pair_losses_equal_single_device(loss_fn):
  mesh = sharding.create_mesh()
  q, k = _normal(18, 16, 8), _normal(19, 16, 8)
  expected = _value_and_grads(lambda a, b: loss_fn(a, b, None), q, k)
  got = _value_and_grads(_sharded_pair(loss_fn, mesh), q, k)
  _assert_close(got[0], float(expected[0]))
  chex.assert_trees_all_close(got[1], expected[1], rtol=1e-5, atol=1e-7)
  assert np.any(np.asarray(got[1][0]))
