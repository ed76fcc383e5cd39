"""Optimisers: LARS with masked weight decay and trust ratio, LR schedules, scaling rules."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax

# Parameter names that LARS leaves alone: biases and BatchNorm/LayerNorm scales/offsets
# get neither weight decay nor trust-ratio adaptation (SimCLR, You et al. 2017), nor do a
# ViT's class token and learned position embeddings (MoCo v3, DINO: decay on kernels only).
_UNADAPTED_NAMES = ("bias", "scale", "cls_token", "pos_embedding", "logit_scale", "logit_bias")
# Modules whose parameters never train (a ViT's frozen patch projection, ``models.vit``):
# their gradients are zero, and without weight decay every optimiser here leaves them as
# they are.
_FROZEN_PREFIX = "frozen_"


def scaled_learning_rate(base_lr: float, global_batch_size: int, scaling: str) -> float:
  """The peak learning rate: ``base_lr * B / 256`` (linear) or ``base_lr * sqrt(B)``."""
  if scaling == "linear":
    return base_lr * global_batch_size / 256
  if scaling == "sqrt":
    return base_lr * math.sqrt(global_batch_size)
  if scaling == "none":
    return base_lr
  raise ValueError(f"optim.lr_scaling must be 'linear', 'sqrt' or 'none', got {scaling!r}.")


def create_learning_rate_fn(peak_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to ``peak_lr``, then cosine decay to 0 at ``total_steps``."""
  if total_steps <= 0:
    raise ValueError(f"total_steps must be > 0, got {total_steps}.")
  if warmup_steps >= total_steps:
    # A run shorter than its warm-up (a smoke test) never reaches the cosine.
    return optax.linear_schedule(0.0, peak_lr, warmup_steps)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak_lr,
    warmup_steps=warmup_steps,
    decay_steps=total_steps,
    end_value=0.0,
  )


def _key(entry) -> str:
  return str(getattr(entry, "key", ""))


def lars_mask(params) -> object:
  """True for the parameters LARS adapts and weight decay shrinks: the kernels.

  False for biases, normalisation scales and offsets, a ViT's class token and
  position embeddings, and anything under a ``frozen_*`` module.
  """

  def adapted(path, _) -> bool:
    if any(_key(entry).startswith(_FROZEN_PREFIX) for entry in path):
      return False
    return _key(path[-1]) not in _UNADAPTED_NAMES

  return jax.tree_util.tree_map_with_path(adapted, params)


def weight_decay_schedule(optim_config: ml_collections.ConfigDict, num_steps: int):
  """``optim.weight_decay``, or with ``optim.weight_decay_end >= 0`` a half cosine from it to
  ``weight_decay_end`` over ``num_steps`` (DINO: 0.04 -> 0.4); constant if ``num_steps`` is 0."""
  start, end = optim_config.weight_decay, optim_config.get("weight_decay_end", -1.0)
  if end < 0:
    return start
  if num_steps <= 0:
    return optax.constant_schedule(start)
  return optax.cosine_decay_schedule(start, num_steps, alpha=end / start if start else 0.0)


def add_decayed_weights(weight_decay, mask) -> optax.GradientTransformation:
  """``optax.add_decayed_weights``, also for a schedule of the step (which optax's takes not).

  A schedule's transform keeps its own step count; a constant is optax's own transform
  (so the optimiser state, and checkpoints, stay as they were without a schedule).
  """
  if not callable(weight_decay):
    return optax.add_decayed_weights(weight_decay, mask=mask)

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params):
    if params is None:
      raise ValueError("add_decayed_weights needs the parameters.")
    decay = weight_decay(state.count)
    updates = jax.tree.map(lambda g, p: g + decay * p, updates, params)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.masked(optax.GradientTransformation(init_fn, update_fn), mask)


def create_optimizer(
  optim_config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule, num_steps: int = 0
) -> optax.GradientTransformation:
  """The optimiser named by ``optim_config.name`` ("lars", "sgd" or "adamw").

  ``num_steps`` (the run's length) sizes the weight-decay schedule of SGD and AdamW when
  ``optim.weight_decay_end >= 0`` (:func:`weight_decay_schedule`).
  """
  name = optim_config.name
  weight_decay = weight_decay_schedule(optim_config, num_steps)
  if name == "lars" and callable(weight_decay):
    raise ValueError(
      "optim.weight_decay_end (a weight-decay schedule) works with optim.name='sgd' or "
      "'adamw'; LARS takes a constant optim.weight_decay: set optim.weight_decay_end=-1."
    )
  if name == "lars":
    return optax.lars(
      learning_rate=learning_rate_fn,
      weight_decay=optim_config.weight_decay,
      weight_decay_mask=lars_mask,
      trust_coefficient=optim_config.trust_coefficient,
      eps=0.0,
      trust_ratio_mask=lars_mask,
      momentum=optim_config.momentum,
      nesterov=False,
    )
  if name == "sgd":
    return optax.chain(
      add_decayed_weights(weight_decay, lars_mask),
      optax.sgd(learning_rate_fn, momentum=optim_config.momentum),
    )
  if name == "adamw":
    b2, eps = optim_config.get("b2", 0.999), optim_config.get("eps", 1e-8)
    if not callable(weight_decay):
      return optax.adamw(
        learning_rate_fn, b2=b2, eps=eps, weight_decay=weight_decay, mask=lars_mask
      )
    # optax.adamw's own chain, its decoupled weight decay on a schedule.
    return optax.chain(
      optax.scale_by_adam(b2=b2, eps=eps),
      add_decayed_weights(weight_decay, lars_mask),
      optax.scale_by_learning_rate(learning_rate_fn),
    )
  raise ValueError(f"optim.name must be 'lars', 'sgd' or 'adamw', got {name!r}.")
