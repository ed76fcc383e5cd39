"""Optimisers: LARS, SGD and AdamW with per-recipe masks, LR schedules, scaling rules."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cljax import sharding

# Parameter names that ``lars_mask`` leaves alone: biases and BatchNorm/LayerNorm
# scales/offsets (SimCLR, You et al. 2017), a ViT's class token and learned position
# embeddings, and CLIP's logit scale and bias. Of the official recipes only open_clip exempts
# the tokens (DINO and MoCo v3 decay them); ``optim.decay_mask`` picks each recipe's own rule.
_UNADAPTED_NAMES = ("bias", "scale", "cls_token", "pos_embedding", "logit_scale", "logit_bias")
# Modules whose parameters never train (a ViT's frozen patch projection, ``models.vit``):
# their gradients are zero, and without weight decay every optimiser here leaves them as
# they are.
_FROZEN_PREFIX = "frozen_"
# Modules whose parameters are stacked over a leading layer axis (a ViT's scanned blocks,
# ``models.vit.STACKED_PREFIX``): that axis does not count in a parameter's dimensions.
_STACKED_PREFIX = "scan_"


# The values of optim.lr_scaling and optim.name (cljax.validate checks them up front).
LR_SCALINGS = ("linear", "sqrt", "sqrt_wrt_1024", "none")
OPTIMIZERS = ("lars", "sgd", "adamw")
# The values of optim.lars_order: where LARS applies the learning rate (:func:`create_lars`).
LARS_ORDERS = ("lr_then_momentum", "momentum_then_lr")


def scaled_learning_rate(base_lr: float, global_batch_size: int, scaling: str) -> float:
  """The peak learning rate: ``base_lr * B / 256`` (linear), ``base_lr * sqrt(B)`` (sqrt) or
  ``base_lr * sqrt(B / 1024)`` (DINOv2's ``sqrt_wrt_1024``)."""
  if scaling == "linear":
    return base_lr * global_batch_size / 256
  if scaling == "sqrt":
    return base_lr * math.sqrt(global_batch_size)
  if scaling == "sqrt_wrt_1024":
    return base_lr * math.sqrt(global_batch_size / 1024)
  if scaling == "none":
    return base_lr
  raise ValueError(f"optim.lr_scaling must be one of {LR_SCALINGS}, got {scaling!r}.")


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
  position embeddings, and anything under a ``frozen_*`` module. On CLIP's models this is
  open_clip's rule: ``ndim <= 1`` (biases, norm gains, ``logit_scale``) and its models'
  ``no_weight_decay()`` (``class_embedding``, ``positional_embedding`` of both towers).
  """

  def adapted(path, _) -> bool:
    return not _frozen(path) and _key(path[-1]) not in _UNADAPTED_NAMES

  return jax.tree_util.tree_map_with_path(adapted, params)


def _ndim(path, p) -> int:
  """A parameter's dimensions, without the layer axis of stacked (scanned) blocks."""
  stacked = any(_key(entry).startswith(_STACKED_PREFIX) for entry in path)
  return len(p.shape) - int(stacked)


def _frozen(path) -> bool:
  return any(_key(entry).startswith(_FROZEN_PREFIX) for entry in path)


def matrix_mask(params) -> object:
  """True for parameters of two or more dimensions that are not biases (PyTorch's
  ``p.ndim >= 2``: a Flax attention bias of shape (heads, head_dim) is PyTorch's 1-D
  ``in_proj_bias``); False for biases, normalisation scales, scalars and ``frozen_*``.

  The official rule of DINO (``get_params_groups``: ``.bias`` or 1-D), Barlow Twins and MoCo
  v3's LARS (``p.ndim == 1`` / ``p.ndim > 1``); on a ResNet, the same parameters as
  :func:`lars_mask`, which differs on a ViT's class token and position embeddings.
  """

  def decayed(path, p) -> bool:
    return not _frozen(path) and _key(path[-1]) != "bias" and _ndim(path, p) >= 2

  return jax.tree_util.tree_map_with_path(decayed, params)


def all_mask(params) -> object:
  """True for every parameter but those under a ``frozen_*`` module (which never train)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: not _frozen(path), params)


def _normalisation(name: str) -> bool:
  """Whether a module name is a normalisation layer's: "norm" in it (DINOv2's ViT: norm1,
  norm2, norm; Flax's LayerNorm_0) or cljax's BatchNorm modules ("bn...")."""
  return "norm" in name.lower() or name.startswith("bn")


def dinov2_mask(params) -> object:
  """DINOv2's rule (``get_params_groups_with_decay``): every parameter but biases, anything
  under a normalisation layer (the official ``"norm" in name``) and LayerScale's ``gamma``.

  Unlike :func:`matrix_mask` it decays the class, register and mask tokens, the position
  embeddings and the DINO head's weight-norm gain, as the official code does.
  """

  def decayed(path, _) -> bool:
    names = [_key(entry) for entry in path]
    excluded = names[-1] in ("bias", "gamma") or any(_normalisation(n) for n in names)
    return not (_frozen(path) or excluded)

  return jax.tree_util.tree_map_with_path(decayed, params)


# optim.decay_mask -> the parameters weight decay (and LARS's trust ratio) applies to.
DECAY_MASKS = {
  "kernels": lars_mask,
  "matrices": matrix_mask,
  "all": all_mask,
  "dinov2": dinov2_mask,
}


def decay_mask(optim_config: ml_collections.ConfigDict) -> Callable[[object], object]:
  """The mask ``optim.decay_mask`` names: "kernels" (:func:`lars_mask`), "matrices"
  (:func:`matrix_mask`) or "all" (:func:`all_mask`)."""
  name = optim_config.get("decay_mask", "kernels")
  if name not in DECAY_MASKS:
    raise ValueError(f"optim.decay_mask must be one of {tuple(DECAY_MASKS)}, got {name!r}.")
  return DECAY_MASKS[name]


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
  optim_config: ml_collections.ConfigDict,
  learning_rate_fn: optax.Schedule,
  num_steps: int = 0,
  *,
  freeze_mask: Callable[[object], object] | None = None,
  freeze_steps: int = 0,
) -> optax.GradientTransformation:
  """The optimiser named by ``optim_config.name`` ("lars", "sgd" or "adamw").

  Weight decay (and LARS's trust ratio) apply to the parameters ``optim.decay_mask`` selects
  (:func:`decay_mask`). ``num_steps`` (the run's length) sizes the weight-decay schedule of
  SGD and AdamW when ``optim.weight_decay_end >= 0`` (:func:`weight_decay_schedule`).

  With ``freeze_mask``, the parameters where ``freeze_mask(params)`` is True are frozen for
  the first ``freeze_steps`` updates as if they had no gradient (PyTorch's ``p.grad = None``,
  DINO's last layer): :func:`freeze_for_steps`. Their optimiser group exists whatever
  ``freeze_steps`` is (0: never frozen), so the state's tree, and what a checkpoint must
  hold, depend on the config alone, never on a run length that evaluation cannot know.
  """
  make = lambda offset: _create_optimizer(optim_config, learning_rate_fn, num_steps, offset)
  if freeze_mask is None:
    return make(0)
  return freeze_for_steps(make, freeze_mask, max(freeze_steps, 0))


def _shifted(schedule, offset: int):
  """``schedule`` read ``offset`` steps later (constants and offset 0 unchanged)."""
  if offset == 0 or not callable(schedule):
    return schedule
  return lambda count: schedule(count + offset)


def _create_optimizer(
  optim_config: ml_collections.ConfigDict, learning_rate_fn, num_steps: int, offset: int
) -> optax.GradientTransformation:
  """:func:`create_optimizer` without a freeze; its schedules start at step ``offset``."""
  name = optim_config.name
  mask = decay_mask(optim_config)
  weight_decay = _shifted(weight_decay_schedule(optim_config, num_steps), offset)
  learning_rate_fn = _shifted(learning_rate_fn, offset)
  if name == "lars" and callable(weight_decay):
    raise ValueError(
      "optim.weight_decay_end (a weight-decay schedule) works with optim.name='sgd' or "
      "'adamw'; LARS takes a constant optim.weight_decay: set optim.weight_decay_end=-1."
    )
  if name == "lars":
    return create_lars(optim_config, learning_rate_fn, mask)
  if name == "sgd":
    return optax.chain(
      add_decayed_weights(weight_decay, mask),
      optax.sgd(learning_rate_fn, momentum=optim_config.momentum),
    )
  if name == "adamw":
    b2, eps = optim_config.get("b2", 0.999), optim_config.get("eps", 1e-8)
    if not callable(weight_decay):
      return optax.adamw(learning_rate_fn, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
    # optax.adamw's own chain, its decoupled weight decay on a schedule.
    return optax.chain(
      optax.scale_by_adam(b2=b2, eps=eps),
      add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate_fn),
    )
  raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {name!r}.")


def create_lars(
  optim_config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule, mask
) -> optax.GradientTransformation:
  """LARS: weight decay and trust ratio on the parameters ``mask`` selects, then momentum and
  the learning rate in the order ``optim.lars_order`` names.

  The orders differ whenever the rate changes (warm-up, cosine). "lr_then_momentum" scales
  each step's update u before the momentum sums it, ``v <- m v + lr_t u; p <- p - v``
  (``optax.lars``; SimCLR's TF ``LARSOptimizer``: ``next_v = m v + scaled_lr * grad``).
  "momentum_then_lr" scales the sum, ``v <- m v + u; p <- p - lr_t v``: PyTorch's SGD rule,
  in Barlow Twins' and MoCo v3's ``LARS.step`` and under SwAV's ``LARC``, and BYOL's
  ``scale_by_lars`` followed by ``optax.scale(-lr)``. Both chain ``optax.lars``'s own
  transforms, so the first is ``optax.lars`` exactly, its state included.

  Raises:
    ValueError: if ``optim.lars_order`` is not one of :data:`LARS_ORDERS`.
  """
  order = optim_config.get("lars_order", LARS_ORDERS[0])
  if order not in LARS_ORDERS:
    raise ValueError(f"optim.lars_order must be one of {LARS_ORDERS}, got {order!r}.")
  momentum = optax.trace(decay=optim_config.momentum, nesterov=False)
  learning_rate = optax.scale_by_learning_rate(learning_rate_fn)
  last = (learning_rate, momentum) if order == "lr_then_momentum" else (momentum, learning_rate)
  trust_ratio = scale_by_trust_ratio(optim_config.trust_coefficient)
  return optax.chain(
    optax.add_decayed_weights(optim_config.weight_decay, mask=mask),
    optax.masked(trust_ratio, mask),
    *last,
  )


def scale_by_trust_ratio(
  trust_coefficient: float, axis_name: str | None = sharding.DATA_AXIS
) -> optax.GradientTransformation:
  """``optax.scale_by_trust_ratio(trust_coefficient=...)`` with whole-leaf norms under FSDP.

  Each update is scaled by ``trust_coefficient * ||p|| / ||u||`` (1 where either norm is 0),
  optax's formula. Inside the train step's ``shard_map`` a parameter that FSDP splits over
  ``axis_name`` arrives as this device's part, and optax would take the norm of that part:
  every shard its own trust ratio, a different optimiser (tests/test_fsdp.py shows the
  step then differs). Here the squares are summed over the axis first
  (``sharding.squared_norm``); on replicated leaves, and outside ``shard_map``, this is
  optax's transform exactly. Its state is optax's (empty), so checkpoints are unchanged.
  """

  def update_fn(updates, state, params):
    if params is None:
      raise ValueError("scale_by_trust_ratio needs the parameters.")

    def scale(path, u, p):
      # Stacked (scanned) blocks: one ratio per layer, as for the unstacked blocks.
      axes = tuple(range(1, p.ndim)) if _ndim(path, p) < p.ndim else None
      p_norm = jnp.sqrt(sharding.squared_norm(p, axis_name, axes)).astype(p.dtype)
      u_norm = jnp.sqrt(sharding.squared_norm(u, axis_name, axes)).astype(p.dtype)
      ratio = trust_coefficient * p_norm / u_norm
      return u * jnp.where((p_norm == 0.0) | (u_norm == 0.0), jnp.ones((), p.dtype), ratio)

    return jax.tree_util.tree_map_with_path(scale, updates, params), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def freeze_for_steps(
  make_tx: Callable[[int], optax.GradientTransformation],
  freeze_mask: Callable[[object], object],
  freeze_steps: int,
) -> optax.GradientTransformation:
  """``make_tx(0)`` for most parameters; those ``freeze_mask`` selects are frozen at first.

  The official DINO code sets the last layer's ``grad`` to None for its first epoch, so
  PyTorch's optimiser skips it: no update, no weight decay, and its Adam state (moments and
  step count) starts when the freeze ends. A zero gradient instead would leave the moments
  near zero while the shared step count runs on, and the first updates after the freeze
  would be several times a fresh Adam's. Here the frozen parameters have an optimiser of
  their own, ``make_tx(freeze_steps)`` (the same one with its learning-rate and
  weight-decay schedules read ``freeze_steps`` later, so it follows the run's schedule),
  behind ``optax.transforms.conditionally_mask``: for the first ``freeze_steps`` updates
  their update is zero and its state is left as it was; after that it runs from its
  initial state. The condition is traced (``lax.cond`` on a step count in the state), so
  the step compiles once.
  """
  labels = lambda params: jax.tree.map(lambda m: "frozen" if m else "free", freeze_mask(params))
  frozen = optax.transforms.conditionally_mask(
    make_tx(freeze_steps), lambda count: count >= freeze_steps
  )
  return optax.multi_transform({"free": make_tx(0), "frozen": frozen}, labels)


def applied_count(opt_state) -> jax.Array:
  """How many updates the optimiser has applied: the step count its schedules read.

  The largest ``count`` in the state (optax's schedules and Adam keep one each and advance
  them together; a frozen group's, :func:`freeze_for_steps`, is smaller). The train step
  keeps the whole state when it skips a non-finite step, so this can lag ``state.step``.

  Raises:
    ValueError: if the state holds no ``count`` (an optimiser without a schedule).
  """
  counts = [c for _, c in optax.tree_utils.tree_get_all_with_path(opt_state, "count")]
  if not counts:
    raise ValueError("The optimiser state holds no step count ('count'): is lr a schedule?")
  return functools.reduce(jnp.maximum, counts)


def clip_by_global_norm_per_module(
  max_norm: float, axis_name: str | None = sharding.DATA_AXIS
) -> optax.GradientTransformation:
  """Clips the gradient of each top-level module to ``max_norm`` by its own global norm.

  DINOv2 clips each student module (backbone, DINO head, iBOT head) on its own
  (``for v in model.student.values(): v.clip_grad_norm_(clip_grad)``); PyTorch's rule
  scales by ``max_norm / (norm + 1e-6)`` when that is below 1. Norms are of whole leaves
  under FSDP (``sharding.global_norm``), so every device scales by the same factor. The
  updates must be a dict of modules; the state is empty.
  """
  if max_norm <= 0:
    raise ValueError(f"max_norm must be > 0, got {max_norm}.")

  def update_fn(updates, state, params=None):
    del params

    def clip(tree):
      coef = max_norm / (sharding.global_norm(tree, axis_name) + 1e-6)
      return jax.tree.map(lambda g: g * jnp.minimum(coef, 1.0).astype(g.dtype), tree)

    return {name: clip(tree) for name, tree in updates.items()}, state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_multipliers(
  multipliers: Callable[[object], object],
  frozen_mask: Callable[[object], object] | None = None,
  freeze_steps: int = 0,
) -> optax.GradientTransformation:
  """Scales each update by a per-parameter learning-rate multiplier, and by 0 while frozen.

  Placed after the learning rate (and the decoupled weight decay), this is PyTorch's
  per-group ``lr * lr_multiplier``: DINOv2's layer-wise decay and patch-embedding factor.
  ``multipliers(params)`` gives a scalar or an array broadcastable to each leaf (one value
  per layer of stacked blocks). The parameters ``frozen_mask`` selects get 0 for the first
  ``freeze_steps`` updates: DINOv2's last-layer freeze, a learning rate of 0 while the
  optimiser's moments still see the gradient (unlike DINO's, :func:`freeze_for_steps`).
  """

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    factors = multipliers(updates)
    if frozen_mask is not None and freeze_steps > 0:
      active = (state.count >= freeze_steps).astype(jnp.float32)
      factors = jax.tree.map(
        lambda f, frozen: f * active if frozen else f, factors, frozen_mask(updates)
      )
    updates = jax.tree.map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, factors)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)
