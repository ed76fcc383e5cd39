"""TS2Vec's classification protocol: an RBF SVM on frozen representations, C by 5-fold CV.

A port of ``fit_svm`` in the official ``tasks/_eval_protocols.py`` (Yue et al., AAAI 2022),
which the TS2Vec table's accuracies come from: ``SVC(kernel="rbf", gamma="scale")`` with C
chosen by 5-fold cross-validation over {1e-4, ..., 1e4, inf}, or fitted directly with
C = inf where the training set is too small to cross-validate (fewer than 5 examples per
class on average, or fewer than 50 in all); at most 10,000 training examples (a stratified
subsample above that).
"""

from __future__ import annotations

import time

import numpy as np
from sklearn import model_selection, svm

C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4, np.inf)
MAX_SAMPLES = 10_000


def fit_svm(features: np.ndarray, labels: np.ndarray, *, seed: int = 0) -> svm.SVC:
  """The official ``fit_svm``: the RBF SVM of the best C (see the module docstring)."""
  features, labels = np.asarray(features, np.float64), np.asarray(labels)
  num_classes = len(np.unique(labels))
  model = svm.SVC(C=np.inf, kernel="rbf", gamma="scale")
  if len(features) // num_classes < 5 or len(features) < 50:
    return model.fit(features, labels)
  if len(features) > MAX_SAMPLES:
    features, _, labels, _ = model_selection.train_test_split(
      features, labels, train_size=MAX_SAMPLES, random_state=seed, stratify=labels
    )
  # The official grid also fixes libsvm's iteration limit (sklearn's default: none).
  grid = {"C": list(C_GRID), "max_iter": [10_000_000]}
  search = model_selection.GridSearchCV(model, grid, cv=5, n_jobs=1)
  return search.fit(features, labels).best_estimator_


def svm_accuracy(
  train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]
) -> dict[str, float]:
  """``{"top1", "C", "seconds"}`` of ``fit_svm`` on ``train``, scored on ``test``."""
  t0 = time.perf_counter()
  model = fit_svm(*train)
  top1 = float(np.mean(model.predict(np.asarray(test[0], np.float64)) == np.asarray(test[1])))
  return {"top1": top1, "C": float(model.C), "seconds": time.perf_counter() - t0}
