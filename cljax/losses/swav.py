"""SwAV: Sinkhorn-Knopp codes over the global batch and the swapped prediction loss."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from cljax.losses._common import _check_2d, _check_temperature, _mean_over_batch


def _check_positive(name: str, value: float) -> None:
  if not isinstance(value, jax.Array) and not value > 0:
    raise ValueError(f"{name} must be > 0, got {value!r}.")


def _check_iters(name: str, value: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be an int >= 1, got {value!r}.")


def sinkhorn(
  scores: jax.Array,
  *,
  num_iters: int = 3,
  epsilon: float = 0.05,
  axis_name: str | None = None,
) -> jax.Array:
  r"""SwAV's Sinkhorn-Knopp: equipartitioned soft assignments of samples to prototypes.

  With B the number of rows of the global batch and K prototypes, starting
  from :math:`Q = \exp(S / \epsilon)^\top \in \mathbb{R}^{K \times B}`
  normalised to total 1, each of ``num_iters`` iterations makes every row
  (prototype) sum to :math:`1/K` and then every column (sample) sum to
  :math:`1/B`; the result is :math:`B Q^\top`, whose rows sum to 1. This
  approximates the entropic optimal transport

  .. math::
     \max_{Q \in \mathcal{Q}} \operatorname{Tr}(Q^\top C^\top Z)
       + \epsilon H(Q), \quad
     \mathcal{Q} = \{Q \in \mathbb{R}_+^{K \times B} :
       Q 1_B = \tfrac{1}{K} 1_K,\ Q^\top 1_K = \tfrac{1}{B} 1_B\}

  of the paper's eq. 3. Prototype sums (and the total) run over all devices,
  so the codes equal those of one device holding the global batch; sample
  sums are local. After the last step the rows of the output sum to 1 up to
  rounding, and the columns (prototypes) sum to B/K only approximately: the
  error shrinks with ``num_iters`` (SwAV uses 3).

  Computed in float32 with the global maximum of ``scores / epsilon``
  subtracted before ``exp`` (a constant factor, removed by the first
  normalisation). ``(max - min) / epsilon`` of the scores should stay below
  ~80, or ``exp`` underflows to 0 and a prototype's sum can vanish; cosine
  scores (in [-1, 1]) are safe for ``epsilon`` >= 0.025.

  Args:
    scores: (n, K) scores of the local samples against the prototypes.
    num_iters: number of Sinkhorn iterations, >= 1.
    epsilon: entropic regularisation :math:`\epsilon` > 0.
    axis_name: mapped axis over which the batch is split, or None.

  Returns:
    (n, K) float32 assignments of the local samples, rows summing to 1.
    Gradients flow through it; SwAV uses it under ``stop_gradient``.

  Raises:
    ValueError: if ``scores`` is not 2-D, ``num_iters`` is not an int >= 1
      or ``epsilon`` <= 0.

  References:
    Caron et al., "Unsupervised Learning of Visual Features by Contrasting
    Cluster Assignments", NeurIPS 2020 (Algorithm 1 and
    ``distributed_sinkhorn`` in its code). https://arxiv.org/abs/2006.09882
  """
  _check_2d("scores", scores)
  _check_iters("num_iters", num_iters)
  _check_positive("epsilon", epsilon)
  n, k = scores.shape
  b = n if axis_name is None else n * jax.lax.psum(1, axis_name)
  logits = scores.astype(jnp.float32) / epsilon
  shift = jax.lax.stop_gradient(jnp.max(logits))
  if axis_name is not None:
    shift = jax.lax.pmax(shift, axis_name)

  def global_sum(x, axis=None):
    total = jnp.sum(x, axis=axis, keepdims=axis is not None)
    return total if axis_name is None else jax.lax.psum(total, axis_name)

  # The paper's Q is K x B; here q = Q^T is (n, K) with samples in rows.
  q = jnp.exp(logits - shift)
  q = q / global_sum(q)

  def step(_, q):
    q = q / global_sum(q, axis=0) / k  # prototypes sum to 1/K (over the global batch)
    return q / jnp.sum(q, axis=1, keepdims=True) / b  # samples sum to 1/B

  q = jax.lax.fori_loop(0, num_iters, step, q)
  return q * b


def swav_loss(
  scores: jax.Array,
  *,
  temperature: float = 0.1,
  epsilon: float = 0.05,
  sinkhorn_iters: int = 3,
  assign_views: Sequence[int] = (0, 1),
  queue_scores: jax.Array | None = None,
  axis_name: str | None = None,
  return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
  r"""SwAV's swapped prediction loss over V views (multi-crop).

  For each view :math:`v` in ``assign_views`` the codes
  :math:`q_v = \mathrm{sg}(\mathrm{sinkhorn}(S_v))` are computed over the
  global batch, and every other view :math:`u \ne v` predicts them:

  .. math::
     L = \frac{1}{|\mathcal{A}|} \sum_{v \in \mathcal{A}} \frac{1}{V - 1}
       \sum_{u \ne v} \frac{1}{N} \sum_{i=1}^{N} \Big(
       -\sum_k q_{v,ik} \log \operatorname{softmax}_k(S_{u,i} / \tau) \Big)

  with :math:`\mathcal{A}` = ``assign_views``, N the global batch size and
  :math:`\mathrm{sg}` stop-gradient: gradients reach the scores only through
  the predictions.

  Queue convention (as in the paper's code): ``queue_scores`` are the scores
  of stored embeddings from earlier batches against the current prototypes.
  They are local to the device: each device appends its own queue rows to its
  local batch before Sinkhorn, so Sinkhorn runs over the global batch plus all
  devices' queues (B = (n + Q) * num_devices), and the queue rows are dropped
  from the codes afterwards. Sharding a (Q * num_devices, K) queue over the
  mesh axis gives the same codes as one device holding the whole queue
  (Sinkhorn treats every row alike, so the order of rows does not matter).
  The queue adds no loss terms and gets no gradient. Each assigned view can
  have its own queue (SwAV keeps one per assigned crop).

  Args:
    scores: (V, n, K) scores (cosines of normalised embeddings with
      normalised prototypes) of V >= 2 views of the local batch against K
      prototypes; the high-resolution crops first.
    temperature: :math:`\tau` > 0 of the prediction softmax.
    epsilon: Sinkhorn's :math:`\epsilon` > 0.
    sinkhorn_iters: Sinkhorn iterations, >= 1.
    assign_views: distinct view indices in [0, V) whose codes are targets.
    queue_scores: optional (Q, K) local queue scores used for every assigned
      view, or (len(assign_views), Q, K), one queue per assigned view in the
      order of ``assign_views``.
    axis_name: mapped axis over which the batch is split, or None.
    return_metrics: also return ``{"code_entropy", "prototypes_used"}``: the
      mean entropy (nats) of the codes of the global batch, and the number of
      prototypes that are the argmax code of at least one sample of the
      global batch (for the first assigned view).

  Returns:
    The scalar float32 loss, identical on every device, and the metrics dict
    when ``return_metrics``.

  Raises:
    ValueError: on a bad shape, an empty, repeated or out-of-range
      ``assign_views``, or a bad temperature, epsilon or iteration count.

  References:
    Caron et al., "Unsupervised Learning of Visual Features by Contrasting
    Cluster Assignments", NeurIPS 2020. https://arxiv.org/abs/2006.09882
  """
  if scores.ndim != 3:
    raise ValueError(f"scores must have shape (views, batch, prototypes), got {scores.shape}.")
  num_views, n, k = scores.shape
  if num_views < 2:
    raise ValueError(f"scores must hold at least 2 views, got {num_views}.")
  _check_temperature(temperature)
  _check_positive("epsilon", epsilon)
  _check_iters("sinkhorn_iters", sinkhorn_iters)
  assign_views = tuple(assign_views)
  if (
    not assign_views
    or len(set(assign_views)) != len(assign_views)
    or not all(isinstance(v, int) and not isinstance(v, bool) for v in assign_views)
    or not all(0 <= v < num_views for v in assign_views)
  ):
    raise ValueError(
      f"assign_views must be distinct ints in [0, {num_views}), got {assign_views!r}."
    )
  if queue_scores is not None:
    if queue_scores.ndim == 2:
      queue_scores = jnp.broadcast_to(queue_scores, (len(assign_views), *queue_scores.shape))
    if queue_scores.ndim != 3 or queue_scores.shape[0] != len(assign_views):
      raise ValueError(
        "queue_scores must have shape (queue, prototypes) or "
        f"({len(assign_views)}, queue, prototypes), got {queue_scores.shape}."
      )
    if queue_scores.shape[2] != k:
      raise ValueError(
        f"queue_scores must have {k} prototypes like scores, got shape {queue_scores.shape}."
      )

  log_p = jax.nn.log_softmax(scores.astype(jnp.float32) / temperature, axis=-1)
  log_p_sum = jnp.sum(log_p, axis=0)  # (n, K): summed over all views
  loss = 0.0
  codes = []
  for i, v in enumerate(assign_views):
    s = scores[v].astype(jnp.float32)
    if queue_scores is not None:
      s = jnp.concatenate([s, queue_scores[i].astype(jnp.float32)], axis=0)
    q = sinkhorn(s, num_iters=sinkhorn_iters, epsilon=epsilon, axis_name=axis_name)[:n]
    q = jax.lax.stop_gradient(q)
    codes.append(q)
    # Cross-entropy of q against every view but v, averaged over those V - 1 views.
    ce = -jnp.sum(q * (log_p_sum - log_p[v]), axis=-1) / (num_views - 1)
    loss = loss + _mean_over_batch(ce, axis_name)
  loss = loss / len(assign_views)
  if not return_metrics:
    return loss

  entropy = 0.0
  for q in codes:
    entropy = entropy + _mean_over_batch(-jnp.sum(q * jnp.log(q + 1e-12), axis=-1), axis_name)
  counts = jnp.sum(jax.nn.one_hot(jnp.argmax(codes[0], axis=-1), k), axis=0)
  if axis_name is not None:
    counts = jax.lax.psum(counts, axis_name)
  metrics = {
    "code_entropy": entropy / len(codes),
    "prototypes_used": jnp.sum(counts > 0).astype(jnp.float32),
  }
  return loss, metrics
