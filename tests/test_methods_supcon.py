"""cljax.methods.supcon in the shared sharded train step: positives from labels, 8 devices == 1.

The loss on the linear stand-in model of method_steps equals SimCLR's with one image per
label; the full step's positives come from other devices.
"""

import chex
import numpy as np
import pytest
from helpers import tiny_config
from method_steps import (
  N,
  _assert_8_devices_equal_1,
  _batch,
  _config,
  _method_losses,
  contrastive_losses_fixture,  # noqa: F401 (the fixture)
  flush_callback_errors,
)


def test_supcon_with_one_image_per_label_is_simclr_nt_xent(contrastive_losses):
  _, params, results = contrastive_losses
  assert _config("supcon").supcon.base_temperature == tiny_config().loss.temperature
  supcon, nt_xent = results["supcon"], results["nt_xent"]
  np.testing.assert_allclose(supcon[0], nt_xent[0], rtol=1e-6)
  chex.assert_trees_all_close(supcon[1], nt_xent[1], rtol=1e-4, atol=1e-7)
  # The base temperature scales the loss by T / T_b.
  ratio = tiny_config().loss.temperature / 0.07
  np.testing.assert_allclose(results["supcon_0.07"][0], nt_xent[0] * ratio, rtol=1e-5)
  # With labels 0..3 (four images per class, across devices) the positives differ.
  ((four_per_class, _, metrics),) = _method_losses([_config("supcon")], _batch(), params)
  assert abs(four_per_class - nt_xent[0]) > 1e-2
  assert metrics["anchor_fraction"] == 1.0


@pytest.fixture(scope="module")
def supcon_run():
  # Labels 0..3 repeat across devices: positives come from other devices.
  batches = [_batch(seed=0), _batch(seed=1)]
  return _assert_8_devices_equal_1(_config("supcon"), batches, keep_going=True)


def test_supcon_step_on_8_devices_equals_1_device(supcon_run):
  _, hist, _ = supcon_run
  assert hist[0]["anchor_fraction"] == 1.0


def test_supcon_without_labels_is_a_clear_error(supcon_run):
  *_, one_more_step = supcon_run  # The compiled 8-device step, its state donated here.
  batch = dict(_batch(), label=np.full(N, -1, np.int32))
  with pytest.raises(Exception, match="method='supcon' needs class labels, but 16 labels"):
    one_more_step(batch)
  flush_callback_errors()
