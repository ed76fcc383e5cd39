"""Optimisers: LARS with masked weight decay and trust ratio, LR schedules, scaling rules."""

from __future__ import annotations

import math

import jax
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


def create_optimizer(
  optim_config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule
) -> optax.GradientTransformation:
  """The optimiser named by ``optim_config.name`` ("lars", "sgd" or "adamw")."""
  name = optim_config.name
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
      optax.add_decayed_weights(optim_config.weight_decay, mask=lars_mask),
      optax.sgd(learning_rate_fn, momentum=optim_config.momentum),
    )
  if name == "adamw":
    return optax.adamw(
      learning_rate_fn,
      b2=optim_config.get("b2", 0.999),
      eps=optim_config.get("eps", 1e-8),
      weight_decay=optim_config.weight_decay,
      mask=lars_mask,
    )
  raise ValueError(f"optim.name must be 'lars', 'sgd' or 'adamw', got {name!r}.")
