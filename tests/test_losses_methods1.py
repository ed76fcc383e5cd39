"""MoCo v2/v3, BYOL, SimSiam, DINO losses and their schedules against float64 NumPy.

Each loss is checked three ways: value and gradient against an independent
float64 NumPy implementation of the paper's formula (gradients by central
finite differences), sharded over the 8 fake CPU devices against the
single-device call, and the stop-gradients (keys, queue, targets, teacher).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cljax import sharding
from cljax.losses import dino, moco, regression, schedules

DATA = sharding.DATA_AXIS


# ---------------------------------------------------------------------------
# Float64 NumPy references, written from the papers' formulas.


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _logsumexp(x, axis=-1):
  m = np.max(x, axis=axis, keepdims=True)
  return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


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


def np_byol(p, z):
  return float(np.mean(np.sum((_unit(p) - _unit(z)) ** 2, axis=1)))


def np_simsiam(p, z):
  return float(np.mean(-np.sum(_unit(p) * _unit(z), axis=1)))


def _np_softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def np_dino(student, teacher, center, student_temperature, teacher_temperature):
  """The official DINOLoss.forward, loop by loop, in float64."""
  student = np.asarray(student, np.float64) / student_temperature
  teacher = _np_softmax((np.asarray(teacher, np.float64) - center) / teacher_temperature)
  total, terms = 0.0, 0
  for iq in range(teacher.shape[0]):
    for v in range(student.shape[0]):
      if v == iq:
        continue
      log_s = student[v] - _logsumexp(student[v])[:, None]
      total += np.mean(np.sum(-teacher[iq] * log_s, axis=-1))
      terms += 1
  return total / terms


def np_center(center, teacher, momentum):
  t = np.asarray(teacher, np.float64)
  batch_center = t.reshape(-1, t.shape[-1]).sum(axis=0) / (t.shape[0] * t.shape[1])
  return momentum * center + (1 - momentum) * batch_center


def fd_grad(f, x, eps=1e-6):
  """Central finite-difference gradient of the float64 scalar f at x."""
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    hi, lo = x.copy(), x.copy()
    hi[idx] += eps
    lo[idx] -= eps
    grad[idx] = (f(hi) - f(lo)) / (2 * eps)
  return grad


def _normal(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _assert_close(got, expected, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=rtol, atol=atol)


def _assert_zero(tree):
  for leaf in jax.tree.leaves(tree):
    assert not np.any(np.asarray(leaf)), leaf


def _value_and_grads(fn, *args):
  return jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args)


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
  local_only = jax.shard_map(
    lambda a, b, c: moco.moco_v2_loss(a, b, c, t)[None],
    mesh=mesh,
    in_specs=(P(DATA), P(DATA), P(DATA)),
    out_specs=P(DATA),
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


# ---------------------------------------------------------------------------
# BYOL and SimSiam.


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


def _sharded_pair(loss_fn, mesh):
  return jax.shard_map(
    lambda a, b: loss_fn(a, b, DATA),
    mesh=mesh,
    in_specs=(P(DATA), P(DATA)),
    out_specs=P(),
    check_vma=True,
  )


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


def test_sharded_moco_v3_uses_the_global_batch():
  mesh = sharding.create_mesh()
  q, k = _normal(20, 16, 8), _normal(21, 16, 8)
  got = jax.jit(_sharded_pair(lambda a, b, ax: moco.moco_v3_loss(a, b, 0.2, axis_name=ax), mesh))
  _assert_close(got(q, k), np_moco_v3(q, k, 0.2))


# ---------------------------------------------------------------------------
# DINO.


def _dino_inputs(num_views, n, num_classes, seed):
  student = 3 * _normal(seed, num_views, n, num_classes)
  teacher = 3 * _normal(seed + 1, 2, n, num_classes)
  center = _normal(seed + 2, num_classes)
  return student, teacher, center


@pytest.mark.parametrize("num_views", [2, 4])
def test_dino_value_gradient_and_stop_gradients_match_numpy(num_views):
  student, teacher, center = _dino_inputs(num_views, 2, 5, seed=30)
  ts, tt = 0.1, 0.04

  def loss(s, t, c):
    return dino.dino_loss(s, t, c, student_temperature=ts, teacher_temperature=tt)

  value, (ds, dt, dc) = _value_and_grads(loss, student, teacher, center)
  _assert_close(value, np_dino(student, teacher, center, ts, tt), rtol=1e-5, atol=1e-5)
  expected_ds = fd_grad(lambda x: np_dino(x, teacher, center, ts, tt), student, eps=1e-5)
  _assert_close(ds, expected_ds, rtol=1e-4, atol=1e-4)
  # The teacher and the center receive no gradient.
  _assert_zero((dt, dc))


def test_dino_metrics_and_bfloat16():
  student, teacher, center = _dino_inputs(4, 6, 7, seed=40)
  loss, metrics = dino.dino_loss(
    student, teacher, center, teacher_temperature=0.07, return_metrics=True
  )
  p_t = _np_softmax((teacher.astype(np.float64) - center) / 0.07)
  log_s = student / 0.1 - _logsumexp(student.astype(np.float64) / 0.1)[..., None]
  h_t = np.mean(-np.sum(p_t * np.log(p_t), axis=-1))
  _assert_close(metrics["teacher_entropy"], h_t, rtol=1e-4, atol=1e-5)
  kl = np.mean(
    [
      np.mean(np.sum(p_t[a] * (np.log(p_t[a]) - log_s[v]), axis=-1))
      for a in range(2)
      for v in range(4)
      if v != a
    ]
  )
  _assert_close(metrics["kl"], kl, rtol=1e-4, atol=1e-4)
  _assert_close(
    metrics["student_entropy"], np.mean(-np.sum(np.exp(log_s) * log_s, -1)), rtol=1e-4, atol=1e-5
  )
  args16 = [jnp.asarray(x, jnp.bfloat16) for x in (student, teacher, center)]
  loss16 = dino.dino_loss(*args16)
  assert loss16.dtype == jnp.float32 and loss.dtype == jnp.float32
  _assert_close(
    loss16, np_dino(*(np.asarray(x, np.float32) for x in args16), 0.1, 0.04), rtol=1e-5, atol=1e-5
  )


def test_dino_teacher_temperature_may_be_traced():
  student, teacher, center = _dino_inputs(3, 4, 5, seed=45)
  f = jax.jit(
    lambda s, t, c, step: dino.dino_loss(
      s,
      t,
      c,
      teacher_temperature=dino.teacher_temperature_schedule(
        step, warmup_start=0.04, final=0.07, warmup_steps=10
      ),
    )
  )
  _assert_close(
    f(student, teacher, center, 5),
    np_dino(student, teacher, center, 0.1, 0.055),
    rtol=1e-5,
    atol=1e-5,
  )


def test_sharded_dino_loss_and_center_equal_single_device():
  mesh = sharding.create_mesh()
  student, teacher, center = _dino_inputs(4, 16, 6, seed=50)
  expected = _value_and_grads(dino.dino_loss, student, teacher, center)
  loss_fn = jax.shard_map(
    lambda s, t, c: dino.dino_loss(s, t, c, axis_name=DATA),
    mesh=mesh,
    in_specs=(P(None, DATA), P(None, DATA), P()),
    out_specs=P(),
    check_vma=True,
  )
  got = _value_and_grads(loss_fn, student, teacher, center)
  _assert_close(got[0], float(expected[0]))
  _assert_close(expected[0], np_dino(student, teacher, center, 0.1, 0.04), atol=1e-5)
  chex.assert_trees_all_close(got[1], expected[1], rtol=1e-5, atol=1e-7)
  _assert_zero(got[1][1:])

  center_fn = jax.jit(
    jax.shard_map(
      lambda c, t: dino.dino_center_update(c, t, 0.9, axis_name=DATA),
      mesh=mesh,
      in_specs=(P(), P(None, DATA)),
      out_specs=P(),
      check_vma=True,
    )
  )
  new_center = center_fn(center, teacher)
  _assert_close(new_center, np_center(center, teacher, 0.9))
  chex.assert_trees_all_close(
    new_center, dino.dino_center_update(center, teacher, 0.9), rtol=1e-6, atol=1e-6
  )


def test_dino_center_update_matches_numpy_and_has_no_gradient():
  _, teacher, center = _dino_inputs(2, 3, 4, seed=60)
  new = dino.dino_center_update(center, teacher, momentum=0.7)
  assert new.shape == (4,) and new.dtype == jnp.float32
  _assert_close(new, np_center(center, teacher, 0.7))
  grads = jax.grad(lambda c, t: jnp.sum(dino.dino_center_update(c, t) ** 2), argnums=(0, 1))(
    center, teacher
  )
  _assert_zero(grads)


@pytest.mark.parametrize(
  "shapes,kwargs,match",
  [
    (((4, 3, 5), (3, 3, 5), (5,)), {}, "teacher_logits must have shape \\(2, n, K\\)"),
    (((4, 3, 5), (3, 5), (5,)), {}, "teacher_logits"),
    (((1, 3, 5), (2, 3, 5), (5,)), {}, "V >= 2"),
    (((3, 5), (2, 3, 5), (5,)), {}, "student_logits"),
    (((4, 2, 5), (2, 3, 5), (5,)), {}, "share n and K"),
    (((4, 3, 6), (2, 3, 5), (5,)), {}, "share n and K"),
    (((4, 3, 5), (2, 3, 5), (1, 5)), {}, "center"),
    (((4, 3, 5), (2, 3, 5), (5,)), dict(student_temperature=0.0), "student_temperature"),
    (((4, 3, 5), (2, 3, 5), (5,)), dict(teacher_temperature=-1.0), "teacher_temperature"),
  ],
)
def test_dino_loss_rejects_bad_arguments(shapes, kwargs, match):
  student, teacher, center = (np.zeros(s, np.float32) for s in shapes)
  with pytest.raises(ValueError, match=match):
    dino.dino_loss(student, teacher, center, **kwargs)


def test_dino_center_update_and_schedule_reject_bad_arguments():
  with pytest.raises(ValueError, match="teacher_logits"):
    dino.dino_center_update(np.zeros(5), np.zeros((4, 3, 5)))
  with pytest.raises(ValueError, match="center"):
    dino.dino_center_update(np.zeros(4), np.zeros((2, 3, 5)))
  with pytest.raises(ValueError, match="momentum"):
    dino.dino_center_update(np.zeros(5), np.zeros((2, 3, 5)), 1.5)
  with pytest.raises(ValueError, match="warmup_steps"):
    dino.teacher_temperature_schedule(0, warmup_steps=-1)
  with pytest.raises(ValueError, match="warmup_start"):
    dino.teacher_temperature_schedule(0, warmup_start=0.0)
  with pytest.raises(ValueError, match="final"):
    dino.teacher_temperature_schedule(0, final=-0.1)


def test_teacher_temperature_schedule_warms_up_linearly_then_stays_constant():
  kw = dict(warmup_start=0.04, final=0.07, warmup_steps=30)
  f = jax.jit(lambda s: dino.teacher_temperature_schedule(s, **kw))
  for step, expected in [(0, 0.04), (15, 0.055), (30, 0.07), (100, 0.07)]:
    _assert_close(f(jnp.int32(step)), expected, rtol=1e-6)
    _assert_close(dino.teacher_temperature_schedule(step, **kw), expected, rtol=1e-6)
  # No warm-up: the final temperature from step 0.
  _assert_close(dino.teacher_temperature_schedule(0, final=0.07), 0.07, rtol=1e-6)
  assert dino.teacher_temperature_schedule(jnp.arange(3)).shape == (3,)


# ---------------------------------------------------------------------------
# Schedules.


def test_cosine_ramp_values_at_start_middle_end_and_clamped():
  f = jax.jit(lambda s: schedules.cosine_ramp(s, 100, 0.996, 1.0))
  for step, expected in [(0, 0.996), (50, 0.998), (100, 1.0), (250, 1.0)]:
    _assert_close(f(jnp.int32(step)), expected, rtol=1e-7)
    _assert_close(schedules.cosine_ramp(step, 100, 0.996), expected, rtol=1e-7)
  # BYOL's formula at a quarter: 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2.
  _assert_close(schedules.cosine_ramp(25, 100, 0.99), 1 - 0.01 * (np.cos(np.pi / 4) + 1) / 2)
  _assert_close(schedules.cosine_ramp(50, 100, 2.0, end=0.0), 1.0)
  with pytest.raises(ValueError, match="total_steps"):
    schedules.cosine_ramp(0, 0, 0.99)


def test_ema_update_over_pytrees():
  target = {"w": np.ones((2, 3), np.float32), "b": [np.zeros(3, np.float32)]}
  online = {"w": np.full((2, 3), 3.0, np.float32), "b": [np.ones(3, np.float32)]}
  new = jax.jit(schedules.ema_update)(target, online, 0.75)
  chex.assert_trees_all_close(new, {"w": np.full((2, 3), 1.5), "b": [np.full(3, 0.25)]})
  chex.assert_trees_all_equal(schedules.ema_update(target, online, 1.0), target)
  chex.assert_trees_all_equal(schedules.ema_update(target, online, 0.0), online)
  # The online parameters receive no gradient through the update.
  grads = jax.grad(
    lambda o: sum(jnp.sum(x) for x in jax.tree.leaves(schedules.ema_update(target, o, 0.5)))
  )(online)
  _assert_zero(grads)
  bf16 = schedules.ema_update(jnp.ones(3, jnp.bfloat16), jnp.zeros(3, jnp.float32), 0.5)
  assert bf16.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="decay"):
    schedules.ema_update(target, online, 1.5)
  with pytest.raises(ValueError, match="shape"):
    schedules.ema_update({"w": np.ones(3)}, {"w": np.ones(4)}, 0.5)
  with pytest.raises(ValueError):
    schedules.ema_update(target, {"w": online["w"]}, 0.5)
