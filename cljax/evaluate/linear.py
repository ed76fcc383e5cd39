"""Linear probe on cached frozen features: L2-regularised multinomial logistic regression, L-BFGS.

The standard protocol for features (Kornblith et al. 2019; SimCLR's transfer evaluation):
features are standardised with the training set's mean and standard deviation, a
multinomial logistic regression is fitted full-batch with L-BFGS (``optax.lbfgs``), the L2
strength is chosen on a held-out part of the training set, and the model is refitted on the
whole training set with that strength before it is scored on the test set.

    from cljax.evaluate import linear
    result = linear.linear_probe(train_z, train_y, test_z, test_y, num_classes=10)
    result["top1"], result["top5"], result["l2"]

Everything runs in JAX, so ImageNet-size feature sets (1.28M x 2048) fit on one accelerator;
with ``mesh`` the features are split over its devices and XLA reduces across them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from cljax import sharding

_HIGHEST = jax.lax.Precision.HIGHEST
DEFAULT_L2_GRID = tuple(10.0**e for e in range(-6, 1))  # 1e-6 ... 1.
DEFAULT_PATIENCE = 2  # Strengths without a better held-out score before the sweep stops.


class LinearClassifier(NamedTuple):
  """``logits = ((x - mean) / scale) @ kernel + bias``: kernel (d, c), bias (c,), mean (d,)."""

  kernel: jax.Array
  bias: jax.Array
  mean: jax.Array
  scale: jax.Array


@jax.jit
def _logits(kernel: jax.Array, bias: jax.Array, mean, scale, x: jax.Array) -> jax.Array:
  # Folds the standardisation into the weights: (x - m) / s @ W + b = x @ (W / s) + (b - m/s @ W).
  # That avoids a standardised copy of the (n, d) features, which can be gigabytes.
  # Full float32 products (and in the gradients, whose dots inherit the precision): TPU/GPU
  # default precision rounds the inputs to bf16 or TF32.
  w = kernel / scale[:, None]
  b = bias - jnp.matmul(mean / scale, kernel, precision=_HIGHEST)  # (d,) @ (d, c) -> (c,)
  return jnp.matmul(x.astype(jnp.float32), w, precision=_HIGHEST) + b  # (n, d) @ (d, c)


def predict_logits(classifier: LinearClassifier, features: jax.Array) -> jax.Array:
  """(n, d) features -> (n, c) float32 logits of ``classifier``."""
  return _logits(classifier.kernel, classifier.bias, classifier.mean, classifier.scale, features)


def topk_accuracy(
  logits: jax.Array, labels: jax.Array, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
  """Fraction of rows whose label is among the ``k`` largest logits, for each ``k``.

  Args:
    logits: (n, c) scores.
    labels: (n,) integer labels.
    ks: the k values; a k above ``c`` counts as ``c`` (always correct).

  Returns:
    ``{"top1": ..., "top5": ...}`` (one key per k), floats in [0, 1].
  """
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  # Rank of the true class = number of classes scoring strictly higher; ties favour the label.
  true = jnp.take_along_axis(logits, labels[:, None], axis=1)
  rank = jnp.sum(logits > true, axis=1)
  return {f"top{k}": float(jnp.mean(rank < k)) for k in ks}


@jax.jit
def _weighted_accuracy(classifier: LinearClassifier, x, labels, weights) -> jax.Array:
  correct = jnp.argmax(predict_logits(classifier, x), axis=1) == labels
  return jnp.sum(weights * correct) / jnp.sum(weights)


def standardization(features: jax.Array, weights: jax.Array | None = None) -> tuple:
  """(d,) mean and standard deviation (floored at 1e-6 of the largest) of weighted rows."""
  x = jnp.asarray(features)
  w = jnp.ones(x.shape[:1], jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  return _standardization(x, w)


@jax.jit
def _standardization(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
  x = x.astype(jnp.float32)
  total = jnp.sum(w)
  # Reductions, not (n,) @ (n, d) dots: XLA fuses the elementwise producers into a reduction,
  # so no (n, d) temporary is materialised for ImageNet-size feature sets.
  mean = jnp.sum(w[:, None] * x, axis=0) / total
  std = jnp.sqrt(jnp.sum(w[:, None] * jnp.square(x - mean), axis=0) / total)
  # Constant features (dead ReLUs) would divide by zero; they carry no signal either way.
  return mean, jnp.maximum(std, 1e-6 * jnp.maximum(jnp.max(std), 1e-12))


def logistic_loss(
  params: tuple[jax.Array, jax.Array],
  features: jax.Array,
  labels: jax.Array,
  weights: jax.Array,
  l2: jax.Array | float,
  mean: jax.Array,
  scale: jax.Array,
) -> jax.Array:
  """Weighted mean cross-entropy plus ``l2 / 2 * |kernel|^2`` (the bias is not penalised).

  This is scikit-learn's multinomial ``LogisticRegression`` objective divided by ``C * n``:
  ``l2 = 1 / (C * n)`` for ``n`` unit-weight examples.
  """
  kernel, bias = params
  logits = _logits(kernel, bias, mean, scale, features)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(weights * ce) / jnp.sum(weights) + 0.5 * l2 * jnp.sum(jnp.square(kernel))


@functools.partial(jax.jit, static_argnames=("max_steps",))
def _fit(features, labels, weights, l2, mean, scale, init, tol, *, max_steps):
  def loss_fn(params):
    return logistic_loss(params, features, labels, weights, l2, mean, scale)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss_fn)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  def not_done(carry):
    _, state = carry
    count = optax.tree.get(state, "count")
    grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
    return (count == 0) | ((count < max_steps) & (grad_norm >= tol))

  params, state = jax.lax.while_loop(not_done, step, (init, opt.init(init)))
  info = {
    "steps": optax.tree.get(state, "count"),
    "loss": optax.tree.get(state, "value"),
    "grad_norm": optax.tree.norm(optax.tree.get(state, "grad")),
  }
  return params, info


def _check(features, labels, num_classes: int) -> None:
  if features.ndim != 2 or labels.shape != features.shape[:1] or features.shape[0] == 0:
    raise ValueError(
      f"need features (n, d) with n >= 1 and labels (n,), got {features.shape} and {labels.shape}."
    )
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}.")


def fit_logistic_regression(
  features: jax.Array,
  labels: jax.Array,
  *,
  num_classes: int,
  l2: float,
  weights: jax.Array | None = None,
  standardize: bool = True,
  init: LinearClassifier | None = None,
  max_steps: int = 1000,
  tol: float = 1e-5,
) -> tuple[LinearClassifier, dict[str, float]]:
  """Fits an L2-regularised multinomial logistic regression with full-batch L-BFGS.

  Minimises ``sum_i w_i CE(x_i, y_i) / sum_i w_i + l2 / 2 |kernel|^2`` (see
  ``logistic_loss``) until the gradient norm falls below ``tol`` or ``max_steps``.

  Args:
    features: (n, d) features (any float dtype; computed in float32).
    labels: (n,) integer labels in ``[0, num_classes)``; rows with weight 0 may hold any
      valid label.
    num_classes: number of classes.
    l2: regularisation strength on the kernel, >= 0.
    weights: optional (n,) non-negative example weights; 0 leaves a row out (a held-out
      split or padding) without copying the features.
    standardize: fit on features standardised with the weighted mean and std.
    init: a starting point (warm start), e.g. the fit at a neighbouring ``l2``.
    max_steps: L-BFGS iterations at most.
    tol: stop when the gradient's L2 norm is below this.

  Returns:
    ``(classifier, info)``: the fitted ``LinearClassifier`` and ``{"steps", "loss",
    "grad_norm"}`` of the last iterate.

  Raises:
    ValueError: on inconsistent shapes, ``num_classes < 2`` or ``l2 < 0``.
  """
  _check(features, labels, num_classes)
  if not l2 >= 0:
    raise ValueError(f"l2 must be >= 0, got {l2}.")
  n, d = features.shape
  weights = jnp.ones((n,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  if standardize:
    mean, scale = standardization(features, weights)
  else:
    mean, scale = jnp.zeros((d,), jnp.float32), jnp.ones((d,), jnp.float32)
  if init is None:
    start = (jnp.zeros((d, num_classes), jnp.float32), jnp.zeros((num_classes,), jnp.float32))
  else:
    start = (jnp.asarray(init.kernel), jnp.asarray(init.bias))
  (kernel, bias), info = _fit(
    features,
    jnp.asarray(labels, jnp.int32),
    weights,
    jnp.float32(l2),
    mean,
    scale,
    start,
    jnp.float32(tol),
    max_steps=max_steps,
  )
  info = {k: float(v) for k, v in jax.device_get(info).items()}
  return LinearClassifier(kernel, bias, mean, scale), info


def _shard_rows(mesh: Mesh | None, *arrays: np.ndarray) -> list[Any]:
  """Pads rows to a multiple of the mesh size and splits them over its devices."""
  if mesh is None:
    return [jnp.asarray(a) for a in arrays]
  n, size = arrays[0].shape[0], mesh.devices.size
  pad = -n % size
  out = []
  for a in arrays:
    a = np.asarray(a)
    a = np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a
    out.append(jax.device_put(a, sharding.batch_sharded(mesh)))
  return out


def linear_probe(
  train_features: np.ndarray,
  train_labels: np.ndarray,
  test_features: np.ndarray,
  test_labels: np.ndarray,
  *,
  num_classes: int,
  l2_grid: Sequence[float] = DEFAULT_L2_GRID,
  val_fraction: float = 0.2,
  seed: int = 0,
  max_steps: int = 1000,
  tol: float = 1e-5,
  mesh: Mesh | None = None,
  patience: int | None = DEFAULT_PATIENCE,
  progress: Callable[..., Any] | None = None,
) -> dict[str, Any]:
  """The standard linear-probe protocol on frozen features; reports test top-1 and top-5.

  A random ``val_fraction`` of the training rows (from ``seed``) is held out; for each L2
  strength in ``l2_grid`` (largest first, each fit warm-started from the previous one) a
  classifier is fitted on the rest and scored on the held-out rows. The strength with the
  best held-out top-1 (the larger one on ties) is refitted on all training rows.

  The sweep stops early once ``patience`` strengths in a row after the best have scored no
  better on the held-out rows: the weakest strengths are the slowest fits (L-BFGS runs to
  ``max_steps`` on nearly unregularised, separable features), and held-out accuracy that has
  fallen with less regularisation rarely rises again. A heuristic: it picks another strength
  than the full sweep only when a skipped one would have scored strictly higher. ``None``
  fits the whole grid (``python -m cljax.evaluate --linear_patience=0``).

  Args:
    train_features: (n_train, d) features of the labelled training set.
    train_labels: (n_train,) labels in ``[0, num_classes)``.
    test_features: (n_test, d) features to score.
    test_labels: (n_test,) labels.
    num_classes: number of classes.
    l2_grid: candidate L2 strengths.
    val_fraction: fraction of the training rows held out to choose the strength.
    seed: seed of the held-out split.
    max_steps: L-BFGS iterations per fit.
    tol: gradient-norm tolerance per fit.
    mesh: optional mesh: the features are split over its devices (rows padded with
      weight 0), for feature sets larger than one device's memory.
    patience: strengths without a better held-out top-1 before the sweep stops; None: all.
    progress: optional ``progress(iterable, desc=..., total=...)`` wrapper (a tqdm bar)
      around the sweep.

  Returns:
    ``{"top1", "top5", "l2", "val_top1": {l2: accuracy}, "train_top1", "steps",
    "skipped_l2": [...]}``: ``val_top1`` holds the strengths fitted, ``skipped_l2`` those
    the early stop left out.

  Raises:
    ValueError: on inconsistent shapes, an empty grid or a ``val_fraction`` outside (0, 1).
  """
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  _check(np.asarray(train_features), train_labels, num_classes)
  if not l2_grid or not 0 < val_fraction < 1:
    raise ValueError(
      f"need a non-empty l2_grid and 0 < val_fraction < 1, got {l2_grid}, {val_fraction}."
    )
  if patience is not None and patience < 1:
    raise ValueError(f"patience must be >= 1 or None, got {patience}.")
  n = len(train_labels)
  held_out = np.zeros(n, bool)
  held_out[np.random.default_rng(seed).permutation(n)[: max(1, int(round(val_fraction * n)))]] = 1
  x, y, fit_w, val_w, all_w = _shard_rows(
    mesh,
    np.asarray(train_features),
    train_labels.astype(np.int32),
    (~held_out).astype(np.float32),
    held_out.astype(np.float32),
    np.ones(n, np.float32),
  )
  val_top1, fits, classifier = {}, {}, None
  grid = sorted(l2_grid, reverse=True)
  sweep = grid if progress is None else progress(grid, desc="L2 sweep", total=len(grid))
  for l2 in sweep:
    if patience is not None and val_top1:
      best = max(val_top1, key=lambda s: (val_top1[s], s))
      if sum(1 for s in val_top1 if s < best) >= patience:  # No better since the best.
        break
    classifier, _ = fit_logistic_regression(
      x,
      y,
      num_classes=num_classes,
      l2=l2,
      weights=fit_w,
      init=classifier,
      max_steps=max_steps,
      tol=tol,
    )
    fits[l2] = classifier
    val_top1[l2] = float(_weighted_accuracy(classifier, x, y, val_w))
  if hasattr(sweep, "close"):  # A bar the early stop left short.
    sweep.close()
  best = max(val_top1, key=lambda l2: (val_top1[l2], l2))
  classifier, info = fit_logistic_regression(
    x,
    y,
    num_classes=num_classes,
    l2=best,
    weights=all_w,
    init=fits[best],
    max_steps=max_steps,
    tol=tol,
  )
  result = topk_accuracy(predict_logits(classifier, jnp.asarray(test_features)), test_labels)
  result.update(
    l2=best,
    val_top1=val_top1,
    train_top1=float(_weighted_accuracy(classifier, x, y, all_w)),
    steps=int(info["steps"]),
    skipped_l2=[s for s in grid if s not in val_top1],
  )
  return result
