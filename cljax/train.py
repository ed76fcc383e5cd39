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
from jax.sharding import Mesh, PartitionSpec

from cljax import checkpoint, losses, metrics, models, optim, sharding
from cljax.data import augment, pipeline, sources
from cljax.data import device as device_data
from cljax.evaluate import collapse, features, knn, online
from cljax.state import TrainState

# Per-channel ImageNet statistics; inputs arrive as uint8 and are normalised
# on device so that the host ships 4x fewer bytes.
_MEAN_RGB = np.array([0.485, 0.456, 0.406], np.float32)
_STDDEV_RGB = np.array([0.229, 0.224, 0.225], np.float32)

Metrics = dict[str, jax.Array]


def normalize_images(images: jax.Array) -> jax.Array:
  """(b, h, w, 3) float images in [0, 1] -> zero-mean, unit-variance channels."""
  return (images - _MEAN_RGB) / _STDDEV_RGB


def create_train_state(
  config: ml_collections.ConfigDict,
  rng: jax.Array,
  learning_rate_fn: optax.Schedule,
  image_shape: tuple[int, int, int],
  num_classes: int = 0,
) -> TrainState:
  """Initialises parameters, BatchNorm statistics and the optimiser state.

  With ``num_classes >= 2`` and ``evals.online_probe`` it adds the online
  linear probe on the encoder features.
  """
  model = models.create_model(config)
  model_rng, probe_rng = jax.random.split(rng)
  variables = jax.jit(functools.partial(model.init, train=False))(
    model_rng, jnp.zeros((2, *image_shape), jnp.float32)
  )
  tx = optim.create_optimizer(config.optim, learning_rate_fn)
  probe_params = probe_tx = None
  if num_classes >= 2 and config.evals.online_probe:
    feature_dim = models.encoder_feature_dim(config)
    probe_params = online.init_probe_params(probe_rng, feature_dim, num_classes)
    probe_tx = online.create_probe_optimizer(config.evals.online_probe_lr)
  return TrainState.create(
    apply_fn=models.create_model(config, bn_axis_name=sharding.DATA_AXIS).apply,
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    tx=tx,
    probe_params=probe_params,
    probe_tx=probe_tx,
  )


def photometric(images: jax.Array, keys: jax.Array, aug: Any) -> jax.Array:
  """The config's photometric augmentation of (b, h, w, 3) float images in [0, 1]."""
  return augment.photometric_augment(
    images,
    keys,
    color_strength=aug.color_strength,
    color_jitter_prob=aug.color_jitter_prob,
    grayscale_prob=aug.grayscale_prob,
    blur_prob=aug.blur_prob,
    solarize_prob=aug.solarize_prob,
  )


def _augmented_views(batch: dict, rng: jax.Array, step: jax.Array, aug: Any) -> jax.Array:
  """Both views as one normalised float batch ``[view_a; view_b]`` (2n, h, w, 3).

  Each example's photometric keys come from its ``aug_seed`` (drawn by the
  pipeline from the record's place in the shuffled stream), so augmentations
  do not depend on how the global batch is split over processes or devices.
  """
  views = []
  for v, name in enumerate(("view_a", "view_b")):
    x = batch[name].astype(jnp.float32) / 255.0
    if aug.photometric:
      keys = augment.example_keys(jax.random.fold_in(rng, v), step, batch["aug_seed"])
      x = photometric(x, keys, aug)
    views.append(normalize_images(x))
  return jnp.concatenate(views, axis=0)


def make_loss_fn(loss_config: ml_collections.ConfigDict):
  """NT-Xent as ``loss.implementation`` says: plain or blockwise (memory-bounded)."""
  if loss_config.implementation == "plain":
    return losses.nt_xent
  if loss_config.implementation == "blockwise":
    return functools.partial(losses.nt_xent_blockwise, block_size=loss_config.block_size)
  raise ValueError(
    f"loss.implementation must be 'plain' or 'blockwise', got {loss_config.implementation!r}."
  )


def forward(
  apply_fn: Any, params: Any, batch_stats: Any, views: jax.Array, num_chunks: int = 1
) -> tuple[jax.Array, jax.Array, Any]:
  """Encoder features, embeddings and updated BatchNorm statistics of ``views``.

  With ``num_chunks > 1`` this is gradient caching (GradCache, Gao et al.
  2021) by rematerialisation: the views pass through the network in chunks
  under ``lax.scan``, and ``jax.checkpoint`` keeps only each chunk's input, so
  the backward pass recomputes one chunk's activations at a time. Activation
  memory falls by about ``num_chunks`` while the loss still sees every
  embedding of the global batch. BatchNorm then normalises each chunk with its
  own statistics (ghost BatchNorm, still averaged across devices), and the
  running averages are updated chunk after chunk; gradients equal those of
  the same chunked forward without rematerialisation.
  """
  if num_chunks == 1:
    variables = {"params": params, "batch_stats": batch_stats}
    (h, z), new_vars = apply_fn(variables, views, train=True, mutable=["batch_stats"])
    return h, z, new_vars["batch_stats"]
  if views.shape[0] % num_chunks:
    raise ValueError(
      f"train.grad_chunks={num_chunks} must divide the {views.shape[0]} views on each device."
    )

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk(stats, x):
    variables = {"params": params, "batch_stats": stats}
    (h, z), new_vars = apply_fn(variables, x, train=True, mutable=["batch_stats"])
    return new_vars["batch_stats"], (h, z)

  chunks = views.reshape(num_chunks, -1, *views.shape[1:])
  batch_stats, (h, z) = jax.lax.scan(chunk, batch_stats, chunks)
  return h.reshape(-1, h.shape[-1]), z.reshape(-1, z.shape[-1]), batch_stats


def train_step(
  state: TrainState,
  batch: dict,
  rng: jax.Array,
  *,
  config: ml_collections.ConfigDict,
  learning_rate_fn: optax.Schedule,
) -> tuple[TrainState, Metrics]:
  """One SimCLR step on one device's shard; runs inside ``shard_map`` over 'data'.

  Args:
    state: the replicated train state.
    batch: this device's ``{"view_a", "view_b"}`` uint8 (n, h, w, 3) images.
    rng: the run's key; the step's keys derive from it and ``state.step``.
    config: the run config (static).
    learning_rate_fn: the schedule, for the logged learning rate.

  Returns:
    The new state and a dict of global scalar metrics.
  """
  views = _augmented_views(batch, rng, state.step, config.data.augment)
  n = batch["view_a"].shape[0]

  def loss_fn(params):
    h, z, new_stats = forward(
      state.apply_fn, params, state.batch_stats, views, config.train.grad_chunks
    )
    loss, metrics = make_loss_fn(config.loss)(
      z[:n],
      z[n:],
      config.loss.temperature,
      axis_name=sharding.DATA_AXIS,
      return_metrics=True,
    )
    return loss, (new_stats, metrics, z, h)

  # The loss is already the global mean (pmean inside nt_xent), so its
  # gradient with respect to the replicated parameters is the global gradient:
  # shard_map's autodiff sums the per-device contributions.
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (batch_stats, metrics, z, features)), grads = grad_fn(state.params)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  # A NaN or Inf in the loss or any gradient (the norm is non-finite iff some
  # element is) skips the update: parameters, statistics and optimiser state
  # stay as they were, and the batch counts as consumed.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  if config.evals.collapse_metrics:
    # Effective rank, alignment and uniformity; costs a (d, d) eigendecomposition.
    extra = collapse.collapse_metrics(z[:n], z[n:], axis_name=sharding.DATA_AXIS)
    metrics = dict(metrics, **{k: v for k, v in extra.items() if k != "embedding_std"})
  probe_params, probe_opt_state = state.probe_params, state.probe_opt_state
  if state.probe_params is not None:
    labels = jnp.concatenate([batch["label"], batch["label"]])
    probe_params, probe_opt_state, probe_metrics = online.probe_update(
      state.probe_params,
      state.probe_opt_state,
      features,
      labels,
      tx=state.probe_tx,
      num_classes=state.probe_params["kernel"].shape[1],
      axis_name=sharding.DATA_AXIS,
    )
    metrics = dict(metrics, **probe_metrics)
  new_state = state.replace(
    step=state.step + 1,
    params=keep_if_bad(optax.apply_updates(state.params, updates), state.params),
    batch_stats=keep_if_bad(batch_stats, state.batch_stats),
    opt_state=keep_if_bad(opt_state, state.opt_state),
    probe_params=keep_if_bad(probe_params, state.probe_params),
    probe_opt_state=keep_if_bad(probe_opt_state, state.probe_opt_state),
  )
  metrics = dict(
    metrics,
    loss=loss,
    learning_rate=learning_rate_fn(state.step),
    grad_norm=grad_norm,
    param_norm=optax.tree.norm(state.params),
    # About 1/sqrt(d) for a healthy embedding and near 0 for a collapsed one.
    embedding_std=jnp.mean(collapse.embedding_std(z, axis_name=sharding.DATA_AXIS)),
    nonfinite=1.0 - finite.astype(jnp.float32),
  )
  return new_state, metrics


def make_train_step(
  config: ml_collections.ConfigDict, mesh: Mesh, learning_rate_fn: optax.Schedule
):
  """``train_step`` jit-compiled over ``mesh``: state replicated and donated, batch sharded."""
  step_fn = functools.partial(train_step, config=config, learning_rate_fn=learning_rate_fn)
  data, rep = PartitionSpec(sharding.DATA_AXIS), PartitionSpec()
  mapped = jax.shard_map(
    step_fn, mesh=mesh, in_specs=(rep, data, rep), out_specs=(rep, rep), check_vma=True
  )
  return jax.jit(
    mapped,
    in_shardings=(
      sharding.replicated(mesh),
      sharding.batch_sharded(mesh),
      sharding.replicated(mesh),
    ),
    out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)),
    donate_argnums=(0,),
  )


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
  """The iterator of two-view batches: grain on the host, or device-resident.

  With ``data.device_resident`` the whole uint8 data set is copied to every
  device once and crops and flips happen there too (``cljax.data.device``);
  its batches are already global device arrays.
  """
  crop_area = (config.data.augment.crop_area_min, 1.0)
  if config.data.device_resident:
    return device_data.create_device_iterator(
      source,
      mesh,
      seed=config.train.seed,
      global_batch_size=config.data.global_batch_size,
      image_size=config.data.image_size,
      crop_area=crop_area,
      flip=config.data.augment.flip,
    )
  return pipeline.create_pretrain_iterator(
    source,
    seed=config.train.seed,
    global_batch_size=config.data.global_batch_size,
    image_size=config.data.image_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    num_workers=config.data.num_workers,
    crop_area=crop_area,
    flip=config.data.augment.flip,
  )


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
    variables = {"params": state.params, "batch_stats": state.batch_stats}
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
  logging.info(
    "cljax: %d process(es), %d device(s) (%s); global batch %d images = %d views, %d "
    "negatives per anchor; %d examples, %d steps per epoch, %d steps; peak LR %.4g.",
    *(jax.process_count(), jax.device_count(), jax.devices()[0].platform),
    *(batch, 2 * batch, 2 * batch - 2),
    *(num_examples, steps_per_epoch, num_steps, peak_lr),
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
  state = create_train_state(config, init_rng, learning_rate_fn, image_shape, num_classes)
  state = jax.device_put(state, sharding.replicated(mesh))
  train_iter = create_train_iterator(config, source, mesh)

  manager = checkpoint.create_manager(workdir, config)
  state, start_step = checkpoint.restore_latest(manager, state, train_iter, config, force_resume)
  writer = metrics.MetricWriter(
    workdir,
    total_steps=num_steps,
    views_per_step=2 * config.data.global_batch_size,
    enabled=jax.process_index() == 0,
  )
  writer.write_config(config.to_dict())
  step_fn = make_train_step(config, mesh, learning_rate_fn)
  stop_at = min(num_steps, config.train.stop_at_step or num_steps)
  stop = _StopSignal()
  pending = PendingMetrics(NonFiniteGuard(config.train.max_nonfinite_streak))
  last, step, saved = {}, start_step, (start_step if start_step else None)
  try:
    while step < stop_at and not stop.should_stop(step % config.train.log_every_steps == 0):
      batch = next(train_iter)
      if not config.data.device_resident:
        keys = ("view_a", "view_b", "aug_seed", "label")
        batch = sharding.host_to_global({k: batch[k] for k in keys}, mesh)
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
    baseline = knn_eval(config, jax.device_put(init_state, sharding.replicated(mesh)), mesh)
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
