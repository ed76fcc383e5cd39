"""cljax.losses.moco: MoCo v2 and v3 losses against float64 NumPy, sharded, and stop-gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from loss_references import DATA, fd_grad
from loss_references import assert_close as _assert_close
from loss_references import assert_zero as _assert_zero
from loss_references import logsumexp as _logsumexp
from loss_references import normal as _normal
from loss_references import sharded_pair as _sharded_pair
from loss_references import unit as _unit
from loss_references import value_and_grads as _value_and_grads

from cljax import sharding
from cljax.losses import moco


def np_moco_v2(q, k, queue, temperature):
  """Logits [q.k, q.queue_j] / T with label 0, cross-entropy, mean (MoCo Algorithm 1)."""
  q, k, queue = _unit(q), _unit(k), _unit(queue)
  l_pos = np.sum(q * k, axis=1, keepdims=True)
  l_neg = q @ queue.T
  logits = np.concatenate([l_pos, l_neg], axis=1) / temperature
  return float(np.mean(_logsumexp(logits) - logits[:, 0])), logits


def np_moco_v3(q, k, temperature):
  """ctr(q, k) of MoCo v3's Algorithm 1: CE(q k^T / T, arange(N)) * 2T."""
  logits = _unit(q) @ _unit(k).T / temperature
  n = logits.shape[0]
  return float(np.mean(_logsumexp(logits) - logits[np.arange(n), np.arange(n)]) * 2 * temperature)


# ---------------------------------------------------------------------------
# MoCo v1/v2.


def test_moco_v2_value_gradient_and_stop_gradients_match_numpy():
  q, k, queue = _normal(0, 3, 4), _normal(1, 3, 4), _normal(2, 5, 4)
  t = 0.2
  value, (dq, dk, du) = _value_and_grads(lambda a, b, c: moco.moco_v2_loss(a, b, c, t), q, k, queue)
  _assert_close(value, np_moco_v2(q, k, queue, t)[0])
  _assert_close(dq, fd_grad(lambda x: np_moco_v2(x, k, queue, t)[0], q), rtol=1e-4)
  # The keys and the queue come from the momentum encoder: no gradient.
  _assert_zero((dk, du))


def test_moco_v2_metrics_and_bfloat16():
  q, queue = _normal(3, 8, 6), _normal(4, 10, 6)
  k = _normal(5, 8, 6)
  k[:4] = q[:4] + 0.01 * k[:4]  # Half the positives near-identical to the query.
  loss, metrics = moco.moco_v2_loss(q, k, queue, 0.1, return_metrics=True)
  _, logits = np_moco_v2(q, k, queue, 0.1)
  _assert_close(metrics["accuracy"], np.mean(np.argmax(logits, axis=1) == 0))
  assert 0.0 < float(metrics["accuracy"]) < 1.0
  _assert_close(metrics["positive_cosine"], np.mean(logits[:, 0] * 0.1))
  _assert_close(metrics["negative_cosine"], np.mean(logits[:, 1:] * 0.1))
  # bfloat16 inputs: float32 math on the rounded values.
  args16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, queue)]
  loss16 = moco.moco_v2_loss(*args16, 0.1)
  assert loss16.dtype == jnp.float32 and loss.dtype == jnp.float32
  _assert_close(loss16, np_moco_v2(*(np.asarray(x, np.float32) for x in args16), 0.1)[0])


def _sharded_moco_v2(mesh, temperature, **kwargs):
  return jax.shard_map(
    lambda q, k, u: moco.moco_v2_loss(q, k, u, temperature, axis_name=DATA, **kwargs),
    mesh=mesh,
    in_specs=(P(DATA), P(DATA), P(DATA)),
    out_specs=P(),
    check_vma=True,
  )


def _output_shapes(jaxpr, primitive):
  """Output shapes of every ``primitive`` equation, nested jaxprs included."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == primitive:
      shapes += [v.aval.shape for v in eqn.outvars]
    for param in eqn.params.values():
      sub = getattr(param, "jaxpr", param)
      if hasattr(sub, "eqns"):
        shapes += _output_shapes(sub, primitive)
  return shapes


def test_sharded_moco_v2_with_sharded_queue_equals_single_device_full_queue():
  mesh = sharding.create_mesh()
  assert mesh.devices.size == 8
  # 16 queries (2 per device); a 24-entry queue, 3 entries per device.
  q, k, queue = _normal(6, 16, 8), _normal(7, 16, 8), _normal(8, 24, 8)
  k[:8] = q[:8] + 0.05 * k[:8]
  t = 0.2
  expected = _value_and_grads(lambda a, b, c: moco.moco_v2_loss(a, b, c, t), q, k, queue)
  got = _value_and_grads(_sharded_moco_v2(mesh, t), q, k, queue)
  _assert_close(got[0], float(expected[0]))
  _assert_close(expected[0], np_moco_v2(q, k, queue, t)[0])
  chex.assert_trees_all_close(got[1], expected[1], rtol=1e-5, atol=1e-7)
  assert np.any(np.asarray(got[1][0]))
  _assert_zero(got[1][1:])

  _, metrics = moco.moco_v2_loss(q, k, queue, t, return_metrics=True)
  s_metrics = jax.jit(_sharded_moco_v2(mesh, t, return_metrics=True))(q, k, queue)[1]
  chex.assert_trees_all_close(s_metrics, metrics, rtol=1e-5, atol=1e-6)
  assert 0.0 < float(metrics["accuracy"]) < 1.0

  # Only the (16, 8) queries are gathered, never the (24, 8) queue.
  jaxpr = jax.make_jaxpr(_sharded_moco_v2(mesh, t))(q, k, queue).jaxpr
  assert _output_shapes(jaxpr, "all_gather") == [(16, 8)]

  # Teeth: a device's own queue shard alone gives a different loss.
  local_only = jax.jit(
    jax.shard_map(
      lambda a, b, c: moco.moco_v2_loss(a, b, c, t)[None],
      mesh=mesh,
      in_specs=(P(DATA), P(DATA), P(DATA)),
      out_specs=P(DATA),
    )
  )(q, k, queue)
  assert abs(float(jnp.mean(local_only)) - float(expected[0])) > 1e-3


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(queries=np.ones((4, 8)), keys=np.ones((5, 8)), queue=np.ones((6, 8))), "same shape"),
    (dict(queries=np.ones((4,)), keys=np.ones((4,)), queue=np.ones((6, 8))), "shape"),
    (dict(queries=np.ones((4, 8)), keys=np.ones((4, 8)), queue=np.ones((6, 7))), "queue"),
    (dict(queries=np.ones((4, 8)), keys=np.ones((4, 8)), queue=np.ones((0, 8))), "queue"),
    (dict(queries=np.ones((4, 8)), keys=np.ones((4, 8)), queue=np.ones(8)), "queue"),
    (
      dict(queries=np.ones((4, 8)), keys=np.ones((4, 8)), queue=np.ones((6, 8)), temperature=0),
      "temperature",
    ),
  ],
)
def test_moco_v2_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    moco.moco_v2_loss(**kwargs)


# ---------------------------------------------------------------------------
# MoCo v3.


def test_moco_v3_value_gradient_and_stop_gradient_match_numpy():
  q, k = _normal(10, 4, 3), _normal(11, 4, 3)
  t = 0.2
  value, (dq, dk) = _value_and_grads(lambda a, b: moco.moco_v3_loss(a, b, t), q, k)
  _assert_close(value, np_moco_v3(q, k, t))
  _assert_close(dq, fd_grad(lambda x: np_moco_v3(x, k, t), q), rtol=1e-4)
  _assert_zero(dk)
  _, metrics = moco.moco_v3_loss(q, q, t, return_metrics=True)
  assert float(metrics["accuracy"]) == 1.0
  _assert_close(metrics["positive_cosine"], 1.0)


@pytest.mark.parametrize("temperature,match", [(0.0, "temperature"), (-0.2, "temperature")])
def test_moco_v3_rejects_bad_arguments(temperature, match):
  with pytest.raises(ValueError, match=match):
    moco.moco_v3_loss(np.ones((4, 8)), np.ones((4, 8)), temperature)
  with pytest.raises(ValueError, match="same shape"):
    moco.moco_v3_loss(np.ones((4, 8)), np.ones((4, 6)))


def test_sharded_moco_v3_uses_the_global_batch():
  mesh = sharding.create_mesh()
  q, k = _normal(20, 16, 8), _normal(21, 16, 8)
  got = jax.jit(_sharded_pair(lambda a, b, ax: moco.moco_v3_loss(a, b, 0.2, axis_name=ax), mesh))
  _assert_close(got(q, k), np_moco_v3(q, k, 0.2))
