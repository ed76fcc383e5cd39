"""Recipes as the official code runs them: per-view BatchNorm (BYOL, MoCo v2/v3, SimSiam,
Barlow Twins), against a reference that calls the network once per view; MoCo v3's heads
against its ``_build_mlp``; and the full float32 products of the online probe and the SGD
linear protocol (``dot_precisions``, shared with the evaluation tests)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import initial_state, tiny_config
from test_step import _batch

from cljax import methods, models, probe, sharding, step
from cljax.evaluate import classifier
from cljax.methods import base
from cljax.models import heads

HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)


def dot_precisions(fn, *args) -> list:
  """The ``(lhs, rhs)`` precision of every matrix product in ``fn``'s jaxpr, nested ones
  (jit, scan, map, custom derivatives) included: on a CPU, where every precision computes
  the same, the one way to see that a TPU or GPU would not round the inputs to bf16/TF32."""
  from jax.extend import core

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        p = eqn.params["precision"]
        yield p if isinstance(p, tuple) else (p, p)
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if isinstance(sub, core.ClosedJaxpr):
            yield from walk(sub.jaxpr)
          elif isinstance(sub, core.Jaxpr):
            yield from walk(sub)

  return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


PER_VIEW = ("byol", "moco_v3", "moco_v2", "simsiam", "barlow_twins")


def _config(method, bn_views="default"):
  c = tiny_config()
  c.method = method
  c.model.bn_views = bn_views
  c.moco.queue_size = 64
  c.moco.symmetric = True  # Both views through each network: the case where BatchNorm differs.
  if method in ("moco_v3", "byol", "simsiam"):
    c.predictor.num_layers = 2
    c.predictor.hidden_dim = 32
  # Plain SGD, one step: the parameters move by exactly -lr x gradient.
  c.optim.name = "sgd"
  c.optim.weight_decay = 0.0
  c.barlow_twins.bias_lr_ratio = 1.0
  return c


class _SeparatePasses:
  """The official code's forward: the network applied to each view in its own call.

  How many views ``x`` holds is read off its rows (``views_per_device`` images a view), not
  taken from the method, so a method that pooled its views would differ from this.
  """

  views_per_device = 0

  def forward(self, apply_fn, params, batch_stats, x, num_views=1, **kwargs):
    del num_views
    outputs = []
    for view in jnp.split(x, x.shape[0] // self.views_per_device):
      variables = {"params": params, "batch_stats": batch_stats}
      out, new = apply_fn(variables, view, train=True, mutable=["batch_stats"], **kwargs)
      batch_stats = new["batch_stats"]
      outputs.append(out)
    return (*(jnp.concatenate(parts) for parts in zip(*outputs, strict=True)), batch_stats)


def _one_step(method_obj, mesh, batch):
  lr_fn = optax.constant_schedule(1.0)
  state = step.create_train_state(method_obj, jax.random.key(0), lr_fn, (16, 16, 3), mesh=mesh)
  state = step.place_state(state, mesh, method_obj)
  step_fn = step.make_train_step(method_obj, mesh, lr_fn)
  batch = jax.device_put(batch, sharding.batch_sharded(mesh))
  new_state, metrics = step_fn(state, batch, jax.random.key(1))
  return jax.device_get(new_state), jax.device_get(metrics)


def _reference(config, mesh, batch):
  cls = type(methods.create_method(config))
  reference = type("Reference" + cls.__name__, (_SeparatePasses, cls), {})(config)
  reference.views_per_device = batch["view_a"].shape[0] // mesh.size
  return _one_step(reference, mesh, batch)


def _assert_same_step(got, want):
  state, metrics = got
  ref_state, ref_metrics = want
  # The same float32 operations in another program: XLA's fusion and summation order differ
  # by a few ulp per operation (~1e-7 relative); through the tiny network's dozen layers,
  # its loss and one step of lr 1 they stay below 1e-5. Pooled statistics differ by O(1e-2).
  tol = dict(rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(metrics["loss"], ref_metrics["loss"], **tol)
  chex.assert_trees_all_close(state.params, ref_state.params, **tol)  # Gradients, by lr 1.
  chex.assert_trees_all_close(state.batch_stats, ref_state.batch_stats, **tol)
  if state.method_state is not None:  # The target network's statistics (and MoCo's queue).
    chex.assert_trees_all_close(state.method_state, ref_state.method_state, **tol)


@pytest.mark.parametrize("method", PER_VIEW)
def test_per_view_batchnorm_is_the_default_and_equals_separate_forward_passes(method):
  config = _config(method)
  assert methods.create_method(config).bn_views == "per_view"
  mesh = sharding.create_mesh()  # 8 devices: statistics per view over the global batch.
  batch = _batch()
  want = _reference(config, mesh, batch)
  _assert_same_step(_one_step(methods.create_method(config), mesh, batch), want)
  # The test tells pooled statistics apart: one pass over both views fails it.
  pooled = _one_step(methods.create_method(_config(method, "pooled")), mesh, batch)
  with pytest.raises(AssertionError):
    _assert_same_step(pooled, want)


def test_pooled_is_simclrs_only_choice_and_a_wrong_name_is_refused():
  assert methods.create_method(_config("simclr")).bn_views == "pooled"
  with pytest.raises(ValueError, match="model.bn_views must be 'default' or 'pooled' for simclr"):
    methods.create_method(_config("simclr", "per_view"))
  with pytest.raises(ValueError, match="model.bn_views must be .* for byol, got 'per_image'"):
    methods.create_method(_config("byol", "per_image"))


def test_per_view_groups_with_gradient_caching_chunk_each_view():
  # Two views of 8 images, each in 2 chunks: the four chunks pass one after another, as
  # four separate calls would (ghost BatchNorm within each view).
  config = tiny_config()
  state = initial_state(config, optax.constant_schedule(0.1))
  apply_fn = models.create_model(config).apply
  rng = np.random.default_rng(0)
  # Images that differ as wholes (a colour each, plus noise): pure noise images would have
  # nearly equal pooled features, and the head's BatchNorm over 4 of them would amplify
  # float32 rounding by the inverse of their tiny spread (3e-4 differences, not ulps).
  images = 0.3 * rng.normal(size=(16, 16, 16, 3)) + rng.normal(size=(16, 1, 1, 3))
  views = jnp.asarray(images, jnp.float32)
  weights = jnp.asarray(rng.normal(size=(16, config.head.output_dim)), jnp.float32)

  def separate(params):
    stats, zs = state.batch_stats, []
    for x in jnp.split(views, 4):
      variables = {"params": params, "batch_stats": stats}
      (_, z), new = apply_fn(variables, x, train=True, mutable=["batch_stats"])
      stats = new["batch_stats"]
      zs.append(z)
    return jnp.concatenate(zs), stats

  def grouped(params):
    _, z, stats = base.forward(apply_fn, params, state.batch_stats, views, 2, 2)
    return z, stats

  def outputs_grads(fn):
    # A random linear read-out: every embedding's gradient differs (a sum of squares of
    # BatchNorm outputs would be nearly constant, its gradient all cancellation).
    grads = jax.grad(lambda p: jnp.sum(fn(p)[0] * weights))(state.params)
    return fn(state.params), grads

  got, want = outputs_grads(grouped), outputs_grads(separate)
  # Rematerialisation changes only how XLA fuses and orders the float32 sums: a few ulp
  # (float32 eps 1.2e-7) of each leaf's largest value, never a fraction of it.
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(b).max()))
  with pytest.raises(ValueError, match="grad_chunks=3 must divide the 8 views of each of the 2"):
    base.forward(apply_fn, state.params, state.batch_stats, views, 3, 2)


def test_a_network_without_batchnorm_takes_the_views_in_one_pass():
  # A ViT with a head without BatchNorm: nothing differs per view, so no scan is paid for.
  config = _config("byol")
  config.model.name = "vit"
  config.model.variant = "custom:hidden=16,depth=1,heads=2,mlp=32,patch=4"
  config.head.hidden_norm = config.head.output_norm = "none"
  config.predictor.num_layers = 0
  method_obj = methods.create_method(config)
  calls = []

  def apply_fn(variables, x, **kwargs):
    calls.append(x.shape[0])
    return (x, x), {}

  method_obj.forward(apply_fn, {}, {}, jnp.zeros((8, 2)), 2)
  assert calls == [8]


def test_the_online_probe_multiplies_at_full_float32_precision():
  params = probe.init_probe_params(jax.random.key(0), 8, 3)
  features, labels = jnp.ones((4, 8)), jnp.arange(4) % 3

  def loss_and_grad(p):
    return jax.value_and_grad(lambda q: probe.probe_loss_and_metrics(q, features, labels, 3)[0])(p)

  precisions = dot_precisions(loss_and_grad, params)
  assert len(precisions) >= 2 and all(p == HIGHEST for p in precisions), precisions


class _Identity(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    return x


def test_the_sgd_linear_protocol_multiplies_at_full_float32_precision():
  model = classifier.Classifier(_Identity(), num_classes=3, frozen=True)
  features, labels = jnp.ones((4, 8)), jnp.arange(4) % 3
  params = model.init(jax.random.key(0), features)["params"]

  def loss_and_grad(p):
    logits = lambda q: model.apply({"params": q}, features)
    loss = lambda q: optax.softmax_cross_entropy_with_integer_labels(logits(q), labels).mean()
    return jax.value_and_grad(loss)(p)

  precisions = dot_precisions(loss_and_grad, params)
  assert len(precisions) >= 2 and all(p == HIGHEST for p in precisions), precisions


def _build_mlp_reference(x, params, last_bn, eps=1e-5):
  """MoCo v3's ``_build_mlp(2, ...)`` in training mode, in float64: Linear(bias=False) ->
  BatchNorm1d (batch statistics, biased variance) -> ReLU -> Linear(bias=False), and
  BatchNorm1d(affine=False) after it if ``last_bn``."""
  w = lambda module, name: np.asarray(params[module][name], np.float64)

  def norm(y, scale=1.0, bias=0.0):
    return scale * (y - y.mean(0)) / np.sqrt(y.var(0) + eps) + bias

  hidden = norm(x @ w("Dense_0", "kernel"), w("BatchNorm_0", "scale"), w("BatchNorm_0", "bias"))
  y = np.maximum(hidden, 0.0) @ w("Dense_1", "kernel")  # (n, mlp) @ (mlp, out) -> (n, out)
  return norm(y) if last_bn else y


@pytest.mark.parametrize(
  "output_norm,last_bn",
  [("bn_no_affine", True), ("none_no_bias", False)],  # Projector; ResNet predictor.
)
def test_moco_v3_heads_are_the_official_build_mlp(output_norm, last_bn):
  head = heads.ProjectionHead(num_layers=2, hidden_dim=8, output_dim=4, output_norm=output_norm)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
  variables = head.init(jax.random.key(0), x)
  # _build_mlp's parameters, no more: two bias-free Linear weights and the hidden BatchNorm's
  # affine pair (BatchNorm1d(affine=False) has none).
  assert jax.tree.map(np.shape, variables["params"]) == {
    "Dense_0": {"kernel": (6, 8)},
    "BatchNorm_0": {"scale": (8,), "bias": (8,)},
    "Dense_1": {"kernel": (8, 4)},
  }
  # Random values everywhere (BatchNorm's affine pair included), so each one shows.
  params = jax.tree.map(
    lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), variables["params"]
  )
  got, _ = head.apply({**variables, "params": params}, x, mutable=["batch_stats"])
  want = _build_mlp_reference(np.asarray(x, np.float64), params, last_bn)
  # Two float32 matmuls and normalisations over 16 rows: errors ~1e-6 on outputs of ~1-10.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
