"""cljax.losses.supcon: the SupCon loss against float64 NumPy, NT-Xent and sharded."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from loss_references import DATA, RTOL, assert_grads_close, np_grad
from loss_references import data_mesh as _mesh
from loss_references import logsumexp as _logsumexp
from loss_references import normal as _normal
from loss_references import sharded as _sharded
from loss_references import unit as _unit
from loss_references import value_and_grads as _value_and_grads

from cljax import losses
from cljax.losses.supcon import supcon_loss


def np_supcon(emb, labels, t, base_t=None):
  """Khosla et al. eq. 2 (L_out), mean over anchors with at least one positive."""
  z = _unit(emb)
  m = z.shape[0]
  factor = 1.0 if base_t is None else t / base_t
  losses_, count = 0.0, 0
  for i in range(m):
    sims = z @ z[i] / t
    a = [j for j in range(m) if j != i]
    pos = [j for j in a if labels[j] == labels[i]]
    if not pos:
      continue
    log_den = _logsumexp(sims[a])
    losses_ += -factor * np.mean([sims[p] - log_den for p in pos])
    count += 1
  return losses_ / max(count, 1)


def _supcon_inputs(seed=0, m=12, d=5, num_classes=4):
  emb = _normal(seed, m, d)
  labels = np.random.default_rng(seed + 1).integers(0, num_classes, size=m).astype(np.int32)
  return emb, labels


@pytest.mark.parametrize("t,base_t", [(0.1, None), (0.5, 0.07)])
def test_supcon_value_and_gradient_match_numpy(t, base_t):
  emb, labels = _supcon_inputs()
  value, (grad,) = _value_and_grads(
    lambda e: supcon_loss(e, labels, t, base_temperature=base_t), emb
  )
  np.testing.assert_allclose(float(value), np_supcon(emb, labels, t, base_t), rtol=RTOL)
  expected = np_grad(lambda e: np_supcon(e, labels, t, base_t), emb)
  assert_grads_close([grad], expected)


def test_supcon_with_one_positive_per_anchor_is_nt_xent():
  z_a, z_b = _normal(1, 6, 4), _normal(2, 6, 4)
  labels = np.concatenate([np.arange(6), np.arange(6)]).astype(np.int32)
  got = _value_and_grads(lambda a, b: supcon_loss(jnp.concatenate([a, b]), labels, 0.2), z_a, z_b)
  expected = _value_and_grads(lambda a, b: losses.nt_xent(a, b, 0.2), z_a, z_b)
  np.testing.assert_allclose(float(got[0]), float(expected[0]), rtol=1e-5)
  chex.assert_trees_all_close(got[1], expected[1], rtol=1e-5, atol=1e-7)


def test_supcon_leaves_out_anchors_without_positive():
  emb = _normal(3, 8, 4)
  # Rows 0-4 share two labels; rows 5, 6 and 7 have a label of their own.
  labels = np.array([0, 0, 1, 1, 1, 5, 6, 7], np.int32)
  loss, metrics = jax.jit(lambda e: supcon_loss(e, labels, 0.3, return_metrics=True))(emb)
  np.testing.assert_allclose(float(loss), np_supcon(emb, labels, 0.3), rtol=RTOL)
  np.testing.assert_allclose(float(metrics["anchor_fraction"]), 5 / 8)
  # Averaging over all 8 anchors (0 for the lonely ones) would give 5/8 of it.
  per_valid = np_supcon(emb, labels, 0.3)
  assert abs(float(loss) - per_valid * 5 / 8) > 0.1
  # No anchor with a positive: the loss is 0, not NaN, and so is its gradient.
  value, (grad,) = _value_and_grads(lambda e: supcon_loss(e, np.arange(8, dtype=np.int32)), emb)
  assert float(value) == 0.0
  assert np.all(np.asarray(grad) == 0.0)


def test_sharded_supcon_equals_single_device():
  mesh = _mesh()
  emb, labels = _supcon_inputs(seed=4, m=32, d=6, num_classes=5)
  labels[0] = 99  # one anchor without a positive
  (value, metrics), grad = jax.jit(
    jax.value_and_grad(lambda e: supcon_loss(e, labels, 0.1, return_metrics=True), has_aux=True)
  )(emb)
  sharded = _sharded(
    lambda e, y: supcon_loss(e, y, 0.1, axis_name=DATA, return_metrics=True),
    mesh,
    (P(DATA), P(DATA)),
  )
  (s_value, s_metrics), s_grad = jax.jit(
    jax.value_and_grad(lambda e: sharded(e, labels), has_aux=True)
  )(emb)
  np.testing.assert_allclose(float(s_value), float(value), rtol=1e-5)
  # Sums in another order: an element that cancels to near 0 keeps the error of its summed
  # terms, so the floor scales with the largest element (an atol of 1e-7 held by 2.4x).
  assert_grads_close((s_grad,), (grad,), rtol=1e-5)
  chex.assert_trees_all_close(s_metrics, metrics, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(value), np_supcon(emb, labels, 0.1), rtol=RTOL)
  np.testing.assert_allclose(float(metrics["anchor_fraction"]), 31 / 32)
