"""cljax.methods.simclr: the loss variants that loss.name selects, with their hyperparameters.

Checked on the linear stand-in model of method_steps, sharded over 8 devices.
"""

import chex
import jax
import numpy as np
import pytest
from helpers import tiny_config
from method_steps import (
  SIMCLR_VARIANTS,
  _config,
  _global_embeddings,
  contrastive_losses_fixture,  # noqa: F401 (the fixture)
)

from cljax import losses, methods
from cljax.methods import simclr


def test_simclr_loss_names_select_the_variants_with_their_hyperparameters(contrastive_losses):
  batch, params, results = contrastive_losses
  t = tiny_config().loss.temperature
  direct = jax.jit(
    lambda z_a, z_b: {
      "nt_xent": losses.nt_xent(z_a, z_b, t),
      "debiased": losses.debiased_nt_xent(z_a, z_b, t, 0.2),
      "hard_negative": losses.hard_negative_nt_xent(z_a, z_b, t, 0.1, 0.5),
      "decoupled": losses.decoupled_nt_xent(z_a, z_b, t),
    }
  )(*_global_embeddings(batch, params))
  for name in SIMCLR_VARIANTS:
    loss, _, metrics = results[name]
    np.testing.assert_allclose(loss, direct[name], rtol=1e-5, err_msg=name)
    assert np.isfinite(metrics["accuracy"])
  assert len({round(float(results[name][0]), 4) for name in SIMCLR_VARIANTS}) == 4


def test_debiased_with_tau_plus_zero_is_nt_xent_in_value_and_gradient(contrastive_losses):
  _, _, results = contrastive_losses
  debiased, plain = results["debiased_0"], results["nt_xent"]
  np.testing.assert_allclose(debiased[0], plain[0], rtol=1e-6)
  chex.assert_trees_all_close(debiased[1], plain[1], rtol=1e-4, atol=1e-7)


def test_simclr_bad_loss_names_fail_when_the_method_is_built():
  with pytest.raises(ValueError, match="loss.name must be one of .*'nt_xent'.*got 'dcl'"):
    methods.create_method(_config("simclr", loss__name="dcl"))
  with pytest.raises(ValueError, match="loss.name='debiased' has no blockwise form"):
    methods.create_method(
      _config("simclr", loss__name="debiased", loss__implementation="blockwise")
    )
  assert simclr.make_loss_fn(_config("simclr").loss) is losses.nt_xent
