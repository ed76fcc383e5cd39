"""The train state of a method and its pure, sharded train step, jit-compiled once.

``train_step`` is the same for every method (``cljax.methods``): views, loss and gradients,
the optimiser update, the method's own state, then the guard that skips a non-finite step.
What it measures besides the loss (the online probe and the collapse metrics) is one call,
``monitor``. ``make_train_step`` wraps it in ``shard_map`` over the mesh's 'data' axis and
``jax.jit`` with the state donated.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cljax import collapse, models, optim, probe, sharding, xla_options
from cljax.data import decode
from cljax.data import views as views_lib
from cljax.methods import Method, StepOutput
from cljax.state import TrainState

Metrics = dict[str, jax.Array]


def create_train_state(
  method: Method,
  rng: jax.Array,
  learning_rate_fn: optax.Schedule,
  image_shape: tuple[int, int, int],
  *,
  mesh: Mesh | None = None,
  num_classes: int = 0,
) -> TrainState:
  """Initialises parameters, BatchNorm statistics, the optimiser and the method's state.

  Args:
    method: the run's method; its ``num_steps`` sizes a weight-decay schedule, if the config
      has one.
    rng: the initialisation key.
    learning_rate_fn: the optimiser's schedule.
    image_shape: (H, W, 3) of the global views.
    mesh: the mesh the step runs on: BatchNorm averages over its 'data' axis, except on one
      device (``sharding.bn_axis_name``); None keeps the axis (right on any mesh).
    num_classes: >= 2 with ``evals.online_probe`` adds the online linear probe on the
      encoder features.

  Returns:
    The state, on the default device (``place_state`` puts it on the mesh).
  """
  config = method.config
  model_rng, probe_rng, method_rng = jax.random.split(rng, 3)
  variables = method.init_variables(model_rng, image_shape)
  tx = method.create_optimizer(learning_rate_fn)
  probe_params = probe_tx = None
  if num_classes >= 2 and config.evals.online_probe:
    feature_dim = models.encoder_feature_dim(config)
    probe_params = probe.init_probe_params(probe_rng, feature_dim, num_classes)
    probe_tx = probe.create_probe_optimizer(config.evals.online_probe_lr)
  return TrainState.create(
    apply_fn=method.create_model(bn_axis_name=sharding.bn_axis_name(mesh)).apply,
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    tx=tx,
    probe_params=probe_params,
    probe_tx=probe_tx,
    method_state=method.init_state(method_rng, variables),
  )


def _specs_to_shardings(mesh: Mesh, specs: Any, tree: Any) -> Any:
  """Expands a ``PartitionSpec`` prefix of ``tree`` into one ``NamedSharding`` per leaf."""
  is_spec = lambda x: isinstance(x, PartitionSpec)
  return jax.tree.map(
    lambda spec, sub: jax.tree.map(lambda _: NamedSharding(mesh, spec), sub),
    specs,
    tree,
    is_leaf=is_spec,
  )


def place_state(state: TrainState, mesh: Mesh, method: Method) -> TrainState:
  """Puts ``state`` on ``mesh``: replicated, but for method state the method shards (a queue)."""
  method_state = state.method_state
  placed = jax.device_put(state.replace(method_state=None), sharding.replicated(mesh))
  if method_state is not None:
    specs = _specs_to_shardings(mesh, method.state_specs(), method_state)
    method_state = jax.device_put(method_state, specs)
  return placed.replace(method_state=method_state)


def monitor(
  state: TrainState, out: StepOutput, batch: dict, *, collapse_metrics: bool
) -> tuple[Any, Any, Metrics]:
  """What the step measures besides the loss: the online probe and the embeddings' health.

  Args:
    state: the state before the step.
    out: the method's step output (features for the probe, embeddings for the metrics).
    batch: this device's batch (its labels train the probe).
    collapse_metrics: also the effective rank, alignment and uniformity (a (d, d)
      eigendecomposition per step).

  Returns:
    The probe's new parameters and optimiser state (None without a probe) and the metrics.
  """
  axis = sharding.DATA_AXIS
  metrics = {
    # About 1/sqrt(d) for a healthy embedding and near 0 for a collapsed one.
    "embedding_std": jnp.mean(collapse.embedding_std(out.embeddings, axis_name=axis)),
  }
  if collapse_metrics and out.pairs is not None:
    extra = collapse.collapse_metrics(*out.pairs, axis_name=axis)
    metrics.update({k: v for k, v in extra.items() if k != "embedding_std"})
  if state.probe_params is None:
    return None, None, metrics
  n = batch["label"].shape[0]
  labels = jnp.tile(batch["label"], out.features.shape[0] // n)
  probe_params, probe_opt_state, probe_metrics = probe.probe_update(
    state.probe_params,
    state.probe_opt_state,
    out.features,
    labels,
    tx=state.probe_tx,
    num_classes=state.probe_params["kernel"].shape[1],
    axis_name=axis,
  )
  return probe_params, probe_opt_state, metrics | probe_metrics


def _loss_and_grads(
  method: Method, state: TrainState, views: dict, batch: dict, axis: str | None
) -> tuple[jax.Array, StepOutput, Any]:
  """The method's loss and output and the global gradient of the loss in the parameters.

  Losses are global means (pmean inside ``cljax.losses``), so the global gradient is the
  sum over devices of each device's gradient. Differentiating with respect to the
  replicated parameters would leave that sum to ``shard_map``'s autodiff, which casts the
  parameters to device-varying at each use and all-reduces the cotangent of each cast: once
  per chunk inside the backward loop with ``train.grad_chunks > 1`` (the parameters are
  closed over in ``base.forward``'s scan), and once per forward for SwAV and DINO with local
  crops. So the parameters are cast once here, the gradient is taken with respect to that
  per-device copy, and the gradients are summed once (tests/test_step_allreduce.py counts
  the all-reduces). Without an axis (one device) the gradient is already the global one.
  """
  loss_fn = lambda p: method.loss(p, state, views, batch)
  params = state.params if axis is None else sharding.vary(state.params, axis)
  (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  if axis is None:
    return loss, out, grads
  if sharding.varies_over(loss, axis):
    # A term of the per-device copy alone (a weight penalty, say) would be counted on every
    # device, and the summed gradient would hold it once per device.
    raise ValueError(
      f"{type(method).__name__}.loss must be a global value (a mean over the devices with "
      "pmean/psum, as cljax.losses' are); it varies over the devices. Reduce every term "
      "over the 'data' axis; a term of the parameters alone as psum(term / device count)."
    )
  # A metric computed from the per-device copy alone (CLIP's logit scale) is the same on every
  # device but typed device-varying.
  metrics = sharding.invariant(out.metrics, axis)
  return loss, out._replace(metrics=metrics), jax.lax.psum(grads, axis)


def train_step(
  state: TrainState,
  batch: dict,
  rng: jax.Array,
  *,
  method: Method,
  learning_rate_fn: optax.Schedule,
  grad_axis: str | None = sharding.DATA_AXIS,
) -> tuple[TrainState, Metrics]:
  """One step of ``method`` on one device's shard; runs inside ``shard_map`` over 'data'.

  Args:
    state: the train state (replicated but for sharded method state).
    batch: this device's ``{"view_a", "view_b", "aug_seed", "label"}`` (and
      ``"local_views"`` with multi-crop, ``"tokens"`` for CLIP) uint8 images and ints; or,
      with ``data.crop_on_device``, ``{"canvas", "boxes", "flips", "aug_seed", "label"}``:
      decoded images and each view's crop box and flip, cut into the views here
      (``decode.views_from_canvas``).
    rng: the run's key; the step's keys derive from it and ``state.step``.
    method: the method (static): its views, loss and state updates.
    learning_rate_fn: the schedule, for the logged learning rate.
    grad_axis: the axis the gradients are summed over (``_loss_and_grads``); None on one
      device, where ``shard_map`` does not check replication and there is nothing to sum.

  Returns:
    The new state and a dict of global scalar metrics.
  """
  # Decode-only batches carry images on a canvas and each view's box: cut the views here.
  batch = decode.views_from_canvas(batch, views_lib.ViewSpec.from_config(method.config.data))
  views = method.views(batch, rng, state.step)

  loss, out, grads = _loss_and_grads(method, state, views, batch, grad_axis)
  grad_norm = optax.tree.norm(grads)

  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = method.project_params(optax.apply_updates(state.params, updates))
  method_state = method.update_state(state, params, out)
  probe_params, probe_opt_state, metrics = monitor(
    state, out, batch, collapse_metrics=method.config.evals.collapse_metrics
  )
  new_state = state.replace(
    step=state.step + 1,
    params=params,
    batch_stats=out.batch_stats,
    opt_state=opt_state,
    probe_params=probe_params,
    probe_opt_state=probe_opt_state,
    method_state=method_state,
  )

  # A NaN or Inf in the loss, any gradient (the norm is non-finite iff some element is) or
  # anything the step would write skips the update: parameters, statistics, optimiser, probe
  # and method state stay as they were, and the batch counts as consumed. Checking the new
  # state too catches an update that overflows from finite gradients, and a non-finite state
  # is never kept, so never checkpointed.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_state, grad_axis)
  kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  metrics = out.metrics | metrics
  metrics.update(
    loss=loss,
    # The schedule at the optimiser's own count, which skipped steps leave behind state.step.
    learning_rate=learning_rate_fn(optim.applied_count(state.opt_state)),
    grad_norm=grad_norm,
    param_norm=optax.tree.norm(state.params),
    nonfinite=1.0 - finite.astype(jnp.float32),
  )
  return kept.replace(step=new_state.step), metrics


def all_finite(tree: Any, axis: str | None = None) -> jax.Array:
  """Whether every floating-point element of ``tree`` is finite, as one boolean scalar.

  Inside ``shard_map`` a leaf sharded over ``axis`` (a MoCo queue) is checked on every device
  and the answer agreed on, so the result is replicated; integer leaves are always finite.
  """
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if _is_float(x)]
  varying = [f for f in flags if axis is not None and sharding.varies_over(f, axis)]
  finite = jnp.all(jnp.stack([f for f in flags if not any(f is v for v in varying)] + [True]))
  if varying:
    # One scalar all-reduce: the devices whose shard holds a NaN or Inf, counted.
    bad = jnp.any(~jnp.stack(varying)).astype(jnp.int32)
    finite = finite & (jax.lax.psum(bad, axis) == 0)
  return finite


def _is_float(x: Any) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def make_train_step(method: Method, mesh: Mesh, learning_rate_fn: optax.Schedule):
  """``train_step`` of ``method`` jit-compiled over ``mesh``, the state donated.

  The state is replicated, but for method state the method shards (a MoCo
  queue), the batch sharded over 'data'. The method carries the run's length
  (``num_steps``/``steps_per_epoch``), which drives its schedules (target
  momentum, teacher temperature, DINO's last-layer freeze).
  """
  # On one device there is no axis: no casts, no sums, no one-participant all-reduces.
  grad_axis = sharding.bn_axis_name(mesh)
  step_fn = functools.partial(
    train_step, method=method, learning_rate_fn=learning_rate_fn, grad_axis=grad_axis
  )
  data, rep, method_specs = PartitionSpec(sharding.DATA_AXIS), PartitionSpec(), method.state_specs()

  # The method state goes through shard_map as its own argument so that its
  # specs are a plain pytree prefix (the TrainState's static fields would not
  # match a prefix built separately).
  def split_step(state, method_state, batch, rng):
    new_state, metrics = step_fn(state.replace(method_state=method_state), batch, rng)
    return new_state.replace(method_state=None), new_state.method_state, metrics

  mapped = jax.shard_map(
    split_step,
    mesh=mesh,
    in_specs=(rep, method_specs, data, rep),
    out_specs=(rep, method_specs, rep),
    # On one device the model's BatchNorm has no axis (sharding.bn_axis_name), so its
    # statistics are not typed as replicated over 'data'; on one device they are, trivially.
    check_vma=grad_axis is not None,
  )

  def step(state, batch, rng):
    new_state, method_state, metrics = mapped(
      state.replace(method_state=None), state.method_state, batch, rng
    )
    return new_state.replace(method_state=method_state), metrics

  # Input shardings come from the arguments (``place_state`` and the
  # batch-sharded iterators); outputs from shard_map's out_specs.
  return jax.jit(step, donate_argnums=(0,), compiler_options=xla_options.for_mesh(mesh))
