"""One-class anomaly detection by nearest-neighbour distance, for any modality.

The usual protocol on labelled data (for images the one-class CIFAR-10 setting, e.g.
Bergman et al. 2020, "Deep Nearest Neighbor Anomaly Detection"): each class in turn is
"normal"; the normal examples of the training split are the memory; every test example is
scored by its distance to its k-th nearest normal representation, and the AUROC measures
how well the scores separate the test examples of other classes (anomalies) from those of
the normal class. The same scores on the raw inputs are the no-learning baseline.

Representations are l2-normalised first (distances then follow the cosine, as the kNN
classifier's); raw inputs are compared as they are (Euclidean), the baseline's usual form.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics


def knn_distances(memory: np.ndarray, queries: np.ndarray, k: int = 1) -> np.ndarray:
  """Each query's Euclidean distance to its k-th nearest row of ``memory`` (float64)."""
  memory = np.asarray(memory, np.float64)
  queries = np.asarray(queries, np.float64)
  k = min(k, len(memory))
  out = np.empty(len(queries))
  for start in range(0, len(queries), 1024):
    q = queries[start : start + 1024]
    d2 = (q**2).sum(1)[:, None] - 2 * q @ memory.T + (memory**2).sum(1)[None, :]
    out[start : start + 1024] = np.sqrt(np.maximum(np.partition(d2, k - 1, axis=1)[:, k - 1], 0))
  return out


def one_class_auroc(
  train: tuple[np.ndarray, np.ndarray],
  test: tuple[np.ndarray, np.ndarray],
  *,
  k: int = 1,
  normalize: bool = True,
) -> dict[str, object]:
  """AUROC of kNN-distance scores with each class in turn as the normal one.

  Args:
    train: ``(x, labels)``: the memory is the rows of the normal class.
    test: ``(x, labels)``: scored; anomalies are the rows of the other classes.
    k: the neighbour whose distance is the score (1: the nearest).
    normalize: l2-normalise the rows first (representations); False for raw inputs.

  Returns:
    ``{"mean": mean AUROC over classes, "per_class": {class index: AUROC}, "k": k}``; classes
    missing from either split are skipped.
  """
  (x_train, y_train), (x_test, y_test) = train, test
  x_train = np.asarray(x_train, np.float64).reshape(len(x_train), -1)
  x_test = np.asarray(x_test, np.float64).reshape(len(x_test), -1)
  if normalize:
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    x_train, x_test = unit(x_train), unit(x_test)
  per_class = {}
  for c in np.unique(y_train):
    anomalous = y_test != c
    if not anomalous.any() or anomalous.all():
      continue
    scores = knn_distances(x_train[y_train == c], x_test, k)
    per_class[int(c)] = float(metrics.roc_auc_score(anomalous, scores))
  return {"mean": float(np.mean(list(per_class.values()))), "per_class": per_class, "k": k}
