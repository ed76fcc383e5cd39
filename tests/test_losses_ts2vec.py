"""cljax.losses.ts2vec: TS2Vec's instance, temporal and hierarchical losses against float64
NumPy written from the official ``models/losses.py``, masked (static-shape) against unpadded,
and 8 devices against 1."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from loss_references import DATA, np_grad
from loss_references import assert_close as _assert_close
from loss_references import assert_grads_close as _assert_grads_close
from loss_references import assert_zero as _assert_zero
from loss_references import logsumexp as _logsumexp
from loss_references import normal as _normal
from loss_references import value_and_grads as _value_and_grads

from cljax import losses, sharding
from cljax.losses import ts2vec

# -- The official losses, line by line, in float64 (tril/triu trick included). --


def _neg_log_softmax(x):
  return -(x - _logsumexp(x)[..., None])


def np_instance(z1, z2):
  z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
  batch = z1.shape[0]
  if batch == 1:
    return 0.0
  z = np.concatenate([z1, z2], axis=0).transpose(1, 0, 2)  # T x 2B x C
  sim = z @ z.transpose(0, 2, 1)  # T x 2B x 2B
  logits = np.tril(sim, -1)[:, :, :-1] + np.triu(sim, 1)[:, :, 1:]
  logits = _neg_log_softmax(logits)
  i = np.arange(batch)
  return (logits[:, i, batch + i - 1].mean() + logits[:, batch + i, i].mean()) / 2


def np_temporal(z1, z2):
  z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
  length = z1.shape[1]
  if length == 1:
    return 0.0
  z = np.concatenate([z1, z2], axis=1)  # B x 2T x C
  sim = z @ z.transpose(0, 2, 1)  # B x 2T x 2T
  logits = np.tril(sim, -1)[:, :, :-1] + np.triu(sim, 1)[:, :, 1:]
  logits = _neg_log_softmax(logits)
  t = np.arange(length)
  return (logits[:, t, length + t - 1].mean() + logits[:, length + t, t].mean()) / 2


def _np_max_pool2(z):
  batch, length, channels = z.shape
  half = length // 2
  return z[:, : 2 * half].reshape(batch, half, 2, channels).max(axis=2)


def np_hierarchical(z1, z2, alpha=0.5, temporal_unit=0):
  z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
  loss, d = 0.0, 0
  while z1.shape[1] > 1:
    if alpha != 0:
      loss += alpha * np_instance(z1, z2)
    if d >= temporal_unit and 1 - alpha != 0:
      loss += (1 - alpha) * np_temporal(z1, z2)
    d += 1
    z1, z2 = _np_max_pool2(z1), _np_max_pool2(z2)
  if z1.shape[1] == 1:
    if alpha != 0:
      loss += alpha * np_instance(z1, z2)
    d += 1
  return loss / d


def _pair(batch, length, channels, seed):
  # Scaled so that the softmaxes are neither uniform nor one-hot.
  return 0.7 * _normal(seed, batch, length, channels), 0.7 * _normal(
    seed + 1, batch, length, channels
  )


# -- Value and gradient against the reference. --


@pytest.mark.parametrize("shape", [(3, 5, 4), (4, 2, 3)])
def test_instance_and_temporal_match_numpy_value_and_gradient(shape):
  z1, z2 = _pair(*shape, seed=1)
  for loss_fn, np_fn in (
    (ts2vec.instance_contrastive_loss, np_instance),
    (ts2vec.temporal_contrastive_loss, np_temporal),
  ):
    value, grads = _value_and_grads(loss_fn, z1, z2)
    _assert_close(value, np_fn(z1, z2), rtol=1e-5, atol=1e-6)
    _assert_grads_close(grads, np_grad(np_fn, z1, z2))


@pytest.mark.parametrize(
  "length,alpha,temporal_unit",
  [(8, 0.5, 0), (5, 0.5, 0), (7, 0.3, 1), (6, 0.0, 0), (9, 1.0, 0), (11, 0.5, 2)],
)
def test_hierarchical_matches_numpy(length, alpha, temporal_unit):
  z1, z2 = _pair(3, length, 4, seed=10 + length)
  value = jax.jit(lambda a, b: losses.hierarchical_contrastive_loss(a, b, alpha, temporal_unit))(
    z1, z2
  )
  _assert_close(value, np_hierarchical(z1, z2, alpha, temporal_unit), rtol=1e-5, atol=1e-6)


def test_hierarchical_gradient_matches_numpy():
  z1, z2 = _pair(3, 5, 3, seed=20)
  value, grads = _value_and_grads(ts2vec.hierarchical_contrastive_loss, z1, z2)
  _assert_close(value, np_hierarchical(z1, z2), rtol=1e-5, atol=1e-6)
  _assert_grads_close(grads, np_grad(np_hierarchical, z1, z2))


def test_odd_lengths_pool_with_floor_and_count_every_level():
  # T = 5 -> 2 -> 1: max_pool1d(kernel_size=2) drops the fifth step, three levels.
  z1, z2 = _pair(4, 5, 3, seed=30)
  pooled1 = [z1, _np_max_pool2(z1), _np_max_pool2(_np_max_pool2(z1))]
  pooled2 = [z2, _np_max_pool2(z2), _np_max_pool2(_np_max_pool2(z2))]
  assert [p.shape[1] for p in pooled1] == [5, 2, 1]
  instance = [np_instance(a, b) for a, b in zip(pooled1, pooled2, strict=True)]
  temporal = [np_temporal(a, b) for a, b in zip(pooled1[:2], pooled2[:2], strict=True)]
  expected = (0.5 * sum(instance) + 0.5 * sum(temporal)) / 3
  got = ts2vec.hierarchical_contrastive_loss(z1, z2)
  _assert_close(got, expected, rtol=1e-5, atol=1e-6)
  # The fifth step takes part in level 0 only: with the instance loss alone, moving it
  # changes the loss by the change of level 0's instance loss over 3 levels.
  z1b = z1.copy()
  z1b[:, 4] += 1.0
  _assert_close(
    ts2vec.hierarchical_contrastive_loss(z1b, z2, alpha=1.0),
    ts2vec.hierarchical_contrastive_loss(z1, z2, alpha=1.0)
    + (np_instance(z1b, z2) - np_instance(z1, z2)) / 3,
    rtol=1e-5,
    atol=1e-5,
  )


def test_official_guards_single_series_and_single_timestamp():
  z1, z2 = _pair(1, 6, 3, seed=40)
  assert float(ts2vec.instance_contrastive_loss(z1, z2)) == 0.0
  # B == 1: only the temporal terms remain, at the levels of length 6 and 3.
  expected = 0.5 * (np_temporal(z1, z2) + np_temporal(_np_max_pool2(z1), _np_max_pool2(z2))) / 3
  _assert_close(ts2vec.hierarchical_contrastive_loss(z1, z2), expected, rtol=1e-5)
  _assert_close(expected, np_hierarchical(z1, z2), rtol=1e-12)
  y1, y2 = _pair(5, 1, 3, seed=41)
  assert float(ts2vec.temporal_contrastive_loss(y1, y2)) == 0.0
  # T == 1: one level, instance only.
  _assert_close(
    ts2vec.hierarchical_contrastive_loss(y1, y2, alpha=0.25),
    0.25 * np_instance(y1, y2),
    rtol=1e-5,
  )


# -- Static shapes: a validity mask equals the official loss on the unpadded arrays. --


def _padded(z, length, garbage):
  z = z.copy()
  z[:, length:] = garbage
  return z


@pytest.mark.parametrize("length", [2, 5, 7, 16])
def test_masked_loss_equals_official_on_unpadded_arrays(length):
  full, batch = 16, 3
  z1, z2 = _pair(batch, full, 4, seed=50 + length)
  valid = np.arange(full) < length
  # NaN garbage beyond the overlap must reach neither the value nor the gradient.
  p1, p2 = _padded(z1, length, np.nan), _padded(z2, length, np.nan)
  fn = jax.jit(
    jax.value_and_grad(
      lambda a, b, m: ts2vec.hierarchical_contrastive_loss(a, b, mask=m), argnums=(0, 1)
    )
  )
  value, (g1, g2) = fn(p1, p2, valid)
  unpadded = z1[:, :length], z2[:, :length]
  _assert_close(value, np_hierarchical(*unpadded), rtol=1e-5, atol=1e-6)
  expected_value, (e1, e2) = _value_and_grads(ts2vec.hierarchical_contrastive_loss, *unpadded)
  _assert_close(value, float(expected_value), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g1[:, :length], e1, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g2[:, :length], e2, rtol=1e-4, atol=1e-6)
  _assert_zero((g1[:, length:], g2[:, length:]))
  # A (B, T) mask with the same rows is the same mask.
  _assert_close(fn(p1, p2, np.broadcast_to(valid, (batch, full)))[0], float(value), rtol=1e-6)
  for loss_fn, np_fn in (
    (ts2vec.instance_contrastive_loss, np_instance),
    (ts2vec.temporal_contrastive_loss, np_temporal),
  ):
    _assert_close(loss_fn(p1, p2, mask=valid), np_fn(*unpadded), rtol=1e-5, atol=1e-6)


def test_masked_loss_with_no_valid_timestamp_is_zero():
  z1, z2 = _pair(2, 4, 3, seed=60)
  none = np.zeros(4, bool)
  for loss_fn in (
    ts2vec.instance_contrastive_loss,
    ts2vec.temporal_contrastive_loss,
    ts2vec.hierarchical_contrastive_loss,
  ):
    assert float(loss_fn(z1, z2, mask=none)) == 0.0


# -- 8 devices == 1 device on the same global batch. --


def _sharded_loss(loss_fn, mask_spec=None):
  """``loss_fn`` over the 8 devices: (z1, z2) without a mask, (z1, z2, mask) with a spec."""
  mesh = sharding.create_mesh()
  assert mesh.devices.size == 8
  if mask_spec is None:
    fn, in_specs = (lambda a, b: loss_fn(a, b, axis_name=DATA)), (P(DATA), P(DATA))
  else:
    fn, in_specs = (
      (lambda a, b, m: loss_fn(a, b, axis_name=DATA, mask=m)),
      (P(DATA), P(DATA), mask_spec),
    )
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P(), check_vma=True)


@pytest.mark.parametrize("global_batch", [8, 16])
@pytest.mark.parametrize(
  "name",
  ["instance_contrastive_loss", "temporal_contrastive_loss", "hierarchical_contrastive_loss"],
)
def test_sharded_loss_and_gradients_equal_single_device(name, global_batch):
  loss_fn = getattr(ts2vec, name)
  length = 7
  z1, z2 = _pair(global_batch, length, 4, seed=70 + global_batch)
  expected = _value_and_grads(lambda a, b: loss_fn(a, b), z1, z2)
  all_valid = np.ones(length, bool)
  for got in (
    _value_and_grads(_sharded_loss(loss_fn), z1, z2),
    _value_and_grads(lambda a, b: _sharded_loss(loss_fn, P())(a, b, all_valid), z1, z2),
  ):
    _assert_close(got[0], float(expected[0]), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(got[1], expected[1], rtol=1e-5, atol=1e-7)
  np_fn = {"instance": np_instance, "temporal": np_temporal}.get(
    name.split("_")[0], np_hierarchical
  )
  _assert_close(expected[0], np_fn(z1, z2), rtol=1e-5, atol=1e-6)
  if name == "instance_contrastive_loss" and global_batch == 8:
    # One series per device: without the gathered negatives the loss would be 0.
    assert float(got[0]) > 0.1


def test_sharded_masked_hierarchical_equals_unpadded_single_device():
  full, length = 12, 7
  z1, z2 = _pair(16, full, 4, seed=80)
  valid = np.arange(full) < length
  p1, p2 = _padded(z1, length, 1e4), _padded(z2, length, -1e4)
  expected = _value_and_grads(ts2vec.hierarchical_contrastive_loss, z1[:, :length], z2[:, :length])
  for mask, spec in ((valid, P()), (np.broadcast_to(valid, (16, full)), P(DATA))):
    loss_fn = _sharded_loss(ts2vec.hierarchical_contrastive_loss, spec)
    value, (g1, g2) = _value_and_grads(lambda a, b, m=mask, f=loss_fn: f(a, b, m), p1, p2)
    _assert_close(value, float(expected[0]), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close((g1[:, :length], g2[:, :length]), expected[1], rtol=1e-5, atol=1e-7)
    _assert_zero((g1[:, length:], g2[:, length:]))


# -- dtypes and arguments. --


def test_bfloat16_inputs_compute_in_float32():
  z1, z2 = (jnp.asarray(z, jnp.bfloat16) for z in _pair(4, 6, 3, seed=90))
  loss = ts2vec.hierarchical_contrastive_loss(z1, z2)
  assert loss.dtype == jnp.float32
  as_f32 = [np.asarray(z, np.float32) for z in (z1, z2)]
  _assert_close(loss, np_hierarchical(*as_f32), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "shapes,kwargs,match",
  [
    (((2, 4, 3), (2, 4, 2)), {}, "same shape"),
    (((2, 4), (2, 4)), {}, "batch, time, channels"),
    (((2, 4, 3), (2, 4, 3)), dict(mask=np.ones((3,), bool)), "mask must have shape"),
    (((2, 4, 3), (2, 4, 3)), dict(mask=np.ones((4, 2), bool)), "mask must have shape"),
    (((2, 4, 3), (2, 4, 3)), dict(temporal_unit=-1), "temporal_unit"),
  ],
)
def test_hierarchical_rejects_bad_arguments(shapes, kwargs, match):
  z1, z2 = (np.zeros(s, np.float32) for s in shapes)
  with pytest.raises(ValueError, match=match):
    ts2vec.hierarchical_contrastive_loss(z1, z2, **kwargs)
