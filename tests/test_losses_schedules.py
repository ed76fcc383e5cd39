"""cljax.losses.schedules: the cosine ramp and the EMA update."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from loss_references import assert_close as _assert_close
from loss_references import assert_zero as _assert_zero

from cljax.losses import schedules


def test_cosine_ramp_values_at_start_middle_end_and_clamped():
  f = jax.jit(lambda s: schedules.cosine_ramp(s, 100, 0.996, 1.0))
  for step, expected in [(0, 0.996), (50, 0.998), (100, 1.0), (250, 1.0)]:
    _assert_close(f(jnp.int32(step)), expected, rtol=1e-7)
    _assert_close(schedules.cosine_ramp(step, 100, 0.996), expected, rtol=1e-7)
  # BYOL's formula at a quarter: 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2.
  _assert_close(schedules.cosine_ramp(25, 100, 0.99), 1 - 0.01 * (np.cos(np.pi / 4) + 1) / 2)
  _assert_close(schedules.cosine_ramp(50, 100, 2.0, end=0.0), 1.0)
  with pytest.raises(ValueError, match="total_steps"):
    schedules.cosine_ramp(0, 0, 0.99)


def test_ema_update_over_pytrees():
  target = {"w": np.ones((2, 3), np.float32), "b": [np.zeros(3, np.float32)]}
  online = {"w": np.full((2, 3), 3.0, np.float32), "b": [np.ones(3, np.float32)]}
  new = jax.jit(schedules.ema_update)(target, online, 0.75)
  chex.assert_trees_all_close(new, {"w": np.full((2, 3), 1.5), "b": [np.full(3, 0.25)]})
  chex.assert_trees_all_equal(schedules.ema_update(target, online, 1.0), target)
  chex.assert_trees_all_equal(schedules.ema_update(target, online, 0.0), online)
  # The online parameters receive no gradient through the update.
  grads = jax.grad(
    lambda o: sum(jnp.sum(x) for x in jax.tree.leaves(schedules.ema_update(target, o, 0.5)))
  )(online)
  _assert_zero(grads)
  bf16 = schedules.ema_update(jnp.ones(3, jnp.bfloat16), jnp.zeros(3, jnp.float32), 0.5)
  assert bf16.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="decay"):
    schedules.ema_update(target, online, 1.5)
  with pytest.raises(ValueError, match="shape"):
    schedules.ema_update({"w": np.ones(3)}, {"w": np.ones(4)}, 0.5)
  with pytest.raises(ValueError):
    schedules.ema_update(target, {"w": online["w"]}, 0.5)
