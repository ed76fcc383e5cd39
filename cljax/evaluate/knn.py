"""Weighted k-nearest-neighbour classification on frozen features (InstDisc / DINO protocol).

Each test feature votes with its ``k`` most cosine-similar training features; a neighbour
with similarity ``s`` adds ``exp(s / temperature)`` to its class, and the class with the
largest sum is predicted. Defaults (k=200, temperature=0.07) follow Wu et al. (2018).

    from cljax.evaluate import knn
    top1 = knn.knn_accuracy(train_z, train_y, test_z, test_y, num_classes=10)

References:
  Wu et al., `Unsupervised Feature Learning via Non-Parametric Instance Discrimination
  <https://arxiv.org/abs/1805.01978>`_, 2018.
  Caron et al., `Emerging Properties in Self-Supervised Vision Transformers
  <https://arxiv.org/abs/2104.14294>`_, 2021.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from cljax import losses
from cljax.evaluate import features


def _check_inputs(
  train_features: jax.Array,
  train_labels: jax.Array,
  test_features: jax.Array,
  *,
  num_classes: int,
  k: int,
  temperature: float,
  batch_size: int,
) -> None:
  if train_features.ndim != 2 or test_features.ndim != 2:
    raise ValueError(
      "features must have shape (n, dim), got train_features "
      f"{train_features.shape} and test_features {test_features.shape}."
    )
  if train_features.shape[1] != test_features.shape[1]:
    raise ValueError(
      f"feature dims differ: train_features {train_features.shape}, "
      f"test_features {test_features.shape}."
    )
  if train_labels.shape != train_features.shape[:1]:
    raise ValueError(
      f"train_labels must have shape ({train_features.shape[0]},), got {train_labels.shape}."
    )
  if train_features.shape[0] == 0:
    raise ValueError("the training set is empty.")
  if num_classes < 1 or k < 1 or batch_size < 1 or not temperature > 0:
    raise ValueError(
      "need num_classes, k, batch_size >= 1 and temperature > 0, got "
      f"{num_classes=}, {k=}, {batch_size=}, {temperature=}."
    )


def _replicate_if_explicit(x: jax.Array) -> jax.Array:
  # Under Explicit mesh axes (jax.make_mesh's default) the chunking reshape and the
  # sharded (b, d) @ (d, n) below raise a ShardingTypeError; Auto axes need nothing.
  sharding = getattr(x, "sharding", None)
  if isinstance(sharding, NamedSharding) and AxisType.Explicit in sharding.mesh.axis_types:
    return jax.device_put(x, NamedSharding(sharding.mesh, PartitionSpec()))
  return x


@functools.partial(jax.jit, static_argnames=("num_classes", "k", "batch_size"))
def _classify(
  train_features: jax.Array,
  train_labels: jax.Array,
  test_features: jax.Array,
  temperature: float,
  *,
  num_classes: int,
  k: int,
  batch_size: int,
) -> jax.Array:
  train = losses.l2_normalize(train_features)
  test = losses.l2_normalize(test_features)
  n_test = test.shape[0]
  # Pad to whole chunks so one compiled body serves every chunk; padded rows are dropped.
  n_chunks = -(-n_test // batch_size)
  test = jnp.pad(test, ((0, n_chunks * batch_size - n_test), (0, 0)))
  chunks = test.reshape(n_chunks, batch_size, test.shape[1])

  def classify_chunk(queries: jax.Array) -> jax.Array:
    # Full float32 products: at TPU/GPU default precision (bf16 or TF32 inputs) a cosine
    # errs by ~1e-3, and a vote exp(s / 0.07) by a few percent.
    sims = jnp.matmul(queries, train.T, precision=jax.lax.Precision.HIGHEST)  # (b, n_train)
    top_sims, top_idx = jax.lax.top_k(sims, k)  # (b, k)
    weights = jnp.exp(top_sims / temperature)
    rows = jnp.arange(batch_size)[:, None]
    # Scatter-add instead of one_hot(labels) * weights: that would be (b, k, classes),
    # 800 MB per chunk for ImageNet-1k at the defaults.
    votes = jnp.zeros((batch_size, num_classes), jnp.float32)
    votes = votes.at[rows, train_labels[top_idx]].add(weights)
    return jnp.argmax(votes, axis=-1).astype(jnp.int32)

  # lax.map runs the chunks one after another, so memory holds one (b, n_train) block.
  return jax.lax.map(classify_chunk, chunks).reshape(-1)[:n_test]


def knn_classify(
  train_features: jax.Array,
  train_labels: jax.Array,
  test_features: jax.Array,
  *,
  num_classes: int,
  k: int = 200,
  temperature: float = 0.07,
  batch_size: int = 1024,
) -> jax.Array:
  """Predicts a label for each test feature by a similarity-weighted vote of its neighbours.

  Args:
    train_features: (n_train, dim) features of the labelled set; L2-normalised here.
    train_labels: (n_train,) integer labels in ``[0, num_classes)``.
    test_features: (n_test, dim) features to classify; L2-normalised here.
    num_classes: number of classes.
    k: neighbours per query; capped at ``n_train``.
    temperature: votes are weighted by ``exp(cosine_similarity / temperature)``.
    batch_size: test features scored at once; memory grows as ``batch_size * n_train``.

  Returns:
    (n_test,) int32 predicted labels. Ties between classes go to the lower class index.

  Raises:
    ValueError: if shapes are inconsistent or a setting is out of range.
  """
  _check_inputs(
    train_features,
    train_labels,
    test_features,
    num_classes=num_classes,
    k=k,
    temperature=temperature,
    batch_size=batch_size,
  )
  n_test = test_features.shape[0]
  if n_test == 0:
    return jnp.zeros((0,), jnp.int32)
  return _classify(
    _replicate_if_explicit(train_features),
    _replicate_if_explicit(jnp.asarray(train_labels, jnp.int32)),
    _replicate_if_explicit(test_features),
    temperature,
    num_classes=num_classes,
    k=min(k, train_features.shape[0]),
    # A test set smaller than one chunk needs no padding up to batch_size.
    batch_size=min(batch_size, n_test),
  )


def knn_accuracy(
  train_features: jax.Array,
  train_labels: jax.Array,
  test_features: jax.Array,
  test_labels: jax.Array,
  *,
  num_classes: int,
  k: int = 200,
  temperature: float = 0.07,
  batch_size: int = 1024,
) -> float:
  """Top-1 accuracy of ``knn_classify`` on a labelled test set.

  Args:
    train_features: (n_train, dim) features of the labelled set.
    train_labels: (n_train,) integer labels in ``[0, num_classes)``.
    test_features: (n_test, dim) features to classify, n_test >= 1.
    test_labels: (n_test,) integer labels.
    num_classes: number of classes.
    k: neighbours per query; capped at ``n_train``.
    temperature: votes are weighted by ``exp(cosine_similarity / temperature)``.
    batch_size: test features scored at once.

  Returns:
    The fraction of test features whose predicted label is correct, in [0, 1].

  Raises:
    ValueError: if shapes are inconsistent, the test set is empty, or a setting is out of
      range.
  """
  if test_labels.shape != test_features.shape[:1] or test_labels.shape[0] == 0:
    raise ValueError(
      f"test_labels must have shape ({test_features.shape[0]},) with at least one "
      f"example, got test_labels {test_labels.shape} for test_features "
      f"{test_features.shape}."
    )
  predictions = knn_classify(
    train_features,
    train_labels,
    test_features,
    num_classes=num_classes,
    k=k,
    temperature=temperature,
    batch_size=batch_size,
  )
  # Reduced on device: in multi-host runs the predictions need not be addressable here.
  correct = predictions == _replicate_if_explicit(jnp.asarray(test_labels, jnp.int32))
  return float(jnp.mean(correct))


def knn_eval(config: Any, method: Any, state: Any, mesh: Any) -> dict[str, float]:
  """kNN top-1 of ``state``'s encoder features, eval split against the train split (the
  columns ``method.knn_features`` keeps).

  Returns:
    ``{"knn_top1": accuracy}``, or ``{}`` when a split is unlabelled.
  """
  (train_x, train_y), (test_x, test_y) = (
    features.split_features(config, method, state, split, mesh) for split in ("train", "eval")
  )
  if np.any(train_y < 0) or np.any(test_y < 0):
    return {}
  accuracy = knn_accuracy(
    method.knn_features(train_x),
    train_y,
    method.knn_features(test_x),
    test_y,
    num_classes=int(max(train_y.max(), test_y.max())) + 1,
    k=config.evals.knn_k,
    temperature=config.evals.knn_temperature,
  )
  return {"knn_top1": float(accuracy)}


def final_knn(run: Any, state: Any) -> dict[str, float]:
  """The end-of-training kNN of ``run`` (a ``cljax.run.Run``) at ``state``, and with
  ``evals.knn_baseline`` that of the same encoder at its random initialisation."""
  config, t0 = run.config, time.time()
  result = knn_eval(config, run.method, state, run.mesh)
  if result and config.evals.knn_baseline:
    baseline = knn_eval(config, run.method, run.initial_state(with_probe=False), run.mesh)
    result["knn_top1_random_init"] = baseline["knn_top1"]
  if result:
    logging.info(
      "kNN top-1 (k=%d, T=%g) on the eval split: %s (%.0fs).",
      config.evals.knn_k,
      config.evals.knn_temperature,
      result,
      time.time() - t0,
    )
  return result
