"""Images: the modality cljax started with (``data.modality = "image"``, the default)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from cljax.data import augment, decode, pipeline
from cljax.data import device as device_data
from cljax.data import views as views_lib
from cljax.modalities.base import Modality


class Image(Modality):
  """Square RGB images: uint8 batches cropped on the host or the device, views augmented on
  the device (``cljax.data.augment``), centre crops for evaluation."""

  name = "image"
  batch_keys = (
    *("view_a", "view_b", "aug_seed", "label", "local_views", "tokens"),
    # The decode-only path's images and draws; the step cuts the views (data.decode).
    *("canvas", "image_hw", "boxes", "flips"),
  )
  input_key = "image"

  def input_shape(self, config: ml_collections.ConfigDict, source: Any = None) -> tuple:
    del source
    return (config.data.image_size, config.data.image_size, 3)

  def train_iterator(
    self,
    config: ml_collections.ConfigDict,
    source: Any,
    mesh: Any,
    views: views_lib.ViewSpec,
    *,
    device_resident: bool,
    read_threads: int | None = None,
  ) -> Any:
    """Two views (+ local crops) from grain, or device-resident.

    With ``device_resident`` (``data.device_resident`` in a run) the whole uint8 data set is
    copied to every device once and crops and flips happen there too
    (``cljax.data.device``); its batches are already global device arrays. Otherwise each
    process reads its share on the host: decoded and cropped there, or with
    ``data.crop_on_device`` only decoded there and cropped inside the step
    (``cljax.data.decode``). ``read_threads``: the host pipeline's threads building batches
    (default 2; the benchmark's one-core row reads with 1).
    """
    if device_resident:
      return device_data.create_device_iterator(
        source, mesh, views, seed=config.train.seed, global_batch_size=config.data.global_batch_size
      )
    return decode.create_host_iterator(
      source,
      views,
      crop_on_device=config.data.crop_on_device,
      canvas=config.data.canvas_size,
      jpeg_fast_dct=config.data.jpeg_fast_dct,
      seed=config.train.seed,
      global_batch_size=config.data.global_batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      num_workers=config.data.num_workers,
      read_threads=read_threads,
    )

  def prepare_batch(self, config: ml_collections.ConfigDict, batch: dict) -> dict:
    """Decode-only batches carry images on a canvas and each view's box: cut the views."""
    return decode.views_from_canvas(batch, views_lib.ViewSpec.from_config(config.data))

  def views(
    self, config: ml_collections.ConfigDict, batch: dict, rng: jax.Array, step: jax.Array
  ) -> dict[str, jax.Array]:
    """The augmented, normalised float views of this device's batch.

    Returns ``{"global": (2n, h, w, 3)}`` ordered ``[view_a; view_b]``, and
    with multi-crop also ``{"local": (L * n, s, s, 3)}`` ordered crop by crop.
    Each example's photometric keys come from its ``aug_seed`` (drawn by the
    pipeline from the record's place in the shuffled stream), so
    augmentations do not depend on how the batch is split over devices.
    """
    aug = config.data.augment

    def augmented(images, v, **probs):
      view_rng = jax.random.fold_in(rng, v)
      return augment.network_inputs(images, aug, view_rng, step, batch["aug_seed"], **probs)

    second = {
      "blur_prob": aug.blur_prob_b if aug.blur_prob_b >= 0 else None,
      "solarize_prob": aug.solarize_prob_b if aug.solarize_prob_b >= 0 else None,
    }
    views = {
      "global": jnp.concatenate(
        [augmented(batch["view_a"], 0), augmented(batch["view_b"], 1, **second)]
      )
    }
    if "local_views" in batch:
      local = batch["local_views"]  # (n, L, s, s, 3)
      probs = {"blur_prob": aug.blur_prob_local} if aug.blur_prob_local >= 0 else {}
      crops = [augmented(local[:, j], 2 + j, **probs) for j in range(local.shape[1])]
      views["local"] = jnp.concatenate(crops)
    return views

  def eval_iterator(
    self, config: ml_collections.ConfigDict, source: Any, *, num_workers: int = 0
  ) -> pipeline.BatchIterator:
    """Centre crops of ``source``, once, in order: ``{"image", "label", "mask", "index"}``."""
    return pipeline.create_eval_iterator(
      source,
      batch_size=config.evals.batch_size,
      image_size=config.data.image_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      num_workers=num_workers,
    )

  def network_inputs(self, x: jax.Array) -> jax.Array:
    """uint8 images -> normalised float inputs (``augment.network_inputs`` without
    augmentation)."""
    return augment.network_inputs(x)

  def raw_features(self, x: jax.Array) -> jax.Array:
    """Raw pixels as features (the usual no-learning baseline): flattened images in [0, 1]."""
    return x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0


IMAGE = Image()
