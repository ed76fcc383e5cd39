"""LARS masks, learning-rate scaling and the warm-up + cosine schedule."""

import math

import chex
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
  # PyTorch's ndim >= 2 (DINO, Barlow Twins, MoCo v3's LARS): the tokens and kernels; a Flax
  # attention bias of shape (heads, head_dim) is PyTorch's 1-D bias.
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
  # The default keeps the tokens out too (on a ResNet, the same as "matrices"; open_clip's
  # rule on CLIP's models).
  assert not optim.lars_mask(params)["cls_token"] and not optim.lars_mask(params)["pos_embedding"]


def lars_reference(order, p, grads, lrs, *, weight_decay, eta, momentum, decayed, trusted):
  """Each step's update of one parameter under LARS, in float64: ``u = g + wd p`` (if
  ``decayed``), ``u *= eta |p| / |u|`` (if ``trusted``), then ``v <- m v + lr u; p -= v``
  ("lr_then_momentum", SimCLR's TF LARS) or ``v <- m v + u; p -= lr v`` ("momentum_then_lr",
  PyTorch's SGD rule)."""
  p, v, updates = np.asarray(p, np.float64), 0.0, []
  for g, lr in zip(grads, lrs, strict=True):
    u = np.asarray(g, np.float64) + (weight_decay * p if decayed else 0.0)
    if trusted:
      u = u * eta * np.linalg.norm(p) / np.linalg.norm(u)
    v = momentum * v + (lr * u if order == "lr_then_momentum" else u)
    update = -v if order == "lr_then_momentum" else -lr * v
    p = p + update
    updates.append(update)
  return updates


def run_optimizer(tx, params, grads):
  """Each step's updates of ``tx`` applied to ``params``, and its final state."""
  state, updates = tx.init(params), []
  for g in grads:
    update, state = tx.update(g, state, params)
    params = optax.apply_updates(params, update)
    updates.append(update)
  return updates, state


def assert_lars_order(got, order, p, grads, lrs, label, **hyper):
  """``got``, one parameter's update at each step of a schedule that starts at 0, is LARS of
  ``order`` (:func:`lars_reference`, ``hyper`` its keywords) and far from the other order."""
  (other,) = set(optim.LARS_ORDERS) - {order}
  want, wrong = (np.stack(lars_reference(o, p, grads, lrs, **hyper)) for o in (order, other))
  for t, step in enumerate(got):
    # A few float32 operations a step (norms of <= 72 elements): ~1e-6 of the step's size;
    # where the momentum sum cancels, an element's error is relative to its terms, so the
    # absolute floor is the step's largest element's.
    atol = 1e-6 * np.abs(want[t]).max()
    np.testing.assert_allclose(step, want[t], rtol=1e-5, atol=atol, err_msg=f"{label} {t}")
    # From the second step on (the first has lr 0), the other order is far off.
    if t > 0:
      assert np.linalg.norm(step - wrong[t]) > 0.05 * np.linalg.norm(want[t]), (label, t)


@pytest.mark.parametrize("order", optim.LARS_ORDERS)
def test_lars_applies_the_learning_rate_before_or_after_momentum_as_lars_order_says(order):
  # Warm-up then cosine: the rate changes at every step, where the two orders differ.
  lr_fn = optim.create_learning_rate_fn(peak_lr=2.0, warmup_steps=3, total_steps=8)
  lrs = [float(lr_fn(t)) for t in range(6)]
  config = _optim_config("lars", weight_decay=0.1)
  config.lars_order = order
  rng = np.random.default_rng(0)
  params = {
    "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
    "bn": {"scale": jnp.asarray(rng.normal(size=4), jnp.float32)},
  }
  grads = [
    jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    for _ in range(len(lrs))
  ]
  updates, state = run_optimizer(optim.create_optimizer(config, lr_fn), params, grads)
  assert int(optim.applied_count(state)) == len(grads)
  hyper = dict(weight_decay=0.1, eta=config.trust_coefficient, momentum=config.momentum)
  for (module, name), kernel in ((("conv", "kernel"), True), (("bn", "scale"), False)):
    got = [u[module][name] for u in updates]
    g = [x[module][name] for x in grads]
    flags = dict(decayed=kernel, trusted=kernel)
    assert_lars_order(got, order, params[module][name], g, lrs, module, **hyper, **flags)


def test_lr_then_momentum_is_optax_lars_state_included_and_a_bad_order_is_refused():
  params = {"conv": {"kernel": jnp.ones((3, 2))}, "bn": {"bias": jnp.ones(2)}}
  grads = [jax.tree.map(lambda p, k=k: (k + 1.0) * jnp.sin(p + k), params) for k in range(3)]
  lr_fn = lambda count: 0.1 * (count + 1.0)
  config = _optim_config("lars", weight_decay=0.1)
  reference = optax.lars(
    lr_fn, 0.1, optim.lars_mask, config.trust_coefficient, 0.0, optim.lars_mask, config.momentum
  )
  got, state = run_optimizer(optim.create_optimizer(config, lr_fn), params, grads)
  want, reference_state = run_optimizer(reference, params, grads)
  chex.assert_trees_all_close(got, want, rtol=1e-6)
  chex.assert_trees_all_equal_structs(state, reference_state)  # Checkpoints restore.
  config.lars_order = "nesterov"
  with pytest.raises(ValueError, match="optim.lars_order must be one of"):
    optim.create_optimizer(config, lr_fn)


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
