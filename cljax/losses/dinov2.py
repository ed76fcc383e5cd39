"""DINOv2's losses: Sinkhorn-Knopp teacher, image-level DINO, masked-patch iBOT and KoLeo."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cljax.losses import dino
from cljax.losses._common import _check_2d, _mean_over_batch
from cljax.losses.swav import _check_iters, _check_positive

# The teacher sees the two global crops only.
_NUM_GLOBAL_CROPS = 2


def _safe(denominator: jax.Array) -> jax.Array:
  # A sum with nothing in it (no row counts, or a prototype whose weight
  # underflowed) divides to 0 instead of NaN.
  return jnp.where(denominator > 0, denominator, 1.0)


def sinkhorn_knopp_teacher(
  teacher_logits: jax.Array,
  teacher_temperature: jax.Array | float,
  num_iterations: int = 3,
  axis_name: str | None = None,
  *,
  mask: jax.Array | None = None,
  num_samples: jax.Array | None = None,
) -> jax.Array:
  r"""DINOv2's Sinkhorn-Knopp centring of the teacher: equipartitioned targets.

  With B the number of rows that count in the global batch and K prototypes,
  starting from :math:`Q = \exp(g_t / \tau_t)^\top \in \mathbb{R}^{K \times B}`
  divided by its total, each of ``num_iterations`` iterations makes every
  prototype (row of Q) sum to :math:`1/K` over the global batch and then every
  sample (column) sum to :math:`1/B`; the result is :math:`B Q^\top`:

  .. math::
     Q \leftarrow \frac{Q}{K\, Q 1_B 1_B^\top}, \qquad
     Q \leftarrow \frac{Q}{B\, 1_K 1_K^\top Q}, \qquad
     P_t = B\, Q^\top.

  Every sample's targets sum to 1; the prototypes' totals approach B/K as the
  iterations grow (DINOv2 uses 3). This is SwAV's algorithm applied to the
  teacher's head outputs, as the official ``DINOLoss.sinkhorn_knopp_teacher``
  (class tokens) and ``iBOTPatchLoss.sinkhorn_knopp_teacher`` (masked patch
  tokens) do. DINOv2 runs it once on the class tokens of both global crops
  together (pass ``(2, n, K)``: all leading axes are rows) and once on the
  masked patch tokens (pass ``(n, P, K)`` with ``mask``).

  Rows where ``mask`` is False (padding: unmasked patches) take no part: they
  add nothing to the prototype sums and get all-zero targets, so the result on
  the other rows equals the official one on the gathered masked tokens.

  Differences from the official code, none of which changes the result in
  exact arithmetic: the global maximum of ``g_t / tau_t`` over the rows that
  count is subtracted before ``exp`` (a constant factor that the first
  normalisation removes; it keeps ``exp`` from overflowing in float32), and an
  empty sum divides to 0 rather than NaN.

  Args:
    teacher_logits: (..., K) teacher head outputs; every leading position is
      one sample (local rows with ``axis_name``). No gradient flows into them.
    teacher_temperature: :math:`\tau_t` > 0; may be a traced scalar.
    num_iterations: Sinkhorn iterations, an int >= 1.
    axis_name: mapped mesh axis over which the batch is split, or None.
    mask: optional bool array of the leading shape of ``teacher_logits``: the
      samples that count (iBOT's masked patches). All count when None.
    num_samples: optional scalar B, the number of samples that count in the
      global batch (the official all-reduced ``n_masked_patches_tensor``).
      Defaults to the global count of True entries of ``mask`` (of all rows
      without it). B only scales the columns between steps and is multiplied
      back at the end, so it cancels out up to rounding; it is accepted for
      parity with the official signature.

  Returns:
    (..., K) float32 targets, the shape of ``teacher_logits``: each sample's
    targets sum to 1 (0 for rows outside ``mask``); no gradient.

  Raises:
    ValueError: if ``teacher_logits`` has fewer than 2 dimensions, ``mask``
      does not have its leading shape or is not boolean, ``num_samples`` is
      not a scalar, ``num_iterations`` is not an int >= 1 or the temperature
      is <= 0.

  References:
    Oquab et al., "DINOv2: Learning Robust Visual Features without
    Supervision", TMLR 2024, Sec. 4. https://arxiv.org/abs/2304.07193

    Caron et al., "Unsupervised Learning of Visual Features by Contrasting
    Cluster Assignments", NeurIPS 2020. https://arxiv.org/abs/2006.09882
  """
  if teacher_logits.ndim < 2:
    raise ValueError(
      f"teacher_logits must have shape (..., K) with >= 2 dims, got shape {teacher_logits.shape}."
    )
  lead, k = teacher_logits.shape[:-1], teacher_logits.shape[-1]
  if mask is not None and (mask.shape != lead or mask.dtype != jnp.bool_):
    raise ValueError(
      f"mask must be a bool array of shape {lead} (teacher_logits {teacher_logits.shape} "
      f"without K), got {mask.dtype} of shape {mask.shape}."
    )
  if num_samples is not None and jnp.ndim(num_samples) != 0:
    raise ValueError(f"num_samples must be a scalar, got shape {jnp.shape(num_samples)}.")
  _check_iters("num_iterations", num_iterations)
  _check_positive("teacher_temperature", teacher_temperature)

  def global_sum(x, axis=None):
    total = jnp.sum(x, axis=axis, keepdims=axis is not None)
    return total if axis_name is None else jax.lax.psum(total, axis_name)

  logits = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32).reshape(-1, k)
  logits = logits / teacher_temperature
  counts = jnp.ones(logits.shape[:1], bool) if mask is None else mask.reshape(-1)
  if num_samples is None:
    num_samples = global_sum(counts.astype(jnp.float32))
  b = jax.lax.stop_gradient(jnp.asarray(num_samples, jnp.float32))
  shift = jnp.max(jnp.where(counts[:, None], logits, -jnp.inf))
  if axis_name is not None:
    shift = jax.lax.pmax(shift, axis_name)
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  # The paper's Q is K x B; here q = Q^T is (rows, K) with samples in rows.
  q = jnp.where(counts[:, None], jnp.exp(logits - shift), 0.0)
  q = q / _safe(global_sum(q))

  def step(_, q):
    q = q / _safe(global_sum(q, axis=0)) / k  # prototypes sum to 1/K over the global batch
    return q / _safe(jnp.sum(q, axis=1, keepdims=True)) / b  # samples sum to 1/B

  q = jax.lax.fori_loop(0, num_iterations, step, q)
  return (q * b).reshape(teacher_logits.shape)


def dinov2_loss(
  student_logits: jax.Array,
  teacher_probs: jax.Array,
  student_temperature: jax.Array | float = 0.1,
  axis_name: str | None = None,
) -> jax.Array:
  r"""DINOv2's image-level (class token) loss: cross-entropy of teacher and student crops.

  For image i, teacher global crop :math:`a \in \{0, 1\}` with targets
  :math:`P_t^a` (centred by DINO's running mean and softmax, or by
  :func:`sinkhorn_knopp_teacher`) and student crop
  :math:`v \in \{0, \dots, V-1\}`:

  .. math::
     L = \frac{1}{2(V - 1)} \sum_{a=0}^{1} \sum_{v \ne a}
       \frac{1}{N} \sum_{i=1}^{N} -\sum_{k=1}^{K} P_t^{a}[i, k]
       \log \mathrm{softmax}(g_s^{v}[i] / \tau_s)_k,

  averaged over the N images of the global batch. Each student global crop is
  compared with the teacher's output for the other global crop only (the
  official ``SSLMetaArch.forward_backward`` concatenates the teacher's class
  tokens in reverse, "so A is matched to B"), and every local crop with both;
  the official divides the sum of these 2(V - 1) pair means by
  ``n_global_crops_loss_terms + n_local_crops_loss_terms`` = 2 + 2(V - 2).
  That is the value of :func:`cljax.losses.dino_loss` on teacher probabilities
  instead of logits.

  One departure: with no local crops (V = 2) the official normaliser is
  ``2 + max(0, 1)`` = 3, not 2, so the official loss is 2/3 of this one there
  (a constant factor).

  Args:
    student_logits: (V, n, K) student head outputs for V >= 2 crops of each of
      the n local images; views 0 and 1 must be the two global crops (in the
      same order as the teacher's), views 2.. the local crops.
    teacher_probs: (2, n, K) teacher targets for the 2 global crops, each row
      summing to 1, crop a at index a (not reversed); no gradient flows into
      them.
    student_temperature: :math:`\tau_s` > 0 (0.1 in DINOv2).
    axis_name: mapped mesh axis of the batch (axis 1), or None.

  Returns:
    The scalar float32 loss, the mean over the global batch, identical on
    every device.

  Raises:
    ValueError: if the teacher is not (2, n, K), the student not (V, n, K)
      with V >= 2 and the same n and K, or the temperature is <= 0.

  References:
    Oquab et al., "DINOv2: Learning Robust Visual Features without
    Supervision", TMLR 2024, Sec. 4. https://arxiv.org/abs/2304.07193

    Caron et al., "Emerging Properties in Self-Supervised Vision
    Transformers", ICCV 2021. https://arxiv.org/abs/2104.14294
  """
  if teacher_probs.ndim != 3 or teacher_probs.shape[0] != _NUM_GLOBAL_CROPS:
    raise ValueError(
      "teacher_probs must have shape (2, n, K): the teacher's targets for the 2 global crops "
      f"only, got shape {teacher_probs.shape}."
    )
  dino._check_student(student_logits, teacher_probs, "teacher_probs")
  _check_positive("student_temperature", student_temperature)
  teacher = jax.lax.stop_gradient(teacher_probs).astype(jnp.float32)
  student_log_probs = jax.nn.log_softmax(
    student_logits.astype(jnp.float32) / student_temperature, axis=-1
  )
  return dino.cross_crop_entropy(teacher, student_log_probs, axis_name)


def ibot_patch_loss(
  student_patch_logits: jax.Array,
  teacher_patch_probs: jax.Array,
  masks: jax.Array,
  student_temperature: jax.Array | float = 0.1,
  axis_name: str | None = None,
) -> jax.Array:
  r"""DINOv2's iBOT loss: cross-entropy on the masked patch tokens, weighted per image.

  The student sees a global crop with the patches of :math:`M_i` masked (the
  teacher sees it whole); for image i with :math:`m_i = |M_i|` masked patches:

  .. math::
     L = \frac{1}{N} \sum_{i=1}^{N} \frac{1}{\max(m_i, 1)} \sum_{p \in M_i}
       -\sum_{k=1}^{K} P_t[i, p, k] \log \mathrm{softmax}(g_s[i, p] / \tau_s)_k,

  with N the number of images (crops) of the global batch, including those
  with no masked patch, which add 0. This is the official
  ``iBOTPatchLoss.forward_masked`` (token weights ``1 / clamp(m_i, 1)``, sum,
  divided by ``masks.shape[0]``), and equally its dense ``forward``; DINOv2
  passes both global crops as images (N = 2 x the batch) and its loss scales
  ``2 * 1/2`` leave the value unchanged. Unmasked tokens take no part: their
  student logits get no gradient and their teacher values are ignored.

  Args:
    student_patch_logits: (n, P, K) student head outputs for the P patch
      tokens of n images (crops).
    teacher_patch_probs: (n, P, K) teacher targets (softmax-centred, or
      :func:`sinkhorn_knopp_teacher` with ``mask=masks``); only the masked
      tokens are read; no gradient flows into them.
    masks: (n, P) bool, True where the student's patch was masked.
    student_temperature: :math:`\tau_s` > 0 (0.1 in DINOv2).
    axis_name: mapped mesh axis of the batch (axis 0), or None.

  Returns:
    The scalar float32 loss over the global batch, identical on every device.

  Raises:
    ValueError: if the logits are not (n, P, K), the teacher's shape differs,
      ``masks`` is not a bool (n, P) array or the temperature is <= 0.

  References:
    Oquab et al., "DINOv2: Learning Robust Visual Features without
    Supervision", TMLR 2024, Sec. 4. https://arxiv.org/abs/2304.07193

    Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer",
    ICLR 2022. https://arxiv.org/abs/2111.07832
  """
  if student_patch_logits.ndim != 3:
    raise ValueError(
      f"student_patch_logits must have shape (n, P, K), got shape {student_patch_logits.shape}."
    )
  if teacher_patch_probs.shape != student_patch_logits.shape:
    raise ValueError(
      f"teacher_patch_probs must have the shape of student_patch_logits "
      f"{student_patch_logits.shape}, got {teacher_patch_probs.shape}."
    )
  if masks.shape != student_patch_logits.shape[:2] or masks.dtype != jnp.bool_:
    raise ValueError(
      f"masks must be a bool array of shape {student_patch_logits.shape[:2]} (n, P), got "
      f"{masks.dtype} of shape {masks.shape}."
    )
  _check_positive("student_temperature", student_temperature)

  student_log_probs = jax.nn.log_softmax(
    student_patch_logits.astype(jnp.float32) / student_temperature, axis=-1
  )
  # Zeroed rather than multiplied by the mask: a NaN in an unmasked teacher
  # token must not reach the value or, through 0 * NaN, the gradient.
  teacher = jnp.where(
    masks[..., None], jax.lax.stop_gradient(teacher_patch_probs).astype(jnp.float32), 0.0
  )
  cross_entropy = -jnp.sum(teacher * student_log_probs, axis=-1)  # (n, P)
  num_masked = jnp.maximum(jnp.sum(masks, axis=-1), 1).astype(jnp.float32)
  per_image = jnp.sum(cross_entropy, axis=-1) / num_masked
  return _mean_over_batch(per_image, axis_name)


def koleo_loss(
  x: jax.Array,
  eps: float = 1e-8,
  axis_name: str | None = None,
) -> jax.Array:
  r"""The KoLeo regulariser: spreads features by pushing each from its nearest neighbour.

  With :math:`\hat x_i = x_i / \max(\|x_i\|, \epsilon)` and
  :math:`j(i) = \arg\max_{j \ne i} \hat x_i^\top \hat x_j` the nearest other
  row (on the sphere the largest dot product is the smallest distance):

  .. math::
     L = -\frac{1}{n} \sum_{i=1}^{n} \log\big(\|\hat x_i - \hat x_{j(i)}
       + \epsilon\|_2 + \epsilon\big),

  the Kozachenko-Leonenko differential entropy estimator up to constants, as
  the official ``KoLeoLoss`` computes it (``torch.nn.PairwiseDistance`` adds
  :math:`\epsilon` to the difference, which also keeps the gradient finite for
  duplicate rows). The neighbour index gets no gradient; the distance passes
  gradients to both rows. One departure: the diagonal of the dot products is
  set to -inf, not -1, so a sample is never its own neighbour even when its
  only other candidate is antipodal (dot product -1, a tie in the official).

  Neighbours are searched within the rows given. With ``axis_name`` each
  device searches its own local batch and the per-device losses are averaged
  (``pmean``), which is what DINOv2 does: ``SSLMetaArch.forward_backward``
  calls the loss on each device's local class tokens, once per global crop
  (``student_cls_tokens.chunk(2)``, backbone outputs before the head), and
  sums the two crops' losses (weight 0.1); DDP then averages over devices. It
  is therefore not the loss of one device holding the global batch.

  Args:
    x: (n, d) features, n >= 2 (the local batch with ``axis_name``).
    eps: :math:`\epsilon` > 0 of the normalisation, the distance and the log.
    axis_name: mapped mesh axis over which the batch is split, or None.

  Returns:
    The scalar float32 loss (with ``axis_name`` the mean of the per-device
    losses, identical on every device).

  Raises:
    ValueError: if ``x`` is not (n, d) with n >= 2, or ``eps`` <= 0.

  References:
    Sablayrolles et al., "Spreading vectors for similarity search", ICLR 2019.
    https://arxiv.org/abs/1806.03198

    Oquab et al., "DINOv2: Learning Robust Visual Features without
    Supervision", TMLR 2024, Sec. 4. https://arxiv.org/abs/2304.07193
  """
  _check_2d("x", x)
  if x.shape[0] < 2:
    raise ValueError(f"x must have at least 2 rows to have a neighbour, got shape {x.shape}.")
  _check_positive("eps", eps)
  x = x.astype(jnp.float32)
  x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
  x_fixed = jax.lax.stop_gradient(x)
  # (n, d) @ (d, n) -> (n, n)
  dots = jnp.matmul(x_fixed, x_fixed.T, precision=jax.lax.Precision.HIGHEST)
  dots = jnp.where(jnp.eye(x.shape[0], dtype=bool), -jnp.inf, dots)
  neighbour = jnp.argmax(dots, axis=-1)
  distance = jnp.linalg.norm(x - x[neighbour] + eps, axis=-1)
  loss = -jnp.mean(jnp.log(distance + eps))
  return loss if axis_name is None else jax.lax.pmean(loss, axis_name)


def ibot_masked_patch_loss(
  student_logits: jax.Array,
  teacher_probs: jax.Array,
  token_weights: jax.Array,
  num_images: int,
  student_temperature: jax.Array | float = 0.1,
  axis_name: str | None = None,
) -> jax.Array:
  r""":func:`ibot_patch_loss` on the masked tokens alone, gathered into a fixed-size buffer.

  The official ``iBOTPatchLoss.forward_masked``: the student and teacher outputs of the
  masked patch tokens only (``mask_indices_list``), each token weighted by
  ``1 / max(m_i, 1)`` of its image (``masks_weight``), summed and divided by the number of
  images. The head then runs on the masked tokens, not on every patch: with K = 65,536
  prototypes the dense (n, P, K) logits of :func:`ibot_patch_loss` would not fit.

  .. math::
     L = \frac{1}{N} \sum_{u} w_u \Big(-\sum_{k} P_t[u, k]
       \log \mathrm{softmax}(g_s[u] / \tau_s)_k\Big),

  with N the images (crops) of the global batch; padding rows have weight 0 and add
  nothing (their teacher rows are ignored). With ``w_u = 1 / m_i`` for the tokens of image
  i it equals :func:`ibot_patch_loss` on the dense arrays
  (``tests/test_losses_dinov2.py``).

  Args:
    student_logits: (U, K) student head outputs of the gathered tokens (local rows).
    teacher_probs: (U, K) teacher targets of the same tokens; no gradient flows into them.
    token_weights: (U,) float weights, 0 on padding rows.
    num_images: the images (crops) of this device's batch, n, including unmasked ones;
      every device holds the same number.
    student_temperature: :math:`\tau_s` > 0.
    axis_name: mapped mesh axis of the batch, or None.

  Returns:
    The scalar float32 loss over the global batch, identical on every device.

  Raises:
    ValueError: on shapes that disagree, ``num_images`` < 1 or a temperature <= 0.
  """
  _check_2d("student_logits", student_logits)
  if teacher_probs.shape != student_logits.shape:
    raise ValueError(
      f"teacher_probs must have the shape of student_logits {student_logits.shape}, got "
      f"{teacher_probs.shape}."
    )
  if token_weights.shape != student_logits.shape[:1]:
    raise ValueError(
      f"token_weights must have shape ({student_logits.shape[0]},), got {token_weights.shape}."
    )
  if num_images < 1:
    raise ValueError(f"num_images must be >= 1, got {num_images}.")
  _check_positive("student_temperature", student_temperature)
  student_log_probs = jax.nn.log_softmax(
    student_logits.astype(jnp.float32) / student_temperature, axis=-1
  )
  weights = token_weights.astype(jnp.float32)
  # Zeroed rather than multiplied: a NaN in a padding row must not reach the gradient.
  teacher = jnp.where(
    weights[:, None] > 0, jax.lax.stop_gradient(teacher_probs).astype(jnp.float32), 0.0
  )
  cross_entropy = -jnp.sum(teacher * student_log_probs, axis=-1)
  return _mean_over_batch(jnp.sum(weights * cross_entropy)[None] / num_images, axis_name)
