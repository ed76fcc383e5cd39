"""cljax.losses.dino: the DINO loss, center update and teacher temperature against float64 NumPy."""

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
from loss_references import value_and_grads as _value_and_grads

from cljax import sharding
from cljax.losses import dino


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
