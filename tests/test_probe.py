"""Tests for cljax.probe, the online linear probe of the train step."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from cljax import probe


def _separable(seed, n=256, d=16, c=4):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x, np.argmax(x @ rng.normal(size=(d, c)), axis=1).astype(np.int32)


def test_learns_a_separable_problem():
  x, y = _separable(0)
  params = probe.init_probe_params(jax.random.key(0), 16, 4)
  tx = probe.create_probe_optimizer(1e-2)
  opt_state = tx.init(params)
  step = jax.jit(lambda p, s: probe.probe_update(p, s, x, y, tx=tx, num_classes=4))
  evaluate = jax.jit(probe.probe_loss_and_metrics, static_argnums=3)
  _, first = evaluate(params, x, y, 4)
  assert float(first["probe_loss"]) == pytest.approx(np.log(4), abs=0.05)
  for _ in range(300):
    params, opt_state, metrics = step(params, opt_state)
  _, last = evaluate(params, x, y, 4)
  assert float(last["probe_top1"]) >= 0.95
  assert float(last["probe_loss"]) < 0.3 * float(first["probe_loss"])


def test_unlabelled_rows_are_ignored():
  x, y = _separable(1, n=64)
  params = probe.init_probe_params(jax.random.key(1), 16, 4)
  masked = y.copy()
  masked[::3] = -1
  grad_fn = jax.jit(jax.grad(probe.probe_loss_and_metrics, has_aux=True), static_argnums=3)
  grads, metrics = grad_fn(params, x, masked, 4)
  keep = masked >= 0
  ref_grads, ref_metrics = grad_fn(params, x[keep], y[keep], 4)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(metrics, ref_metrics, rtol=1e-5)
  assert float(metrics["probe_labelled"]) == keep.sum()


def test_no_labels_gives_zero_loss_and_gradient():
  x, _ = _separable(2, n=32)
  params = probe.init_probe_params(jax.random.key(2), 16, 4)
  grad_fn = jax.jit(jax.grad(probe.probe_loss_and_metrics, has_aux=True), static_argnums=3)
  grads, metrics = grad_fn(params, x, -np.ones(32, np.int32), 4)
  assert float(metrics["probe_loss"]) == 0.0
  chex.assert_trees_all_equal(grads, jax.tree.map(jnp.zeros_like, grads))


def test_features_get_no_gradient():
  x, y = _separable(3, n=32)
  params = probe.init_probe_params(jax.random.key(3), 16, 4)
  loss = lambda f: probe.probe_loss_and_metrics(params, f, y, 4)[0]
  assert float(loss(x)) > 0
  np.testing.assert_array_equal(jax.grad(loss)(x), np.zeros_like(x))


def test_sharded_step_equals_global_batch():
  # As in the train step: shard_map over 'data' with check_vma, replicated probe parameters.
  x, y = _separable(4, n=64)
  y[5::7] = -1  # Unequal labelled counts per device.
  params = probe.init_probe_params(jax.random.key(4), 16, 4)
  tx = probe.create_probe_optimizer(1e-2)
  opt_state = tx.init(params)
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  step = lambda p, s, f, lab, axis: probe.probe_update(
    p, s, f, lab, tx=tx, num_classes=4, axis_name=axis
  )
  sharded = jax.jit(
    jax.shard_map(
      lambda p, s, f, lab: step(p, s, f, lab, "data"),
      mesh=mesh,
      in_specs=(P(), P(), P("data"), P("data")),
      out_specs=(P(), P(), P()),
      check_vma=True,
    )
  )(params, opt_state, x, y)
  single = step(params, opt_state, x, y, None)
  assert jax.device_count() == 8
  chex.assert_trees_all_close(sharded, single, rtol=1e-5, atol=1e-7)


def test_rejects_mismatched_shapes():
  params = probe.init_probe_params(jax.random.key(5), 16, 4)
  with pytest.raises(ValueError, match=r"\(16, 4\)"):
    probe.probe_loss_and_metrics(params, np.ones((8, 16)), np.zeros(8, np.int32), 5)
  with pytest.raises(ValueError, match=r"\(7,\)"):
    probe.probe_loss_and_metrics(params, np.ones((8, 16)), np.zeros(7, np.int32), 4)
