"""cljax.losses.debiased: debiased, hard-negative and decoupled NT-Xent against float64 NumPy."""

import chex
import jax
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
from cljax.losses.debiased import debiased_nt_xent, decoupled_nt_xent, hard_negative_nt_xent


def np_nt_xent(z_a, z_b, t):
  z = _unit(np.concatenate([z_a, z_b]))
  n2 = z.shape[0]
  total = 0.0
  for i in range(n2):
    sims = z @ z[i] / t
    others = [j for j in range(n2) if j != i]
    total += _logsumexp(sims[others]) - sims[(i + n2 // 2) % n2]
  return total / n2


def np_dcl_family(z_a, z_b, t, tau_plus=0.0, beta=None, decoupled=False, clamp_count=False):
  """Chuang et al.'s / Robinson et al.'s official code (beta=None: debiased, else hard).

  With ``clamp_count`` returns the number of anchors whose Ng is clamped instead.
  """
  n = z_a.shape[0]
  z = _unit(np.concatenate([z_a, z_b]))
  n2 = 2 * n
  big_n = n2 - 2
  total, clamped = 0.0, 0
  for i in range(n2):
    partner = (i + n) % n2
    sims = z @ z[i] / t
    neg = np.exp(np.array([sims[j] for j in range(n2) if j not in (i, partner)]))
    pos = np.exp(sims[partner])
    if decoupled:
      total += -np.log(pos / neg.sum())
      continue
    if beta is None:
      reweighted = neg.sum()
    else:
      imp = neg**beta
      reweighted = (imp * neg).sum() / imp.mean()
    ng = (-tau_plus * big_n * pos + reweighted) / (1 - tau_plus)
    clamped += ng < big_n * np.exp(-1 / t)
    ng = max(ng, big_n * np.exp(-1 / t))
    total += -np.log(pos / (pos + ng))
  return clamped if clamp_count else total / n2


def _pairs(seed=0, n=5, d=4, close=0):
  z_a, z_b = _normal(seed, n, d), _normal(seed + 1, n, d)
  # The first ``close`` pairs almost identical, so their positive is far above the negatives.
  z_b[:close] = z_a[:close] + 0.05 * z_b[:close]
  return z_a, z_b


@pytest.mark.parametrize(
  "beta,t,tau_plus,close",
  [
    (None, 0.5, 0.1, 0),  # the paper's defaults; the clamp is inactive
    (None, 0.1, 0.1, 0),  # logits up to 1/T = 10; the clamp bites for 1 of 10 anchors
    (None, 0.5, 0.3, 3),  # near-identical pairs: the clamp bites for some anchors
    (1.0, 0.1, 0.1, 0),
    (0.5, 0.5, 0.3, 3),
  ],
)
def test_debiased_variants_match_numpy(beta, t, tau_plus, close):
  """beta None: debiased_nt_xent; else hard_negative_nt_xent."""
  if beta is None:

    def fn(a, b, t, tp):
      return debiased_nt_xent(a, b, t, tp, return_metrics=True)
  else:

    def fn(a, b, t, tp):
      return hard_negative_nt_xent(a, b, t, tp, beta, return_metrics=True)

  def np_fn(a, b, t, tp, **kw):
    return np_dcl_family(a, b, t, tp, beta=beta, **kw)

  z_a, z_b = _pairs(seed=10, close=close)
  (value, metrics), grads = jax.jit(
    jax.value_and_grad(lambda a, b: fn(a, b, t, tau_plus), argnums=(0, 1), has_aux=True)
  )(z_a, z_b)
  clamped = np_fn(z_a, z_b, t, tau_plus, clamp_count=True)
  np.testing.assert_allclose(float(metrics["clamp_fraction"]), clamped / 10)
  if close:
    assert 0 < clamped < 10
  elif t == 0.5:
    assert clamped == 0
  np.testing.assert_allclose(float(value), np_fn(z_a, z_b, t, tau_plus), rtol=RTOL)
  expected = np_grad(lambda a, b: np_fn(a, b, t, tau_plus), z_a, z_b)
  assert_grads_close(grads, expected)


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_decoupled_matches_numpy(t):
  z_a, z_b = _pairs(seed=20, close=2)
  value, grads = _value_and_grads(lambda a, b: decoupled_nt_xent(a, b, t), z_a, z_b)
  np.testing.assert_allclose(float(value), np_dcl_family(z_a, z_b, t, decoupled=True), rtol=RTOL)
  expected = np_grad(lambda a, b: np_dcl_family(a, b, t, decoupled=True), z_a, z_b)
  assert_grads_close(grads, expected)


@pytest.mark.parametrize(
  "fn",
  [
    lambda a, b: debiased_nt_xent(a, b, 0.2, tau_plus=0.0, return_metrics=True),
    lambda a, b: hard_negative_nt_xent(a, b, 0.2, tau_plus=0.0, beta=0.0, return_metrics=True),
  ],
  ids=["debiased", "hard"],
)
def test_debiased_variants_reduce_to_nt_xent(fn):
  # With tau_plus = 0 the negative sum is >= M e^(-1/T) (all cosines >= -1),
  # so the clamp is inactive; this data keeps it strictly so.
  z_a, z_b = _pairs(seed=30, n=6, close=2)
  (value, metrics), grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(z_a, z_b)
  assert float(metrics["clamp_fraction"]) == 0.0
  e_value, e_grads = _value_and_grads(lambda a, b: losses.nt_xent(a, b, 0.2), z_a, z_b)
  np.testing.assert_allclose(float(value), float(e_value), rtol=1e-5)
  chex.assert_trees_all_close(grads, e_grads, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(value), np_nt_xent(z_a, z_b, 0.2), rtol=RTOL)


def test_hard_negative_with_beta_zero_is_debiased():
  z_a, z_b = _pairs(seed=40, close=3)
  got = _value_and_grads(lambda a, b: hard_negative_nt_xent(a, b, 0.5, 0.3, 0.0), z_a, z_b)
  expected = _value_and_grads(lambda a, b: debiased_nt_xent(a, b, 0.5, 0.3), z_a, z_b)
  np.testing.assert_allclose(float(got[0]), float(expected[0]), rtol=1e-5)
  chex.assert_trees_all_close(got[1], expected[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
  "fn",
  [
    lambda a, b, ax: debiased_nt_xent(a, b, 0.5, 0.1, axis_name=ax),
    lambda a, b, ax: hard_negative_nt_xent(a, b, 0.5, 0.1, 1.0, axis_name=ax),
    lambda a, b, ax: decoupled_nt_xent(a, b, 0.1, axis_name=ax),
  ],
  ids=["debiased", "hard", "decoupled"],
)
def test_sharded_debiased_variants_equal_single_device(fn):
  mesh = _mesh()
  z_a, z_b = _pairs(seed=50, n=16, d=6, close=4)
  expected = _value_and_grads(lambda a, b: fn(a, b, None), z_a, z_b)
  sharded = _sharded(lambda a, b: fn(a, b, DATA), mesh, (P(DATA), P(DATA)))
  got = _value_and_grads(sharded, z_a, z_b)
  np.testing.assert_allclose(float(got[0]), float(expected[0]), rtol=1e-5)
  # Sums in another order: an element that cancels to near 0 keeps the error of its summed
  # terms, so the floor scales with the largest element (an atol of 1e-7 held by 2.6x).
  assert_grads_close(got[1], expected[1], rtol=1e-5)
