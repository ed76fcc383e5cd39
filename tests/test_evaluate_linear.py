"""Tests for cljax.evaluate.linear against scikit-learn's LogisticRegression."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh
from test_fidelity_models import HIGHEST, dot_precisions

from cljax.evaluate import linear

sklearn_linear = pytest.importorskip("sklearn.linear_model")


def _problem(seed, n=300, d=20, c=4, noise=2.0):
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=d) + 3.0).astype(np.float32)
  w = rng.normal(size=(d, c)) / np.std(x, axis=0)[:, None]
  y = np.argmax((x - x.mean(0)) @ w + noise * rng.normal(size=(n, c)), axis=1)
  return x, y


@pytest.mark.parametrize("standardize", [False, True])
def test_matches_sklearn(standardize):
  x, y = _problem(0)
  n, l2 = len(y), 1e-2
  clf, info = linear.fit_logistic_regression(
    x, y, num_classes=4, l2=l2, standardize=standardize, tol=1e-6, max_steps=2000
  )
  assert info["grad_norm"] < 1e-5
  ref_x = x.astype(np.float64)
  if standardize:
    ref_x = (ref_x - ref_x.mean(0)) / ref_x.std(0)
  # sklearn minimises C * sum(CE) + |W|^2 / 2, i.e. ours times C * n with C = 1 / (n * l2).
  ref = sklearn_linear.LogisticRegression(C=1 / (n * l2), tol=1e-10, max_iter=10_000)
  ref.fit(ref_x, y)
  probs = jax.nn.softmax(linear.predict_logits(clf, x))
  np.testing.assert_allclose(probs, ref.predict_proba(ref_x), atol=2e-4)
  np.testing.assert_allclose(clf.kernel, ref.coef_.T, atol=2e-3)


def test_zero_weight_rows_are_left_out():
  x, y = _problem(1)
  weights = (np.arange(len(y)) % 3 != 0).astype(np.float32)
  l2 = 1e-2
  clf, _ = linear.fit_logistic_regression(
    x, y, num_classes=4, l2=l2, weights=weights, standardize=False, tol=1e-6, max_steps=2000
  )
  # With sample weights sklearn minimises C * sum(w CE) + |W|^2 / 2: l2 = 1 / (C * sum(w)).
  ref = sklearn_linear.LogisticRegression(C=1 / (weights.sum() * l2), tol=1e-10, max_iter=10_000)
  ref.fit(x.astype(np.float64), y, sample_weight=weights)
  probs = jax.nn.softmax(linear.predict_logits(clf, x))
  np.testing.assert_allclose(probs, ref.predict_proba(x.astype(np.float64)), atol=2e-3)


def _separable(seed, n, d=32, c=10):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(d, c))
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x, np.argmax(x @ w, axis=1)


def test_separable_features_reach_about_100_percent():
  (train_x, train_y), (test_x, test_y) = _separable(2, 2000), _separable(2, 2000)
  result = linear.linear_probe(train_x, train_y, test_x, test_y, num_classes=10)
  assert result["top1"] >= 0.95
  assert result["top5"] == 1.0
  assert result["l2"] in linear.DEFAULT_L2_GRID
  # Weak regularisation must win on a noiseless problem.
  assert result["l2"] <= 1e-3, result["val_top1"]


def test_random_labels_give_chance():
  rng = np.random.default_rng(3)
  train_x, test_x = rng.normal(size=(2000, 32)), rng.normal(size=(2000, 32))
  train_y, test_y = rng.integers(0, 10, 2000), rng.integers(0, 10, 2000)
  result = linear.linear_probe(train_x, train_y, test_x, test_y, num_classes=10)
  # Chance is 0.1 (top-5: 0.5); the standard error over 2000 points is about 0.007.
  assert 0.07 < result["top1"] < 0.13
  assert 0.45 < result["top5"] < 0.55


def test_topk_accuracy_matches_argsort_reference():
  rng = np.random.default_rng(4)
  logits = rng.integers(0, 4, size=(200, 7)).astype(np.float32)  # Many ties.
  labels = rng.integers(0, 7, size=200)
  got = linear.topk_accuracy(logits, labels, ks=(1, 3, 7))
  # Ties favour the label: among tied classes it ranks first.
  for k in (1, 3, 7):
    higher = (logits > logits[np.arange(200), labels][:, None]).sum(1)
    assert got[f"top{k}"] == pytest.approx(np.mean(higher < k))
  assert got["top7"] == 1.0
  strict = linear.topk_accuracy(np.eye(3)[[0, 1, 2, 1]], np.array([0, 1, 2, 0]), ks=(1,))
  assert strict["top1"] == 0.75


def test_sharded_features_give_the_same_result():
  (train_x, train_y), (test_x, test_y) = _separable(5, 301), _separable(6, 100)
  mesh = Mesh(np.asarray(jax.devices()), ("data",), axis_types=(AxisType.Auto,))
  kwargs = dict(num_classes=10, l2_grid=(1e-3,), tol=1e-4)
  sharded = linear.linear_probe(train_x, train_y, test_x, test_y, mesh=mesh, **kwargs)
  single = linear.linear_probe(train_x, train_y, test_x, test_y, **kwargs)
  assert sharded["l2"] == single["l2"]
  assert sharded["top1"] == pytest.approx(single["top1"], abs=0.011)


def test_logits_and_their_gradients_are_full_float32_products():
  # TPU/GPU default precision would round features and weights to bf16/TF32; the jaxpr shows
  # the precision on any backend, the fit's gradient dots (their transposes) included.
  x, y = _problem(0, n=20, d=5, c=3)
  mean, scale = linear.standardization(x)
  params = (np.zeros((5, 3), np.float32), np.zeros(3, np.float32))

  def loss(p):
    return linear.logistic_loss(p, x, y, np.ones(20, np.float32), 1e-3, mean, scale)

  classifier = linear.LinearClassifier(*params, mean, scale)
  for precisions in (
    dot_precisions(jax.value_and_grad(loss), params),
    dot_precisions(linear.predict_logits, classifier, x),
  ):
    assert len(precisions) >= 2 and all(p == HIGHEST for p in precisions), precisions


def test_rejects_bad_inputs():
  x, y = _problem(7, n=10)
  with pytest.raises(ValueError, match=r"\(10, 20\)"):
    linear.fit_logistic_regression(x, y[:5], num_classes=4, l2=0.1)
  with pytest.raises(ValueError, match="l2"):
    linear.fit_logistic_regression(x, y, num_classes=4, l2=-1.0)
  with pytest.raises(ValueError, match="val_fraction"):
    linear.linear_probe(x, y, x, y, num_classes=4, val_fraction=1.0)


def test_the_sweep_stops_after_patience_strengths_without_a_better_held_out_score(monkeypatch):
  # Held-out scores scripted per strength (largest first): best at 0.1, then two no better.
  scores = {1.0: 0.5, 0.1: 0.7, 0.01: 0.6, 1e-3: 0.7, 1e-4: 0.9}
  fitted = []
  fit = linear.fit_logistic_regression

  def recording_fit(*args, l2, **kwargs):
    fitted.append(l2)
    return fit(*args, l2=l2, **kwargs)

  monkeypatch.setattr(linear, "fit_logistic_regression", recording_fit)
  monkeypatch.setattr(linear, "_weighted_accuracy", lambda c, x, y, w: scores[fitted[-1]])
  (train_x, train_y), (test_x, test_y) = _separable(4, 200), _separable(5, 100)
  # The grid in no order: the sweep goes from the strongest to the weakest strength.
  kwargs = dict(num_classes=10, l2_grid=(1e-3, 1.0, 1e-4, 0.01, 0.1), max_steps=5)

  result = linear.linear_probe(train_x, train_y, test_x, test_y, **kwargs)
  # 0.01 and 1e-3 (a tie is not better) after the best: 1e-4 is never fitted; refit at 0.1.
  assert fitted == [1.0, 0.1, 0.01, 1e-3, 0.1]
  assert result["l2"] == 0.1 and result["skipped_l2"] == [1e-4]
  assert set(result["val_top1"]) == {1.0, 0.1, 0.01, 1e-3}

  fitted.clear()
  result = linear.linear_probe(train_x, train_y, test_x, test_y, patience=None, **kwargs)
  assert fitted == [1.0, 0.1, 0.01, 1e-3, 1e-4, 1e-4]  # The whole grid; 1e-4 wins.
  assert result["l2"] == 1e-4 and result["skipped_l2"] == []
  with pytest.raises(ValueError, match="patience"):
    linear.linear_probe(train_x, train_y, test_x, test_y, patience=0, **kwargs)


def test_the_early_stop_on_real_fits_skips_only_strengths_that_score_no_better():
  # Noisy labels: held-out accuracy peaks at a moderate strength, then falls.
  x, y = _problem(6, n=400, d=60, noise=4.0)
  test_x, test_y = _problem(7, n=400, d=60, noise=4.0)
  early = linear.linear_probe(x, y, test_x, test_y, num_classes=4, patience=1)
  full = linear.linear_probe(x, y, test_x, test_y, num_classes=4, patience=None)
  assert early["skipped_l2"], early["val_top1"]  # The premise: the stop fired here.
  best = max(early["val_top1"].values())
  assert all(full["val_top1"][s] <= best for s in early["skipped_l2"])  # None would have won.
  assert early["l2"] == full["l2"] and early["top1"] == full["top1"]
