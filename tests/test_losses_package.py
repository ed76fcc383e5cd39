"""cljax.losses as a package: a light import, and dtype and argument checks across its modules."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from loss_references import normal as _normal

from cljax.losses.barlow import barlow_twins_loss
from cljax.losses.debiased import debiased_nt_xent, decoupled_nt_xent, hard_negative_nt_xent
from cljax.losses.supcon import supcon_loss
from cljax.losses.swav import sinkhorn, swav_loss


def test_import_losses_is_light():
  code = (
    "import sys, cljax.losses\n"
    "heavy = [m for m in ('flax', 'grain', 'tensorflow_datasets', 'orbax', 'tensorflow')"
    " if m in sys.modules]\n"
    "assert not heavy, heavy\n"
  )
  subprocess.run([sys.executable, "-c", code], check=True)


def test_losses_compute_in_float32_for_bfloat16_inputs():
  @jax.jit
  def all_losses(a, b):
    return {
      "supcon": supcon_loss(jnp.concatenate([a, b]), jnp.arange(16) % 8),
      "barlow": barlow_twins_loss(a, b),
      "swav": swav_loss(jnp.stack([a, b]) / 4.0),
      "debiased": debiased_nt_xent(a, b),
      "hard": hard_negative_nt_xent(a, b),
      "decoupled": decoupled_nt_xent(a, b),
    }

  a, b = (jnp.asarray(x, jnp.bfloat16) for x in (_normal(60, 8, 4), _normal(61, 8, 4)))
  got = all_losses(a, b)
  expected = all_losses(a.astype(jnp.float32), b.astype(jnp.float32))
  for name, loss in got.items():
    assert loss.dtype == jnp.float32, name
    np.testing.assert_allclose(float(loss), float(expected[name]), rtol=1e-5, err_msg=name)


_X = np.ones((4, 3), np.float32)


_S = np.zeros((3, 4, 5), np.float32)


@pytest.mark.parametrize(
  "call,match",
  [
    (lambda: supcon_loss(np.ones(4), np.arange(4)), "embeddings"),
    (lambda: supcon_loss(_X, np.arange(5)), "labels"),
    (lambda: supcon_loss(_X, np.zeros(4, np.float32)), "integer"),
    (lambda: supcon_loss(_X, np.arange(4), 0.0), "temperature"),
    (lambda: supcon_loss(_X, np.arange(4), base_temperature=-1.0), "base_temperature"),
    (lambda: barlow_twins_loss(_X, np.ones((4, 2))), "same shape"),
    (lambda: barlow_twins_loss(np.ones(4), np.ones(4)), "z_a"),
    (lambda: barlow_twins_loss(_X, _X, -1.0), "lambda_"),
    (lambda: barlow_twins_loss(_X, _X, eps=0.0), "eps"),
    (lambda: sinkhorn(np.ones(4)), "scores"),
    (lambda: sinkhorn(_X, num_iters=0), "num_iters"),
    (lambda: sinkhorn(_X, epsilon=0.0), "epsilon"),
    (lambda: swav_loss(_X), "scores"),
    (lambda: swav_loss(_S[:1]), "2 views"),
    (lambda: swav_loss(_S, assign_views=()), "assign_views"),
    (lambda: swav_loss(_S, assign_views=(0, 0)), "assign_views"),
    (lambda: swav_loss(_S, assign_views=(3,)), "assign_views"),
    (lambda: swav_loss(_S, temperature=0.0), "temperature"),
    (lambda: swav_loss(_S, epsilon=-1.0), "epsilon"),
    (lambda: swav_loss(_S, sinkhorn_iters=0), "sinkhorn_iters"),
    (lambda: swav_loss(_S, queue_scores=np.zeros((2, 4))), "queue_scores"),
    (lambda: swav_loss(_S, queue_scores=np.zeros((3, 2, 5))), "queue_scores"),
    (lambda: debiased_nt_xent(_X, _X, tau_plus=1.0), "tau_plus"),
    (lambda: debiased_nt_xent(_X, _X, 0.0), "temperature"),
    (lambda: debiased_nt_xent(_X, np.ones((3, 3))), "same shape"),
    (lambda: debiased_nt_xent(_X[:1], _X[:1]), "negative"),
    (lambda: hard_negative_nt_xent(_X, _X, beta=-1.0), "beta"),
    (lambda: hard_negative_nt_xent(_X, _X, tau_plus=-0.1), "tau_plus"),
    (lambda: decoupled_nt_xent(_X[:1], _X[:1]), "negative"),
    (lambda: decoupled_nt_xent(np.ones(4), np.ones(4)), "z_a"),
  ],
)
def test_bad_arguments_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()
