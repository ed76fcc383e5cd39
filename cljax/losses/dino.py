"""DINO's self-distillation loss, its teacher centering and teacher-temperature warm-up."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cljax.losses._common import _mean_over_batch

# The teacher sees the two global crops only.
_NUM_GLOBAL_CROPS = 2


def _check_positive(name: str, value: jax.Array | float) -> None:
  if not isinstance(value, jax.Array) and not value > 0:
    raise ValueError(f"{name} must be > 0, got {value!r}.")


def _check_teacher(teacher_logits: jax.Array) -> None:
  if teacher_logits.ndim != 3 or teacher_logits.shape[0] != _NUM_GLOBAL_CROPS:
    raise ValueError(
      "teacher_logits must have shape (2, n, K): the teacher's outputs for the 2 global "
      f"crops only, got shape {teacher_logits.shape}."
    )


def _check_student(student_logits: jax.Array, teacher: jax.Array, teacher_name: str) -> None:
  """Raises unless the student is (V, n, K), V >= 2 global crops first, with the teacher's n, K."""
  if student_logits.ndim != 3 or student_logits.shape[0] < _NUM_GLOBAL_CROPS:
    raise ValueError(
      "student_logits must have shape (V, n, K) with V >= 2 views, the 2 global crops "
      f"first, got shape {student_logits.shape}."
    )
  if student_logits.shape[1:] != teacher.shape[1:]:
    raise ValueError(
      f"student_logits (V, n, K) and {teacher_name} (2, n, K) must share n and K, got "
      f"{student_logits.shape} and {teacher.shape}."
    )


def cross_crop_entropy(
  teacher_probs: jax.Array, student_log_probs: jax.Array, axis_name: str | None
) -> jax.Array:
  """The mean over the global batch and the 2 (V - 1) pairs of different crops of
  ``-sum_k P_t log P_s``: teacher (2, n, K) probabilities of the global crops against the
  student's (V, n, K) log-probabilities (DINO's and DINOv2's image-level loss)."""
  num_views = student_log_probs.shape[0]
  # (2, n, K) x (V, n, K) -> (2, V, n): cross-entropy of every teacher/student pair.
  cross_entropy = -jnp.einsum(
    "ank,vnk->avn", teacher_probs, student_log_probs, precision=jax.lax.Precision.HIGHEST
  )
  same_view = jnp.arange(_NUM_GLOBAL_CROPS)[:, None] == jnp.arange(num_views)[None, :]
  per_image = jnp.sum(jnp.where(same_view[:, :, None], 0.0, cross_entropy), axis=(0, 1))
  return _mean_over_batch(per_image / (_NUM_GLOBAL_CROPS * (num_views - 1)), axis_name)


def dino_loss(
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  center: jax.Array,
  *,
  student_temperature: jax.Array | float = 0.1,
  teacher_temperature: jax.Array | float = 0.04,
  axis_name: str | None = None,
  return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
  r"""DINO's cross-entropy between the centred, sharpened teacher and the student.

  For image i, teacher view :math:`a \in \{0, 1\}` (the global crops) and
  student view :math:`v \in \{0, \dots, V-1\}`:

  .. math::
     P_t^{a} = \mathrm{softmax}\big((g_t^{a} - c) / \tau_t\big)
       \ (\text{stop-gradient}), \qquad
     \log P_s^{v} = \mathrm{log\_softmax}(g_s^{v} / \tau_s),

  .. math::
     L = \frac{1}{2(V - 1)} \sum_{a=0}^{1} \sum_{v \ne a}
       \frac{1}{N} \sum_{i=1}^{N} -\sum_{k=1}^{K} P_t^{a}[i, k] \log P_s^{v}[i, k],

  averaged over the N images of the global batch: every pair of a global
  teacher view and a different student view (the 2 global and V - 2 local
  crops), as in Algorithm 1 and the official ``DINOLoss``.

  Args:
    student_logits: (V, n, K) student head outputs for V >= 2 crops of each
      of the n local images; views 0 and 1 must be the two global crops (the
      same crops, in the same order, as the teacher's), views 2.. the local
      crops.
    teacher_logits: (2, n, K) teacher head outputs for the 2 global crops
      only; no gradient flows into them.
    center: (K,) the teacher center :math:`c` (see :func:`dino_center_update`);
      no gradient.
    student_temperature: :math:`\tau_s` > 0 (0.1 in the paper).
    teacher_temperature: :math:`\tau_t` > 0 (0.04 to 0.07; see
      :func:`teacher_temperature_schedule`); may be a traced scalar.
    axis_name: mapped mesh axis of the batch (axis 1 of the logits), or None.
    return_metrics: also return ``{"teacher_entropy", "kl",
      "student_entropy"}``: mean entropy :math:`H(P_t)` of the teacher
      distributions, mean :math:`KL(P_t^a \| P_s^v)` over the same pairs as
      the loss (equal to the loss minus the teacher entropy), and the mean
      entropy of the student distributions over all V views. DINO's paper
      (Sec. 5.3, Fig. 7) tracks the first two to tell collapse modes apart.

  Returns:
    The scalar float32 loss (global mean, identical on every device), and
    the metrics dict when ``return_metrics``.

  Raises:
    ValueError: if the teacher is not (2, n, K), the student not (V, n, K)
      with V >= 2 and the same n and K, the center not (K,), or a
      temperature <= 0.

  References:
    Caron et al., "Emerging Properties in Self-Supervised Vision
    Transformers", ICCV 2021. https://arxiv.org/abs/2104.14294
  """
  _check_teacher(teacher_logits)
  _check_student(student_logits, teacher_logits, "teacher_logits")
  num_classes = teacher_logits.shape[-1]
  if center.shape != (num_classes,):
    raise ValueError(f"center must have shape ({num_classes},), got {center.shape}.")
  _check_positive("student_temperature", student_temperature)
  _check_positive("teacher_temperature", teacher_temperature)
  teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  center = jax.lax.stop_gradient(center).astype(jnp.float32)
  teacher_log_probs = jax.nn.log_softmax((teacher - center) / teacher_temperature, axis=-1)
  teacher_probs = jnp.exp(teacher_log_probs)
  student_log_probs = jax.nn.log_softmax(
    student_logits.astype(jnp.float32) / student_temperature, axis=-1
  )
  loss = cross_crop_entropy(teacher_probs, student_log_probs, axis_name)
  if not return_metrics:
    return loss
  teacher_entropy = -jnp.sum(teacher_probs * teacher_log_probs, axis=-1)  # (2, n)
  student_log_probs = jax.lax.stop_gradient(student_log_probs)
  student_entropy = -jnp.sum(jnp.exp(student_log_probs) * student_log_probs, axis=-1)  # (V, n)
  teacher_entropy = _mean_over_batch(teacher_entropy, axis_name)
  metrics = {
    "teacher_entropy": teacher_entropy,
    # Each teacher view takes part in V - 1 pairs, so the mean teacher entropy
    # over the pairs is its plain mean.
    "kl": jax.lax.stop_gradient(loss) - teacher_entropy,
    "student_entropy": _mean_over_batch(student_entropy, axis_name),
  }
  return loss, metrics


def dino_center_update(
  center: jax.Array,
  teacher_logits: jax.Array,
  momentum: jax.Array | float = 0.9,
  *,
  axis_name: str | None = None,
) -> jax.Array:
  r"""DINO's EMA update of the teacher center (Algorithm 1, eq. 4 of the paper).

  .. math::
     c \leftarrow m \, c + (1 - m) \frac{1}{2N} \sum_{a=0}^{1} \sum_{i=1}^{N} g_t^{a}[i]

  the mean of the teacher logits over both global views and the N images of
  the global batch (a ``pmean`` over ``axis_name``), as the official
  ``DINOLoss.update_center`` does with an all-reduce.

  Args:
    center: (K,) current center.
    teacher_logits: (2, n, K) teacher outputs for the 2 global crops (local
      rows with ``axis_name``).
    momentum: :math:`m` in [0, 1] (0.9 in the paper).
    axis_name: mapped mesh axis of the batch, or None.

  Returns:
    The new (K,) float32 center, identical on every device; no gradient flows
    through it.

  Raises:
    ValueError: if the teacher is not (2, n, K), the center not (K,), or
      momentum is a Python number outside [0, 1].

  References:
    Caron et al., "Emerging Properties in Self-Supervised Vision
    Transformers", ICCV 2021. https://arxiv.org/abs/2104.14294
  """
  _check_teacher(teacher_logits)
  num_classes = teacher_logits.shape[-1]
  if center.shape != (num_classes,):
    raise ValueError(f"center must have shape ({num_classes},), got {center.shape}.")
  if not isinstance(momentum, jax.Array) and not 0.0 <= momentum <= 1.0:
    raise ValueError(f"momentum must be in [0, 1], got {momentum!r}.")
  teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  batch_center = jnp.mean(teacher, axis=(0, 1))
  if axis_name is not None:
    batch_center = jax.lax.pmean(batch_center, axis_name)
  center = jax.lax.stop_gradient(center).astype(jnp.float32)
  return momentum * center + (1.0 - momentum) * batch_center


def teacher_temperature_schedule(
  step: jax.Array | int,
  *,
  warmup_start: float = 0.04,
  final: float = 0.04,
  warmup_steps: int = 0,
) -> jax.Array:
  r"""DINO's teacher temperature: a linear warm-up, then constant.

  .. math::
     \tau_t(s) = \tau_0 + (\tau_1 - \tau_0) \min(s / S, 1)

  with :math:`\tau_0` = ``warmup_start``, :math:`\tau_1` = ``final`` and
  :math:`S` = ``warmup_steps`` (``final`` from step 0 when S = 0). The paper
  warms up from 0.04 to 0.07 over the first 30 epochs. The official
  ``np.linspace`` schedule reaches ``final`` one step earlier (at S - 1);
  here it is reached at S.

  Args:
    step: current step (or epoch), a Python int or a (traced) int array.
    warmup_start: temperature at step 0, > 0.
    final: temperature from ``warmup_steps`` on, > 0.
    warmup_steps: S >= 0.

  Returns:
    A float32 scalar (the shape of ``step``).

  Raises:
    ValueError: if a temperature <= 0 or ``warmup_steps`` < 0.

  References:
    Caron et al., "Emerging Properties in Self-Supervised Vision
    Transformers", ICCV 2021, Appendix. https://arxiv.org/abs/2104.14294
  """
  _check_positive("warmup_start", warmup_start)
  _check_positive("final", final)
  if not isinstance(warmup_steps, jax.Array) and not warmup_steps >= 0:
    raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}.")
  step = jnp.asarray(step, jnp.float32)
  if isinstance(warmup_steps, int | float) and warmup_steps == 0:
    return jnp.full_like(step, final)
  fraction = jnp.clip(step / jnp.asarray(warmup_steps, jnp.float32), 0.0, 1.0)
  return warmup_start + (final - warmup_start) * fraction
