"""TS2Vec (Yue et al., AAAI 2022): hierarchical contrastive learning of time series.

A port of the official ``yuezhihan/ts2vec`` training (``ts2vec.py`` ``TS2Vec.fit``) into
the shared sharded step, for ``data.modality = "series"``:

1. one overlap ``[crop_left, crop_right)`` and its two extensions are drawn per step for
   the whole global batch, and a shift per series (``ts_views.sample_crops``, keyed by the
   step: the same crops on every device and after a resume);
2. the two crops pass through the encoder (``models.ts2vec.TSEncoder``: input projection,
   binomial timestamp masking, 11 dilated residual blocks, dropout) as windows of the
   series length with a validity mask (``ts_views.crop_views``);
3. ``losses.hierarchical_contrastive_loss`` on their shared timestamps only
   (``ts_views.overlap``): instance terms against the global batch's other series, temporal
   terms against the series' other timestamps, max-pooled by 2 until one timestamp is left.

Static lengths: the loss reads the overlap at the shortest of ``ts2vec.length_buckets``
lengths that holds it (``ts_views.switch_on_length``); its temporal term is quadratic in
that length, and the official overlaps average half the series. The result does not
depend on the lengths (tests/test_modality_series.py), only the time does. The encoder
keeps the series length: XLA's CPU backend computes a convolution's weight gradient inside
a conditional ~20x slower than outside it, more than shorter windows would save.

The official code evaluates a stochastic weight average of the encoder
(``torch.optim.swa_utils.AveragedModel``, updated once before training and after every
step): the method keeps it as ``method_state["average_params"]`` (the mean of the initial
parameters and those after each step) and evaluation embeds with it. The representation
of a series is the encoder's output max-pooled over all its timestamps (the official
``encoding_window='full_series'``).

References:
  Yue et al., "TS2Vec: Towards Universal Representation of Time Series", AAAI 2022.
  https://arxiv.org/abs/2106.10466
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec

from cljax import losses, models, sharding
from cljax.data import ts_views
from cljax.methods.base import Method, StepOutput, copy_tree
from cljax.models import ts2vec as ts2vec_model

_CROP_STREAM, _MASK_STREAM = 8101, 8102


class TS2VecModel(nn.Module):
  """The encoder; ``apply`` returns ``(features, features)``: each series' representation,
  its outputs max-pooled over time (no projection head: TS2Vec's loss reads the encoder)."""

  encoder: ts2vec_model.TSEncoder

  def __call__(self, x: jax.Array, train: bool = False):
    h = jnp.max(self.encoder(x, train=train), axis=1)
    return h, h

  def encode(
    self, x: jax.Array, valid: jax.Array, mask: jax.Array, train: bool = True
  ) -> jax.Array:
    """(B, T, C) windows -> (B, T, output_dims), zero outside ``valid``; ``mask``: the
    (B, T) timestamps the training mask keeps."""
    return self.encoder(x, train=train, mask=mask, valid=valid)


class TS2Vec(Method):
  """TS2Vec; see the module docstring.

  Method state ``{"average_params", "count"}``: the running mean of the initial parameters
  and those after each step (the official SWA model), which evaluation uses; ``count`` the
  number of parameter sets averaged.
  """

  name = "ts2vec"
  eval_network = "average"
  mirrors_params = ("average_params",)

  @classmethod
  def config_sections(cls) -> dict[str, ml_collections.ConfigDict]:
    """``ts2vec``: the official defaults (``train.py`` and ``TS2Vec.__init__``)."""
    c = ml_collections.ConfigDict()
    c.alpha = 0.5  # Weight of the instance loss; the temporal loss has 1 - alpha.
    c.temporal_unit = 0  # The first level with a temporal loss.
    # How many static lengths the loss's overlap is padded to (ts_views.bucket_lengths); 0:
    # automatic, 1 below 512 timestamps, else one per 128 up to 8. Each compiles the loss once
    # more (seconds on a CPU); a full-length overlap does ~3x the official temporal-loss work.
    c.length_buckets = 0
    return {"ts2vec": c}

  def __init__(self, config, num_steps: int = 0, steps_per_epoch: int = 0):
    super().__init__(config, num_steps, steps_per_epoch)
    if self.modality.name != "series":
      raise ValueError(
        f"method 'ts2vec' trains on time series: set data.modality='series' (got "
        f"{self.modality.name!r})."
      )
    if config.model.name != "ts2vec":
      raise ValueError(f"method 'ts2vec' needs model.name='ts2vec', got {config.model.name!r}.")
    if config.ts2vec.length_buckets < 0:
      raise ValueError(
        f"ts2vec.length_buckets must be >= 0 (0: automatic), got {config.ts2vec.length_buckets}."
      )

  def create_model(self, bn_axis_name: str | None = None) -> TS2VecModel:
    del bn_axis_name
    return TS2VecModel(models.create_tsencoder(self.config.model))

  def init_state(self, rng: jax.Array, variables: dict) -> Any:
    del rng
    # AveragedModel's first update_parameters, before training, copies the initial weights:
    # they are the first of the averaged models.
    return {"average_params": copy_tree(variables["params"]), "count": jnp.ones((), jnp.int32)}

  def state_specs(self) -> Any:
    return PartitionSpec()

  def eval_variables(self, state: Any) -> dict:
    """The averaged parameters (the official evaluates its SWA model)."""
    return {"params": state.method_state["average_params"], "batch_stats": {}}

  def describe(self) -> str:
    cfg = self.config.ts2vec
    return f"; hierarchical loss, alpha {cfg.alpha}, temporal unit {cfg.temporal_unit}"

  def lengths(self, ts_l: int) -> tuple[int, ...]:
    """The static lengths the loss reads the overlap at (``ts2vec.length_buckets``)."""
    count = self.config.ts2vec.length_buckets
    if count == 0:
      # Below 512 timestamps the loss is too small a part of a step to repay the compilations.
      count = 1 if ts_l < 512 else min(ts_l // 128, 8)
    # No overlap is shorter than 2 ** (temporal_unit + 1): such lengths would never be taken.
    shortest = 2 ** (self.config.ts2vec.temporal_unit + 1)
    return tuple(n for n in ts_views.bucket_lengths(ts_l, count) if n >= shortest or n == ts_l)

  # ---- One step.

  def views(self, batch: dict, rng: jax.Array, step: jax.Array) -> dict[str, Any]:
    """The two crops of this device's series: ``{"view1", "view2", "valid1", "valid2",
    "mask1", "mask2", "crops", "key"}`` (``ts_views.crop_views``), crops and timestamp
    masks drawn for the global batch from the step's key."""
    x = batch["series"]
    n, ts_l = x.shape[0], x.shape[1]
    total = self.config.data.global_batch_size
    key = jax.random.fold_in(jax.random.fold_in(rng, _CROP_STREAM), step)
    crops = ts_views.sample_crops(key, total, ts_l, self.config.ts2vec.temporal_unit)
    start = sharding.device_index() * n
    local = crops._replace(crop_offset=jax.lax.dynamic_slice_in_dim(crops.crop_offset, start, n))
    v = ts_views.crop_views(x, local)
    # The timestamp masks of both views, drawn for the global batch and sliced like the
    # offsets: a series' mask depends on its place in the global batch, not on the devices.
    mask_key = jax.random.fold_in(jax.random.fold_in(rng, _MASK_STREAM), step)
    masks = [
      jax.lax.dynamic_slice_in_dim(
        ts2vec_model.timestamp_mask(
          self.config.model.tsencoder.mask_mode, jax.random.fold_in(mask_key, i), (total, ts_l)
        ),
        start,
        n,
      )
      for i in (1, 2)
    ]
    return {
      "view1": v.view1,
      "view2": v.view2,
      "valid1": v.valid1,
      "valid2": v.valid2,
      "mask1": masks[0],
      "mask2": masks[1],
      "crops": local,
      # Dropout: this device's own key (its series are its own).
      "key": jax.random.fold_in(mask_key, sharding.device_index()),
    }

  def loss(self, params: Any, state: Any, views: dict, batch: dict) -> tuple[jax.Array, StepOutput]:
    cfg = self.config.ts2vec
    keys = jax.random.split(views["key"])
    encode = lambda x, valid, mask, key: state.apply_fn(
      {"params": params}, x, valid, mask, True, method="encode", rngs={"dropout": key}
    )
    z1 = encode(views["view1"], views["valid1"], views["mask1"], keys[0])
    z2 = encode(views["view2"], views["valid2"], views["mask2"], keys[1])
    crops = views["crops"]
    z1, z2, valid = ts_views.overlap(z1, z2, crops)

    def contrasted(length, z1, z2):
      # The overlap's first `length` rows (all of it: length >= crop_l).
      return losses.hierarchical_contrastive_loss(
        z1[:, :length],
        z2[:, :length],
        cfg.alpha,
        cfg.temporal_unit,
        self.axis_name,
        mask=valid[:length],
      )

    lengths = self.lengths(z1.shape[1])
    loss = ts_views.switch_on_length(lengths, crops.crop_l, contrasted, z1, z2)
    # Each series' overlap, max-pooled: the online probe's features and the health metrics.
    pooled = lambda z: jnp.max(jnp.where(valid[None, :, None], z, -jnp.inf), axis=1)
    h1, h2 = pooled(z1), pooled(z2)
    h = jnp.concatenate([h1, h2])
    overlap = crops.crop_l.astype(jnp.float32)
    return loss, StepOutput({}, {"overlap_length": overlap}, h, h, pairs=(h1, h2))

  def update_state(self, state: Any, params: Any, out: StepOutput) -> Any:
    """The running mean of the parameters (``AveragedModel``'s default), this step's added."""
    ms = state.method_state
    count = ms["count"] + 1
    weight = 1.0 / count.astype(jnp.float32)
    average = jax.tree.map(
      lambda a, p: a + (p.astype(jnp.float32) - a) * weight, ms["average_params"], params
    )
    return {"average_params": average, "count": count}
