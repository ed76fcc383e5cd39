"""Frozen-encoder features: eval-mode BatchNorm, batches sharded over all devices."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from cljax import sharding


def _normalize(images: jax.Array) -> jax.Array:
  # Deferred import: train imports the evaluation package for its final kNN.
  from cljax import train

  return train.normalize_images(images.astype(jnp.float32) / 255.0)


def make_feature_fn(apply_fn: Callable, mesh: Mesh) -> Callable:
  """``(variables, uint8 images) -> encoder features`` (the output before the head)."""

  def features(variables, images):
    encoded, _ = apply_fn(variables, _normalize(images), train=False)
    return encoded.astype(jnp.float32)

  return jax.jit(
    features,
    in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
    out_shardings=sharding.batch_sharded(mesh),
  )


def extract_features(
  variables: Any, apply_fn: Callable, batches: Iterable[dict], mesh: Mesh
) -> tuple[np.ndarray, np.ndarray]:
  """Features and labels of every real (unpadded) example in ``batches``.

  Each element of ``batches`` is this process's ``{"image", "label", "mask"}``;
  the result holds the examples of all processes, in process order.
  """
  feature_fn = make_feature_fn(apply_fn, mesh)
  features, labels = [], []
  for batch in batches:
    images = sharding.host_to_global({"image": batch["image"]}, mesh)["image"]
    out = multihost_utils.process_allgather(feature_fn(variables, images), tiled=True)
    keep = multihost_utils.process_allgather(np.asarray(batch["mask"]), tiled=True)
    lab = multihost_utils.process_allgather(np.asarray(batch["label"]), tiled=True)
    features.append(np.asarray(out)[keep])
    labels.append(np.asarray(lab)[keep])
  return np.concatenate(features), np.concatenate(labels)


def pixel_features(batches: Iterable[dict]) -> tuple[np.ndarray, np.ndarray]:
  """Raw pixels as features (the usual no-learning baseline): flattened images in [0, 1].

  Args:
    batches: this process's ``{"image", "label", "mask"}`` batches of an eval iterator.

  Returns:
    ``(features, labels)``: (n, h * w * 3) float32 and (n,) labels of the unpadded rows.
  """
  features, labels = [], []
  for batch in batches:
    keep = np.asarray(batch["mask"], bool)
    images = np.asarray(batch["image"])[keep]
    features.append(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    labels.append(np.asarray(batch["label"])[keep])
  return np.concatenate(features), np.concatenate(labels)


def save_features(path: str, features: np.ndarray, labels: np.ndarray, **meta: Any) -> None:
  """Caches features and labels (and scalar ``meta`` such as the step) in one ``.npz``."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  # Written under a temporary name and renamed, so a killed job leaves no truncated cache.
  tmp = f"{path}.tmp.npz"
  np.savez(tmp, features=features, labels=labels, **{f"meta_{k}": v for k, v in meta.items()})
  os.replace(tmp, path)


def load_features(path: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """``(features, labels, meta)`` as written by ``save_features``."""
  with np.load(path) as f:
    meta = {k[len("meta_") :]: f[k].item() for k in f.files if k.startswith("meta_")}
    return f["features"], f["labels"], meta
