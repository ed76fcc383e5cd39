"""Helpers for the train-step tests of cljax.methods (tests/test_methods_<method>.py).

Global-batch statistics: Barlow Twins' standardisation and cross-correlation,
SwAV's Sinkhorn and SupCon's label positives all run over the global batch.
We rely on the loss-level tests (tests/test_losses_{supcon,barlow,swav}.py: each sharded
loss equals the global one and differs from a per-device one) and check with
``_assert_8_devices_equal_1`` that each method's train step on 8 devices (2 images each)
equals its step on 1 device holding the 16 images, which a per-device loss would fail by
O(1e-1) on batches of 2.

Full train steps compile slowly on CPU, so the wiring of the losses (names,
hyperparameters, gradient scaling) is checked on a linear "model" inside a
small ``shard_map`` instead (``_method_losses``).
"""

import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import float64_model, initial_state, tiny_config, to_float64
from jax.sharding import PartitionSpec as P
from test_step import _batch

from cljax import methods, sharding, step

N = 16


def _config(method, **overrides):
  c = tiny_config()
  c.method = method
  c.optim.name = "sgd"  # See test_methods_momentum.py: LARS amplifies summation-order differences.
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


def _initial_state(config, lr, num_steps=0, steps_per_epoch=0):
  """The initial train state on the host, its optimiser state that of the method's run of
  ``num_steps`` (a SwAV freeze adds a group). No online probe (num_classes=0):
  test_methods_momentum.py covers it; here it would only add compile time."""
  lr_fn = optax.constant_schedule(lr)
  return jax.device_get(
    initial_state(config, lr_fn, num_steps=num_steps, steps_per_epoch=steps_per_epoch)
  )


def _run(config, devices, batches, *, steps_per_epoch=0, lr=0.1, keep_going=False, init=None):
  """Steps through ``batches`` from ``init`` (default: ``_initial_state``); the host states
  before each step and after the last, and the metrics. With ``keep_going``, also a
  function that runs one more step on a batch."""
  mesh = sharding.create_mesh(devices)
  lr_fn = optax.constant_schedule(lr)
  state = _initial_state(config, lr, len(batches), steps_per_epoch) if init is None else init
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
  if method_state is None or num_devices == 1 or "queue" not in method_state:
    return method_state
  queue = method_state["queue"]
  views, rows, dim = queue.shape
  per_device = rows // num_devices
  n = N // num_devices
  queue = queue.reshape(views, num_devices, per_device // n, n, dim).transpose(0, 2, 1, 3, 4)
  return dict(method_state, queue=queue.reshape(views, rows, dim))


def _assert_8_devices_equal_1(config, batches, **kwargs):
  """Runs on 8 devices and on 1, in float64, and asserts they agree; returns the 8-device
  ``_run`` (its ``one_more_step`` runs in float64 too).

  In float64 because in float32 the two steps differ by summation order alone, but the
  global standardisations (BatchNorm, Barlow Twins' loss) and the softmax over the global
  batch amplify that past any bound derived from float32's eps: SupCon's positive cosine
  was 4e-6 apart (1.5e-4 relative) after two steps on one CI machine and within 1e-6 on
  another. The views (augmentation) and some losses (Barlow Twins', for bfloat16 models)
  still compute in float32, so float32 rounding enters, but nothing float32 amplifies it:
  measured at most 1.7e-8 in parameters and 2.4e-7 in metrics (Barlow Twins, SupCon). A
  real asymmetry (per-device statistics, positives or queue) is O(1e-2).
  """
  config = config.copy_and_resolve_references()
  with float64_model(config):
    init = to_float64(
      _initial_state(config, kwargs.get("lr", 0.1), len(batches), kwargs.get("steps_per_epoch", 0))
    )
    states8, hist8, *more = _run(config, jax.devices(), batches, init=init, **kwargs)
    kwargs.pop("keep_going", None)
    states1, hist1 = _run(config, jax.devices()[:1], batches, init=init, **kwargs)
  assert jax.tree.leaves(states8[-1].params)[0].dtype == np.float64
  # 40x and 60x the differences measured, 1e3 and 1e4 below a real asymmetry's.
  for m8, m1 in zip(hist8, hist1, strict=True):
    chex.assert_trees_all_close(m8, m1, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(states8[-1].params, states1[-1].params, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(
    _queue_in_batch_order(states8[-1].method_state, 8),
    states1[-1].method_state,
    rtol=1e-6,
    atol=1e-6,
  )
  assert all(np.isfinite(m["loss"]) for m in hist8)
  if more:
    (one_more_step,) = more

    def one_more_step_in_float64(batch):
      with jax.enable_x64(True):
        return one_more_step(batch)

    more = [one_more_step_in_float64]
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


@pytest.fixture(scope="module", name="contrastive_losses")
def contrastive_losses_fixture():
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


# ---------------------------------------------------------------------------
# Host callback errors in the step.


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
