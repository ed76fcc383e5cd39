"""cljax.losses.contrastive: NT-Xent and InfoNCE against float64 NumPy, optax and sharded forms."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from cljax import losses, sharding


def np_nt_xent(z_a: np.ndarray, z_b: np.ndarray, temperature: float) -> float:
  """SimCLR's NT-Xent written directly from the paper, in float64."""
  z = np.concatenate([z_a, z_b]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  n2 = z.shape[0]
  n = n2 // 2
  total = 0.0
  for i in range(n2):
    partner = (i + n) % n2
    sims = np.array([z[i] @ z[j] for j in range(n2)]) / temperature
    others = np.array([j for j in range(n2) if j != i])
    m = sims[others].max()
    log_denominator = m + np.log(np.sum(np.exp(sims[others] - m)))
    total += log_denominator - sims[partner]
  return total / n2


def _embeddings(n, d, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, d)).astype(dtype), rng.normal(size=(n, d)).astype(dtype))


@pytest.mark.parametrize("n,d", [(1, 4), (4, 8), (16, 32), (64, 16)])
@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 1.0])
def test_nt_xent_matches_float64_numpy(n, d, temperature):
  z_a, z_b = _embeddings(n, d, seed=n * 7 + d)
  got = losses.nt_xent(jnp.asarray(z_a), jnp.asarray(z_b), temperature)
  np.testing.assert_allclose(float(got), np_nt_xent(z_a, z_b, temperature), rtol=1e-5)


def test_nt_xent_computes_in_float32_for_bfloat16_inputs():
  z_a, z_b = _embeddings(8, 16)
  loss = losses.nt_xent(jnp.asarray(z_a, jnp.bfloat16), jnp.asarray(z_b, jnp.bfloat16), 0.1)
  assert loss.dtype == jnp.float32
  z_a16 = np.asarray(jnp.asarray(z_a, jnp.bfloat16).astype(jnp.float32))
  z_b16 = np.asarray(jnp.asarray(z_b, jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(float(loss), np_nt_xent(z_a16, z_b16, 0.1), rtol=1e-5)


def test_nt_xent_agrees_with_optax_ntxent():
  # optax.ntxent groups embeddings by label; with exactly two views per label
  # each anchor has one positive and its definition is SimCLR's.
  z_a, z_b = _embeddings(12, 8)
  labels = jnp.concatenate([jnp.arange(12), jnp.arange(12)])
  expected = optax.losses.ntxent(jnp.concatenate([z_a, z_b]), labels, temperature=0.2)
  got = losses.nt_xent(jnp.asarray(z_a), jnp.asarray(z_b), 0.2)
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)


def test_info_nce_with_extra_negatives_matches_numpy():
  rng = np.random.default_rng(3)
  q, k, queue = rng.normal(size=(5, 8)), rng.normal(size=(5, 8)), rng.normal(size=(7, 8))
  got = losses.info_nce(
    jnp.asarray(q, jnp.float32),
    jnp.asarray(k, jnp.float32),
    jnp.arange(5),
    0.2,
    extra_negatives=jnp.asarray(queue, jnp.float32),
  )

  def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)

  logits = unit(q) @ np.concatenate([unit(k), unit(queue)]).T / 0.2
  log_z = np.log(np.exp(logits).sum(axis=1))
  expected = np.mean(log_z - logits[np.arange(5), np.arange(5)])
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_positive_accuracy_counts_top1_positives():
  z = np.eye(4, dtype=np.float32)
  # Views identical to their partner: every anchor finds its positive.
  assert float(losses.nt_xent(z, z, 0.1, return_metrics=True)[1]["accuracy"]) == 1.0
  logits = jnp.array([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
  assert float(losses.positive_accuracy(logits, jnp.array([1, 2]))) == 0.5


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(z_a=np.zeros((4, 8)), z_b=np.zeros((5, 8))), "same shape"),
    (dict(z_a=np.zeros((4,)), z_b=np.zeros((4,))), "shape"),
    (dict(z_a=np.ones((4, 8)), z_b=np.ones((4, 8)), temperature=0.0), "temperature"),
    (dict(z_a=np.ones((4, 8)), z_b=np.ones((4, 8)), temperature=-1.0), "temperature"),
  ],
)
def test_nt_xent_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    losses.nt_xent(**kwargs)


def test_info_nce_rejects_mismatched_dims():
  with pytest.raises(ValueError, match="embedding dim"):
    losses.info_nce(jnp.ones((4, 8)), jnp.ones((4, 6)), jnp.arange(4), 0.1)


def _sharded_loss(loss_fn, mesh):
  """Runs ``loss_fn(z_a, z_b, axis_name)`` per device, the batch split over 'data'."""
  return jax.shard_map(
    lambda a, b: loss_fn(a, b, sharding.DATA_AXIS),
    mesh=mesh,
    in_specs=(P(sharding.DATA_AXIS), P(sharding.DATA_AXIS)),
    out_specs=P(),
  )


def _local_negatives_loss(z_a, z_b, axis_name):
  """A wrong variant: gathered keys carry no gradient back to other devices."""
  n = z_a.shape[0]
  z = jnp.concatenate([z_a, z_b])
  keys = jax.lax.stop_gradient(jax.lax.all_gather(z, axis_name, tiled=True))
  offset = jax.lax.axis_index(axis_name) * 2 * n
  local = jnp.arange(2 * n)
  q = losses.l2_normalize(z)
  k = losses.l2_normalize(keys)
  logits = q @ k.T / 0.1
  logits = jnp.where(jnp.arange(k.shape[0])[None] == (local + offset)[:, None], -1e9, logits)
  labels = jnp.concatenate([local[n:], local[:n]]) + offset
  return losses.softmax_cross_entropy(logits, labels, axis_name)


def test_sharded_nt_xent_and_gradient_equal_single_device():
  mesh = sharding.create_mesh()
  assert mesh.devices.size == 8
  z_a, z_b = _embeddings(32, 16, seed=5)

  def global_loss(a, b):
    return losses.nt_xent(a, b, 0.1)

  def sharded(a, b, axis_name):
    return losses.nt_xent(a, b, 0.1, axis_name=axis_name)

  value, grads = jax.value_and_grad(global_loss, argnums=(0, 1))(z_a, z_b)
  s_value, s_grads = jax.jit(jax.value_and_grad(_sharded_loss(sharded, mesh), argnums=(0, 1)))(
    z_a, z_b
  )
  np.testing.assert_allclose(float(s_value), float(value), rtol=1e-5)
  chex.assert_trees_all_close(s_grads, grads, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(value), np_nt_xent(z_a, z_b, 0.1), rtol=1e-5)

  # Teeth: without gradients through the gather the loss agrees but the
  # gradient does not, and this test's comparison catches it.
  w_value, w_grads = jax.jit(
    jax.value_and_grad(_sharded_loss(_local_negatives_loss, mesh), argnums=(0, 1))
  )(z_a, z_b)
  np.testing.assert_allclose(float(w_value), float(value), rtol=1e-5)
  with pytest.raises(AssertionError):
    chex.assert_trees_all_close(w_grads, grads, rtol=1e-5, atol=1e-7)


def test_sharded_info_nce_uses_global_negatives():
  mesh = sharding.create_mesh()
  rng = np.random.default_rng(9)
  q, k = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)
  expected = losses.info_nce(q, k, jnp.arange(16), 0.3)
  f = jax.jit(
    jax.shard_map(
      lambda a, b: losses.info_nce(a, b, jnp.arange(a.shape[0]), 0.3, axis_name="data"),
      mesh=mesh,
      in_specs=(P("data"), P("data")),
      out_specs=P(),
    )
  )
  np.testing.assert_allclose(float(f(q, k)), float(expected), rtol=1e-5)
