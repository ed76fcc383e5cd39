"""LARS masks, learning-rate scaling and the warm-up + cosine schedule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax import defaults, optim


def _lars(lr, weight_decay=0.1):
  config = defaults.base_config().optim
  config.weight_decay = weight_decay
  return optim.create_optimizer(config, optax.constant_schedule(lr))


def _run(tx, params, grads_seq):
  state = tx.init(params)
  deltas = []
  for g in grads_seq:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    deltas.append(updates)
  return deltas


def test_lars_mask_selects_kernels_only():
  params = {
    "conv": {"kernel": jnp.ones((3, 3, 2, 4))},
    "bn": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
    "dense": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)},
  }
  mask = optim.lars_mask(params)
  assert mask == {
    "conv": {"kernel": True},
    "bn": {"scale": False, "bias": False},
    "dense": {"kernel": True, "bias": False},
  }


def test_batchnorm_scale_update_is_plain_momentum_sgd_and_kernel_update_is_not():
  rng = np.random.default_rng(0)
  params = {
    "bn": {"scale": jnp.asarray(rng.normal(size=8), jnp.float32)},
    "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 8)), jnp.float32)},
  }
  grads_seq = [
    jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params) for _ in range(3)
  ]
  lars = _run(_lars(0.5), params, grads_seq)
  sgd = _run(optax.sgd(0.5, momentum=0.9), params, grads_seq)
  for lars_step, sgd_step in zip(lars, sgd, strict=True):
    np.testing.assert_allclose(lars_step["bn"]["scale"], sgd_step["bn"]["scale"], rtol=1e-6)
    assert not np.allclose(lars_step["conv"]["kernel"], sgd_step["conv"]["kernel"], rtol=1e-2)

  # The kernel's first update is exactly LARS: -lr * eta * ||w|| / ||g + wd w|| * (g + wd w).
  w, g = params["conv"]["kernel"], grads_seq[0]["conv"]["kernel"]
  d = g + 0.1 * w
  expected = -0.5 * 1e-3 * jnp.linalg.norm(w) / jnp.linalg.norm(d) * d
  np.testing.assert_allclose(lars[0]["conv"]["kernel"], expected, rtol=1e-5)


@pytest.mark.parametrize(
  "scaling,batch,expected",
  [("linear", 512, 2.0), ("linear", 4096, 16.0), ("sqrt", 4096, 4.8), ("none", 4096, 1.0)],
)
def test_learning_rate_scaling(scaling, batch, expected):
  base = 0.075 if scaling == "sqrt" else 1.0
  assert optim.scaled_learning_rate(base, batch, scaling) == pytest.approx(expected)
  with pytest.raises(ValueError, match="lr_scaling"):
    optim.scaled_learning_rate(1.0, 256, "cubic")


def test_schedule_warmup_end_and_last_step():
  fn = optim.create_learning_rate_fn(peak_lr=4.8, warmup_steps=100, total_steps=1000)
  assert float(fn(0)) == 0.0
  assert float(fn(50)) == pytest.approx(2.4)
  assert float(fn(100)) == pytest.approx(4.8)
  # Half-way through the cosine part the rate is half the peak.
  assert float(fn(550)) == pytest.approx(2.4, rel=1e-5)
  assert float(fn(999)) == pytest.approx(4.8 * 0.5 * (1 + math.cos(math.pi * 899 / 900)), abs=1e-7)
  assert float(fn(1000)) == pytest.approx(0.0, abs=1e-7)


def _optim_config(name, weight_decay=0.04, weight_decay_end=-1.0):
  c = defaults.base_config().optim
  c.name, c.weight_decay, c.weight_decay_end = name, weight_decay, weight_decay_end
  return c


def test_weight_decay_schedule_is_dinos_half_cosine():
  c = _optim_config("adamw", 0.04, 0.4)
  schedule = optim.weight_decay_schedule(c, num_steps=100)
  for t in (0, 25, 50, 99, 100, 150):
    # DINO's cosine_scheduler: end + 0.5 (start - end) (1 + cos(pi t / T)), held at the end.
    expected = 0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * min(t, 100) / 100))
    np.testing.assert_allclose(float(schedule(t)), expected, rtol=1e-5)
  assert optim.weight_decay_schedule(_optim_config("adamw"), 100) == 0.04  # No schedule.
  assert float(optim.weight_decay_schedule(c, 0)(7)) == pytest.approx(0.04)  # Length unknown.


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_scheduled_weight_decay_adds_the_steps_decay_to_the_kernels_only(name):
  params = {"Dense_0": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.full((2,), 2.0)}}
  grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  lr = 0.5
  fixed = optim.create_optimizer(_optim_config(name, 0.04), optax.constant_schedule(lr))
  scheduled = optim.create_optimizer(
    _optim_config(name, 0.04, 0.4), optax.constant_schedule(lr), num_steps=10
  )
  state_f, state_s = fixed.init(params), scheduled.init(params)
  schedule = optim.weight_decay_schedule(_optim_config(name, 0.04, 0.4), 10)
  for t in range(4):
    up_f, state_f = fixed.update(grads, state_f, params)
    up_s, state_s = scheduled.update(grads, state_s, params)
    extra = float(schedule(t)) - 0.04
    # AdamW: the decay term is -lr * wd * p after Adam's scaling; SGD: wd * p joins the
    # gradient before momentum, so step t's difference is the momentum sum of past ones.
    if name == "adamw":
      np.testing.assert_allclose(
        up_s["Dense_0"]["kernel"] - up_f["Dense_0"]["kernel"],
        -lr * extra * 2.0,
        rtol=1e-5,
        atol=1e-7,
      )
    np.testing.assert_array_equal(up_s["Dense_0"]["bias"], up_f["Dense_0"]["bias"])
    if t > 0:
      assert np.all(np.abs(up_s["Dense_0"]["kernel"]) > np.abs(up_f["Dense_0"]["kernel"]))


def test_constant_weight_decay_keeps_optaxs_adamw_state_and_lars_refuses_a_schedule():
  params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))}}
  tx = optim.create_optimizer(_optim_config("adamw"), optax.constant_schedule(0.1))
  reference = optax.adamw(optax.constant_schedule(0.1), weight_decay=0.04, mask=optim.lars_mask)
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(reference.init(params))
  with pytest.raises(ValueError, match="LARS takes a constant optim.weight_decay"):
    optim.create_optimizer(_optim_config("lars", 0.04, 0.4), optax.constant_schedule(0.1), 10)


def _vit_like_params():
  return {
    "cls_token": jnp.ones((1, 1, 3)),
    "pos_embedding": jnp.ones((1, 4, 3)),
    "attention": {"kernel": jnp.ones((3, 2, 2)), "bias": jnp.ones((2, 2))},
    "LayerNorm_0": {"scale": jnp.ones(3), "bias": jnp.ones(3)},
    "frozen_embedding": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
    "logit_scale": jnp.ones(()),
  }


def test_decay_masks_follow_pytorchs_ndim_rule_or_everything():
  params = _vit_like_params()
  # PyTorch's ndim >= 2 (DINO, Barlow Twins, MoCo v3's LARS, open_clip): the tokens and
  # kernels; a Flax attention bias of shape (heads, head_dim) is PyTorch's 1-D bias.
  assert optim.matrix_mask(params) == {
    "cls_token": True,
    "pos_embedding": True,
    "attention": {"kernel": True, "bias": False},
    "LayerNorm_0": {"scale": False, "bias": False},
    "frozen_embedding": {"kernel": False, "bias": False},
    "logit_scale": False,
  }
  everything = optim.all_mask(params)
  assert everything["frozen_embedding"] == {"kernel": False, "bias": False}  # Never trains.
  del everything["frozen_embedding"]
  assert all(jax.tree.leaves(everything))
  # The default keeps the tokens out too (on a ResNet, the same as "matrices").
  assert not optim.lars_mask(params)["cls_token"] and not optim.lars_mask(params)["pos_embedding"]


@pytest.mark.parametrize(
  "name,weight_decay_end,freeze",
  [("lars", -1.0, 0), ("sgd", -1.0, 0), ("sgd", 0.4, 0), ("adamw", -1.0, 0), ("adamw", 0.4, 2)],
)
def test_applied_count_is_the_number_of_updates_for_every_chain(name, weight_decay_end, freeze):
  params = {"last_layer": {"kernel": jnp.ones((3, 2))}, "dense": {"kernel": jnp.ones((2, 3))}}
  frozen = lambda p: {"last_layer": {"kernel": True}, "dense": {"kernel": False}}
  tx = optim.create_optimizer(
    _optim_config(name, 0.04, weight_decay_end),
    optax.constant_schedule(0.1),
    num_steps=10,
    freeze_mask=frozen,
    freeze_steps=freeze,
  )
  state = tx.init(params)
  assert int(optim.applied_count(state)) == 0
  update = jax.jit(tx.update)
  for k in range(1, 5):
    _, state = update(jax.tree.map(jnp.ones_like, params), state, params)
    # Not the frozen group's own count (k - freeze after the freeze).
    assert int(optim.applied_count(state)) == k
  with pytest.raises(ValueError, match="no step count"):
    optim.applied_count(optax.sgd(0.1).init(params))
