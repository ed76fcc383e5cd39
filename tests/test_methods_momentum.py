"""cljax.methods.momentum (MoCo v2/v3, BYOL) and SimSiam: sharding, target networks, the queue.

Also create_method's error for an unknown name and cljax.methods.base.ema_decay's schedule.
"""

import importlib.util
import os
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import float64_model, initial_state, state_and_step, tiny_config, to_float64
from jax.sharding import PartitionSpec as P
from test_step import _batch

from cljax import collapse, losses, methods, metrics, sharding, step, train
from cljax.methods import base, momentum

MOMENTUM = ("moco_v2", "moco_v3", "byol")


def _config(method, **overrides):
  c = tiny_config()
  c.method = method
  c.moco.queue_size = 64
  if method in ("moco_v3", "byol", "simsiam"):
    c.predictor.num_layers = 2
    c.predictor.hidden_dim = 32
  c.ema.base = 0.9  # A visible EMA step.
  for key, value in overrides.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


def _run(config, devices, batches, num_steps=10, lr=0.1, prepare=lambda state: state):
  mesh = sharding.create_mesh(devices)
  lr_fn = optax.constant_schedule(lr)
  state, step_fn = state_and_step(config, mesh, lr_fn, num_classes=4, num_steps=num_steps)
  state = prepare(state)
  history = []
  for batch in batches:
    state, step_metrics = step_fn(
      state, jax.device_put(batch, sharding.batch_sharded(mesh)), jax.random.key(1)
    )
    history.append(jax.device_get(step_metrics))
  return jax.device_get(state), history


@pytest.mark.parametrize("method", ["moco_v2", "moco_v3", "byol", "simsiam"])
def test_method_step_on_8_devices_equals_1_device(method):
  # In float64. In float32 the sharded and the single-device step differ by summation order
  # alone, but BatchNorm of near-constant features and LARS's trust ratios of near-zero
  # biases amplify that past any bound derived from float32's eps (BYOL's BatchNorm scales
  # and biases: 1.8e-4 to 2.7e-4 after two steps on two different CPUs, other leaves ~1e-5).
  # In float64 the same amplification leaves at most 2e-9 (MoCo v2 with LARS; 1e-14 for
  # BYOL): the two steps compute one function, with no asymmetry in the target network's
  # statistics. A real one (per-device BatchNorm, negatives or queue) is O(1e-2).
  config = _config(method)
  batches = [_batch(seed=0), _batch(seed=1)]
  with float64_model(config):
    state8, hist8 = _run(config, jax.devices(), batches, prepare=to_float64)
    state1, hist1 = _run(config, jax.devices()[:1], batches, prepare=to_float64)
  assert jax.tree.leaves(state8.params)[0].dtype == np.float64
  # Metrics are cast to float32 at the end: a few of its ulps (eps 1.2e-7).
  for m8, m1 in zip(hist8, hist1, strict=True):
    chex.assert_trees_all_close(m8, m1, rtol=1e-6, atol=1e-6)
  # 50x the largest float64 difference measured; 1e5 below a real asymmetry.
  chex.assert_trees_all_close(state8.params, state1.params, rtol=1e-7, atol=1e-7)
  # MoCo v2's queued keys pass through float32 (2^-25 apart measured, a quarter ulp of 1):
  # 1e-6 is 8 ulps of 1, and 1e4 below a misplaced key.
  chex.assert_trees_all_close(state8.method_state, state1.method_state, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(state8.batch_stats, state1.batch_stats, rtol=1e-7, atol=1e-7)
  assert np.isfinite(hist8[-1]["loss"])


def _official_mlp(d_in, mlp_dim, d_out, last_bn):
  """The ``(params, batch_stats)`` shapes of MoCo v3's ``_build_mlp(2, d_in, mlp_dim, d_out,
  last_bn)`` as a cljax head holds them: bias-free Linear layers, an affine BatchNorm between
  them, and (``last_bn``) a BatchNorm without affine parameters, which has statistics only."""
  params = {
    "Dense_0": {"kernel": (d_in, mlp_dim)},
    "BatchNorm_0": {"scale": (mlp_dim,), "bias": (mlp_dim,)},
    "Dense_1": {"kernel": (mlp_dim, d_out)},
  }
  stats = {"BatchNorm_0": {"mean": (mlp_dim,), "var": (mlp_dim,)}}
  if last_bn:
    stats["BatchNorm_1"] = {"mean": (d_out,), "var": (d_out,)}
  return params, stats


@pytest.mark.parametrize("preset", ["gpu", "cpu"])
def test_mocov3_cifar_recipe_has_the_official_resnet_heads(preset):
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "mocov3_cifar10.py"
  spec = importlib.util.spec_from_file_location("mocov3_cifar10", path)
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  config = recipe.get_config(preset)
  assert config.model.name == "resnet"
  method = methods.create_method(config)
  variables = jax.eval_shape(lambda: method.init_variables(jax.random.key(0), (32, 32, 3)))
  shapes = jax.tree.map(lambda x: x.shape, variables)
  mlp, dim = config.head.hidden_dim, config.head.output_dim
  features = shapes["params"]["head"]["Dense_0"]["kernel"][0]
  # MoCo_ResNet: projector _build_mlp(2, features, mlp, dim), predictor _build_mlp(2, dim, mlp,
  # dim, last_bn=False).
  for name, args in (("head", (features, mlp, dim, True)), ("predictor", (dim, mlp, dim, False))):
    params, stats = _official_mlp(*args)
    assert shapes["params"][name] == params, name
    assert shapes["batch_stats"][name] == stats, name


def test_unknown_method_is_named_with_the_choices():
  with pytest.raises(ValueError, match="Unknown method 'mocov9'.*'byol'"):
    methods.create_method(_config("mocov9"))


def test_ema_decay_follows_the_schedule():
  config = _config("byol")
  config.ema.base, config.ema.final = 0.996, 1.0
  values = [float(base.ema_decay(config, jnp.asarray(k), 100)) for k in (0, 50, 100, 150)]
  # A cosine and a few float32 operations on values near 1: a few ulps (eps 1.2e-7); a
  # wrong schedule is off by 1e-3.
  np.testing.assert_allclose(values, [0.996, 0.998, 1.0, 1.0], rtol=4 * np.finfo(np.float32).eps)
  config.ema.schedule = "constant"
  assert float(base.ema_decay(config, jnp.asarray(50), 100)) == pytest.approx(0.996)
  config.ema.schedule = "linear"
  with pytest.raises(ValueError, match="ema.schedule"):
    base.ema_decay(config, jnp.asarray(0), 100)


@pytest.mark.parametrize("method", MOMENTUM)
def test_target_is_the_ema_of_the_new_online_parameters(method):
  config = _config(method)
  lr_fn = optax.constant_schedule(0.1)
  init = jax.device_get(initial_state(config, lr_fn))
  state, _ = _run(config, jax.devices(), [_batch()])
  decay = 0.9  # ema.base at step 0 of the cosine ramp.
  online = {k: v for k, v in state.params.items() if k != "predictor"}
  expected = jax.tree.map(
    lambda t, o: decay * t + (1 - decay) * o, init.method_state["target_params"], online
  )
  chex.assert_trees_all_close(state.method_state["target_params"], expected, rtol=1e-6, atol=1e-7)
  # The target started as a copy of the online network and moved by less than it.
  moved = jax.tree.map(
    lambda a, b: np.abs(a - b).max(), state.params["encoder"], init.params["encoder"]
  )
  assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.parametrize("method", ["moco_v2", "byol"])  # MoCo v3 shares target_forward.
def test_the_target_network_gets_no_gradient(method):
  config = _config(method)
  mesh = sharding.create_mesh()
  method_obj = methods.create_method(config)
  lr_fn = optax.constant_schedule(0.1)
  state = step.place_state(initial_state(config, lr_fn), mesh, method_obj)
  batch = jax.device_put(_batch(), sharding.batch_sharded(mesh))

  def target_grad(method_state, batch):
    s = state.replace(method_state=method_state)
    views = method_obj.views(batch, jax.random.key(1), s.step)

    def loss_of_target(target_params):
      s2 = s.replace(method_state=dict(method_state, target_params=target_params))
      return method_obj.loss(s.params, s2, views, batch)[0]

    return jax.grad(loss_of_target)(method_state["target_params"])

  grads = jax.jit(
    jax.shard_map(
      target_grad,
      mesh=mesh,
      in_specs=(method_obj.state_specs(), P("data")),
      out_specs=P(),
      check_vma=False,
    )
  )(state.method_state, batch)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))


def _fifo(num_rows, dim, steps):
  """A float64 NumPy FIFO queue: rows written in order from ptr, wrapping around."""
  queue, ptr = np.zeros((num_rows, dim)), 0
  for keys in steps:
    for key in keys:
      queue[ptr] = key
      ptr = (ptr + 1) % num_rows
  return queue, ptr


def test_enqueue_sharded_over_8_devices_is_a_fifo_in_global_order():
  mesh = sharding.create_mesh()
  rng = np.random.default_rng(0)
  steps = [rng.normal(size=(16, 3)).astype(np.float32) for _ in range(5)]  # 80 keys, 40 rows.
  enqueue = jax.jit(
    jax.shard_map(
      lambda q, p, k: momentum.enqueue(q, p, k, "data"),
      mesh=mesh,
      in_specs=(P("data"), P(), P("data")),
      out_specs=(P("data"), P()),
    )
  )
  queue, ptr = jnp.zeros((40, 3), jnp.float32), jnp.zeros((), jnp.int32)
  for k, keys in enumerate(steps):
    queue, ptr = enqueue(queue, ptr, keys)
    expected, expected_ptr = _fifo(40, 3, steps[: k + 1])
    np.testing.assert_array_equal(np.asarray(queue), expected.astype(np.float32))
    assert int(ptr) == expected_ptr
  # Single-device form, same result.
  single, single_ptr = jnp.zeros((40, 3), jnp.float32), jnp.zeros((), jnp.int32)
  for keys in steps:
    single, single_ptr = momentum.enqueue(single, single_ptr, jnp.asarray(keys), None)
  np.testing.assert_array_equal(np.asarray(single), np.asarray(queue))


def test_moco_queue_after_k_steps_holds_the_last_keys_of_the_key_encoder():
  config = _config("moco_v2")
  mesh = sharding.create_mesh()
  lr_fn = optax.constant_schedule(0.1)
  method = methods.create_method(config)
  state = initial_state(config, lr_fn)
  initial_queue = np.asarray(state.method_state["queue"])
  state = step.place_state(state, mesh, method)
  step_fn = step.make_train_step(method, mesh, lr_fn)
  model = method.create_model(bn_axis_name=None)  # One device: the global batch at once.
  expected_keys = []
  for k in range(3):
    batch = _batch(seed=k)
    # This step's keys, recomputed on one device from the key encoder before the step.
    before = jax.device_get(state.method_state)
    views = method.views(jax.tree.map(jnp.asarray, batch), jax.random.key(1), jnp.asarray(k))
    variables = {"params": before["target_params"], "batch_stats": before["target_batch_stats"]}
    (_, z), _ = model.apply(variables, views["global"][16:], train=True, mutable=["batch_stats"])
    expected_keys.append(np.asarray(losses.l2_normalize(z)))
    state, _ = step_fn(
      state, jax.device_put(batch, sharding.batch_sharded(mesh)), jax.random.key(1)
    )
  queue = np.asarray(state.method_state["queue"])
  assert int(state.method_state["queue_ptr"]) == 3 * 16
  # Unit keys from the 8-device step against one device's forward pass, in float32: BatchNorm
  # amplifies the summation order's rounding (4e-5 measured); a misplaced key is O(0.1) off.
  np.testing.assert_allclose(queue[:48], np.concatenate(expected_keys), rtol=0, atol=1e-3)
  # The rows not yet reached still hold the initial random unit vectors.
  np.testing.assert_array_equal(queue[48:], initial_queue[48:])


def test_moco_queue_size_must_be_a_multiple_of_the_devices_and_hold_a_batch():
  lr_fn = optax.constant_schedule(0.1)
  with pytest.raises(ValueError, match="multiple of the 8 devices"):
    initial_state(_config("moco_v2", moco__queue_size=60), lr_fn)
  with pytest.raises(ValueError, match="at least one step's 16 keys"):
    initial_state(_config("moco_v2", moco__queue_size=8), lr_fn)


def _synthetic(config, num_steps):
  config.data.source = "synthetic"
  config.data.num_examples = 128
  config.data.num_classes = 4
  config.data.num_workers = 0
  config.train.num_steps = num_steps
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 2
  config.evals.knn_at_end = False
  return config


def _losses(workdir):
  return {r["step"]: r["loss"] for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))}


def test_moco_v2_resumes_exactly_with_its_sharded_queue(tmp_path):
  config = _synthetic(_config("moco_v2"), num_steps=4)
  train.train_and_evaluate(config, str(tmp_path / "straight"))
  config.train.stop_at_step = 2
  train.train_and_evaluate(config, str(tmp_path / "split"))
  config.train.stop_at_step = 0
  train.train_and_evaluate(config, str(tmp_path / "split"))
  assert _losses(tmp_path / "split") == _losses(tmp_path / "straight")
  restore = lambda run: ocp.StandardCheckpointer().restore(
    str(tmp_path / run / "checkpoints" / "4" / "state")
  )
  a, b = restore("straight"), restore("split")
  chex.assert_trees_all_equal(a, b)
  assert a["method_state"]["queue"].shape == (64, 16) and int(a["method_state"]["queue_ptr"]) == 0


def test_simsiam_without_stop_gradient_collapses_and_the_diagnostic_shows_it():
  def last_metrics(stop_gradient):
    config = _config("simsiam", simsiam__stop_gradient=stop_gradient)
    # Without the projector's output BatchNorm a constant output is reachable,
    # so only the stop-gradient stands between SimSiam and the trivial solution.
    config.head.output_norm = "none"
    config.evals.collapse_metrics = True
    config.data.augment.photometric = True
    config.optim.name = "sgd"
    batches = [_batch(seed=s) for s in range(40)]
    return _run(config, jax.devices()[:1], batches, lr=0.5)[1][-1]

  healthy, collapsed = last_metrics(True), last_metrics(False)
  # Measured: std ratio about 0.7 with the stop-gradient and 0.04 without.
  assert not any("complete collapse" in w for w in collapse.collapse_warnings(healthy))
  assert any("complete collapse" in w for w in collapse.collapse_warnings(collapsed))
  assert collapsed["loss"] < -0.99 < healthy["loss"]  # Every output the same: cosine 1.
