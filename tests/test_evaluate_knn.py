"""Tests for cljax.evaluate.knn against a float64 NumPy reference."""

import chex
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from test_fidelity_models import HIGHEST, dot_precisions

from cljax.evaluate import knn


def _reference_knn(train, train_labels, test, *, num_classes, k, temperature):
  """Weighted kNN vote written independently: argsort, top-k, exp(sim / T) per class."""
  train = train.astype(np.float64)
  test = test.astype(np.float64)
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  test = test / np.linalg.norm(test, axis=1, keepdims=True)
  sims = test @ train.T
  k = min(k, len(train))
  predictions = []
  for row in sims:
    top = np.argsort(-row, kind="stable")[:k]
    votes = np.zeros(num_classes)
    for index in top:
      votes[train_labels[index]] += np.exp(row[index] / temperature)
    predictions.append(np.argmax(votes))
  return np.array(predictions)


def _random_problem(seed, n_train, n_test, dim=16, num_classes=5):
  rng = np.random.default_rng(seed)
  return (
    rng.normal(size=(n_train, dim)).astype(np.float32),
    rng.integers(0, num_classes, size=n_train),
    rng.normal(size=(n_test, dim)).astype(np.float32),
  )


@pytest.mark.parametrize(("k", "temperature"), [(200, 0.07), (10, 0.07), (25, 0.5)])
def test_matches_numpy_reference(k, temperature):
  train, labels, test = _random_problem(0, n_train=400, n_test=96)
  got = knn.knn_classify(
    train, labels, test, num_classes=5, k=k, temperature=temperature, batch_size=32
  )
  want = _reference_knn(train, labels, test, num_classes=5, k=k, temperature=temperature)
  assert got.shape == (96,) and got.dtype == np.int32
  np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize(("n_test", "batch_size"), [(37, 8), (37, 1024), (1, 8), (64, 64)])
def test_test_count_not_divisible_by_batch_size(n_test, batch_size):
  train, labels, test = _random_problem(1, n_train=120, n_test=n_test)
  got = knn.knn_classify(train, labels, test, num_classes=5, k=15, batch_size=batch_size)
  want = _reference_knn(train, labels, test, num_classes=5, k=15, temperature=0.07)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_k_larger_than_train_set():
  train, labels, test = _random_problem(2, n_train=7, n_test=20)
  got = knn.knn_classify(train, labels, test, num_classes=5, k=200)
  want = _reference_knn(train, labels, test, num_classes=5, k=7, temperature=0.07)
  np.testing.assert_array_equal(np.asarray(got), want)


def _clusters(seed, n_per_class, num_classes=10, dim=32):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(num_classes, dim))
  labels = np.repeat(np.arange(num_classes), n_per_class)
  features = centers[labels] + 0.05 * rng.normal(size=(len(labels), dim))
  return features.astype(np.float32), labels


def test_separable_clusters_are_classified_perfectly():
  # k=200 exceeds the 50 same-class neighbours: the exp(sim / T) weights must still win.
  train, train_labels = _clusters(3, n_per_class=50)
  test, test_labels = _clusters(3, n_per_class=10)
  accuracy = knn.knn_accuracy(train, train_labels, test, test_labels, num_classes=10)
  assert accuracy == 1.0


def test_shuffled_labels_give_chance_accuracy():
  train, train_labels = _clusters(4, n_per_class=100)
  test, test_labels = _clusters(4, n_per_class=100)
  rng = np.random.default_rng(5)
  accuracy = knn.knn_accuracy(
    train, rng.permutation(train_labels), test, test_labels, num_classes=10, k=20
  )
  # Chance is 0.1; the standard error over 1000 test points is about 0.0095.
  assert 0.06 < accuracy < 0.14


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_sharded_inputs_match_single_device(axis_type):
  # Auto is what cljax.sharding.create_mesh builds; Explicit is jax.make_mesh's default.
  train, labels, test = _random_problem(6, n_train=256, n_test=64)
  mesh = Mesh(np.asarray(jax.devices()), ("data",), axis_types=(axis_type,))
  batch = NamedSharding(mesh, PartitionSpec("data"))
  sharded = knn.knn_classify(
    jax.device_put(train, batch),
    jax.device_put(labels, batch),
    jax.device_put(test, batch),
    num_classes=5,
    k=20,
    batch_size=16,
  )
  single = knn.knn_classify(train, labels, test, num_classes=5, k=20, batch_size=16)
  assert jax.device_count() == 8
  chex.assert_trees_all_equal(np.asarray(sharded), np.asarray(single))


def test_similarities_are_full_float32_products():
  # TPU/GPU default precision rounds the inputs to bf16/TF32: cosines off by ~1e-3 and the
  # votes exp(s / 0.07) by a few percent. The jaxpr shows the precision on any backend.
  train, labels, test = _random_problem(0, 40, 10)

  def classify(a, b, c):
    return knn.knn_classify(a, b, c, num_classes=5, k=3, batch_size=4)

  precisions = dot_precisions(classify, train, labels, test)
  assert precisions and all(p == HIGHEST for p in precisions), precisions


def test_rejects_mismatched_shapes():
  train, labels, test = _random_problem(7, n_train=10, n_test=4)
  with pytest.raises(ValueError, match=r"\(10, 16\)"):
    knn.knn_classify(train, labels, test[:, :8], num_classes=5)
  with pytest.raises(ValueError, match="train_labels"):
    knn.knn_classify(train, labels[:9], test, num_classes=5)
  with pytest.raises(ValueError, match="test_labels"):
    knn.knn_accuracy(train, labels, test, labels[:3], num_classes=5)
  with pytest.raises(ValueError, match="temperature"):
    knn.knn_classify(train, labels, test, num_classes=5, temperature=0.0)
