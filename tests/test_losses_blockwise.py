"""cljax.losses.blockwise: the memory-bounded losses against cljax.losses' plain ones."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cljax import losses, sharding
from cljax.losses import blockwise as blockwise_module


def _embeddings(n, d, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)


def _value_and_grads(loss_fn, *args):
  return jax.jit(jax.value_and_grad(loss_fn, argnums=tuple(range(len(args)))))(*args)


# float32's machine epsilon (2^-23: the spacing of floats at 1).
_EPS32 = float(np.finfo(np.float32).eps)


def _assert_same(got, expected):
  """The blockwise loss against the plain one, both in float32 (both cast logits to float32,
  so neither can run in float64).

  The two sum the same terms in another order (the blockwise one streams a rescaled
  log-sum-exp over blocks), so they agree to float32 rounding, not bitwise. The loss is a
  mean of log-sum-exps of size ~log(2n): relative error a few eps, hence rtol 1e-5. A
  gradient element is a sum over the 2n keys of (p - y) * z / T terms, whose largest is of
  the order of the largest gradient element; summing them in another order moves an element
  by up to ~log2(2n) + a few roundings of that scale, not of the element itself (a small
  element is a cancellation of large terms). So the gradients' atol is 32 eps times the
  leaf's largest element. Measured over CASES: at most 3.7 eps times that scale, on XLA's
  AVX2 and SSE4.2 CPU targets (1.9e-7 in one element where atol was 1e-7: that rounding, not
  a bug); the same losses with the temperature 0.1% off differ by over 8,000 eps times it.
  """
  (value, grads), (e_value, e_grads) = got, expected
  np.testing.assert_allclose(float(value), float(e_value), rtol=1e-5, atol=1e-7)
  for leaf, e_leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(e_grads), strict=True):
    scale = float(np.max(np.abs(np.asarray(e_leaf, np.float32)), initial=0.0))
    np.testing.assert_allclose(
      np.asarray(leaf, np.float32),
      np.asarray(e_leaf, np.float32),
      rtol=1e-5,
      atol=max(32 * _EPS32 * scale, 1e-7),
    )


# (n, d, temperature, block_size) with 2n views: blocks that divide 2n, that
# do not (padded, masked last block), of one view, of exactly and of more
# than all views.
CASES = [
  (16, 32, 0.1, 8),
  (16, 32, 0.1, 7),
  (13, 8, 0.05, 5),
  (13, 8, 0.5, 1),
  (32, 16, 1.0, 64),
  (32, 16, 0.2, 1000),
  (1, 4, 0.1, 1),
  (100, 64, 0.07, 48),
]


@pytest.mark.parametrize("n,d,temperature,block_size", CASES)
def test_nt_xent_blockwise_value_and_gradient_equal_nt_xent(n, d, temperature, block_size):
  z_a, z_b = _embeddings(n, d, seed=n + d)
  expected = _value_and_grads(lambda a, b: losses.nt_xent(a, b, temperature), z_a, z_b)
  got = _value_and_grads(
    lambda a, b: losses.nt_xent_blockwise(a, b, temperature, block_size=block_size), z_a, z_b
  )
  _assert_same(got, expected)


def test_nt_xent_blockwise_gradient_in_temperature_equals_nt_xent():
  z_a, z_b = _embeddings(12, 8, seed=1)
  t = jnp.float32(0.2)
  expected = _value_and_grads(losses.nt_xent, z_a, z_b, t)
  got = _value_and_grads(
    lambda a, b, t: losses.nt_xent_blockwise(a, b, t, block_size=5), z_a, z_b, t
  )
  _assert_same(got, expected)
  assert abs(float(got[1][2])) > 1e-3


def test_nt_xent_blockwise_metrics_equal_nt_xent():
  z_a, z_b = _embeddings(24, 8, seed=2)
  # Half the pairs made near-identical so that accuracy is strictly between 0 and 1.
  z_b[:12] = z_a[:12] + 0.01 * z_b[:12]
  _, expected = jax.jit(lambda a, b: losses.nt_xent(a, b, 0.1, return_metrics=True))(z_a, z_b)
  _, got = jax.jit(
    lambda a, b: losses.nt_xent_blockwise(a, b, 0.1, block_size=10, return_metrics=True)
  )(z_a, z_b)
  assert 0.0 < float(expected["accuracy"]) < 1.0
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)


def test_nt_xent_blockwise_computes_in_float32_for_bfloat16_inputs():
  z_a, z_b = (jnp.asarray(x, jnp.bfloat16) for x in _embeddings(16, 16, seed=3))
  expected = _value_and_grads(lambda a, b: losses.nt_xent(a, b, 0.1), z_a, z_b)
  got = _value_and_grads(lambda a, b: losses.nt_xent_blockwise(a, b, 0.1, block_size=12), z_a, z_b)
  assert got[0].dtype == jnp.float32
  assert all(g.dtype == jnp.bfloat16 for g in got[1])
  np.testing.assert_allclose(float(got[0]), float(expected[0]), rtol=1e-5)
  # Gradients agree in float32; the final rounding to bfloat16 may differ by one ulp.
  chex.assert_trees_all_close(got[1], expected[1], rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("block_size", [3, 64])
@pytest.mark.parametrize("with_negatives", [False, True])
def test_info_nce_blockwise_value_and_gradient_equal_info_nce(block_size, with_negatives):
  rng = np.random.default_rng(block_size)
  q, k = rng.normal(size=(10, 8)).astype(np.float32), rng.normal(size=(14, 8)).astype(np.float32)
  queue = rng.normal(size=(9, 8)).astype(np.float32)
  positives = jnp.asarray(rng.permutation(14)[:10])
  exclude = (positives + 1) % 14
  kwargs = dict(exclude_indices=exclude)

  def plain(q, k, queue):
    negatives = queue if with_negatives else None
    return losses.info_nce(q, k, positives, 0.2, extra_negatives=negatives, **kwargs)

  def blockwise(q, k, queue):
    negatives = queue if with_negatives else None
    return losses.info_nce_blockwise(
      q, k, positives, 0.2, extra_negatives=negatives, block_size=block_size, **kwargs
    )

  _assert_same(_value_and_grads(blockwise, q, k, queue), _value_and_grads(plain, q, k, queue))


def _sharded(loss_fn, mesh):
  """Runs ``loss_fn(z_a, z_b, axis_name)`` per device, the batch split over 'data'."""
  return jax.shard_map(
    lambda a, b: loss_fn(a, b, sharding.DATA_AXIS),
    mesh=mesh,
    in_specs=(P(sharding.DATA_AXIS), P(sharding.DATA_AXIS)),
    out_specs=P(),
  )


def _keep_own_key_gradients(dk, axis_name):
  """A wrong transpose of the all-gather: no gradient reaches other devices' keys."""
  m = dk.shape[0] // jax.lax.psum(1, axis_name)
  return jax.lax.dynamic_slice_in_dim(dk, jax.lax.axis_index(axis_name) * m, m)


@pytest.mark.parametrize("block_size", [24, 64])
def test_sharded_nt_xent_blockwise_and_gradient_equal_single_device(block_size, monkeypatch):
  mesh = sharding.create_mesh()
  assert mesh.devices.size == 8
  z_a, z_b = _embeddings(32, 16, seed=5)  # 64 global views; 24 does not divide them.
  expected = _value_and_grads(lambda a, b: losses.nt_xent(a, b, 0.1), z_a, z_b)

  def blockwise(a, b, axis_name):
    return losses.nt_xent_blockwise(a, b, 0.1, axis_name=axis_name, block_size=block_size)

  _assert_same(_value_and_grads(_sharded(blockwise, mesh), z_a, z_b), expected)

  _, metrics = jax.jit(lambda a, b: losses.nt_xent(a, b, 0.1, return_metrics=True))(z_a, z_b)
  s_metrics = jax.jit(
    _sharded(
      lambda a, b, ax: losses.nt_xent_blockwise(
        a, b, 0.1, axis_name=ax, block_size=block_size, return_metrics=True
      )[1],
      mesh,
    )
  )(z_a, z_b)
  chex.assert_trees_all_close(s_metrics, metrics, rtol=1e-5, atol=1e-6)

  # Teeth: without the reduce-scatter the loss agrees but the key gradients
  # stay on the querying device, and the comparison above catches it.
  monkeypatch.setattr(blockwise_module, "_return_key_gradients", _keep_own_key_gradients)
  w_value, w_grads = _value_and_grads(_sharded(blockwise, mesh), z_a, z_b)
  np.testing.assert_allclose(float(w_value), float(expected[0]), rtol=1e-5)
  with pytest.raises(AssertionError):
    chex.assert_trees_all_close(w_grads, expected[1], rtol=1e-5, atol=1e-7)


def _temp_bytes(loss_fn, *shapes):
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  grad_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=tuple(range(len(args)))))
  return grad_fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_compiled_memory_is_bounded_by_block_not_key_count():
  # One device's share of a large batch: 256 local queries against 8192
  # gathered keys. The plain loss holds (n, K) float32 logits (8 MiB) several
  # times over; the blockwise one a few (n, b) blocks plus the unit keys.
  n, num_keys, d, b = 256, 8192, 32, 512
  positives = jnp.arange(n)

  def plain(q, k):
    return losses.info_nce(q, k, positives, 0.1)

  def blockwise(q, k):
    return losses.info_nce_blockwise(q, k, positives, 0.1, block_size=b)

  plain_bytes = _temp_bytes(plain, (n, d), (num_keys, d))
  block_bytes = _temp_bytes(blockwise, (n, d), (num_keys, d))
  assert plain_bytes >= 4 * n * num_keys  # The memory analysis does see the logits.
  # Bound: four (n, b) float32 blocks plus two (K, d) float32 key copies.
  assert block_bytes <= 4 * (4 * n * b + 2 * num_keys * d), block_bytes
  assert 5 * block_bytes < plain_bytes, (block_bytes, plain_bytes)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(z_a=np.zeros((4, 8)), z_b=np.zeros((5, 8))), "same shape"),
    (dict(z_a=np.zeros((4,)), z_b=np.zeros((4,))), "shape"),
    (dict(z_a=np.ones((4, 8)), z_b=np.ones((4, 8)), temperature=0.0), "temperature"),
    (dict(z_a=np.ones((4, 8)), z_b=np.ones((4, 8)), block_size=0), "block_size"),
    (dict(z_a=np.ones((4, 8)), z_b=np.ones((4, 8)), block_size=-3), "block_size"),
    (dict(z_a=np.ones((4, 8)), z_b=np.ones((4, 8)), block_size=2.5), "block_size"),
  ],
)
def test_nt_xent_blockwise_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    losses.nt_xent_blockwise(**kwargs)


def test_info_nce_blockwise_rejects_bad_arguments():
  with pytest.raises(ValueError, match="embedding dim"):
    losses.info_nce_blockwise(jnp.ones((4, 8)), jnp.ones((4, 6)), jnp.arange(4))
  with pytest.raises(ValueError, match=r"positive_indices must have shape \(4,\)"):
    losses.info_nce_blockwise(jnp.ones((4, 8)), jnp.ones((4, 8)), jnp.arange(3))
