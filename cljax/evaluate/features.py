"""Frozen-encoder features: eval-mode BatchNorm, batches sharded over all devices.

``split_features`` turns a split into features for every evaluator (kNN at the end of
training, ``python -m cljax.evaluate``, the classifier's scoring, CLIP's zero-shot); they
all go through ``eval_batches`` and ``extract``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from cljax import modalities, sharding, xla_options
from cljax.data import augment, sources


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, **kwargs):
  """A tqdm bar with rate and ETA on a terminal; silent where stderr is not one (logs, CI).

  The evaluators log each part's duration when it ends, so a log file still tells where the
  time went.
  """
  show = sys.stderr.isatty() and jax.process_index() == 0
  return tqdm.tqdm(
    iterable, desc=desc, total=total, disable=not show, leave=False, dynamic_ncols=True, **kwargs
  )


def encoder_features(apply_fn: Callable, prepare: Callable = augment.network_inputs) -> Callable:
  """``(variables, inputs) -> encoder features`` (the model's output before the head);
  ``prepare`` makes network inputs of a batch's (default: uint8 images, normalised)."""
  return lambda v, x: apply_fn(v, prepare(x), train=False)[0]


def embeddings(apply_fn: Callable) -> Callable:
  """``(variables, uint8 images) -> embeddings`` (the model's second output: after the head)."""
  return lambda v, images: apply_fn(v, augment.network_inputs(images), train=False)[1]


def eval_batches(
  config: ml_collections.ConfigDict, split: str, *, source: Any = None, num_workers: int = 0
) -> Any:
  """This process's batches of ``split`` (or of ``source``), once, in order: the modality's
  (``Modality.eval_iterator``; images: centre crops)."""
  source = sources.create_source(config.data, split) if source is None else source
  return modalities.get(config).eval_iterator(config, source, num_workers=num_workers)


def num_batches(config: ml_collections.ConfigDict, source: Any) -> int:
  """How many batches ``eval_batches`` yields for ``source`` (one process)."""
  return max(1, -(-len(source) // config.evals.batch_size))


def extract(
  fn: Callable,
  variables: Any,
  batches: Iterable[dict],
  mesh: Mesh,
  *,
  desc: str = "features",
  total: int | None = None,
  input_key: str = "image",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``fn(variables, inputs)`` of every real (unpadded) example in ``batches``.

  Each element of ``batches`` is this process's ``{input_key, "label", "mask", "index"}``
  (``eval_batches``; ``input_key``: the modality's, "image" for images); ``fn`` runs
  jitted on batches sharded over ``mesh``, and the result holds the examples of all
  processes, in process order.

  Returns:
    ``(outputs, labels, indices)``: float32 (n, ...) outputs, the labels and the source
    indices of the examples (``desc`` and ``total``: the progress bar's label and length).
  """
  jitted = jax.jit(
    lambda v, x: fn(v, x).astype(jnp.float32),
    in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
    out_shardings=sharding.batch_sharded(mesh),
    compiler_options=xla_options.for_mesh(mesh),
  )
  gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
  outputs, labels, indices = [], [], []
  for batch in progress(batches, desc=desc, total=total, unit="batch"):
    inputs = sharding.host_to_global({"x": batch[input_key]}, mesh)["x"]
    keep = gather(np.asarray(batch["mask"], bool))
    outputs.append(gather(jitted(variables, inputs))[keep])
    labels.append(gather(np.asarray(batch["label"]))[keep])
    indices.append(gather(np.asarray(batch["index"]))[keep])
  return np.concatenate(outputs), np.concatenate(labels), np.concatenate(indices)


def split_features(
  config: ml_collections.ConfigDict,
  method: Any,
  state: Any,
  split: str,
  mesh: Mesh,
  *,
  cache_path: str | None = None,
  num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """Encoder features and labels of a whole split (centre crops), cached in ``cache_path``.

  The network is the one ``method.eval_variables`` names (DINO's teacher, else the online
  network); a cache written for another network is ignored.
  """
  if cache_path and os.path.exists(cache_path):
    x, y, meta = load_features(cache_path)
    # Caches written before the network was recorded hold the online network's features.
    if meta.get("network", "online") == method.eval_network:
      logging.info("Loaded %s features %s from %s.", split, x.shape, cache_path)
      return x, y
    logging.info("Ignoring %s: features of another network than the %s.", cache_path,
                 method.eval_network)  # fmt: skip
  source = sources.create_source(config.data, split)
  batches = eval_batches(config, split, source=source, num_workers=num_workers)
  variables = method.eval_variables(state)
  t0 = time.perf_counter()
  x, y, _ = extract(
    encoder_features(state.apply_fn, method.modality.network_inputs),
    variables,
    batches,
    mesh,
    desc=f"{split} features",
    total=num_batches(config, source),
    input_key=method.modality.input_key,
  )
  logging.info("Encoded %d %s examples in %.1fs.", len(y), split, time.perf_counter() - t0)
  if cache_path and jax.process_index() == 0:
    save_features(cache_path, x, y, step=int(state.step), network=method.eval_network)
  return x, y


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
