"""DINOv2 (Oquab et al. 2024): DINO's self-distillation with iBOT's masked patches and KoLeo.

A port of the official ``dinov2/train/ssl_meta_arch.py`` (``SSLMetaArch.forward_backward``)
and ``dinov2/train/train.py`` (schedules, optimiser), on DINOv2's ViT
(``cljax.models.vit_dinov2``, ``model.name = "vit_dinov2"``).

The student is the ViT, the DINO head on its class token and the iBOT head on its patch
tokens (the DINO head itself with ``dinov2.ibot_separate_head=False``); the teacher is an
EMA of the whole student tree (no stochastic depth). One step, inside the train step's
``shard_map`` over ``'data'``:

1. masks: block-wise iBOT masks for the 2n global crops of this device
   (``data.masking.block_masks`` over the 2N global crops of the global batch, keyed by the
   step: resume and resharding give the same masks), and the masked patches as a buffer of
   static size (``masking.masked_tokens``, the official ``mask_indices_list``).
2. teacher, no gradient: the ViT on the unmasked global crops; the DINO head on the class
   tokens, the iBOT head on the masked patch tokens; targets by the running-mean centring
   and softmax (``dinov2.centering = "centering"``) or Sinkhorn-Knopp
   (``"sinkhorn_knopp"``, ``losses.sinkhorn_knopp_teacher``), at the step's temperature.
3. student: the ViT on the masked global crops and on the local crops (one forward per
   resolution); the DINO head on all class tokens, the iBOT head on the masked patches.
4. loss = ``dino_loss_weight * dinov2_loss`` (each student crop against the other global
   crop's target) + ``koleo_loss_weight * `` KoLeo of each global crop's student class
   tokens + ``ibot_loss_weight * ibot_masked_patch_loss``.
5. after the optimiser: teacher <- EMA (``ema`` section: 0.992 -> 1 by a cosine), and the
   two centres by their running means (``centering`` only).

The optimiser is AdamW (``optim`` section, its weight decay 0.04 -> 0.4) with DINOv2's
additions: each module's gradient clipped to ``dinov2.clip_grad`` by its own norm, the
learning rate multiplied per parameter by ``layerwise_decay ** (depth + 1 - layer)`` and by
``patch_embed_lr_mult`` on the patch embedding, and the heads' last layers at learning rate
0 for ``freeze_last_layer_epochs`` (``DINOv2.create_optimizer``). Departures from the
official code are listed in docs/fidelity.md ("DINOv2").
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec

from cljax import losses, models, optim, sharding
from cljax.data import masking
from cljax.methods.base import Method, StepOutput, copy_tree, ema_decay
from cljax.methods.dino import DINOHead, last_layer_mask
from cljax.models import vit, vit_dinov2

CENTERINGS = ("centering", "sinkhorn_knopp")  # The values of dinov2.centering.
EVAL_FEATURES = ("cls", "cls_avgpool")  # The values of dinov2.eval_features.
# Streams of the run key for the step's masks and stochastic depth.
_MASK_STREAM, _DROP_PATH_STREAM = 7001, 7002


def _head_config(out_dim: int = 65536) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.out_dim = out_dim  # Prototypes.
  c.hidden_dim = 2048
  c.bottleneck_dim = 256
  c.num_layers = 3
  return c


class DINOv2Model(nn.Module):
  """DINOv2's ViT (under ``encoder``, as the other methods' encoders: fine-tuning and the
  linear probes find it there) with its DINO head and (optionally separate) iBOT head.

  ``apply`` returns ``(features, z)``: the evaluation features (``eval_features``: the
  class token, or the class token and the mean of the patch tokens concatenated, as
  DINOv2's linear evaluation) and the DINO head's l2-normalised bottleneck embedding of
  the class token. Training calls the parts by name: ``tokens``, ``dino_head_outputs``,
  ``ibot_head_outputs``.
  """

  encoder: models.ClassToken
  dino_head: DINOHead
  ibot_head: DINOHead | None = None
  eval_features: str = "cls_avgpool"

  def __call__(self, x: jax.Array, train: bool = False):
    tokens = self.encoder.tokens(x, train=train)
    if self.is_initializing() and self.ibot_head is not None:
      self.ibot_head(tokens["patches"][:, 0])
    z, _ = self.dino_head(tokens["cls"])
    if self.eval_features == "cls":
      return tokens["cls"], z
    return jnp.concatenate([tokens["cls"], jnp.mean(tokens["patches"], axis=1)], axis=-1), z

  def tokens(self, x: jax.Array, masks: jax.Array | None = None, train: bool = True) -> dict:
    return self.encoder.tokens(x, masks, train=train)

  def dino_head_outputs(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.dino_head(x)

  def ibot_head_outputs(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return (self.ibot_head or self.dino_head)(x)


def layerwise_multipliers(params: Any, decay: float, patch_embed_mult: float, depth: int) -> Any:
  """DINOv2's learning-rate multiplier of each parameter (``get_params_groups_with_decay``).

  In the ViT (``encoder/backbone``, the official ``backbone``): ``decay ** (depth + 1 -
  layer)``, with layer 0 for the patch embedding, position embeddings, class and mask
  tokens, ``i + 1`` for block i and ``depth + 1`` for the rest (final norm, register
  tokens); the patch embedding's is also multiplied by ``patch_embed_mult``. 1 for the
  heads. Stacked (scanned) blocks get one value per layer, shaped to broadcast over the leaf.
  """

  def multiplier(path, p):
    names = [str(getattr(e, "key", "")) for e in path]
    if "backbone" not in names:
      return 1.0
    stacked = next((n for n in names if n.startswith(vit.STACKED_PREFIX)), None)
    block = next((n for n in names if n.startswith("blocks_")), None)
    if stacked is not None:
      layers = np.arange(1, depth + 1, dtype=np.float32)
      value = decay ** (depth + 1 - layers)
      return jnp.asarray(value.reshape((depth,) + (1,) * (p.ndim - 1)))
    if block is not None:
      layer = int(block.split("_")[1]) + 1
    elif any(n in ("patch_embed", "pos_embed", "mask_token", "cls_token") for n in names):
      layer = 0
    else:
      layer = depth + 1
    value = decay ** (depth + 1 - layer)
    return value * patch_embed_mult if "patch_embed" in names else value

  return jax.tree_util.tree_map_with_path(multiplier, params)


class DINOv2(Method):
  """DINOv2: image-level DINO, masked-patch iBOT and KoLeo, on a multi-crop ViT.

  Method state ``{"teacher_params", "center", "ibot_center"}``: the EMA teacher (the whole
  student tree) and the running centres of the DINO and iBOT teacher outputs (used with
  ``dinov2.centering = "centering"`` only).

  ``StepOutput.features`` are the student's class tokens of the two global crops (online
  probe); ``embeddings`` and ``pairs`` their DINO-head bottleneck embeddings.

  Metrics: ``dino_loss``, ``ibot_loss``, ``koleo_loss`` (unweighted), ``masked_patches``
  (mean masked patches per global crop), ``teacher_temperature``, ``ema_decay`` and
  ``last_layer_frozen``.

  References:
    Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision",
    TMLR 2024. https://arxiv.org/abs/2304.07193
  """

  name = "dinov2"
  eval_network = "teacher"
  mirrors_params = ("teacher_params",)

  @classmethod
  def config_sections(cls) -> dict[str, ml_collections.ConfigDict]:
    """``dinov2``: the official ``ssl_default_config.yaml`` values (the recipes set the
    ViT-L/g yamls' where they differ)."""
    c = ml_collections.ConfigDict()
    c.centering = "centering"  # | "sinkhorn_knopp" (the ViT-L/g recipes).
    c.sinkhorn_iterations = 3
    c.center_momentum = 0.9
    c.student_temperature = 0.1
    c.teacher_temperature = 0.07
    c.warmup_teacher_temperature = 0.04
    c.warmup_teacher_temperature_epochs = 30.0
    c.dino_loss_weight = 1.0
    c.koleo_loss_weight = 0.1
    c.ibot_loss_weight = 1.0
    c.head = _head_config()
    c.ibot_separate_head = False
    c.ibot_head = _head_config()  # Used with ibot_separate_head only.
    c.mask_probability = 0.5  # The fraction of global crops that are masked.
    c.mask_ratio_min = 0.1
    c.mask_ratio_max = 0.5
    c.freeze_last_layer_epochs = 1.0
    c.layerwise_decay = 0.9
    c.patch_embed_lr_mult = 0.2
    c.clip_grad = 3.0  # 0: no clipping.
    # Evaluation features: "cls_avgpool" (class token + mean patch token, DINOv2's linear
    # evaluation) | "cls"; kNN always reads the class token.
    c.eval_features = "cls_avgpool"
    return {"dinov2": c}

  def __init__(self, config, num_steps: int = 0, steps_per_epoch: int = 0):
    super().__init__(config, num_steps, steps_per_epoch)
    cfg = config.dinov2
    if config.model.name != "vit_dinov2":
      raise ValueError(
        f"method 'dinov2' needs model.name='vit_dinov2' (DINOv2's ViT), got {config.model.name!r}."
      )
    if cfg.centering not in CENTERINGS:
      raise ValueError(f"dinov2.centering must be one of {CENTERINGS}, got {cfg.centering!r}.")
    if cfg.eval_features not in EVAL_FEATURES:
      raise ValueError(
        f"dinov2.eval_features must be one of {EVAL_FEATURES}, got {cfg.eval_features!r}."
      )
    self.sizes = vit_dinov2.parse_variant(config.model.variant)

  # ---- The model and the method's state.

  def create_model(self, bn_axis_name: str | None = None) -> DINOv2Model:
    del bn_axis_name  # No BatchNorm.
    cfg = self.config.dinov2
    dtype = models.dtype_from_name(self.config.model.dtype)
    head = lambda h: DINOHead(
      out_dim=h.out_dim,
      hidden_dim=h.hidden_dim,
      bottleneck_dim=h.bottleneck_dim,
      num_layers=h.num_layers,
      # The official head trains its weight-norm gain (``weight_g`` filled with 1).
      norm_last_layer=False,
      dtype=dtype,
    )
    return DINOv2Model(
      encoder=models.ClassToken(models.create_dinov2_backbone(self.config.model)),
      dino_head=head(cfg.head),
      ibot_head=head(cfg.ibot_head) if cfg.ibot_separate_head else None,
      eval_features=cfg.eval_features,
    )

  def init_state(self, rng: jax.Array, variables: dict) -> Any:
    del rng
    cfg = self.config.dinov2
    ibot_dim = cfg.ibot_head.out_dim if cfg.ibot_separate_head else cfg.head.out_dim
    return {
      "teacher_params": copy_tree(variables["params"]),
      "center": jnp.zeros((cfg.head.out_dim,), jnp.float32),
      "ibot_center": jnp.zeros((ibot_dim,), jnp.float32),
    }

  def state_specs(self) -> Any:
    return PartitionSpec()

  def eval_variables(self, state: Any) -> dict:
    """The teacher's, as DINOv2 evaluates it."""
    return {"params": state.method_state["teacher_params"], "batch_stats": {}}

  def knn_features(self, features: np.ndarray) -> np.ndarray:
    """The class token (the first ``embed_dim`` columns): DINOv2's kNN reads it alone."""
    return features[:, : self.sizes["embed_dim"]]

  def describe(self) -> str:
    cfg = self.config.dinov2
    heads = "separate" if cfg.ibot_separate_head else "shared"
    return f"; {cfg.centering} centring, {heads} DINO/iBOT heads"

  # ---- Schedules and the optimiser.

  def decay(self, step: jax.Array) -> jax.Array:
    """The teacher's EMA decay at ``step`` (``ema`` section; DINOv2: 0.992 cosine to 1)."""
    return ema_decay(self.config, step, self.num_steps)

  def teacher_temperature(self, step: jax.Array) -> jax.Array:
    """Linear warm-up from ``warmup_teacher_temperature``, then ``teacher_temperature``."""
    cfg = self.config.dinov2
    if cfg.warmup_teacher_temperature_epochs > 0 and self.steps_per_epoch <= 0:
      return jnp.asarray(cfg.warmup_teacher_temperature, jnp.float32)
    return losses.teacher_temperature_schedule(
      step,
      warmup_start=cfg.warmup_teacher_temperature,
      final=cfg.teacher_temperature,
      warmup_steps=int(round(cfg.warmup_teacher_temperature_epochs * self.steps_per_epoch)),
    )

  @property
  def freeze_steps(self) -> int:
    """The first updates during which the heads' last layers have learning rate 0."""
    return max(math.ceil(self.config.dinov2.freeze_last_layer_epochs * self.steps_per_epoch), 0)

  def create_optimizer(self, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
    """The ``optim`` section's AdamW between DINOv2's per-module clipping and its
    per-parameter learning-rate multipliers (layer-wise decay, patch embedding, the
    last-layer freeze)."""
    cfg = self.config.dinov2
    if self.config.optim.name != "adamw":
      raise ValueError(f"dinov2 trains with optim.name='adamw', got {self.config.optim.name!r}.")
    depth = self.sizes["depth"]
    multipliers = lambda tree: layerwise_multipliers(
      tree, cfg.layerwise_decay, cfg.patch_embed_lr_mult, depth
    )
    parts = [] if cfg.clip_grad <= 0 else [optim.clip_by_global_norm_per_module(cfg.clip_grad)]
    parts += [
      optim.create_optimizer(self.config.optim, learning_rate_fn, self.num_steps),
      optim.scale_by_multipliers(multipliers, last_layer_mask, self.freeze_steps),
    ]
    return optax.chain(*parts)

  def last_layer_frozen(self, count: jax.Array) -> jax.Array:
    return jnp.asarray(count < self.freeze_steps, jnp.float32)

  # ---- One step.

  def _grid(self, image_size: int) -> int:
    return image_size // self.sizes["patch_size"]

  def views(self, batch: dict, rng: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
    """The base views, ``"masks"``: (2n, P) iBOT masks of this device's global crops, and
    ``"drop_path_key"``: this device's key for the student's stochastic depth.

    Crop c of example j of the global batch is image ``c * N + j`` of the 2N global crops
    (the official collate's order), masked by ``block_masks`` from the step's key.
    """
    views = super().views(batch, rng, step)
    # Stochastic depth: this device's own key (its images are its own).
    drop_key = jax.random.fold_in(jax.random.fold_in(rng, _DROP_PATH_STREAM), step)
    views["drop_path_key"] = jax.random.fold_in(drop_key, sharding.device_index())
    cfg = self.config.dinov2
    x = views["global"]
    n, side = x.shape[0] // 2, x.shape[1]
    total = self.config.data.global_batch_size
    rows = sharding.device_index() * n + jnp.arange(n)
    index = jnp.concatenate([rows, total + rows])
    key = jax.random.fold_in(jax.random.fold_in(rng, _MASK_STREAM), step)
    views["masks"] = masking.block_masks(
      key,
      2 * total,
      self._grid(side),
      index=index,
      mask_ratio=(cfg.mask_ratio_min, cfg.mask_ratio_max),
      mask_probability=cfg.mask_probability,
    )
    return views

  def loss(self, params: Any, state: Any, views: dict, batch: dict) -> tuple[jax.Array, StepOutput]:
    cfg = self.config.dinov2
    axis, apply = self.axis_name, state.apply_fn
    x, masks = views["global"], views["masks"]
    n, num_patches = x.shape[0] // 2, masks.shape[1]
    total = self.config.data.global_batch_size
    do_ibot = cfg.ibot_loss_weight > 0
    capacity = masking.max_masked_patches(
      2 * total, 2 * n, num_patches, (cfg.mask_ratio_min, cfg.mask_ratio_max),
      cfg.mask_probability,
    )  # fmt: skip
    indices, weights = masking.masked_tokens(masks, capacity)
    temperature = self.teacher_temperature(state.step)
    ms = state.method_state

    # Teacher: the unmasked global crops, no stochastic depth, no gradient.
    teacher = {"params": ms["teacher_params"]}
    t_tokens = apply(teacher, x, None, False, method="tokens")
    _, t_cls = apply(teacher, t_tokens["cls"], method="dino_head_outputs")
    t_cls = jax.lax.stop_gradient(t_cls.reshape(2, n, -1))
    t_patch = jnp.zeros((0, 0))
    if do_ibot:
      patches = t_tokens["patches"].reshape(-1, t_tokens["patches"].shape[-1])[indices]
      _, t_patch = apply(teacher, patches, method="ibot_head_outputs")
      t_patch = jax.lax.stop_gradient(t_patch)
    valid = weights > 0
    if cfg.centering == "sinkhorn_knopp":
      iters = cfg.sinkhorn_iterations
      t_cls_probs = losses.sinkhorn_knopp_teacher(t_cls, temperature, iters, axis)
      if do_ibot:
        t_patch_probs = losses.sinkhorn_knopp_teacher(t_patch, temperature, iters, axis, mask=valid)
    else:
      t_cls_probs = jax.nn.softmax((t_cls - ms["center"]) / temperature, axis=-1)
      if do_ibot:
        t_patch_probs = jax.nn.softmax((t_patch - ms["ibot_center"]) / temperature, axis=-1)

    # Student: masked global crops, then the local crops, with stochastic depth.
    student = {"params": params}
    keys = jax.random.split(views["drop_path_key"])
    s_global = apply(student, x, masks, True, method="tokens", rngs={"dropout": keys[0]})
    cls = [s_global["cls"]]
    if "local" in views:
      s_local = apply(
        student, views["local"], None, True, method="tokens", rngs={"dropout": keys[1]}
      )
      cls.append(s_local["cls"])
    cls = jnp.concatenate(cls)
    s_patch = None
    if do_ibot:
      s_patch = s_global["patches"].reshape(-1, s_global["patches"].shape[-1])[indices]
    if do_ibot and not cfg.ibot_separate_head:
      # One pass of the shared head over class and masked patch tokens, as the official.
      z_all, logits_all = apply(
        student, jnp.concatenate([cls, s_patch]), method="dino_head_outputs"
      )
      z, s_cls, s_patch_logits = z_all[: cls.shape[0]], *jnp.split(logits_all, [cls.shape[0]])
    else:
      z, s_cls = apply(student, cls, method="dino_head_outputs")
      if do_ibot:
        _, s_patch_logits = apply(student, s_patch, method="ibot_head_outputs")

    tau_s = cfg.student_temperature
    dino = losses.dinov2_loss(s_cls.reshape(-1, n, s_cls.shape[-1]), t_cls_probs, tau_s, axis)
    koleo = jnp.zeros((), jnp.float32)
    if cfg.koleo_loss_weight > 0 and n < 2:
      raise ValueError(
        f"KoLeo needs 2 or more images per device to find a neighbour (the official computes "
        f"it per GPU), got {n}: raise data.global_batch_size or set dinov2.koleo_loss_weight=0."
      )
    if cfg.koleo_loss_weight > 0:
      # Per global crop (never between the two crops of an image), per device: the official.
      koleo = sum(losses.koleo_loss(c, axis_name=axis) for c in jnp.split(s_global["cls"], 2))
    loss = cfg.dino_loss_weight * dino + cfg.koleo_loss_weight * koleo
    ibot = jnp.zeros((), jnp.float32)
    if do_ibot:
      ibot = losses.ibot_masked_patch_loss(
        s_patch_logits, t_patch_probs, weights, 2 * n, tau_s, axis
      )
      loss = loss + cfg.ibot_loss_weight * ibot

    count = optim.applied_count(state.opt_state)
    metrics = {
      "dino_loss": dino,
      "ibot_loss": ibot,
      "koleo_loss": koleo,
      "masked_patches": _global_mean(jnp.sum(masks, axis=1).astype(jnp.float32), axis),
      "teacher_temperature": temperature,
      "ema_decay": self.decay(state.step),
      "last_layer_frozen": self.last_layer_frozen(count),
    }
    z_global = z[: 2 * n]
    extra = {"teacher_cls": t_cls, "teacher_patch": t_patch, "valid": valid}
    return loss, StepOutput(
      {}, metrics, z_global, s_global["cls"], pairs=(z_global[:n], z_global[n:]), extra=extra
    )

  def update_state(self, state: Any, params: Any, out: StepOutput) -> Any:
    cfg = self.config.dinov2
    ms = state.method_state
    new = dict(
      ms, teacher_params=losses.ema_update(ms["teacher_params"], params, self.decay(state.step))
    )
    if cfg.centering == "centering":
      m = cfg.center_momentum
      new["center"] = losses.dino_center_update(
        ms["center"], out.extra["teacher_cls"], m, axis_name=self.axis_name
      )
      if cfg.ibot_loss_weight > 0:
        mean = _masked_mean(out.extra["teacher_patch"], out.extra["valid"], self.axis_name)
        new["ibot_center"] = m * ms["ibot_center"] + (1 - m) * mean
    return new


def _global_mean(x: jax.Array, axis: str | None) -> jax.Array:
  mean = jnp.mean(x)
  return mean if axis is None else jax.lax.pmean(mean, axis)


def _masked_mean(x: jax.Array, valid: jax.Array, axis: str | None) -> jax.Array:
  """The mean of the rows of ``x`` where ``valid``, over the global batch (0 if none)."""
  total = jnp.sum(jnp.where(valid[:, None], x, 0.0), axis=0)
  count = jnp.sum(valid.astype(jnp.float32))
  if axis is not None:
    total, count = jax.lax.psum(total, axis), jax.lax.psum(count, axis)
  return total / jnp.maximum(count, 1.0)
