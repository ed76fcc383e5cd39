"""SupCon, Barlow Twins, SwAV and SimCLR's loss variants in the shared sharded train step.

Global-batch statistics: Barlow Twins' standardisation and cross-correlation,
SwAV's Sinkhorn and SupCon's label positives all run over the global batch.
We rely on the loss-level tests (tests/test_losses_{supcon,barlow,swav}.py: each sharded
loss equals the global one and differs from a per-device one) and check here
that each method's train step on 8 devices (2 images each) equals its step
on 1 device holding the 16 images, which a per-device loss would fail by
O(1e-1) on batches of 2.

Full train steps compile slowly on CPU, so the wiring of the losses (names,
hyperparameters, gradient scaling) is checked on a linear "model" inside a
small ``shard_map`` instead.
"""

import functools
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import initial_state, tiny_config
from jax.sharding import PartitionSpec as P
from test_train_step import _batch

from cljax import losses, methods, sharding, step
from cljax.methods import barlow_twins, simclr

N, LOCAL_CROPS, LOCAL_SIZE = 16, 2, 8


def _config(method, **overrides):
  c = tiny_config()
  c.method = method
  c.optim.name = "sgd"  # See test_methods.py: LARS amplifies summation-order differences.
  if method == "supcon":
    # T / T_b = 1: the default T_b = 0.07 against the tiny config's T = 0.5 makes steps
    # 7x larger, and two of them amplify float32 summation-order noise to 4e-4.
    c.supcon.base_temperature = c.loss.temperature
  if method == "swav":
    c.swav.num_prototypes = 24
    c.swav.freeze_prototypes_epochs = 0.0
    c.head.output_norm = "none"
  if method == "barlow_twins":
    c.head.num_layers = 3
    c.head.output_norm = "none"
  for key, value in overrides.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


def _multicrop_batch(seed=0):
  batch = _batch(seed=seed)
  rng = np.random.default_rng(100 + seed)
  shape = (N, LOCAL_CROPS, LOCAL_SIZE, LOCAL_SIZE, 3)
  batch["local_views"] = rng.integers(0, 256, shape, dtype=np.uint8)
  return batch


def _initial_state(config, lr):
  """The initial train state on the host. No online probe (num_classes=0):
  test_methods.py covers it; here it would only add compile time."""
  lr_fn = optax.constant_schedule(lr)
  return jax.device_get(initial_state(config, lr_fn))


def _run(config, devices, batches, *, steps_per_epoch=0, lr=0.1, keep_going=False, init=None):
  """Steps through ``batches`` from ``init`` (default: ``_initial_state``); the host states
  before each step and after the last, and the metrics. With ``keep_going``, also a
  function that runs one more step on a batch."""
  mesh = sharding.create_mesh(devices)
  lr_fn = optax.constant_schedule(lr)
  state = _initial_state(config, lr) if init is None else init
  method = methods.create_method(config, len(batches), steps_per_epoch)
  state = step.place_state(state, mesh, method)  # From host arrays: fresh device buffers.
  step_fn = step.make_train_step(method, mesh, lr_fn)
  states, history = [jax.device_get(state)], []
  for batch in batches:
    state, step_metrics = step_fn(
      state, jax.device_put(batch, sharding.batch_sharded(mesh)), jax.random.key(1)
    )
    history.append(jax.device_get(step_metrics))
    states.append(jax.device_get(state))  # The state is donated: copy it out now.
  if not keep_going:
    return states, history

  def one_more_step(batch):
    batch = jax.device_put(batch, sharding.batch_sharded(mesh))
    return jax.device_get(step_fn(state, batch, jax.random.key(1))[1])

  return states, history, one_more_step


def _queue_in_batch_order(method_state, num_devices):
  """A SwAV queue (2, D * Q, d) with rows regrouped batch by batch (newest first), as one
  device holds it: on D devices, device i's shard holds its own n images of each batch."""
  if method_state is None or num_devices == 1:
    return method_state
  queue = method_state["queue"]
  views, rows, dim = queue.shape
  per_device = rows // num_devices
  n = N // num_devices
  queue = queue.reshape(views, num_devices, per_device // n, n, dim).transpose(0, 2, 1, 3, 4)
  return dict(method_state, queue=queue.reshape(views, rows, dim))


def _assert_8_devices_equal_1(config, batches, **kwargs):
  """Runs on 8 devices and on 1 and asserts they agree; returns the 8-device ``_run``."""
  init = _initial_state(config, kwargs.get("lr", 0.1))
  states8, hist8, *more = _run(config, jax.devices(), batches, init=init, **kwargs)
  kwargs.pop("keep_going", None)
  states1, hist1 = _run(config, jax.devices()[:1], batches, init=init, **kwargs)
  for m8, m1 in zip(hist8, hist1, strict=True):
    chex.assert_trees_all_close(m8, m1, rtol=1e-4, atol=1e-6)
  # As in test_methods.py: float32 summation order moves parameters by ~1e-5;
  # per-device statistics would move them by O(1e-2).
  chex.assert_trees_all_close(states8[-1].params, states1[-1].params, rtol=1e-4, atol=3e-5)
  # Queued embeddings: float32 noise of a few 1e-5; a misplaced one is O(0.1) off.
  chex.assert_trees_all_close(
    _queue_in_batch_order(states8[-1].method_state, 8),
    states1[-1].method_state,
    rtol=1e-4,
    atol=1e-4,
  )
  assert all(np.isfinite(m["loss"]) for m in hist8)
  return states8, hist8, *more


# ---------------------------------------------------------------------------
# The wiring of the losses, on a linear model.


def _linear_apply(variables, x, train=True, mutable=(), **kwargs):
  """A stand-in network: features = flat pixels, embeddings = tanh(h + bias) @ kernel."""
  del train, mutable, kwargs
  p = variables["params"]
  h = x.reshape(x.shape[0], -1)
  return (h, jnp.tanh(h + p["bias"]) @ p["kernel"]), {"batch_stats": {}}


def _linear_params(dim=8):
  k1, k2 = jax.random.split(jax.random.key(3))
  return {
    "bias": 0.1 * jax.random.normal(k1, (16 * 16 * 3,)),
    "kernel": 0.05 * jax.random.normal(k2, (16 * 16 * 3, dim)),
  }


def _method_losses(configs, batch, params):
  """Each config's method loss, gradient and metrics on the linear model, sharded over 8
  devices (one compile for all)."""
  ms = [methods.create_method(c) for c in configs]
  mesh = sharding.create_mesh()
  state = types.SimpleNamespace(
    apply_fn=_linear_apply, batch_stats={}, step=jnp.zeros((), jnp.int32), method_state=None
  )

  def loss_and_grad(method, params, batch):
    views = method.views(batch, jax.random.key(1), state.step)
    (loss, out), grads = jax.value_and_grad(
      lambda p: method.loss(p, state, views, batch), has_aux=True
    )(params)
    return loss, grads, out.metrics

  fn = lambda params, batch: [loss_and_grad(m, params, batch) for m in ms]
  fn = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
  return jax.jit(fn)(params, jax.device_put(batch, sharding.batch_sharded(mesh)))


def _global_embeddings(batch, params):
  """(z_a, z_b) of the linear model on one device, the global batch at once."""
  views = methods.create_method(_config("simclr")).views(
    jax.tree.map(jnp.asarray, batch), jax.random.key(1), jnp.zeros((), jnp.int32)
  )
  (_, z), _ = _linear_apply({"params": params}, views["global"])
  return z[:N], z[N:]


SIMCLR_VARIANTS = {
  "nt_xent": {},
  "debiased": {"loss__tau_plus": 0.2},
  "hard_negative": {"loss__tau_plus": 0.1, "loss__beta": 0.5},
  "decoupled": {},
}


@pytest.fixture(scope="module")
def contrastive_losses():
  """SimCLR's variants, debiased with tau_plus = 0, and SupCon (T_b = T and 0.07), all on
  one batch whose 16 images have 16 distinct labels."""
  batch = dict(_batch(), label=np.arange(N, dtype=np.int32))
  configs = {name: _config("simclr", loss__name=name, **kw) for name, kw in SIMCLR_VARIANTS.items()}
  configs["debiased_0"] = _config("simclr", loss__name="debiased", loss__tau_plus=0.0)
  configs["supcon"] = _config("supcon")
  configs["supcon_0.07"] = _config("supcon", supcon__base_temperature=0.07)
  params = _linear_params()
  results = _method_losses(list(configs.values()), batch, params)
  return batch, params, dict(zip(configs, results, strict=True))


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


# ---------------------------------------------------------------------------
# Full train steps: 8 devices equal 1, and SupCon's error without labels.


@pytest.fixture(scope="module")
def supcon_run():
  # Labels 0..3 repeat across devices: positives come from other devices.
  batches = [_batch(seed=0), _batch(seed=1)]
  return _assert_8_devices_equal_1(_config("supcon"), batches, keep_going=True)


def test_supcon_step_on_8_devices_equals_1_device(supcon_run):
  _, hist, _ = supcon_run
  assert hist[0]["anchor_fraction"] == 1.0


def test_barlow_twins_step_on_8_devices_equals_1_device():
  # lr 0.02: Barlow Twins' gradient on the tiny model is ~10x SimCLR's, and its three
  # standardisations (two BatchNorms, the loss's own) amplify float32 noise; at lr 0.1 the
  # parameters end 1.4e-4 apart after two steps, at 0.02 8e-6.
  batches = [_batch(seed=0), _batch(seed=1)]
  _, hist, *_ = _assert_8_devices_equal_1(_config("barlow_twins"), batches, lr=0.02)
  assert hist[0]["off_diagonal"] > 0


def test_supcon_without_labels_is_a_clear_error(supcon_run):
  *_, one_more_step = supcon_run  # The compiled 8-device step, its state donated here.
  batch = dict(_batch(), label=np.full(N, -1, np.int32))
  with pytest.raises(Exception, match="method='supcon' needs class labels, but 16 labels"):
    one_more_step(batch)
  flush_callback_errors()


def flush_callback_errors():
  """After a step whose host callback raised: its runtime tokens keep the error until an
  effectful computation on the same devices replaces them (else jax.effects_barrier, e.g.
  at exit, re-raises it)."""
  mesh = sharding.create_mesh()
  flush = jax.shard_map(
    lambda x: (jax.debug.callback(lambda: None), x)[1],
    mesh=mesh,
    in_specs=P("data"),
    out_specs=P("data"),
  )
  jax.jit(flush)(jax.device_put(jnp.zeros(8), sharding.batch_sharded(mesh)))
  jax.effects_barrier()


# ---------------------------------------------------------------------------
# SwAV: one multi-crop run with a frozen start and a queue, on 8 devices and on 1.


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


@pytest.fixture(scope="module")
def swav_run():
  """Four multi-crop steps, one step per epoch: prototypes frozen for steps 0 and 1; the
  queue (4 rows per device = 2 batches) filled from step 1, full after step 2, used at 3."""
  config = _config(
    "swav",
    swav__freeze_prototypes_epochs=2.0,
    swav__queue_size=4,
    swav__queue_start_epoch=1.0,
    optim__weight_decay=0.0,
  )
  config.data.augment.num_local_crops = LOCAL_CROPS
  config.data.augment.local_crop_size = LOCAL_SIZE
  batches = [_multicrop_batch(seed=s) for s in range(4)]
  states, hist, *_ = _assert_8_devices_equal_1(config, batches, steps_per_epoch=1)
  return config, batches, states, hist


def test_swav_multicrop_predicts_the_global_crops_codes_from_every_crop(swav_run):
  config, batches, states, hist = swav_run
  _, scores = _swav_forward(config, states[0], batches[0], 0)
  assert scores.shape == (2 + LOCAL_CROPS, N, config.swav.num_prototypes)
  expected = _swav_loss(config, scores, assign_views=(0, 1))
  np.testing.assert_allclose(hist[0]["loss"], expected, rtol=1e-5)
  # Teeth: codes from a local crop as well, or no local crops, are other losses.
  assert abs(_swav_loss(config, scores, assign_views=(0, 1, 2)) - expected) > 1e-4
  assert abs(_swav_loss(config, scores[:2], assign_views=(0, 1)) - expected) > 1e-4


def test_swav_prototypes_get_no_gradient_while_frozen(swav_run):
  _, _, states, hist = swav_run
  assert [m["prototypes_frozen"] for m in hist] == [1.0, 1.0, 0.0, 0.0]
  kernels = [s.params["prototypes"]["kernel"] for s in states]
  # SGD without weight decay: a zero gradient (and zero momentum) leaves them bit for bit.
  np.testing.assert_array_equal(kernels[1], kernels[0])
  np.testing.assert_array_equal(kernels[2], kernels[0])
  assert np.abs(kernels[3] - kernels[2]).max() > 1e-6
  # The rest of the network trains meanwhile.
  head = [s.params["head"]["Dense_1"]["kernel"] for s in states]
  assert np.abs(head[1] - head[0]).max() > 1e-6


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
