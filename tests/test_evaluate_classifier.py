"""Tests for SimCLR's SGD linear protocol and semi-supervised fine-tuning, on tiny data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from cljax import methods, models, step
from cljax.data import sources
from cljax.evaluate import classifier

_PALETTE = np.array([[220, 40, 40], [40, 220, 40], [40, 40, 220], [220, 220, 40]])


def _colour_source(n, seed, size=16):
  """Four classes told apart by their mean colour under heavy noise: learnable, not trivial."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 4, n)
  images = _PALETTE[labels][:, None, None, :] + rng.normal(0, 60, (n, size, size, 3))
  return sources.ArraySource(np.clip(images, 0, 255).astype(np.uint8), labels)


@pytest.fixture(scope="module")
def setup():
  config = tiny_config()
  config.data.num_workers = 0
  config.evals.batch_size = 64
  method = methods.create_method(config)
  state = step.create_train_state(method, jax.random.key(0), lambda _: 0.0, (16, 16, 3))
  return method, state, _colour_source(512, 0), _colour_source(128, 1)


def test_balanced_subset():
  labels = np.repeat(np.arange(5), [100, 200, 50, 10, 40])
  labels = np.concatenate([labels, -np.ones(30, int)])
  subset = classifier.balanced_subset(labels, 0.1, seed=3)
  np.testing.assert_array_equal(np.bincount(labels[subset]), [10, 20, 5, 1, 4])
  assert len(np.unique(subset)) == len(subset) and np.all(np.diff(subset) > 0)
  np.testing.assert_array_equal(subset, classifier.balanced_subset(labels, 0.1, seed=3))
  assert not np.array_equal(subset, classifier.balanced_subset(labels, 0.1, seed=4))
  with pytest.raises(ValueError, match="fraction"):
    classifier.balanced_subset(labels, 0.0)


def test_frozen_classifier_gives_the_encoder_no_gradient(setup):
  config = setup[0].config
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 3)), jnp.float32)
  for frozen in (True, False):
    model = classifier.Classifier(models.create_encoder(config.model), 4, frozen)
    variables = model.init(jax.random.key(1), x, train=False)
    # A random layer (it starts at zero), so that gradients can reach the encoder at all.
    params = dict(variables["params"])
    kernel = params["classifier"]["kernel"]
    params["classifier"] = {
      "kernel": jax.random.normal(jax.random.key(2), kernel.shape),
      "bias": params["classifier"]["bias"],
    }

    def loss(params, model=model, variables=variables):
      v = {"params": params, "batch_stats": variables["batch_stats"]}
      logits, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
      return jnp.sum(jax.nn.log_softmax(logits)[:, 0] * jnp.arange(4.0))

    grads = jax.jit(jax.grad(loss))(params)
    encoder_norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads["encoder"]))))
    assert (encoder_norm == 0.0) == frozen, (frozen, encoder_norm)


def test_linear_probe_sgd_learns_and_random_labels_do_not(setup):
  method, state, train_source, eval_source = setup
  kwargs = dict(num_epochs=2, batch_size=64, base_lr=1.0, log_every_steps=100)
  result = classifier.linear_probe_sgd(
    method, state, train_source=train_source, eval_source=eval_source, **kwargs
  )
  assert result["top1"] > 0.8  # Chance: 0.25.
  assert result["steps"] == 2 * (512 // 64)
  shuffled = sources.ArraySource(
    train_source.images, np.random.default_rng(5).permutation(train_source.labels)
  )
  control = classifier.linear_probe_sgd(
    method, state, train_source=shuffled, eval_source=eval_source, num_classes=4, **kwargs
  )
  assert control["top1"] < 0.45


def test_finetune_on_a_label_subset_beats_chance(setup):
  method, state, train_source, eval_source = setup
  result = classifier.finetune(
    method,
    state,
    label_fraction=0.1,
    train_source=train_source,
    eval_source=eval_source,
    num_epochs=8,
    batch_size=32,
    base_lr=0.5,
  )
  assert result["num_labelled"] == len(classifier.balanced_subset(train_source.labels, 0.1))
  assert result["steps"] == 8 * result["num_labelled"] // 32
  assert result["top1"] > 0.6  # Chance: 0.25.


def test_too_small_training_set_is_an_error(setup):
  method, state, train_source, eval_source = setup
  with pytest.raises(ValueError, match="fewer than one batch"):
    classifier.train_classifier(
      method,
      state,
      classifier.Subset(train_source, range(16)),
      eval_source,
      num_classes=4,
      frozen=True,
      num_epochs=1,
      batch_size=32,
      base_lr=0.1,
    )
