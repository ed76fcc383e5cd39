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
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cljax import collapse, models, optim, probe, sharding, xla_options
from cljax.methods import Method, StepOutput
from cljax.state import TrainState

Metrics = dict[str, jax.Array]


def create_train_state(
  method: Method,
  rng: jax.Array,
  learning_rate_fn: optax.Schedule,
  input_shape: tuple[int, ...],
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
    input_shape: one network input's shape ((H, W, 3) of the global views for images;
      ``Modality.input_shape``).
    mesh: the mesh the step runs on: BatchNorm averages over its 'data' axis, except on one
      device (``sharding.bn_axis_name``); None keeps the axis (right on any mesh).
    num_classes: >= 2 with ``evals.online_probe`` adds the online linear probe on the
      encoder features.

  Returns:
    The state, on the default device (``place_state`` puts it on the mesh).
  """
  config = method.config
  model_rng, probe_rng, method_rng = jax.random.split(rng, 3)
  variables = method.init_variables(model_rng, input_shape)
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


def state_specs(state: TrainState, method: Method, num_devices: int) -> TrainState:
  """Each leaf's ``PartitionSpec`` on a mesh of ``num_devices``: the state's layout, a tree
  like ``state`` (whose leaves need only shapes: ``jax.eval_shape``'s do).

  With ``mesh.state_sharding="replicated"`` every leaf is whole on every device but the
  method state the method shards (a MoCo queue, ``Method.state_specs``). With "fsdp" the
  parameters, their optimiser state and the method state that mirrors them
  (``Method.mirrors_params``: a target network) are split by ``sharding.fsdp_spec``; the
  BatchNorm statistics, the step, the online probe and the rest of the method state stay as
  in data parallelism (small, or laid out by the method).
  """
  config = method.config.mesh
  if config.state_sharding not in sharding.STATE_SHARDINGS:
    raise ValueError(
      f"mesh.state_sharding must be one of {sharding.STATE_SHARDINGS}, "
      f"got {config.state_sharding!r}."
    )
  size = num_devices if config.state_sharding == "fsdp" else 1
  split = lambda tree: jax.tree.map(
    lambda x: sharding.fsdp_spec(x.shape, size, config.fsdp_min_elements), tree
  )
  whole = lambda tree: jax.tree.map(lambda _: PartitionSpec(), tree)
  is_spec = lambda x: isinstance(x, PartitionSpec)
  method_specs = jax.tree.map(
    lambda spec, sub: jax.tree.map(lambda _: spec, sub),
    method.state_specs(),
    state.method_state,
    is_leaf=is_spec,
  )
  for key in method.mirrors_params:
    method_specs[key] = split(state.method_state[key])
  return state.replace(
    step=PartitionSpec(),
    params=split(state.params),
    batch_stats=whole(state.batch_stats),
    opt_state=split(state.opt_state),
    probe_params=whole(state.probe_params),
    probe_opt_state=whole(state.probe_opt_state),
    method_state=method_specs,
  )


def place_state(state: TrainState, mesh: Mesh, method: Method) -> TrainState:
  """Puts ``state`` on ``mesh`` as ``state_specs`` lays it out (under FSDP, says which large
  leaves no dimension of which the device count divides had to stay whole)."""
  specs = state_specs(state, method, mesh.devices.size)
  config = method.config.mesh
  if config.state_sharding == "fsdp" and mesh.devices.size > 1:
    whole = [
      x.nbytes
      for x, spec in zip(jax.tree.leaves(state.params), jax.tree.leaves(specs.params), strict=True)
      if x.size >= config.fsdp_min_elements and spec == PartitionSpec()
    ]
    if whole:
      logging.warning(
        "FSDP: %d parameters of %d or more elements (%.3g GB) stay whole on every device: no "
        "dimension of theirs splits evenly over %d devices.",
        len(whole),
        config.fsdp_min_elements,
        sum(whole) / 1e9,
        mesh.devices.size,
      )
  return jax.device_put(state, jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs))


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
  method: Method, state: TrainState, views: dict, batch: dict, axis: str | None, param_specs: Any
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
  Under FSDP ``state`` holds the gathered parameters, and the sum of each leaf that
  ``param_specs`` split is reduce-scattered: each device keeps its part (``sum_gradients``).
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
  # Scanned blocks gather their layers themselves: their gathers' transposes summed those.
  summed = left_to_the_model(param_specs)
  return (
    loss,
    out._replace(metrics=metrics),
    sharding.sum_gradients(grads, param_specs, axis, summed),
  )


def train_step(
  state: TrainState,
  batch: dict,
  rng: jax.Array,
  *,
  method: Method,
  learning_rate_fn: optax.Schedule,
  grad_axis: str | None = sharding.DATA_AXIS,
  specs: TrainState | None = None,
) -> tuple[TrainState, Metrics]:
  """One step of ``method`` on one device's shard; runs inside ``shard_map`` over 'data'.

  Args:
    state: this device's part of the train state (``state_specs``).
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
    specs: the state's layout (``state_specs``); None: replicated but for the method's
      sharded state. Under FSDP the network's parameters (the online ones and the method
      state that mirrors them) are gathered whole for the forward and backward passes,
      while the optimiser, the target update and the guard work on this device's parts.

  Returns:
    The new state and a dict of global scalar metrics.
  """
  # What the host left to the device (decode-only images: the views are cut here).
  batch = method.modality.prepare_batch(method.config, batch)
  views = method.views(batch, rng, state.step)

  whole = gathered(state, method, specs)
  param_specs = (
    jax.tree.map(lambda _: PartitionSpec(), state.params) if specs is None else specs.params
  )
  loss, out, grads = _loss_and_grads(method, whole, views, batch, grad_axis, param_specs)
  grad_norm = sharding.global_norm(grads, grad_axis)

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
    param_norm=sharding.global_norm(state.params, grad_axis),
    nonfinite=1.0 - finite.astype(jnp.float32),
  )
  return kept.replace(step=new_state.step), metrics


def gathered(state: TrainState, method: Method, specs: TrainState | None) -> TrainState:
  """``state`` with the networks' parameters whole (``sharding.gather``): the online ones
  and the method state that mirrors them; as it is without FSDP (``specs`` None). The split
  parameters of scanned blocks stay split: the model gathers them a layer at a time
  (``models.vit``'s scanned blocks, ``left_to_the_model``)."""
  if specs is None:
    return state

  def gather(tree, tree_specs):
    kept = left_to_the_model(tree_specs)
    return sharding.gather(
      tree, jax.tree.map(lambda s, k: PartitionSpec() if k else s, tree_specs, kept)
    )

  method_state = state.method_state
  if method.mirrors_params:
    method_state = dict(method_state)
    for key in method.mirrors_params:
      method_state[key] = gather(method_state[key], specs.method_state[key])
  return state.replace(params=gather(state.params, specs.params), method_state=method_state)


def left_to_the_model(specs: Any) -> Any:
  """True for the split leaves of stacked (scanned) blocks, which the model gathers itself."""

  def stacked_and_split(path, spec) -> bool:
    stacked = any(str(getattr(k, "key", "")).startswith(models.vit.STACKED_PREFIX) for k in path)
    return stacked and sharding.split_dim(spec) is not None

  return jax.tree_util.tree_map_with_path(stacked_and_split, specs)


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

  The state is laid out as ``state_specs`` says (read from the state's shapes when the step
  is traced), the batch split over 'data'. The method carries the run's length
  (``num_steps``/``steps_per_epoch``), which drives its schedules (target momentum, teacher
  temperature, DINO's last-layer freeze).
  """
  # On one device there is no axis: no casts, no sums, no one-participant all-reduces.
  grad_axis = sharding.bn_axis_name(mesh)
  fsdp = method.config.mesh.state_sharding == "fsdp" and grad_axis is not None

  def step(state, batch, rng):
    specs = state_specs(state, method, mesh.devices.size)
    step_fn = functools.partial(
      train_step,
      method=method,
      learning_rate_fn=learning_rate_fn,
      grad_axis=grad_axis,
      specs=specs if fsdp else None,
    )
    mapped = jax.shard_map(
      step_fn,
      mesh=mesh,
      in_specs=(specs, PartitionSpec(sharding.DATA_AXIS), PartitionSpec()),
      out_specs=(specs, PartitionSpec()),
      # On one device the model's BatchNorm has no axis (sharding.bn_axis_name), so its
      # statistics are not typed as replicated over 'data'; on one device they are, trivially.
      check_vma=grad_axis is not None,
    )
    return mapped(state, batch, rng)

  # Input shardings come from the arguments (``place_state`` and the batch-sharded
  # iterators); outputs from shard_map's out_specs.
  return jax.jit(step, donate_argnums=(0,), compiler_options=xla_options.for_mesh(mesh))
