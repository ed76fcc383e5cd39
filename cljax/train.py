"""Train state creation, the pure sharded SimCLR train step, and the training loop."""

from __future__ import annotations

import functools
import hashlib
import math
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cljax import checkpoint, methods, metrics, models, optim, sharding
from cljax.data import augment, pipeline, sources
from cljax.data import device as device_data
from cljax.evaluate import collapse, features, knn, online
from cljax.state import TrainState

Metrics = dict[str, jax.Array]

# Re-exported: evaluation and older callers use them from here.
normalize_images = augment.normalize_images
photometric = augment.photometric
forward = methods.base.forward


def create_train_state(
  config: ml_collections.ConfigDict,
  rng: jax.Array,
  learning_rate_fn: optax.Schedule,
  image_shape: tuple[int, int, int],
  num_classes: int = 0,
  num_steps: int = 0,
) -> TrainState:
  """Initialises parameters, BatchNorm statistics, the optimiser and the method's state.

  ``num_steps`` (the run's length) sizes a weight-decay schedule, if the config has one.

  With ``num_classes >= 2`` and ``evals.online_probe`` it adds the online
  linear probe on the encoder features.
  """
  method = methods.create_method(config)
  model_rng, probe_rng, method_rng = jax.random.split(rng, 3)
  variables = method.init_variables(model_rng, image_shape)
  tx = optim.create_optimizer(config.optim, learning_rate_fn, num_steps)
  probe_params = probe_tx = None
  if num_classes >= 2 and config.evals.online_probe:
    feature_dim = models.encoder_feature_dim(config)
    probe_params = online.init_probe_params(probe_rng, feature_dim, num_classes)
    probe_tx = online.create_probe_optimizer(config.evals.online_probe_lr)
  return TrainState.create(
    apply_fn=method.create_model(bn_axis_name=sharding.DATA_AXIS).apply,
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


def place_state(state: TrainState, mesh: Mesh, config: ml_collections.ConfigDict) -> TrainState:
  """Puts ``state`` on ``mesh``: replicated, but for method state the method shards (a queue)."""
  specs = methods.create_method(config).state_specs()
  method_state = state.method_state
  placed = jax.device_put(state.replace(method_state=None), sharding.replicated(mesh))
  if method_state is not None:
    method_state = jax.device_put(method_state, _specs_to_shardings(mesh, specs, method_state))
  return placed.replace(method_state=method_state)


def train_step(
  state: TrainState,
  batch: dict,
  rng: jax.Array,
  *,
  method: methods.Method,
  learning_rate_fn: optax.Schedule,
) -> tuple[TrainState, Metrics]:
  """One step of ``method`` on one device's shard; runs inside ``shard_map`` over 'data'.

  Args:
    state: the train state (replicated but for sharded method state).
    batch: this device's ``{"view_a", "view_b", "aug_seed", "label"}`` (and
      ``"local_views"`` with multi-crop) uint8 images and ints.
    rng: the run's key; the step's keys derive from it and ``state.step``.
    method: the method (static): its views, loss and state updates.
    learning_rate_fn: the schedule, for the logged learning rate.

  Returns:
    The new state and a dict of global scalar metrics.
  """
  config = method.config
  views = method.views(batch, rng, state.step)
  n = batch["view_a"].shape[0]

  # Losses are already global means (pmean inside cljax.losses), so their
  # gradient with respect to the replicated parameters is the global gradient:
  # shard_map's autodiff sums the per-device contributions.
  grad_fn = jax.value_and_grad(lambda p: method.loss(p, state, views, batch), has_aux=True)
  (loss, out), grads = grad_fn(state.params)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  method_state = method.update_state(state, params, out)
  # A NaN or Inf in the loss or any gradient (the norm is non-finite iff some
  # element is) skips the update: parameters, statistics, optimiser and method
  # state stay as they were, and the batch counts as consumed.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  metrics = dict(out.metrics)
  if config.evals.collapse_metrics and out.pairs is not None:
    # Effective rank, alignment and uniformity; costs a (d, d) eigendecomposition.
    extra = collapse.collapse_metrics(*out.pairs, axis_name=sharding.DATA_AXIS)
    metrics.update({k: v for k, v in extra.items() if k != "embedding_std"})
  probe_params, probe_opt_state = state.probe_params, state.probe_opt_state
  if state.probe_params is not None:
    labels = jnp.tile(batch["label"], out.features.shape[0] // n)
    probe_params, probe_opt_state, probe_metrics = online.probe_update(
      state.probe_params,
      state.probe_opt_state,
      out.features,
      labels,
      tx=state.probe_tx,
      num_classes=state.probe_params["kernel"].shape[1],
      axis_name=sharding.DATA_AXIS,
    )
    metrics.update(probe_metrics)
  new_state = state.replace(
    step=state.step + 1,
    params=keep_if_bad(params, state.params),
    batch_stats=keep_if_bad(out.batch_stats, state.batch_stats),
    opt_state=keep_if_bad(opt_state, state.opt_state),
    probe_params=keep_if_bad(probe_params, state.probe_params),
    probe_opt_state=keep_if_bad(probe_opt_state, state.probe_opt_state),
    method_state=keep_if_bad(method_state, state.method_state),
  )
  metrics.update(
    loss=loss,
    learning_rate=learning_rate_fn(state.step),
    grad_norm=grad_norm,
    param_norm=optax.tree.norm(state.params),
    # About 1/sqrt(d) for a healthy embedding and near 0 for a collapsed one.
    embedding_std=jnp.mean(collapse.embedding_std(out.embeddings, axis_name=sharding.DATA_AXIS)),
    nonfinite=1.0 - finite.astype(jnp.float32),
  )
  return new_state, metrics


def make_train_step(
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  learning_rate_fn: optax.Schedule,
  *,
  num_steps: int = 0,
  steps_per_epoch: int = 0,
):
  """``train_step`` of ``config.method`` jit-compiled over ``mesh``, the state donated.

  The state is replicated, but for method state the method shards (a MoCo
  queue), the batch sharded over 'data'. ``num_steps``/``steps_per_epoch``
  drive the method's schedules (target momentum, teacher temperature).
  """
  method = methods.create_method(config, num_steps, steps_per_epoch)
  step_fn = functools.partial(train_step, method=method, learning_rate_fn=learning_rate_fn)
  data, rep, method_specs = PartitionSpec(sharding.DATA_AXIS), PartitionSpec(), method.state_specs()

  # On a mesh of one device, BatchNorm over the 'data' axis is BatchNorm over
  # the device's batch, but its psum of the statistics stays in the compiled
  # step as a one-participant all-reduce per layer (47 in a ResNet-50 step),
  # each a kernel and a fusion barrier. The step then swaps in the same model
  # without the axis; the state keeps its own apply_fn (so its pytree, and the
  # compiled step's cache key, are unchanged). Only the model that
  # create_train_state built is swapped; another apply_fn is used as it is.
  global_bn_model = method.create_model(bn_axis_name=sharding.DATA_AXIS)
  local_apply = method.create_model(bn_axis_name=None).apply if mesh.size == 1 else None

  def with_apply_fn(state, apply_fn):
    if local_apply is None or getattr(state.apply_fn, "__self__", None) != global_bn_model:
      return state
    return state.replace(apply_fn=apply_fn)

  # The method state goes through shard_map as its own argument so that its
  # specs are a plain pytree prefix (the TrainState's static fields would not
  # match a prefix built separately).
  def split_step(state, method_state, batch, rng):
    apply_fn = state.apply_fn
    state = with_apply_fn(state.replace(method_state=method_state), local_apply)
    new_state, metrics = step_fn(state, batch, rng)
    new_state = new_state.replace(apply_fn=apply_fn)
    return new_state.replace(method_state=None), new_state.method_state, metrics

  mapped = jax.shard_map(
    split_step,
    mesh=mesh,
    in_specs=(rep, method_specs, data, rep),
    out_specs=(rep, method_specs, rep),
    # Without the axis in BatchNorm its statistics are not typed as replicated;
    # on one device they are, trivially.
    check_vma=local_apply is None,
  )

  def step(state, batch, rng):
    new_state, method_state, metrics = mapped(
      state.replace(method_state=None), state.method_state, batch, rng
    )
    return new_state.replace(method_state=method_state), metrics

  # Input shardings come from the arguments (``place_state`` and the
  # batch_sharded iterators); outputs from shard_map's out_specs.
  return jax.jit(step, donate_argnums=(0,))


def total_steps(config: ml_collections.ConfigDict, num_examples: int) -> tuple[int, int]:
  """``(steps_per_epoch, total_steps)``; ``train.num_steps > 0`` overrides the epochs."""
  steps_per_epoch = num_examples // config.data.global_batch_size
  if steps_per_epoch == 0 and config.train.num_steps <= 0:
    raise ValueError(
      f"The training set has {num_examples} examples, fewer than one global batch "
      f"({config.data.global_batch_size}); lower data.global_batch_size."
    )
  if config.train.num_steps > 0:
    return steps_per_epoch, config.train.num_steps
  return steps_per_epoch, int(math.ceil(config.train.num_epochs * steps_per_epoch))


def create_train_iterator(config: ml_collections.ConfigDict, source: Any, mesh: Mesh):
  """The iterator of two-view (or multi-crop) batches: grain on the host, or device-resident.

  CLIP (``method="clip"``) gets (one view, caption ``tokens``) batches from
  ``cljax.data.captions`` instead, captioning ``source`` as ``clip.captions`` says.

  With ``data.device_resident`` the whole uint8 data set is copied to every
  device once and crops and flips happen there too (``cljax.data.device``);
  its batches are already global device arrays. With
  ``data.augment.num_local_crops > 0`` batches also hold ``local_views``.
  """
  aug = config.data.augment
  crops = dict(
    seed=config.train.seed,
    global_batch_size=config.data.global_batch_size,
    image_size=config.data.image_size,
    crop_area=(aug.crop_area_min, aug.crop_area_max),
    flip=aug.flip,
    num_local_crops=aug.num_local_crops,
    local_crop_size=aug.local_crop_size,
    local_crop_area=(aug.local_crop_area_min, aug.local_crop_area_max),
  )
  if config.method == "clip":
    # (view, caption tokens) pairs; imported here so only CLIP runs need `tokenizers`.
    from cljax.data import captions

    return captions.create_train_iterator(config, source, jax.process_index(), jax.process_count())
  if config.data.device_resident:
    return device_data.create_device_iterator(source, mesh, **crops)
  return pipeline.create_pretrain_iterator(
    source,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    num_workers=config.data.num_workers,
    **crops,
  )


BATCH_KEYS = ("view_a", "view_b", "aug_seed", "label", "local_views", "tokens")


class _StopSignal:
  """Turns SIGTERM (preemption) into a flag the loop checks between steps.

  With several processes the flag is agreed on (any process signalled means
  all stop) at the steps where the loop syncs anyway, so every process
  leaves the loop at the same step and joins the same final checkpoint.
  """

  def __init__(self):
    self._received = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting.")
    self._received = True

  def should_stop(self, at_sync_point: bool) -> bool:
    if jax.process_count() == 1:
      return self._received
    if not at_sync_point:
      return False
    flags = multihost_utils.process_allgather(np.asarray(self._received))
    return bool(np.any(flags))

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def knn_eval(config: ml_collections.ConfigDict, state: TrainState, mesh: Mesh) -> dict[str, float]:
  """kNN top-1 of the encoder features, eval split against the train split."""
  batches = {}
  for split in ("train", "eval"):
    source = sources.create_source(config.data, split)
    it = pipeline.create_eval_iterator(
      source,
      batch_size=config.evals.batch_size,
      image_size=config.data.image_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    variables = methods.create_method(config).eval_variables(state)
    batches[split] = features.extract_features(variables, state.apply_fn, it, mesh)
  (train_x, train_y), (test_x, test_y) = batches["train"], batches["eval"]
  if np.any(train_y < 0) or np.any(test_y < 0):
    return {}
  accuracy = knn.knn_accuracy(
    train_x,
    train_y,
    test_x,
    test_y,
    num_classes=int(max(train_y.max(), test_y.max())) + 1,
    k=config.evals.knn_k,
    temperature=config.evals.knn_temperature,
  )
  return {"knn_top1": float(accuracy)}


class NonFiniteGuard:
  """Counts steps whose loss or gradients were NaN/Inf and stops a run that keeps failing.

  The step itself skips such updates; this host-side guard only reads the
  per-step flags when metrics are fetched anyway (log and checkpoint steps),
  so it costs no extra synchronisation.
  """

  def __init__(self, limit: int):
    self.limit = limit
    self.total = 0
    self.streak = 0

  def update(self, flags: list[float], first_step: int, last_good_checkpoint: int | None) -> None:
    """Takes the flags of steps ``first_step, first_step + 1, ...``; raises past the limit."""
    for i, flag in enumerate(flags):
      self.streak = self.streak + 1 if flag else 0
      self.total += int(bool(flag))
      if self.limit and self.streak >= self.limit:
        raise FloatingPointError(
          f"{self.streak} consecutive training steps had a NaN or Inf loss or gradient, the "
          f"last at step {first_step + i} (train.max_nonfinite_streak={self.limit}). Each was "
          "skipped; the last checkpoint"
          + (f" (step {last_good_checkpoint})" if last_good_checkpoint is not None else "")
          + " is intact. Lower the learning rate, check the input data, or raise the limit."
        )


class PendingMetrics:
  """Per-step metrics kept on device until the loop needs them on the host."""

  def __init__(self, guard: NonFiniteGuard):
    self.guard = guard
    self.steps: list[tuple[int, Metrics]] = []
    self.checked = 0  # How many of `steps` the guard has seen.

  def append(self, step: int, step_metrics: Metrics) -> None:
    self.steps.append((step, step_metrics))

  def check(self, last_checkpoint: int | None) -> None:
    """Feeds the not yet checked steps' non-finite flags to the guard (one transfer)."""
    new = self.steps[self.checked :]
    if new:
      flags = jax.device_get([m["nonfinite"] for _, m in new])
      self.guard.update([float(f) for f in flags], new[0][0], last_checkpoint)
      self.checked = len(self.steps)

  def drain(self, last_checkpoint: int | None) -> dict[str, float]:
    """Averages over the finite steps since the last drain, on the host, and clears."""
    self.check(last_checkpoint)
    host = jax.device_get([m for _, m in self.steps])
    good = [m for m in host if not m["nonfinite"]]
    keys = [k for k in host[0] if k != "nonfinite"]
    out = {k: float(np.mean([m[k] for m in good])) if good else float("nan") for k in keys}
    out["nonfinite_steps"] = float(len(host) - len(good))
    out["nonfinite_total"] = float(self.guard.total)
    self.steps, self.checked = [], 0
    return out


def _log_run(config, num_examples: int, steps_per_epoch: int, num_steps: int, peak_lr: float):
  batch = config.data.global_batch_size
  negatives = {
    "simclr": f"; {2 * batch - 2} negatives per anchor",
    "moco_v2": f"; {config.moco.queue_size} queued negatives per query",
  }.get(config.method, "")
  logging.info(
    "cljax %s: %d process(es), %d device(s) (%s); global batch %d images%s; %d examples, "
    "%d steps per epoch, %d steps; peak LR %.4g.",
    *(config.method, jax.process_count(), jax.device_count(), jax.devices()[0].platform),
    *(batch, negatives, num_examples, steps_per_epoch, num_steps, peak_lr),
  )
  logging.info("Config:\n%s", config)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Rejects values that would only fail later, inside a compiled step.

  In a multi-process run it also checks that every process has the same
  config (a stale file or a missing override on one host would otherwise
  hang a collective or silently train something else).
  """
  if jax.process_count() > 1:
    digest = hashlib.sha256(config.to_json(sort_keys=True).encode()).digest()
    try:
      multihost_utils.assert_equal(np.frombuffer(digest, np.uint8), "config hash")
    except AssertionError as e:
      raise ValueError(
        f"Process {jax.process_index()} has a different config from process 0. Start every "
        "process with the same config file and --config overrides."
      ) from e
  if not config.loss.temperature > 0:
    raise ValueError(f"loss.temperature must be > 0, got {config.loss.temperature}.")
  for key in ("log_every_steps", "checkpoint_every_steps", "max_to_keep"):
    if config.train[key] < 1:
      raise ValueError(f"train.{key} must be >= 1, got {config.train[key]}.")


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, force_resume: bool = False
) -> dict[str, float]:
  """Pretrains as the config says, checkpointing into and resuming from ``workdir``.

  Returns:
    The last logged training metrics, plus kNN accuracies when evaluated.
  """
  check_config(config)
  checkpoint.check_workdir(workdir)
  mesh = sharding.create_mesh()
  sharding.check_global_batch(config.data.global_batch_size, mesh)
  source = sources.create_source(config.data, "train")
  steps_per_epoch, num_steps = total_steps(config, len(source))
  peak_lr = optim.scaled_learning_rate(
    config.optim.base_lr, config.data.global_batch_size, config.optim.lr_scaling
  )
  warmup_steps = int(round(config.optim.warmup_epochs * max(steps_per_epoch, 1)))
  learning_rate_fn = optim.create_learning_rate_fn(peak_lr, warmup_steps, num_steps)
  _log_run(config, len(source), steps_per_epoch, num_steps, peak_lr)

  rng = jax.random.key(config.train.seed)
  init_rng, step_rng = jax.random.split(rng)
  image_shape = (config.data.image_size, config.data.image_size, 3)
  num_classes = len(getattr(source, "class_names", None) or ())
  methods.create_method(config).check_data(source, num_classes)
  state = create_train_state(
    config, init_rng, learning_rate_fn, image_shape, num_classes, num_steps=num_steps
  )
  state = place_state(state, mesh, config)
  train_iter = create_train_iterator(config, source, mesh)

  manager = checkpoint.create_manager(workdir, config)
  state, start_step = checkpoint.restore_latest(manager, state, train_iter, config, force_resume)
  writer = metrics.MetricWriter(
    workdir,
    total_steps=num_steps,
    views_per_step=(1 if config.method == "clip" else 2) * config.data.global_batch_size,
    enabled=jax.process_index() == 0,
  )
  writer.write_config(config.to_dict())
  step_fn = make_train_step(
    config, mesh, learning_rate_fn, num_steps=num_steps, steps_per_epoch=steps_per_epoch
  )
  stop_at = min(num_steps, config.train.stop_at_step or num_steps)
  stop = _StopSignal()
  pending = PendingMetrics(NonFiniteGuard(config.train.max_nonfinite_streak))
  last, step, saved = {}, start_step, (start_step if start_step else None)
  try:
    while step < stop_at and not stop.should_stop(step % config.train.log_every_steps == 0):
      batch = next(train_iter)
      if not config.data.device_resident:
        batch = sharding.host_to_global({k: batch[k] for k in BATCH_KEYS if k in batch}, mesh)
      # Dispatch is asynchronous: the host fetches the next batch while the
      # device runs this step. Metrics stay on device until a log step.
      state, step_metrics = step_fn(state, batch, step_rng)
      step += 1
      pending.append(step, step_metrics)
      if step % config.train.log_every_steps == 0 or step == num_steps:
        last = dict(pending.drain(saved), epoch=step / max(steps_per_epoch, 1))
        writer.write_scalars(step, last)
      if step % config.train.checkpoint_every_steps == 0:
        pending.check(saved)  # Never checkpoint past a run of failed steps.
        saved = checkpoint.save(manager, step, state, train_iter, config) or saved
    if saved != step:
      pending.check(saved)
      saved = checkpoint.save(manager, step, state, train_iter, config, force=True) or saved
    checkpoint.wait(manager, saved)
  finally:
    stop.restore()
    manager.close()

  if step >= num_steps and config.evals.knn_at_end:
    knn_result = _final_knn(config, state, mesh, init_rng, learning_rate_fn, image_shape)
    if knn_result:
      writer.write_scalars(step, knn_result)
      last.update(knn_result)
  writer.close()
  return last


def _final_knn(config, state, mesh, init_rng, learning_rate_fn, image_shape) -> dict[str, float]:
  """kNN of the trained encoder, and of the same encoder at random initialisation."""
  t0 = time.time()
  result = knn_eval(config, state, mesh)
  if result and config.evals.knn_baseline:
    init_state = create_train_state(config, init_rng, learning_rate_fn, image_shape)
    baseline = knn_eval(config, place_state(init_state, mesh, config), mesh)
    result["knn_top1_random_init"] = baseline["knn_top1"]
  if result:
    logging.info(
      "kNN top-1 (k=%d, T=%g) on the eval split: %s (%.0fs).",
      config.evals.knn_k,
      config.evals.knn_temperature,
      result,
      time.time() - t0,
    )
  return result
