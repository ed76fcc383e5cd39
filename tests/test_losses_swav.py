"""cljax.losses.swav: Sinkhorn and the SwAV loss against float64 NumPy and sharded."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from loss_references import DATA, RTOL, assert_grads_close, np_grad
from loss_references import data_mesh as _mesh
from loss_references import normal as _normal
from loss_references import sharded as _sharded
from loss_references import unit as _unit
from loss_references import value_and_grads as _value_and_grads

from cljax.losses.swav import sinkhorn, swav_loss


def np_sinkhorn(scores, num_iters, eps):
  """SwAV's distributed_sinkhorn on one device: Q is K x B."""
  q = np.exp(np.asarray(scores, np.float64) / eps).T
  k, b = q.shape
  q /= q.sum()
  for _ in range(num_iters):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    q /= q.sum(axis=0, keepdims=True)
    q /= b
  return (q * b).T


def _np_log_softmax(x):
  m = x.max(axis=-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_swav(scores, t, eps, iters, assign, queue=None, codes=None):
  """SwAV's loss (main_swav.py); ``codes`` fixes the targets (the stop-gradient)."""
  scores = np.asarray(scores, np.float64)
  v_count, n, _ = scores.shape
  if codes is None:
    codes = []
    for i, v in enumerate(assign):
      s = scores[v] if queue is None else np.concatenate([scores[v], queue[i]])
      codes.append(np_sinkhorn(s, iters, eps)[:n])
  loss = 0.0
  for i, v in enumerate(assign):
    sub = 0.0
    for u in range(v_count):
      if u != v:
        sub -= np.mean(np.sum(codes[i] * _np_log_softmax(scores[u] / t), axis=1))
    loss += sub / (v_count - 1)
  return loss / len(assign), codes


def _cosine_scores(seed, *lead, k=5, d=4):
  """Cosines of random unit embeddings with random unit prototypes."""
  rng = np.random.default_rng(seed)
  z = _unit(rng.normal(size=(*lead, d)))
  c = _unit(rng.normal(size=(k, d)))
  return (z @ c.T).astype(np.float32)


@pytest.mark.parametrize("num_iters,epsilon", [(3, 0.05), (10, 0.1)])
def test_sinkhorn_matches_numpy_and_gradient(num_iters, epsilon):
  scores = _cosine_scores(0, 8)
  w = _normal(1, 8, 5)

  def read_out(s):
    """A fixed linear read-out of the codes, to differentiate."""
    q = sinkhorn(s, num_iters=num_iters, epsilon=epsilon)
    return jnp.sum(w * q), q

  (_, got), grad = jax.jit(jax.value_and_grad(read_out, has_aux=True))(scores)
  np.testing.assert_allclose(
    np.asarray(got), np_sinkhorn(scores, num_iters, epsilon), rtol=RTOL, atol=1e-6
  )
  expected = np_grad(lambda s: np.sum(w * np_sinkhorn(s, num_iters, epsilon)), scores)
  assert_grads_close([grad], expected, rtol=1e-3)


def _column_error(q, b, k):
  """Largest relative deviation of the prototype sums from B / K."""
  return float(np.max(np.abs(np.asarray(q).sum(axis=0) / (b / k) - 1)))


def test_sinkhorn_marginals():
  # B = 32 cosine scores of 16-d embeddings against K = 4 prototypes, epsilon 0.05.
  scores = _cosine_scores(3, 32, k=4, d=16)
  b, k = 32, 4
  run = jax.jit(lambda s: [sinkhorn(s, num_iters=it) for it in (3, 10, 50)])
  errors = []
  for q in run(scores):
    # Rows: exact up to rounding, as the last step normalises them.
    np.testing.assert_allclose(np.asarray(q).sum(axis=1), 1.0, atol=1e-5)
    errors.append(_column_error(q, b, k))
  # Prototype sums on this data: within 35% of B/K after SwAV's 3 iterations
  # (0.297 seen; with so few, peaked samples 3 iterations are far from
  # converged), 10% after 10 (0.056) and 1e-3 after 50 (< 1e-6).
  softmax_error = _column_error(jax.nn.softmax(scores / 0.05), b, k)
  assert softmax_error > errors[0] > errors[1] > errors[2]
  assert errors[0] < 0.35 and errors[1] < 0.1 and errors[2] < 1e-3


def test_sharded_sinkhorn_equals_global_and_not_per_device():
  mesh = _mesh()
  scores = _cosine_scores(3, 32, k=4, d=16)
  w = _normal(3, 32, 4)
  b, k = 32, 4

  def codes(axis_name):
    """(3-iteration, 50-iteration) codes; the 3-iteration ones read out to differentiate."""

    def fn(s):
      return sinkhorn(s, axis_name=axis_name), sinkhorn(s, num_iters=50, axis_name=axis_name)

    if axis_name is not None:
      fn = _sharded(fn, mesh, P(DATA), (P(DATA), P(DATA)))

    def read_out(s):
      q3, q50 = fn(s)
      return jnp.sum(w * q3), (q3, q50)

    return jax.jit(jax.value_and_grad(read_out, has_aux=True))(scores)

  (_, expected), grad = codes(None)
  (_, got), s_grad = codes(DATA)
  # Codes and gradients through the psums equal the global ones.
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(s_grad, grad, rtol=1e-4, atol=1e-6)
  for q in got:
    np.testing.assert_allclose(np.asarray(q).sum(axis=1), 1.0, atol=1e-5)
  assert _column_error(got[1], b, k) < 1e-3

  # Teeth: per-device Sinkhorn (4 samples each) gives different codes.
  local = jax.jit(_sharded(lambda s: sinkhorn(s), mesh, P(DATA), P(DATA)))(scores)
  assert np.max(np.abs(np.asarray(local) - np.asarray(expected[0]))) > 1e-2


@pytest.mark.parametrize(
  "assign,queue_len,t",
  [((0, 1), 0, 0.1), ((0,), 3, 0.5), ((1, 2), 4, 0.2)],
)
def test_swav_value_and_gradient_match_numpy(assign, queue_len, t):
  scores = _cosine_scores(4, 3, 6, k=5)  # V=3 views of 6 samples, 5 prototypes
  # One (queue_len, K) queue per assigned view.
  queue = _cosine_scores(5, len(assign), queue_len, k=5) if queue_len else None
  value, (grad,) = _value_and_grads(
    lambda s: swav_loss(s, temperature=t, assign_views=assign, queue_scores=queue), scores
  )
  expected, codes = np_swav(scores, t, 0.05, 3, assign, queue)
  np.testing.assert_allclose(float(value), expected, rtol=RTOL)
  # The codes are stop-gradient targets: differentiate with them held fixed.
  expected_grad = np_grad(lambda s: np_swav(s, t, 0.05, 3, assign, codes=codes)[0], scores)
  assert_grads_close([grad], expected_grad)


def test_swav_shared_queue_equals_per_view_copies():
  scores = _cosine_scores(6, 3, 6, k=5)
  queue = _cosine_scores(7, 4, k=5)
  shared, copies, no_queue = jax.jit(
    lambda s: (
      swav_loss(s, queue_scores=queue),
      swav_loss(s, queue_scores=np.stack([queue, queue])),
      swav_loss(s),
    )
  )(scores)
  np.testing.assert_allclose(float(shared), float(copies), rtol=1e-6)
  assert abs(float(shared) - float(no_queue)) > 1e-3


def test_sharded_swav_equals_global_and_not_per_device():
  mesh = _mesh()
  scores = _cosine_scores(8, 3, 16, k=6)  # (V, N, K), N split over the 8 devices
  queue = _cosine_scores(9, 2, 16, k=6)  # 2 local queue rows per device and view

  def global_loss(s):
    return swav_loss(s, queue_scores=queue, return_metrics=True)

  (value, metrics), grad = jax.jit(jax.value_and_grad(global_loss, has_aux=True))(scores)
  sharded = _sharded(
    lambda s, q: swav_loss(s, queue_scores=q, axis_name=DATA, return_metrics=True),
    mesh,
    (P(None, DATA), P(None, DATA)),
  )
  (s_value, s_metrics), s_grad = jax.jit(
    jax.value_and_grad(lambda s: sharded(s, queue), has_aux=True)
  )(scores)
  np.testing.assert_allclose(float(s_value), float(value), rtol=1e-5)
  chex.assert_trees_all_close(s_grad, grad, rtol=1e-4, atol=1e-7)
  chex.assert_trees_all_close(s_metrics, metrics, rtol=1e-5)
  np.testing.assert_allclose(float(value), np_swav(scores, 0.1, 0.05, 3, (0, 1), queue)[0], 1e-4)

  # Teeth: Sinkhorn over each device's 2 + 2 rows only gives another loss.
  per_device = jax.jit(
    _sharded(
      lambda s, q: jax.lax.pmean(swav_loss(s, queue_scores=q), DATA),
      mesh,
      (P(None, DATA), P(None, DATA)),
    )
  )
  assert abs(float(per_device(scores, queue)) - float(value)) > 1e-2
