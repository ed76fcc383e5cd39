"""cljax.methods.swav: multi-crop codes, frozen prototypes and the queue; 8 devices == 1.

One multi-crop run with a frozen start and a queue, on 8 devices and on 1.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import float64_model, to_float64
from method_steps import N, _batch, _config, _initial_state, _queue_in_batch_order, _run

from cljax import losses, methods

LOCAL_CROPS, LOCAL_SIZE = 2, 8


def _multicrop_batch(seed=0):
  batch = _batch(seed=seed)
  rng = np.random.default_rng(100 + seed)
  shape = (N, LOCAL_CROPS, LOCAL_SIZE, LOCAL_SIZE, 3)
  batch["local_views"] = rng.integers(0, 256, shape, dtype=np.uint8)
  return batch


@functools.partial(jax.jit, static_argnums=0)
def _swav_apply(model, variables, x):
  return model.apply(variables, x, train=True, scores=True, mutable=["batch_stats"])[0]


def _swav_forward(config, state, batch, step):
  """One device, the global batch at once: unit embeddings (2, N, d) and scores (V, N, K)."""
  method = methods.create_method(config)
  views = method.views(jax.tree.map(jnp.asarray, batch), jax.random.key(1), jnp.asarray(step))
  model = method.create_model(bn_axis_name=None)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  _, z, global_scores = _swav_apply(model, variables, views["global"])
  local_scores = _swav_apply(model, variables, views["local"])[2]
  scores = jnp.concatenate(
    [global_scores.reshape(2, N, -1), local_scores.reshape(-1, N, global_scores.shape[-1])]
  )
  return losses.l2_normalize(z).reshape(2, N, -1), scores


def _swav_loss(config, scores, **kwargs):
  return losses.swav_loss(
    scores,
    temperature=config.loss.temperature,
    epsilon=config.swav.epsilon,
    sinkhorn_iters=config.swav.sinkhorn_iterations,
    **kwargs,
  )


def _swav_multicrop_config():
  """Prototypes frozen for steps 0 and 1; the queue (4 rows per device = 2 batches) filled
  from step 1, full after step 2, used at 3. SGD with momentum and weight decay on every
  parameter (SwAV's ``decay_mask="all"``), so a freeze by zero gradients would still move
  the prototypes."""
  config = _config(
    "swav",
    swav__freeze_prototypes_epochs=2.0,
    swav__queue_size=4,
    swav__queue_start_epoch=1.0,
    optim__weight_decay=0.05,
  )
  config.data.augment.num_local_crops = LOCAL_CROPS
  config.data.augment.local_crop_size = LOCAL_SIZE
  return config


@pytest.fixture(scope="module")
def swav_run():
  """Four multi-crop steps on 8 devices, one step per epoch (``_swav_multicrop_config``)."""
  config = _swav_multicrop_config()
  batches = [_multicrop_batch(seed=s) for s in range(4)]
  states, hist = _run(config, jax.devices(), batches, steps_per_epoch=1)
  assert all(np.isfinite(m["loss"]) for m in hist)
  return config, batches, states, hist


def test_swav_multicrop_step_on_8_devices_equals_1_device():
  # In float64, as the momentum methods' test: in float32 the sharded and the one-device
  # step differ by summation order alone, but BatchNorm of near-constant features amplifies
  # that past any bound from float32's eps (a BatchNorm bias 1.7e-4 apart after 4 steps with
  # XLA's own CPU kernels). In float64 the same function leaves only float64 rounding,
  # amplified alike; a real asymmetry (per-device statistics, codes or queue) is O(1e-2).
  config = _swav_multicrop_config()
  batches = [_multicrop_batch(seed=s) for s in range(4)]
  with float64_model(config):
    init = to_float64(_initial_state(config, 0.1, len(batches), 1))
    states8, hist8 = _run(config, jax.devices(), batches, steps_per_epoch=1, init=init)
    states1, hist1 = _run(config, jax.devices()[:1], batches, steps_per_epoch=1, init=init)
  assert jax.tree.leaves(states8[-1].params)[0].dtype == np.float64
  for m8, m1 in zip(hist8, hist1, strict=True):
    chex.assert_trees_all_close(m8, m1, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(states8[-1].params, states1[-1].params, rtol=1e-7, atol=1e-7)
  # The queued embeddings pass through float32 (2^-24 apart measured, half an ulp of 1):
  # 1e-6 is 8 ulps of 1, and 1e4 below a misplaced row.
  queue8 = _queue_in_batch_order(states8[-1].method_state, 8)
  chex.assert_trees_all_close(queue8, states1[-1].method_state, rtol=1e-6, atol=1e-6)


def test_swav_multicrop_predicts_the_global_crops_codes_from_every_crop(swav_run):
  config, batches, states, hist = swav_run
  _, scores = _swav_forward(config, states[0], batches[0], 0)
  assert scores.shape == (2 + LOCAL_CROPS, N, config.swav.num_prototypes)
  expected = _swav_loss(config, scores, assign_views=(0, 1))
  np.testing.assert_allclose(hist[0]["loss"], expected, rtol=1e-5)
  # Teeth: codes from a local crop as well, or no local crops, are other losses.
  assert abs(_swav_loss(config, scores, assign_views=(0, 1, 2)) - expected) > 1e-4
  assert abs(_swav_loss(config, scores[:2], assign_views=(0, 1)) - expected) > 1e-4


def _frozen_group_state(opt_state):
  """The prototypes' optimiser state (``optim.freeze_for_steps``'s frozen group)."""
  return opt_state.inner_states["frozen"].inner_state.inner_state


def test_swav_prototypes_are_skipped_by_the_optimiser_while_frozen(swav_run):
  # The official code sets the prototypes' grad to None: no update, no weight decay, no
  # momentum while frozen, and their optimiser starts afresh when the freeze ends.
  config, _, states, hist = swav_run
  assert config.optim.weight_decay > 0 and config.optim.momentum > 0
  assert [m["prototypes_frozen"] for m in hist] == [1.0, 1.0, 0.0, 0.0]
  kernels = [s.params["prototypes"]["kernel"] for s in states]
  np.testing.assert_array_equal(kernels[1], kernels[0])
  np.testing.assert_array_equal(kernels[2], kernels[0])
  assert np.abs(kernels[3] - kernels[2]).max() > 1e-6
  group = [_frozen_group_state(s.opt_state) for s in states]
  chex.assert_trees_all_equal(group[1], group[0])
  chex.assert_trees_all_equal(group[2], group[0])
  assert np.abs(jax.tree.leaves(group[3])[-1]).max() > 0  # Momentum, from the first update.
  # The rest of the network trains meanwhile.
  head = [s.params["head"]["Dense_1"]["kernel"] for s in states]
  assert np.abs(head[1] - head[0]).max() > 1e-6


def test_swav_prototypes_mask_selects_the_prototypes_only(swav_run):
  mask = methods.swav.prototypes_mask(swav_run[2][0].params)
  assert all(jax.tree.leaves(mask["prototypes"]))
  assert not any(jax.tree.leaves({k: v for k, v in mask.items() if k != "prototypes"}))


def test_swav_scores_do_not_depend_on_the_prototypes_norm():
  # Weight decay shrinks frozen prototypes geometrically (methods.swav.unit_prototypes); a
  # kernel 1e-12 times smaller must score the same. float32 cosines over d = 16: error
  # about d * 6e-8 = 1e-6.
  rng = np.random.default_rng(0)
  z = losses.l2_normalize(jnp.asarray(rng.normal(size=(8, 16)), jnp.float32))
  kernel = jnp.asarray(rng.normal(size=(16, 32)), jnp.float32)
  score = lambda k: methods.swav.Prototypes(32).apply({"params": {"kernel": k}}, z)
  expected = np.asarray(z, np.float64) @ (kernel / np.linalg.norm(kernel, axis=0))
  np.testing.assert_allclose(score(kernel), expected, atol=1e-6)
  np.testing.assert_allclose(score(kernel * 1e-12), expected, atol=1e-6)


def test_swav_queue_fills_in_order_and_joins_sinkhorn_once_full(swav_run):
  config, batches, states, hist = swav_run
  assert [m["queue_used"] for m in hist] == [0.0, 0.0, 0.0, 1.0]
  assert [int(s.method_state["queue_batches"]) for s in states] == [0, 0, 1, 2, 2]
  assert not np.any(states[1].method_state["queue"])  # Step 0 is before queue_start.
  # After steps 1 and 2, device i's rows 4i..4i+3 of queue v hold global crop v's unit
  # embeddings of its own images 2i, 2i+1: step 2's first, then step 1's.
  queue = states[3].method_state["queue"]
  assert queue.shape == (2, 8 * 4, config.head.output_dim)
  z = {k: _swav_forward(config, states[k], batches[k], k)[0] for k in (1, 2)}
  rows = [
    np.concatenate([z[2][:, 2 * i : 2 * i + 2], z[1][:, 2 * i : 2 * i + 2]], 1) for i in range(8)
  ]
  # Float32 noise of two trained steps: ~5e-5; a misplaced row is O(0.1) off.
  np.testing.assert_allclose(queue, np.concatenate(rows, axis=1), atol=2e-4)

  # Before step 3 the queue is filling, not used: the losses are the plain ones.
  for k in range(3):
    _, scores = _swav_forward(config, states[k], batches[k], k)
    np.testing.assert_allclose(hist[k]["loss"], _swav_loss(config, scores), rtol=1e-5)
  # At step 3 Sinkhorn also sees the global queue's scores against the current prototypes.
  _, scores = _swav_forward(config, states[3], batches[3], 3)
  kernel = states[3].params["prototypes"]["kernel"]
  queue_scores = jnp.einsum("aqd,dk->aqk", queue, losses.l2_normalize(kernel, axis=0))
  with_queue = _swav_loss(config, scores, queue_scores=queue_scores)
  np.testing.assert_allclose(hist[3]["loss"], with_queue, rtol=1e-5)
  assert abs(with_queue - _swav_loss(config, scores)) > 1e-4


def test_swav_queue_must_hold_whole_local_batches():
  with pytest.raises(ValueError, match="multiple of the per-device batch 2"):
    methods.create_method(_config("swav", swav__queue_size=3)).init_state(jax.random.key(0), {})


def test_swav_model_applies_like_every_cljax_model():
  method = methods.create_method(_config("swav"))
  variables = jax.eval_shape(lambda: method.init_variables(jax.random.key(0), (16, 16, 3)))
  assert variables["params"]["prototypes"]["kernel"].shape == (16, 24)
  apply = lambda v, x: method.create_model().apply(v, x, train=False)
  features, z = jax.eval_shape(apply, variables, jnp.zeros((2, 16, 16, 3)))
  assert features.shape == (2, 8) and z.shape == (2, 16)
