"""The cross-entropy baseline (method="supervised") in the shared sharded train step.

Its loss is checked against float64 NumPy on a linear stand-in model sharded over 8
devices (the mean over the global batch, not one device's), its full train step on 8
devices against 1, and its configuration errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from method_steps import (
  N,
  _assert_8_devices_equal_1,
  _config,
  _global_embeddings,
  _linear_params,
  _method_losses,
  flush_callback_errors,
)
from test_step import _batch

from cljax import methods
from cljax.methods import supervised

NUM_CLASSES = 4  # _batch's labels are 0..3.


def _supervised_config():
  c = _config("supervised")
  c.head.num_layers = 1
  c.head.output_dim = NUM_CLASSES
  c.head.output_norm = "none"
  return c


def np_cross_entropy(logits, labels):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  return -np.mean(log_p[np.arange(len(labels)), labels])


def test_loss_is_cross_entropy_over_both_views_of_the_global_batch():
  batch = _batch()
  params = _linear_params(dim=NUM_CLASSES)
  ((loss, grads, metrics),) = _method_losses([_supervised_config()], batch, params)
  z_a, z_b = _global_embeddings(batch, params)
  labels = np.tile(batch["label"], 2)
  logits = np.concatenate([z_a, z_b])
  np.testing.assert_allclose(float(loss), np_cross_entropy(logits, labels), rtol=1e-5)
  expected_accuracy = np.mean(np.argmax(logits, axis=1) == labels)
  np.testing.assert_allclose(float(metrics["train_accuracy"]), expected_accuracy, atol=1e-6)

  # The gradient equals that of the global loss computed on one device.
  def global_loss(p):
    z_a, z_b = _global_embeddings(batch, p)
    logp = jax.nn.log_softmax(jnp.concatenate([z_a, z_b]))
    return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(labels)[:, None], axis=1))

  expected = jax.grad(global_loss)(params)
  for name in params:
    np.testing.assert_allclose(grads[name], expected[name], rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def supervised_run():
  return _assert_8_devices_equal_1(_supervised_config(), [_batch(seed=0)] * 4, keep_going=True)


def test_step_on_8_devices_equals_1_device_and_learns_the_labels(supervised_run):
  _, hist, _ = supervised_run
  assert len(hist) == 4 and hist[0]["loss"] > hist[-1]["loss"]
  assert {"train_accuracy", "loss"} <= set(hist[0])


def test_unlabelled_batch_in_the_step_is_an_error_that_names_the_method(supervised_run):
  *_, one_more_step = supervised_run  # The compiled 8-device step.
  batch = dict(_batch(), label=np.full(N, -1, np.int32))
  with pytest.raises(Exception, match="method='supervised' needs class labels, but 16 labels"):
    one_more_step(batch)
  flush_callback_errors()


@pytest.mark.parametrize(
  "head, match",
  [
    (dict(output_dim=10), "head.output_dim=4"),
    (dict(num_layers=2), "num_layers=2"),
    (dict(output_norm="bn"), "output_norm='bn'"),
  ],
)
def test_a_head_that_is_not_a_linear_classifier_is_a_clear_error(head, match):
  config = _supervised_config()
  for key, value in head.items():
    config.head[key] = value
  with pytest.raises(ValueError, match=match):
    supervised.check_classifier_head(config, NUM_CLASSES)
  supervised.check_classifier_head(_supervised_config(), NUM_CLASSES)  # The right head passes.


def test_unlabelled_data_is_a_clear_error_before_anything_compiles():
  method = methods.create_method(_supervised_config())
  with pytest.raises(ValueError, match="method='supervised' trains with labels, .* 0 classes"):
    method.check_data(None, 0)
  method.check_data(None, NUM_CLASSES)
  with pytest.raises(ValueError, match="head.output_dim=10"):
    method.check_data(None, 10)
  with pytest.raises(ValueError, match="method='supcon' trains with labels, .* 1 classes"):
    methods.create_method(_config("supcon")).check_data(None, 1)
