"""Methods with a momentum target network: MoCo v2 (with a queue), MoCo v3 and BYOL.

The target network has the online network's architecture without the
predictor, its parameters an exponential moving average of the online ones
(``ema.base`` ramped to ``ema.final``, see ``base.ema_decay``), applied after
each optimiser step to the new online parameters:
``target <- decay * target + (1 - decay) * online``. The target gets no
gradient; its BatchNorm uses global batch statistics like the online
network's, and its running statistics are its own.

BatchNorm and MoCo's "shuffling BN": with per-device BatchNorm the key
encoder's statistics on a device come from the same few images as its
queries, and the model can cheat the pretext task through them; MoCo v1/v2
shuffle the keys across devices to break that. cljax uses global
(cross-device) BatchNorm instead, as MoCo v3 and SimCLR do: statistics over
the whole global batch carry about 1/B of any one image, the leak has no
device structure to exploit, and the step stays identical on any number of
devices (sharded equals single-device, which a shuffle would not keep).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec

from cljax import losses
from cljax.methods.base import Method, StepOutput, copy_tree, ema_config, ema_decay


def _without_predictor(tree: dict) -> dict:
  return {k: v for k, v in tree.items() if k != "predictor"}


class MomentumMethod(Method):
  """Online network + EMA target network; subclasses define the loss.

  BatchNorm over the views: the official code of BYOL, MoCo v3 and MoCo v2 runs each view
  through each network in its own forward pass, so by default (``model.bn_views``) both
  the online and the target network normalise each view with its own statistics.
  """

  bn_views_default = "per_view"
  bn_views_choices = ("per_view", "pooled")
  mirrors_params = ("target_params",)

  @classmethod
  def config_sections(cls) -> dict[str, ml_collections.ConfigDict]:
    return {"ema": ema_config()}

  def init_state(self, rng: jax.Array, variables: dict) -> Any:
    del rng
    return {
      "target_params": copy_tree(_without_predictor(variables["params"])),
      "target_batch_stats": copy_tree(_without_predictor(variables["batch_stats"])),
    }

  def state_specs(self) -> Any:
    return PartitionSpec()

  def target_forward(self, state: Any, x: jax.Array, num_views: int = 1) -> tuple[jax.Array, Any]:
    """The target network's embeddings of the ``num_views`` views stacked in ``x`` (no
    gradient) and its new statistics."""
    ms = state.method_state
    params, stats = ms["target_params"], ms["target_batch_stats"]
    _, z, stats = self.forward(state.apply_fn, params, stats, x, num_views)
    return jax.lax.stop_gradient(z), stats

  def decay(self, step: jax.Array) -> jax.Array:
    return ema_decay(self.config, step, self.num_steps)

  def update_state(self, state: Any, params: Any, out: StepOutput) -> Any:
    ms = state.method_state
    target = losses.ema_update(
      ms["target_params"], _without_predictor(params), self.decay(state.step)
    )
    return dict(ms, target_params=target, target_batch_stats=out.extra["target_batch_stats"])


class BYOL(MomentumMethod):
  """BYOL: predict the target network's projection of the other view.

  Loss ``byol(p_a, z'_b) + byol(p_b, z'_a)`` with ``byol`` the normalised MSE
  ``2 - 2 cos``; no negatives. The predictor and the slowly moving target
  (decay 0.996 cosine-ramped to 1) keep it from collapsing.

  References:
    Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020.
    https://arxiv.org/abs/2006.07733
  """

  name = "byol"

  def loss(self, params: Any, state: Any, views: dict, batch: dict) -> tuple[jax.Array, StepOutput]:
    x = views["global"]
    n = x.shape[0] // 2
    h, z, p, stats = self.forward(
      state.apply_fn, params, state.batch_stats, x, num_views=2, predict=True
    )
    t, target_stats = self.target_forward(state, x, num_views=2)
    swapped = jnp.concatenate([t[n:], t[:n]])
    # Mean over both directions of the batch mean: byol(p_a, t_b) + byol(p_b, t_a).
    loss = 2 * losses.byol_loss(p, swapped, axis_name=self.axis_name)
    metrics = {"ema_decay": self.decay(state.step)}
    extra = {"target_batch_stats": target_stats}
    return loss, StepOutput(stats, metrics, z, h, pairs=(z[:n], z[n:]), extra=extra)


class MoCoV3(MomentumMethod):
  """MoCo v3: symmetric InfoNCE of predictions against momentum keys of the other view.

  ``ctr(p_a, k_b) + ctr(p_b, k_a)`` where ``ctr`` is InfoNCE over the keys of
  the whole global batch (gathered across devices), scaled by ``2 T``; no
  queue. Momentum 0.99 cosine-ramped to 1. The official heads (``_build_mlp``,
  BatchNorm in the hidden layers): for a ViT (AdamW), a 3-layer projector and a
  2-layer predictor, both ending in BatchNorm without affine parameters
  (``output_norm="bn_no_affine"``); for a ResNet (LARS), a 2-layer projector
  ending in that BatchNorm and a 2-layer predictor ending in a bias-free Linear
  (``predictor.output_norm="none_no_bias"``, ``last_bn=False``).

  References:
    Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision
    Transformers", ICCV 2021. https://arxiv.org/abs/2104.02057
  """

  name = "moco_v3"

  def loss(self, params: Any, state: Any, views: dict, batch: dict) -> tuple[jax.Array, StepOutput]:
    x = views["global"]
    n = x.shape[0] // 2
    h, z, p, stats = self.forward(
      state.apply_fn, params, state.batch_stats, x, num_views=2, predict=True
    )
    k, target_stats = self.target_forward(state, x, num_views=2)
    temperature = self.config.loss.temperature
    loss_ab, m_ab = losses.moco_v3_loss(
      p[:n], k[n:], temperature, axis_name=self.axis_name, return_metrics=True
    )
    loss_ba, m_ba = losses.moco_v3_loss(
      p[n:], k[:n], temperature, axis_name=self.axis_name, return_metrics=True
    )
    metrics = jax.tree.map(lambda a, b: (a + b) / 2, m_ab, m_ba)
    metrics["ema_decay"] = self.decay(state.step)
    extra = {"target_batch_stats": target_stats}
    return loss_ab + loss_ba, StepOutput(stats, metrics, z, h, pairs=(z[:n], z[n:]), extra=extra)


class MoCoV2(MomentumMethod):
  """MoCo v2: InfoNCE of queries against their momentum key and a queue of past keys.

  The queue (``moco.queue_size`` keys, 65,536 in the paper) lives in
  ``method_state["queue"]``, sharded over the devices' ``'data'`` axis (each
  holds ``queue_size / num_devices`` rows); ``method_state["queue_ptr"]`` is
  the row the next key goes to. After each step the keys of the global batch
  (all-gathered, in device order) overwrite the oldest rows, so after k steps
  the rows ``ptr - k B .. ptr - 1`` (mod the size) hold the last k global
  batches in order. The loss never gathers the queue (see
  ``losses.moco_v2_loss``). Asymmetric as in the paper (queries of view a,
  keys of view b) unless ``moco.symmetric``.

  References:
    He et al., "Momentum Contrast for Unsupervised Visual Representation
    Learning", CVPR 2020. https://arxiv.org/abs/1911.05722
    Chen et al., "Improved Baselines with Momentum Contrastive Learning",
    2020. https://arxiv.org/abs/2003.04297
  """

  name = "moco_v2"

  @classmethod
  def config_sections(cls) -> dict[str, ml_collections.ConfigDict]:
    c = ml_collections.ConfigDict()
    c.queue_size = 65536  # MoCo v2's queue of negative keys, sharded over devices.
    # False: the paper's asymmetric loss (queries of view a, keys of view b,
    # those keys enqueued). True: both directions, both views' keys enqueued.
    c.symmetric = False
    return super().config_sections() | {"moco": c}

  def describe(self) -> str:
    return f"; {self.config.moco.queue_size} queued negatives per query"

  def init_state(self, rng: jax.Array, variables: dict) -> Any:
    size, dim = self.config.moco.queue_size, self.config.head.output_dim
    num_devices = jax.device_count()
    if size <= 0 or size % num_devices:
      raise ValueError(
        f"moco.queue_size={size} must be a positive multiple of the {num_devices} devices."
      )
    keys_per_step = self.config.data.global_batch_size * (2 if self.config.moco.symmetric else 1)
    if keys_per_step > size:
      raise ValueError(
        f"moco.queue_size={size} must hold at least one step's {keys_per_step} keys."
      )
    # As in the paper: random unit vectors until real keys replace them.
    queue = losses.l2_normalize(jax.random.normal(rng, (size, dim), jnp.float32))
    state = super().init_state(rng, variables)
    return dict(state, queue=queue, queue_ptr=jnp.zeros((), jnp.int32))

  def state_specs(self) -> Any:
    rep = PartitionSpec()
    return {
      "target_params": rep,
      "target_batch_stats": rep,
      "queue": PartitionSpec(self.axis_name),
      "queue_ptr": rep,
    }

  def loss(self, params: Any, state: Any, views: dict, batch: dict) -> tuple[jax.Array, StepOutput]:
    x = views["global"]
    n = x.shape[0] // 2
    temperature, queue = self.config.loss.temperature, state.method_state["queue"]
    if self.config.moco.symmetric:
      h, q, stats = self.forward(state.apply_fn, params, state.batch_stats, x, num_views=2)
      k, target_stats = self.target_forward(state, x, num_views=2)
      swapped = jnp.concatenate([k[n:], k[:n]])
      loss, metrics = losses.moco_v2_loss(
        q, swapped, queue, temperature, axis_name=self.axis_name, return_metrics=True
      )
      pairs, new_keys = (q[:n], q[n:]), swapped
    else:
      h, q, stats = self.forward(state.apply_fn, params, state.batch_stats, x[:n])
      k, target_stats = self.target_forward(state, x[n:])
      loss, metrics = losses.moco_v2_loss(
        q, k, queue, temperature, axis_name=self.axis_name, return_metrics=True
      )
      pairs, new_keys = (q, k), k
    metrics["ema_decay"] = self.decay(state.step)
    extra = {"target_batch_stats": target_stats, "keys": losses.l2_normalize(new_keys)}
    return loss, StepOutput(stats, metrics, q, h, pairs=pairs, extra=extra)

  def update_state(self, state: Any, params: Any, out: StepOutput) -> Any:
    ms = super().update_state(state, params, out)
    queue, ptr = enqueue(ms["queue"], ms["queue_ptr"], out.extra["keys"], self.axis_name)
    return dict(ms, queue=queue, queue_ptr=ptr)


def enqueue(
  queue: jax.Array, ptr: jax.Array, keys: jax.Array, axis_name: str | None
) -> tuple[jax.Array, jax.Array]:
  """Writes the keys of the global batch into a FIFO queue at ``ptr``, wrapping around.

  Args:
    queue: (K, d) queue, or with ``axis_name`` this device's (K / D, d) rows
      of it (device i holds rows ``i K / D .. (i + 1) K / D - 1``).
    ptr: int32 scalar, the row the first new key goes to.
    keys: (m, d) keys of this device; with ``axis_name`` they are gathered
      in device order to the global batch's M keys first.
    axis_name: the mapped axis the queue is sharded over, or None.

  Returns:
    The new queue (rows ``ptr .. ptr + M - 1`` mod K hold the keys in order)
    and the new pointer ``(ptr + M) mod K``. No gradient flows.
  """
  keys = jax.lax.stop_gradient(keys.astype(queue.dtype))
  if axis_name is None:
    first, num_devices = 0, 1
  else:
    keys = jax.lax.all_gather(keys, axis_name, tiled=True)
    first, num_devices = jax.lax.axis_index(axis_name) * queue.shape[0], jax.lax.psum(1, axis_name)
  total, num_keys = queue.shape[0] * num_devices, keys.shape[0]
  rows = first + jnp.arange(queue.shape[0])
  age = jnp.mod(rows - ptr, total)  # Position of each row after ptr.
  fresh = age < num_keys
  new = jnp.where(fresh[:, None], keys[jnp.minimum(age, num_keys - 1)], queue)
  return new, jnp.mod(ptr + num_keys, total).astype(ptr.dtype)
