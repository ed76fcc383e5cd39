"""cljax.losses.dinov2: Sinkhorn-Knopp teacher, DINOv2, iBOT and KoLeo against float64 NumPy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from loss_references import DATA, fd_grad
from loss_references import assert_close as _assert_close
from loss_references import assert_zero as _assert_zero
from loss_references import data_mesh as _mesh
from loss_references import logsumexp as _logsumexp
from loss_references import normal as _normal
from loss_references import sharded as _sharded
from loss_references import value_and_grads as _value_and_grads

from cljax import losses
from cljax.losses import dino, dinov2

# The official code's references (facebookresearch/dinov2), loop by loop, in float64.


def _np_log_softmax(x):
  return x - _logsumexp(x)[..., None]


def _np_softmax(x):
  return np.exp(_np_log_softmax(np.asarray(x, np.float64)))


def np_sinkhorn_knopp(teacher, temperature, n_iterations=3, b=None):
  """``DINOLoss.sinkhorn_knopp_teacher`` (``iBOTPatchLoss``'s with ``b``) on one device."""
  q = np.exp(np.asarray(teacher, np.float64) / temperature).T  # K x B
  b = q.shape[1] if b is None else b
  k = q.shape[0]
  q /= q.sum()
  for _ in range(n_iterations):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    q /= q.sum(axis=0, keepdims=True)
    q /= b
  return (q * b).T


def np_dino_forward(student_list, teacher_list, student_temperature):
  """``DINOLoss.forward``: every student crop against every teacher crop."""
  total = 0.0
  for s in student_list:
    lsm = _np_log_softmax(np.asarray(s, np.float64) / student_temperature)
    for t in teacher_list:
      total -= np.mean(np.sum(t * lsm, axis=-1))
  return total


def np_dinov2(student, teacher_probs, student_temperature):
  """The class-token terms of ``SSLMetaArch.forward_backward``: crops collated crop-major."""
  num_views, n, k = student.shape
  num_local = num_views - 2
  num_terms = (2 - 1) * 2 + max(num_local * 2, 1)
  teacher_probs = np.asarray(teacher_probs, np.float64)
  # "chunked and cat'd in reverse so A is matched to B in the global crops dino loss".
  reversed_teacher = np.concatenate([teacher_probs[1], teacher_probs[0]])
  loss = 0.0
  if num_local > 0:
    teacher_list = list(reversed_teacher.reshape(2, n, k))
    loss += np_dino_forward(list(student[2:]), teacher_list, student_temperature) / num_terms
  global_student = np.asarray(student[:2]).reshape(2 * n, k)
  loss += np_dino_forward([global_student], [reversed_teacher], student_temperature) * 2 / num_terms
  return loss


def np_ibot_forward_masked(student, teacher, masks, student_temperature):
  """``iBOTPatchLoss.forward_masked`` on the gathered masked tokens, weights as in collate."""
  s = np.asarray(student, np.float64)[masks]
  t = np.asarray(teacher, np.float64)[masks]
  loss = np.sum(t * _np_log_softmax(s / student_temperature), axis=-1)
  weight = np.broadcast_to((1 / np.maximum(masks.sum(-1), 1.0))[:, None], masks.shape)[masks]
  return -np.sum(loss * weight) / masks.shape[0]


def np_ibot_forward(student, teacher, masks, student_temperature):
  """``iBOTPatchLoss.forward``: the dense form on (n, P, K) tokens."""
  lsm = _np_log_softmax(np.asarray(student, np.float64) / student_temperature)
  loss = np.sum(np.asarray(teacher, np.float64) * lsm, axis=-1)
  loss = np.sum(loss * masks, axis=-1) / np.maximum(masks.sum(-1), 1.0)
  return -np.mean(loss)


def np_koleo(x, eps=1e-8, include_self=False):
  """``KoLeoLoss.forward``; ``include_self`` skips the diagonal fill (the bug it prevents)."""
  x = np.asarray(x, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
  dots = x @ x.T
  if not include_self:
    np.fill_diagonal(dots, -1)
  nearest = np.argmax(dots, axis=1)
  distances = np.linalg.norm(x - x[nearest] + eps, axis=-1)  # torch's PairwiseDistance
  return -np.mean(np.log(distances + eps))


def _probs(seed, *shape):
  return _np_softmax(2 * _normal(seed, *shape)).astype(np.float32)


def _patch_masks():
  # Image 2 has no masked patch: it adds 0 but still counts in the mean.
  return np.array([[1, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]], bool)


def test_losses_package_exports_dinov2():
  for name in ("sinkhorn_knopp_teacher", "dinov2_loss", "ibot_patch_loss", "koleo_loss"):
    assert getattr(losses, name) is getattr(dinov2, name) and name in losses.__all__


def test_sinkhorn_knopp_teacher_matches_official_and_normalises_samples():
  logits = _normal(0, 2, 6, 5)  # both global crops together, as DINOv2 calls it
  f = jax.jit(dinov2.sinkhorn_knopp_teacher, static_argnums=2)
  got = np.asarray(f(logits, 0.1, 3))
  expected = np_sinkhorn_knopp(logits.reshape(12, 5), 0.1).reshape(2, 6, 5)
  assert got.shape == (2, 6, 5) and got.dtype == np.float32
  _assert_close(got, expected, rtol=1e-4, atol=1e-6)
  # After the last (column) step every sample's targets sum to 1; the prototypes' totals
  # are those of the official code, and reach B / K only as the iterations grow.
  _assert_close(got.sum(-1), np.ones((2, 6)), rtol=1e-5)
  _assert_close(got.reshape(12, 5).sum(0), expected.reshape(12, 5).sum(0), rtol=1e-4)
  assert np.abs(expected.reshape(12, 5).sum(0) - 12 / 5).max() > 1e-2
  many = np.asarray(f(logits, 0.5, 200)).reshape(12, 5)
  _assert_close(many.sum(0), np.full(5, 12 / 5), rtol=1e-3)
  _assert_close(many, np_sinkhorn_knopp(logits.reshape(12, 5), 0.5, 200), rtol=1e-3, atol=1e-6)


def test_sinkhorn_knopp_teacher_gets_no_gradient_and_takes_a_traced_temperature():
  logits, w = _normal(1, 8, 5), _normal(2, 8, 5)
  grad = jax.grad(lambda t: jnp.sum(w * dinov2.sinkhorn_knopp_teacher(t, 0.1)))(logits)
  _assert_zero(grad)
  f = jax.jit(lambda t, temp: dinov2.sinkhorn_knopp_teacher(t, temp))
  _assert_close(f(logits, jnp.float32(0.07)), np_sinkhorn_knopp(logits, 0.07), rtol=1e-4)


def test_masked_sinkhorn_equals_official_ibot_on_the_masked_tokens():
  masks = _patch_masks()
  logits = _normal(3, 3, 4, 5)
  # Unmasked tokens take no part: values that would dominate (or overflow) the sums.
  logits = np.where(masks[..., None], logits, 1e4).astype(np.float32)
  count = int(masks.sum())
  got = np.asarray(dinov2.sinkhorn_knopp_teacher(logits, 0.1, mask=masks))
  expected = np_sinkhorn_knopp(logits[masks], 0.1, b=count)
  _assert_close(got[masks], expected, rtol=1e-4, atol=1e-6)
  _assert_zero(got[~masks])
  # B cancels out: an explicit count, right or doubled, gives the same targets.
  for num_samples in (count, 2 * count):
    other = dinov2.sinkhorn_knopp_teacher(
      logits, 0.1, mask=masks, num_samples=jnp.float32(num_samples)
    )
    _assert_close(other, got, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("num_views", [3, 4])
def test_dinov2_loss_matches_official_and_teacher_gets_no_gradient(num_views):
  student = 3 * _normal(10, num_views, 4, 6)
  teacher = _probs(11, 2, 4, 6)
  value, (ds, dt) = _value_and_grads(
    lambda s, t: dinov2.dinov2_loss(s, t, student_temperature=0.1), student, teacher
  )
  _assert_close(value, np_dinov2(student, teacher, 0.1), rtol=1e-5, atol=1e-5)
  expected_ds = fd_grad(lambda s: np_dinov2(s, teacher, 0.1), student, eps=1e-5)
  _assert_close(ds, expected_ds, rtol=1e-4, atol=1e-4)
  _assert_zero(dt)  # the function applies stop_gradient itself


def test_dinov2_loss_equals_dino_loss_on_centred_softmax_and_differs_without_local_crops():
  student, logits, center = 3 * _normal(20, 4, 5, 6), 3 * _normal(21, 2, 5, 6), _normal(22, 6)
  probs = jax.nn.softmax((logits - center) / 0.04, axis=-1)
  _assert_close(
    dinov2.dinov2_loss(student, probs, 0.1), dino.dino_loss(student, logits, center), rtol=1e-5
  )
  # With no local crops the official divides by 2 + max(0, 1) = 3 pairs, not 2.
  two = student[:2]
  _assert_close(dinov2.dinov2_loss(two, probs, 0.1), np_dinov2(two, probs, 0.1) * 3 / 2, rtol=1e-5)


def test_dinov2_pipeline_gives_no_gradient_to_the_teacher():
  student, teacher_logits = 3 * _normal(30, 3, 4, 6), _normal(31, 2, 4, 6)

  def loss(s, t):
    return dinov2.dinov2_loss(s, dinov2.sinkhorn_knopp_teacher(t, 0.07), 0.1)

  _, (ds, dt) = _value_and_grads(loss, student, teacher_logits)
  _assert_zero(dt)
  assert np.abs(np.asarray(ds)).max() > 1e-3


def test_ibot_patch_loss_matches_official_with_per_image_weights():
  masks = _patch_masks()
  student, teacher = 3 * _normal(40, 3, 4, 6), _probs(41, 3, 4, 6)
  value, (ds, dt) = _value_and_grads(
    lambda s, t: dinov2.ibot_patch_loss(s, t, masks, 0.1), student, teacher
  )
  expected = np_ibot_forward_masked(student, teacher, masks, 0.1)
  _assert_close(expected, np_ibot_forward(student, teacher, masks, 0.1), rtol=1e-12)
  _assert_close(value, expected, rtol=1e-5, atol=1e-6)
  expected_ds = fd_grad(lambda s: np_ibot_forward_masked(s, teacher, masks, 0.1), student, 1e-5)
  _assert_close(ds, expected_ds, rtol=1e-4, atol=1e-5)
  _assert_zero(np.asarray(ds)[~masks])
  _assert_zero(dt)
  # The image without a masked patch adds 0 but counts: 3 * L(3 images) = 2 * L(first 2).
  first_two = dinov2.ibot_patch_loss(student[:2], teacher[:2], masks[:2], 0.1)
  _assert_close(3 * value, 2 * float(first_two), rtol=1e-5)


def test_ibot_patch_loss_ignores_unmasked_tokens():
  masks = _patch_masks()
  student, teacher = 3 * _normal(50, 3, 4, 6), _probs(51, 3, 4, 6)
  other_student = np.where(masks[..., None], student, 10 * _normal(52, 3, 4, 6))
  nan_teacher = np.where(masks[..., None], teacher, np.nan).astype(np.float32)
  loss = lambda s, t: dinov2.ibot_patch_loss(s, t, masks, 0.1)
  value = _value_and_grads(loss, student, teacher)
  other = _value_and_grads(loss, other_student, nan_teacher)
  _assert_close(other[0], float(value[0]), rtol=1e-6)
  chex.assert_trees_all_close(other[1][0], value[1][0], rtol=1e-6, atol=1e-7)
  assert np.all(np.isfinite(np.asarray(other[1][1])))


def test_koleo_loss_matches_official_and_excludes_the_sample_itself():
  x = _normal(60, 6, 4)
  value, grad = jax.jit(jax.value_and_grad(dinov2.koleo_loss))(x)
  _assert_close(value, np_koleo(x), rtol=1e-5, atol=1e-6)
  _assert_close(grad, fd_grad(np_koleo, x, eps=1e-6), rtol=1e-4, atol=1e-5)
  # Its own nearest neighbour, every sample would be at distance ~eps: -log(eps) ~ 18.
  assert np_koleo(x, include_self=True) > 17 and float(value) < 2
  _assert_close(dinov2.koleo_loss(5 * x), float(value), rtol=1e-5)  # rows are normalised
  # An antipodal pair ties with the official -1 diagonal; here the other row always wins.
  _assert_close(dinov2.koleo_loss(np.array([[1.0, 0.0], [-1.0, 0.0]])), -np.log(2), rtol=1e-6)
  # Duplicate rows: a large but finite loss and gradient (eps inside the distance).
  dup = np.concatenate([x[:1], x[:1], x[1:3]])
  dup_value, dup_grad = jax.value_and_grad(dinov2.koleo_loss)(dup)
  assert float(dup_value) > 8 and np.all(np.isfinite(np.asarray(dup_grad)))


def test_sharded_sinkhorn_dinov2_and_ibot_equal_single_device():
  mesh = _mesh()
  # Sinkhorn on both global crops, (2, n, K) split over n, then the loss: the whole pipeline.
  student, teacher_logits = 3 * _normal(70, 3, 16, 6), _normal(71, 2, 16, 6)

  def pipeline(s, t, axis_name=None):
    probs = dinov2.sinkhorn_knopp_teacher(t, 0.07, axis_name=axis_name)
    return dinov2.dinov2_loss(s, probs, 0.1, axis_name=axis_name), probs

  spec = P(None, DATA)
  sharded_pipeline = _sharded(
    lambda s, t: pipeline(s, t, DATA), mesh, (spec, spec), out_specs=(P(), spec)
  )
  expected = jax.jit(jax.value_and_grad(pipeline, argnums=0, has_aux=True))(student, teacher_logits)
  got = jax.jit(jax.value_and_grad(sharded_pipeline, argnums=0, has_aux=True))(
    student, teacher_logits
  )
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-7)
  _assert_close(
    expected[0][1],
    np_sinkhorn_knopp(teacher_logits.reshape(32, 6), 0.07).reshape(2, 16, 6),
    rtol=1e-4,
    atol=1e-6,
  )

  # iBOT: masked Sinkhorn and the patch loss, images split over devices.
  masks = np.random.default_rng(72).random((16, 3)) < 0.4
  masks[:3] = False  # some images, a whole device's, without a masked patch
  patch_student, patch_logits = 3 * _normal(73, 16, 3, 6), _normal(74, 16, 3, 6)

  def ibot(s, t, m, axis_name=None):
    probs = dinov2.sinkhorn_knopp_teacher(t, 0.07, mask=m, axis_name=axis_name)
    return dinov2.ibot_patch_loss(s, probs, m, 0.1, axis_name=axis_name), probs

  sharded_ibot = _sharded(
    lambda s, t, m: ibot(s, t, m, DATA), mesh, (P(DATA),) * 3, out_specs=(P(), P(DATA))
  )
  grad_fn = lambda f: jax.jit(jax.value_and_grad(f, argnums=0, has_aux=True))
  expected = grad_fn(ibot)(patch_student, patch_logits, masks)
  got = grad_fn(sharded_ibot)(patch_student, patch_logits, masks)
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-7)
  probs = np.asarray(expected[0][1])
  _assert_close(probs[masks], np_sinkhorn_knopp(patch_logits[masks], 0.07), rtol=1e-4, atol=1e-6)
  _assert_close(expected[0][0], np_ibot_forward_masked(patch_student, probs, masks, 0.1), rtol=1e-5)


def test_sharded_koleo_searches_neighbours_within_each_device():
  x = _normal(80, 32, 4)
  sharded = jax.jit(_sharded(lambda v: dinov2.koleo_loss(v, axis_name=DATA), _mesh(), P(DATA)))
  per_device = np.mean([np_koleo(chunk) for chunk in np.split(x, 8)])
  _assert_close(sharded(x), per_device, rtol=1e-5, atol=1e-6)
  # Not the loss of one device holding the global batch (its neighbours are nearer).
  assert float(sharded(x)) < np_koleo(x) - 0.1


def test_dinov2_losses_compute_in_float32_for_bfloat16_inputs():
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  masks = _patch_masks()
  got = [
    dinov2.sinkhorn_knopp_teacher(bf(_normal(90, 4, 5)), 0.1),
    dinov2.dinov2_loss(bf(_normal(91, 3, 4, 5)), bf(_probs(92, 2, 4, 5))),
    dinov2.ibot_patch_loss(bf(_normal(93, 3, 4, 5)), bf(_probs(94, 3, 4, 5)), masks),
    dinov2.koleo_loss(bf(_normal(95, 4, 5))),
  ]
  assert all(x.dtype == jnp.float32 for x in got)


_S, _T = np.zeros((3, 4, 5), np.float32), np.zeros((2, 4, 5), np.float32)
_M = np.zeros((3, 4), bool)


@pytest.mark.parametrize(
  "call,match",
  [
    (lambda: dinov2.sinkhorn_knopp_teacher(np.zeros(5), 0.1), "teacher_logits"),
    (lambda: dinov2.sinkhorn_knopp_teacher(_S, 0.0), "teacher_temperature"),
    (lambda: dinov2.sinkhorn_knopp_teacher(_S, 0.1, 0), "num_iterations"),
    (lambda: dinov2.sinkhorn_knopp_teacher(_S, 0.1, mask=_M[:2]), "mask must be"),
    (lambda: dinov2.sinkhorn_knopp_teacher(_S, 0.1, mask=_M.astype(int)), "bool"),
    (lambda: dinov2.sinkhorn_knopp_teacher(_S, 0.1, num_samples=np.ones(2)), "num_samples"),
    (lambda: dinov2.dinov2_loss(_S, _S), "teacher_probs must have shape \\(2, n, K\\)"),
    (lambda: dinov2.dinov2_loss(_S[:1], _T), "V >= 2"),
    (lambda: dinov2.dinov2_loss(_S[:, :3], _T), "share n and K"),
    (lambda: dinov2.dinov2_loss(_S, _T, 0.0), "student_temperature"),
    (lambda: dinov2.ibot_patch_loss(_S[0], _S[0], _M), "student_patch_logits"),
    (lambda: dinov2.ibot_patch_loss(_S, _S[:2], _M), "teacher_patch_probs"),
    (lambda: dinov2.ibot_patch_loss(_S, _S, _M[:, :3]), "masks"),
    (lambda: dinov2.ibot_patch_loss(_S, _S, _M.astype(np.float32)), "bool"),
    (lambda: dinov2.ibot_patch_loss(_S, _S, _M, -1.0), "student_temperature"),
    (lambda: dinov2.koleo_loss(np.ones(4)), "x must have shape"),
    (lambda: dinov2.koleo_loss(np.ones((1, 4))), "at least 2 rows"),
    (lambda: dinov2.koleo_loss(np.ones((3, 4)), eps=0.0), "eps"),
  ],
)
def test_dinov2_losses_reject_bad_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call()
