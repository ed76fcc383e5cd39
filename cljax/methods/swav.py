"""SwAV (Caron et al. 2020): swapped prediction of Sinkhorn cluster codes, with multi-crop.

Every crop's embedding (encoder, projection head, l2-normalisation) is scored
against K learnable prototypes; the codes of the two global crops, computed
over the global batch by Sinkhorn-Knopp (equipartitioned over the
prototypes, no gradient), are predicted from the scores of every other crop
(``losses.swav_loss``).

One step, as the train step runs it inside ``shard_map`` over ``'data'``:

1. forward of the 2n global crops (``data.image_size``), then (multi-crop) a
   second forward of the L n local crops (``data.augment.local_crop_size``):
   the shapes differ, so the encoder runs once per resolution as in the
   official code. BatchNorm normalises each forward with the global batch's
   statistics of its own crops, and the running statistics are updated by
   the first forward, then the second. (The official code runs the
   projection head once on all crops together; here its BatchNorm sees each
   resolution's crops separately.)
2. scores ``(2 + L, n, K)`` of all crops, cosines with the unit prototypes.
3. ``swav_loss`` with codes from the global crops only (``assign_views=(0,
   1)``), ``loss.temperature``, ``swav.epsilon``, ``swav.sinkhorn_iterations``,
   and, once the queue is full, the queue's scores.
4. after the optimiser step (``update_state``): the global crops'
   embeddings of this step enter the queue.

The prototypes. ``params["prototypes"]["kernel"]`` is a (d, K) matrix whose
columns are the prototypes; the forward l2-normalises each column before
scoring, so the prototypes in use are always unit vectors. The official code
instead renormalises the weights in place before each step and
differentiates through the unit weights; normalising inside the forward is
the same to first order (the gradient loses only its radial part, which the
official renormalisation discards at the next step) and keeps the parameters
an ordinary pytree the train step updates. The raw kernel's norm may drift
(weight decay shrinks it, tangent updates grow it), which changes no score;
with LARS the relative step of the prototypes does not depend on that norm.

Freezing. For the first ``ceil(swav.freeze_prototypes_epochs *
steps_per_epoch)`` updates (the official 313 iterations, one epoch at batch
4096) the prototypes are frozen in the optimiser, as the official code's
``p.grad = None`` does it (:meth:`SwAV.create_optimizer`,
``optim.freeze_for_steps``): they have an optimiser state of their own
(LARS's momentum), left untouched while frozen, with no weight decay and no
update; after the freeze it starts from its initial state at the run's
learning rate of that step. With ``steps_per_epoch=0`` (unknown) nothing is
frozen.

The queue (``swav.queue_size > 0`` rows per device, for small batches; the
official code uses it from ``swav.queue_start_epoch``). The method state
holds ``queue``: (2, D * Q, d) unit embeddings, one queue per assigned crop,
sharded over the devices on its second axis (device i holds rows ``i Q ..
(i + 1) Q - 1`` of each), and ``queue_batches``, how many batches it holds
(at most Q / n, the same on any number of devices). From the first step of epoch
``queue_start_epoch`` on, each device pushes the embeddings of its own
global crops of the step to the front of its shard (newest first, the oldest
drop out), as the official code does per GPU. The union of the shards then
holds the last ``Q / n`` global batches whatever the number of devices (Q a
multiple of the per-device batch n), which is all Sinkhorn needs: it treats
rows alike, whatever their order. Once a shard is full, the queue's scores
against the current prototypes (no gradient) join Sinkhorn for the codes:
``losses.swav_loss``'s convention, each device appending its own rows, so
Sinkhorn runs over (n + Q) x D rows; the queue adds no loss terms.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import PartitionSpec

from cljax import losses, models, optim
from cljax.methods.base import Method, StepOutput

ASSIGN_VIEWS = (0, 1)  # The two global crops give the codes.


def prototypes_mask(params: Any) -> Any:
  """True for the prototypes' kernel (``params["prototypes"]``), False elsewhere."""
  return {k: jax.tree.map(lambda _, k=k: k == "prototypes", v) for k, v in params.items()}


class Prototypes(nn.Module):
  """Scores against K unit prototypes: ``z @ (v / ||v||)`` per column of the (d, K) kernel.

  The kernel is float32 and the product is computed at full float32
  precision (scores are divided by Sinkhorn's epsilon = 0.05).
  """

  num_prototypes: int

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    # Unit-variance columns (norm about 1); only their direction matters.
    init = nn.initializers.lecun_normal()
    kernel = self.param("kernel", init, (z.shape[-1], self.num_prototypes), jnp.float32)
    return jnp.einsum(
      "nd,dk->nk",
      z.astype(jnp.float32),
      unit_prototypes(kernel),
      precision=jax.lax.Precision.HIGHEST,
    )


def unit_prototypes(kernel: jax.Array) -> jax.Array:
  """The (d, K) kernel with each column (prototype) scaled to unit norm, whatever its norm.

  The floor under the squared norm is float32's smallest normal number, not
  ``l2_normalize``'s 1e-12: nothing but the direction of a prototype is meant to matter.
  Weight decay shrinks the kernel (with LARS, a step of ``lr * trust_coefficient`` of its
  norm, accumulated by momentum) and only tangent updates grow it back; under the 1e-12
  floor a shrunken kernel would shrink the scores with it to 0 and make the codes uniform
  (the ln K plateau). Before the prototypes were frozen in the optimiser, decay during the
  freeze took their norm to 1e-4 within one epoch of ``configs/swav_cifar10.py:cpu``.
  """
  return losses.l2_normalize(kernel, axis=0, eps=float(jnp.finfo(jnp.float32).tiny))


class SwAVModel(nn.Module):
  """Encoder, projection head and prototypes.

  ``apply`` returns ``(features, embeddings)`` (the encoder features and the
  head's outputs, as every cljax model, for evaluation); with
  ``scores=True`` it returns ``(features, embeddings, scores)``, the scores
  being the (m, K) cosines of the l2-normalised embeddings with the unit
  prototypes. The parameters are ``{"encoder", "head",
  "prototypes"}``: the encoder where evaluation looks for it.
  """

  encoder: nn.Module
  head: nn.Module
  num_prototypes: int

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    train: bool = True,
    scores: bool = False,
  ):
    features = self.encoder(x, train=train)
    z = self.head(features, train=train)
    if not scores:
      return features, z
    prototypes = Prototypes(self.num_prototypes, name="prototypes")
    return features, z, prototypes(losses.l2_normalize(z))


class SwAV(Method):
  """Online clustering with swapped assignments between the views of each image.

  Config: ``swav.num_prototypes`` (3000), ``swav.epsilon`` (0.05),
  ``swav.sinkhorn_iterations`` (3), ``loss.temperature`` (0.1),
  ``swav.freeze_prototypes_epochs``, ``swav.queue_size`` (rows per device, 0:
  no queue) and ``swav.queue_start_epoch``; multi-crop through
  ``data.augment.num_local_crops`` and ``local_crop_*``. The projection head
  is the config's (the paper: 2048-128 with BatchNorm in the hidden layer and
  none at the output, ``head.output_norm="none"``).

  ``StepOutput.features`` are the encoder features of the two global crops
  (for the online probe); ``embeddings`` and ``pairs`` the head's outputs of
  those crops. Metrics: ``code_entropy`` and ``prototypes_used`` from the
  loss, ``prototypes_frozen`` (1 while frozen) and, with a queue,
  ``queue_used`` (1 once the queue joins Sinkhorn).

  References:
    Caron et al., "Unsupervised Learning of Visual Features by Contrasting
    Cluster Assignments", NeurIPS 2020. https://arxiv.org/abs/2006.09882
  """

  name = "swav"

  @classmethod
  def config_sections(cls) -> dict[str, ml_collections.ConfigDict]:
    c = ml_collections.ConfigDict()
    c.num_prototypes = 3000
    c.epsilon = 0.05
    c.sinkhorn_iterations = 3
    c.freeze_prototypes_epochs = 1.0
    c.queue_size = 0  # Per device; 0: no queue.
    c.queue_start_epoch = 15.0
    return {"swav": c}

  # ---- The model and the method's state.

  def create_model(self, bn_axis_name: str | None = None) -> SwAVModel:
    if self.config.predictor.num_layers > 0:
      raise ValueError("method='swav' has no predictor; set predictor.num_layers=0.")
    base = models.create_model(self.config, bn_axis_name)
    return SwAVModel(
      encoder=base.encoder, head=base.head, num_prototypes=self.config.swav.num_prototypes
    )

  def init_variables(self, rng: jax.Array, input_shape: tuple[int, ...]) -> dict:
    model = self.create_model()
    init = jax.jit(functools.partial(model.init, train=False, scores=True))
    variables = init(rng, jnp.zeros((2, *input_shape), jnp.float32))
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

  def init_state(self, rng: jax.Array, variables: dict) -> Any:
    """None without a queue; else the zero queue and its fill count (see the module docstring)."""
    del rng, variables
    size = self.config.swav.queue_size
    if size <= 0:
      return None
    num_devices = jax.device_count()
    local_batch = self.config.data.global_batch_size // num_devices
    if local_batch <= 0 or size % local_batch:
      raise ValueError(
        f"swav.queue_size={size} (rows per device) must be a multiple of the per-device batch "
        f"{local_batch} (data.global_batch_size={self.config.data.global_batch_size} over "
        f"{num_devices} devices), so that the queue holds whole batches."
      )
    shape = (len(ASSIGN_VIEWS), num_devices * size, self.config.head.output_dim)
    return {"queue": jnp.zeros(shape, jnp.float32), "queue_batches": jnp.zeros((), jnp.int32)}

  def state_specs(self) -> Any:
    if self.config.swav.queue_size <= 0:
      return PartitionSpec()
    return {"queue": PartitionSpec(None, self.axis_name), "queue_batches": PartitionSpec()}

  # ---- Schedules.

  def _epochs_to_steps(self, epochs: float) -> int:
    return max(math.ceil(epochs * self.steps_per_epoch), 0)

  @property
  def freeze_steps(self) -> int:
    """How many first steps the prototypes are frozen for (0 without ``steps_per_epoch``)."""
    return self._epochs_to_steps(self.config.swav.freeze_prototypes_epochs)

  @property
  def queue_start_step(self) -> int:
    """The first step whose embeddings enter the queue (0 without ``steps_per_epoch``)."""
    return self._epochs_to_steps(self.config.swav.queue_start_epoch)

  def prototypes_frozen(self, count: jax.Array) -> bool | jax.Array:
    """Whether the optimiser holds the prototypes after ``count`` applied updates (the
    ``prototypes_frozen`` metric): the optimiser freezes by its own count
    (:meth:`create_optimizer`, ``optim.applied_count``), which a skipped non-finite step does
    not advance, so the metric reads that count, not ``state.step``."""
    return count < self.freeze_steps if self.freeze_steps > 0 else False

  def create_optimizer(self, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
    """The config's optimiser, with the prototypes frozen for ``freeze_steps`` updates as if
    they had no gradient (the official ``p.grad = None`` while ``iteration <
    freeze_prototypes_niters``)."""
    frozen = self.config.swav.freeze_prototypes_epochs > 0
    return optim.create_optimizer(
      self.config.optim,
      learning_rate_fn,
      self.num_steps,
      freeze_mask=prototypes_mask if frozen else None,
      freeze_steps=self.freeze_steps,
    )

  # ---- One step.

  def loss(self, params: Any, state: Any, views: dict, batch: dict) -> tuple[jax.Array, StepOutput]:
    x = views["global"]
    n = x.shape[0] // 2
    frozen = self.prototypes_frozen(optim.applied_count(state.opt_state))
    forward = functools.partial(self.forward, state.apply_fn, params, scores=True)
    h, z, global_scores, stats = forward(state.batch_stats, x)
    scores = [global_scores.reshape(2, n, -1)]
    if "local" in views:
      # A second forward at the local resolution; BatchNorm statistics continue from the first.
      _, _, local_scores, stats = forward(stats, views["local"])
      scores.append(local_scores.reshape(-1, n, local_scores.shape[-1]))
    scores = jnp.concatenate(scores)

    swav = functools.partial(
      losses.swav_loss,
      temperature=self.config.loss.temperature,
      epsilon=self.config.swav.epsilon,
      sinkhorn_iters=self.config.swav.sinkhorn_iterations,
      assign_views=ASSIGN_VIEWS,
      axis_name=self.axis_name,
      return_metrics=True,
    )
    ms = state.method_state
    metrics = {}
    if ms is None:
      loss, loss_metrics = swav(scores)
    else:
      queue = jax.lax.stop_gradient(ms["queue"])  # (2, Q, d): this device's rows
      kernel = jax.lax.stop_gradient(params["prototypes"]["kernel"])
      queue_scores = jnp.einsum(
        "aqd,dk->aqk", queue, unit_prototypes(kernel), precision=jax.lax.Precision.HIGHEST
      )
      # Replicated, so every device takes the same branch.
      use_queue = ms["queue_batches"] * n >= queue.shape[1]
      loss, loss_metrics = jax.lax.cond(
        use_queue,
        lambda s, q: swav(s, queue_scores=q),
        lambda s, q: swav(s),
        scores,
        queue_scores,
      )
      metrics["queue_used"] = use_queue.astype(jnp.float32)
    metrics.update(loss_metrics, prototypes_frozen=jnp.asarray(frozen, jnp.float32))
    # The embeddings the queue stores: unit vectors of the assigned (global) crops.
    extra = {"queue_embeddings": jax.lax.stop_gradient(losses.l2_normalize(z)).reshape(2, n, -1)}
    return loss, StepOutput(stats, metrics, z, h, pairs=(z[:n], z[n:]), extra=extra)

  def update_state(self, state: Any, params: Any, out: StepOutput) -> Any:
    """Pushes this step's global-crop embeddings into the queue, from ``queue_start_epoch``."""
    del params
    ms = state.method_state
    if ms is None:
      return None
    queue, batches = ms["queue"], ms["queue_batches"]
    new = out.extra["queue_embeddings"].astype(queue.dtype)  # (2, n, d)
    rows, n = queue.shape[1], new.shape[1]
    pushed = jnp.concatenate([new, queue], axis=1)[:, :rows]  # Newest first.
    filling = state.step >= self.queue_start_step
    return {
      "queue": jnp.where(filling, pushed, queue),
      "queue_batches": jnp.where(filling, jnp.minimum(batches + 1, rows // n), batches),
    }
