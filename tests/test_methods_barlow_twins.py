"""cljax.methods.barlow_twins: its loss, the bias learning-rate ratio, and 8 devices == 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from method_steps import (
  _assert_8_devices_equal_1,
  _batch,
  _config,
  _global_embeddings,
  _linear_params,
  _method_losses,
)

from cljax import losses, methods
from cljax.methods import barlow_twins


def test_barlow_twins_loss_and_the_bias_learning_rate_ratio():
  batch, params = _batch(), _linear_params(dim=6)
  configs = [
    _config("barlow_twins", barlow_twins__lambda_=0.01, barlow_twins__bias_lr_ratio=r)
    for r in (1.0, 0.1)
  ]
  (loss, grads, metrics), (loss_r, grads_r, _) = _method_losses(configs, batch, params)
  z_a, z_b = _global_embeddings(batch, params)
  np.testing.assert_allclose(loss, losses.barlow_twins_loss(z_a, z_b, 0.01), rtol=1e-5)
  assert metrics["off_diagonal"] > 0
  # The ratio scales the gradient of biases (and BatchNorm parameters), not of kernels,
  # and leaves the loss as it is.
  assert float(loss_r) == float(loss)
  assert np.abs(grads["bias"]).max() > 1e-6
  np.testing.assert_allclose(grads_r["bias"], 0.1 * grads["bias"], rtol=1e-5, atol=1e-12)
  np.testing.assert_array_equal(grads_r["kernel"], grads["kernel"])
  # Without the key the paper's ratio applies: 0.0048 / 0.2.
  config = configs[0]
  del config.barlow_twins["bias_lr_ratio"]
  assert methods.create_method(config).bias_lr_ratio == pytest.approx(0.024)
  value, grad = jax.value_and_grad(lambda p: jnp.sum(barlow_twins.scale_gradient(p, 0.25)))(
    jnp.array([1.0, -2.0])
  )
  assert float(value) == -1.0 and np.all(np.asarray(grad) == 0.25)


def test_barlow_twins_step_on_8_devices_equals_1_device():
  # lr 0.02: Barlow Twins' gradient on the tiny model is ~10x SimCLR's, and its three
  # standardisations (two BatchNorms, the loss's own) amplify float32 noise; at lr 0.1 the
  # parameters end 1.4e-4 apart after two steps, at 0.02 8e-6.
  batches = [_batch(seed=0), _batch(seed=1)]
  _, hist, *_ = _assert_8_devices_equal_1(_config("barlow_twins"), batches, lr=0.02)
  assert hist[0]["off_diagonal"] > 0
