"""Train state creation, the pure sharded SimCLR train step, and the training loop."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, PartitionSpec

from cljax import losses, models, optim, sharding
from cljax.state import TrainState

# Per-channel ImageNet statistics; inputs arrive as uint8 and are normalised
# on device so that the host ships 4x fewer bytes.
_MEAN_RGB = jnp.array([0.485, 0.456, 0.406], jnp.float32)
_STDDEV_RGB = jnp.array([0.229, 0.224, 0.225], jnp.float32)

Metrics = dict[str, jax.Array]


def normalize_images(images: jax.Array) -> jax.Array:
  """(b, h, w, 3) float images in [0, 1] -> zero-mean, unit-variance channels."""
  return (images - _MEAN_RGB) / _STDDEV_RGB


def create_train_state(
    config: ml_collections.ConfigDict,
    rng: jax.Array,
    learning_rate_fn: optax.Schedule,
    image_shape: tuple[int, int, int],
) -> TrainState:
  """Initialises parameters, BatchNorm statistics and the optimiser state."""
  model = models.create_model(config)
  variables = jax.jit(functools.partial(model.init, train=False))(
      rng, jnp.zeros((2, *image_shape), jnp.float32)
  )
  tx = optim.create_optimizer(config.optim, learning_rate_fn)
  return TrainState.create(
      apply_fn=models.create_model(config, bn_axis_name=sharding.DATA_AXIS).apply,
      params=variables["params"],
      batch_stats=variables["batch_stats"],
      tx=tx,
  )


def _augmented_views(batch: dict, rng: jax.Array, step: jax.Array, aug: Any) -> jax.Array:
  """Both views as one normalised float batch ``[view_a; view_b]`` (2n, h, w, 3)."""
  n = batch["view_a"].shape[0]
  # Global example indices make every example's augmentation independent of
  # how the batch is split over devices.
  index = jax.lax.axis_index(sharding.DATA_AXIS) * n + jnp.arange(n)
  views = []
  for v, name in enumerate(("view_a", "view_b")):
    x = batch[name].astype(jnp.float32) / 255.0
    if aug.photometric:
      from cljax.data import augment  # Deferred: keeps train importable without dm_pix.

      keys = augment.example_keys(jax.random.fold_in(rng, v), step, index)
      x = augment.photometric_augment(
          x,
          keys,
          color_strength=aug.color_strength,
          color_jitter_prob=aug.color_jitter_prob,
          grayscale_prob=aug.grayscale_prob,
          blur_prob=aug.blur_prob,
          solarize_prob=aug.solarize_prob,
      )
    views.append(normalize_images(x))
  return jnp.concatenate(views, axis=0)


def _embedding_std(z: jax.Array) -> jax.Array:
  """Mean over dimensions of the per-dimension std of L2-normalised embeddings.

  About 1/sqrt(d) for a healthy embedding and near 0 for a collapsed one
  (Chen and He, SimSiam 2021). Computed over the global batch.
  """
  z = losses.l2_normalize(jax.lax.stop_gradient(z))
  count = jax.lax.psum(z.shape[0], sharding.DATA_AXIS)
  mean = jax.lax.psum(jnp.sum(z, axis=0), sharding.DATA_AXIS) / count
  sq = jax.lax.psum(jnp.sum(z * z, axis=0), sharding.DATA_AXIS) / count
  return jnp.mean(jnp.sqrt(jnp.maximum(sq - mean * mean, 0.0)))


def train_step(
    state: TrainState,
    batch: dict,
    rng: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    learning_rate_fn: optax.Schedule,
) -> tuple[TrainState, Metrics]:
  """One SimCLR step on one device's shard; runs inside ``shard_map`` over 'data'.

  Args:
    state: the replicated train state.
    batch: this device's ``{"view_a", "view_b"}`` uint8 (n, h, w, 3) images.
    rng: the run's key; the step's keys derive from it and ``state.step``.
    config: the run config (static).
    learning_rate_fn: the schedule, for the logged learning rate.

  Returns:
    The new state and a dict of global scalar metrics.
  """
  views = _augmented_views(batch, rng, state.step, config.data.augment)
  n = batch["view_a"].shape[0]

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    (_, z), new_vars = state.apply_fn(variables, views, train=True, mutable=["batch_stats"])
    loss, metrics = losses.nt_xent(
        z[:n],
        z[n:],
        config.loss.temperature,
        axis_name=sharding.DATA_AXIS,
        return_metrics=True,
    )
    return loss, (new_vars["batch_stats"], metrics, z)

  # The loss is already the global mean (pmean inside nt_xent), so its
  # gradient with respect to the replicated parameters is the global gradient:
  # shard_map's autodiff sums the per-device contributions.
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (batch_stats, metrics, z)), grads = grad_fn(state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(
      step=state.step + 1,
      params=optax.apply_updates(state.params, updates),
      batch_stats=batch_stats,
      opt_state=opt_state,
  )
  metrics = dict(
      metrics,
      loss=loss,
      learning_rate=learning_rate_fn(state.step),
      grad_norm=optax.tree.norm(grads),
      param_norm=optax.tree.norm(state.params),
      embedding_std=_embedding_std(z),
  )
  return new_state, metrics


def make_train_step(
    config: ml_collections.ConfigDict, mesh: Mesh, learning_rate_fn: optax.Schedule
):
  """``train_step`` jit-compiled over ``mesh``: state replicated and donated, batch sharded."""
  step_fn = functools.partial(train_step, config=config, learning_rate_fn=learning_rate_fn)
  data, rep = PartitionSpec(sharding.DATA_AXIS), PartitionSpec()
  mapped = jax.shard_map(
      step_fn, mesh=mesh, in_specs=(rep, data, rep), out_specs=(rep, rep), check_vma=True
  )
  return jax.jit(
      mapped,
      in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh), sharding.replicated(mesh)),
      out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)),
      donate_argnums=(0,),
  )
