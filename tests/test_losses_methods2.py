"""SupCon, Barlow Twins, SwAV/Sinkhorn and the NT-Xent variants against float64 NumPy.

Each loss is checked for value and gradient against a NumPy float64 version
written from its paper (gradients by central finite differences), and its
sharded form (8 fake CPU devices) against the single-device one.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cljax import losses, sharding
from cljax.losses.barlow import barlow_twins_loss
from cljax.losses.debiased import debiased_nt_xent, decoupled_nt_xent, hard_negative_nt_xent
from cljax.losses.supcon import supcon_loss
from cljax.losses.swav import sinkhorn, swav_loss

DATA = sharding.DATA_AXIS

# float32 JAX against float64 NumPy.
RTOL = 1e-4


# ---------------------------------------------------------------------------
# float64 NumPy references, written from the papers.


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _logsumexp(x):
  m = np.max(x)
  return m + np.log(np.sum(np.exp(x - m)))


def np_nt_xent(z_a, z_b, t):
  z = _unit(np.concatenate([z_a, z_b]))
  n2 = z.shape[0]
  total = 0.0
  for i in range(n2):
    sims = z @ z[i] / t
    others = [j for j in range(n2) if j != i]
    total += _logsumexp(sims[others]) - sims[(i + n2 // 2) % n2]
  return total / n2


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


def np_grad(f, *xs, h=1e-5):
  """Central finite differences of scalar ``f(*xs)`` in float64, one array per argument."""
  xs = [np.array(x, np.float64) for x in xs]
  grads = []
  for x in xs:
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
      orig = x[idx]
      x[idx] = orig + h
      up = f(*xs)
      x[idx] = orig - h
      down = f(*xs)
      x[idx] = orig
      g[idx] = (up - down) / (2 * h)
    grads.append(g)
  return grads


def assert_grads_close(got, expected, rtol=RTOL):
  for g, e in zip(got, expected, strict=True):
    g, e = np.asarray(g, np.float64), np.asarray(e, np.float64)
    np.testing.assert_allclose(g, e, rtol=rtol, atol=rtol * np.abs(e).max() + 1e-8)


def _value_and_grads(f, *args):
  return jax.jit(jax.value_and_grad(f, argnums=tuple(range(len(args)))))(*args)


def _normal(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _mesh():
  mesh = sharding.create_mesh()
  assert mesh.devices.size == 8
  return mesh


def _sharded(fn, mesh, in_specs, out_specs=None):
  out_specs = P() if out_specs is None else out_specs
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=True)


# ---------------------------------------------------------------------------
# SupCon


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
  chex.assert_trees_all_close(s_grad, grad, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(s_metrics, metrics, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(value), np_supcon(emb, labels, 0.1), rtol=RTOL)
  np.testing.assert_allclose(float(metrics["anchor_fraction"]), 31 / 32)


# ---------------------------------------------------------------------------
# Barlow Twins


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


# ---------------------------------------------------------------------------
# Sinkhorn and SwAV


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


# ---------------------------------------------------------------------------
# Debiased, hard-negative and decoupled NT-Xent


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
  chex.assert_trees_all_close(got[1], expected[1], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# dtypes and argument checks


def test_losses_compute_in_float32_for_bfloat16_inputs():
  @jax.jit
  def all_losses(a, b):
    return {
      "supcon": supcon_loss(jnp.concatenate([a, b]), jnp.arange(16) % 8),
      "barlow": barlow_twins_loss(a, b),
      "swav": swav_loss(jnp.stack([a, b]) / 4.0),
      "debiased": debiased_nt_xent(a, b),
      "hard": hard_negative_nt_xent(a, b),
      "decoupled": decoupled_nt_xent(a, b),
    }

  a, b = (jnp.asarray(x, jnp.bfloat16) for x in (_normal(60, 8, 4), _normal(61, 8, 4)))
  got = all_losses(a, b)
  expected = all_losses(a.astype(jnp.float32), b.astype(jnp.float32))
  for name, loss in got.items():
    assert loss.dtype == jnp.float32, name
    np.testing.assert_allclose(float(loss), float(expected[name]), rtol=1e-5, err_msg=name)


_X = np.ones((4, 3), np.float32)
_S = np.zeros((3, 4, 5), np.float32)


@pytest.mark.parametrize(
  "call,match",
  [
    (lambda: supcon_loss(np.ones(4), np.arange(4)), "embeddings"),
    (lambda: supcon_loss(_X, np.arange(5)), "labels"),
    (lambda: supcon_loss(_X, np.zeros(4, np.float32)), "integer"),
    (lambda: supcon_loss(_X, np.arange(4), 0.0), "temperature"),
    (lambda: supcon_loss(_X, np.arange(4), base_temperature=-1.0), "base_temperature"),
    (lambda: barlow_twins_loss(_X, np.ones((4, 2))), "same shape"),
    (lambda: barlow_twins_loss(np.ones(4), np.ones(4)), "z_a"),
    (lambda: barlow_twins_loss(_X, _X, -1.0), "lambda_"),
    (lambda: barlow_twins_loss(_X, _X, eps=0.0), "eps"),
    (lambda: sinkhorn(np.ones(4)), "scores"),
    (lambda: sinkhorn(_X, num_iters=0), "num_iters"),
    (lambda: sinkhorn(_X, epsilon=0.0), "epsilon"),
    (lambda: swav_loss(_X), "scores"),
    (lambda: swav_loss(_S[:1]), "2 views"),
    (lambda: swav_loss(_S, assign_views=()), "assign_views"),
    (lambda: swav_loss(_S, assign_views=(0, 0)), "assign_views"),
    (lambda: swav_loss(_S, assign_views=(3,)), "assign_views"),
    (lambda: swav_loss(_S, temperature=0.0), "temperature"),
    (lambda: swav_loss(_S, epsilon=-1.0), "epsilon"),
    (lambda: swav_loss(_S, sinkhorn_iters=0), "sinkhorn_iters"),
    (lambda: swav_loss(_S, queue_scores=np.zeros((2, 4))), "queue_scores"),
    (lambda: swav_loss(_S, queue_scores=np.zeros((3, 2, 5))), "queue_scores"),
    (lambda: debiased_nt_xent(_X, _X, tau_plus=1.0), "tau_plus"),
    (lambda: debiased_nt_xent(_X, _X, 0.0), "temperature"),
    (lambda: debiased_nt_xent(_X, np.ones((3, 3))), "same shape"),
    (lambda: debiased_nt_xent(_X[:1], _X[:1]), "negative"),
    (lambda: hard_negative_nt_xent(_X, _X, beta=-1.0), "beta"),
    (lambda: hard_negative_nt_xent(_X, _X, tau_plus=-0.1), "tau_plus"),
    (lambda: decoupled_nt_xent(_X[:1], _X[:1]), "negative"),
    (lambda: decoupled_nt_xent(np.ones(4), np.ones(4)), "z_a"),
  ],
)
def test_bad_arguments_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()
