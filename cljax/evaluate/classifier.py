"""Supervised training on a pretrained encoder: SimCLR's linear protocol and label-subset tuning.

Both attach a zero-initialised linear layer to the encoder output (the projection head is
dropped) and train with SGD, Nesterov momentum 0.9, a cosine schedule, no weight decay and
random resized crop + flip, as SimCLR does (Chen et al. 2020, appendix B.5 and B.6):

- ``linear_probe_sgd``: the encoder is frozen (eval-mode BatchNorm, stop-gradient); only the
  linear layer learns. SimCLR: batch 4096, learning rate 0.1 x B/256, 90 epochs.
- ``finetune``: encoder and layer learn on a class-balanced ``label_fraction`` of the training
  labels (fixed seed), BatchNorm in training mode with global statistics. SimCLR: batch 4096,
  learning rate 0.05 x B/256, 60 epochs on 1% and 30 on 10% of ImageNet.

Training is plain ``jax.jit`` over a batch-sharded global array (XLA inserts the cross-device
reductions, so BatchNorm statistics are global); evaluation uses the centre-crop eval pipeline
and reports top-1 and top-5.
"""

from __future__ import annotations

import functools
import time
import types
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from cljax import methods, models, sharding, xla_options
from cljax.data import augment, pipeline, sources
from cljax.data import views as views_lib
from cljax.evaluate import features, linear


class Classifier(nn.Module):
  """The encoder followed by a linear layer ``classifier``; ``frozen`` stops gradients into it."""

  encoder: nn.Module
  num_classes: int
  frozen: bool = False

  @nn.compact
  def __call__(self, x, train: bool = True):
    z = self.encoder(x, train=train and not self.frozen)
    if self.frozen:
      z = jax.lax.stop_gradient(z)
    # Zero initialisation (SimCLR's zero_init_logits_layer): the first predictions are uniform.
    # Full float32 products, as the kNN and the other probes: TPU/GPU default precision
    # rounds the inputs to bf16 or TF32.
    dense = nn.Dense(
      self.num_classes,
      kernel_init=nn.initializers.zeros,
      precision=jax.lax.Precision.HIGHEST,
      name="classifier",
    )
    return dense(z.astype(jnp.float32))


class Subset:
  """The examples ``indices`` of a random-access source, in that order."""

  def __init__(self, source: Any, indices: Sequence[int]):
    self.source, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> Any:
    return self.source[int(self.indices[index])]

  def __repr__(self) -> str:
    # Stable across processes: grain's checkpointed state and worker processes rely on it.
    digest = int(np.bitwise_xor.reduce(self.indices * 2654435761 % 2**31)) if len(self) else 0
    return f"Subset({self.source!r}, num_examples={len(self)}, digest={digest})"


def source_labels(source: Any) -> np.ndarray:
  """All labels of a source: its ``labels`` array when it has one, else read example by example."""
  labels = getattr(source, "labels", None)
  if labels is not None:
    return np.asarray(labels, np.int64)
  return np.asarray([int(source[i]["label"]) for i in range(len(source))], np.int64)


def _num_classes(source: Any, labels: np.ndarray | None = None) -> int:
  # The class names avoid reading every label (a pass over ImageNet) when the source has them.
  names = getattr(source, "class_names", None)
  if names:
    return len(names)
  labels = source_labels(source) if labels is None else labels
  return int(labels.max()) + 1


def balanced_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
  """Indices of a class-balanced random ``fraction`` of the labelled examples.

  Each class contributes ``round(fraction * count)`` examples (at least one), drawn without
  replacement from a generator seeded by ``seed``, so a fixed seed gives a fixed subset.

  Args:
    labels: (n,) integer labels; examples with a label < 0 are never chosen.
    fraction: in (0, 1].
    seed: seed of the draw.

  Returns:
    Sorted (m,) int64 indices into ``labels``.

  Raises:
    ValueError: if ``fraction`` is outside (0, 1] or no example is labelled.
  """
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
  labels = np.asarray(labels)
  classes = np.unique(labels[labels >= 0])
  if not len(classes):
    raise ValueError("no labelled examples to draw a subset from.")
  rng = np.random.default_rng(seed)
  chosen = []
  for c in classes:
    members = np.flatnonzero(labels == c)
    chosen.append(rng.choice(members, max(1, int(round(fraction * len(members)))), replace=False))
  return np.sort(np.concatenate(chosen))


class OneView(grain.transforms.RandomMap):
  """Example -> one random resized crop (+ flip) as ``views`` says, and its label."""

  def __init__(self, views: views_lib.ViewSpec):
    self.views = views

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    view = pipeline.global_view(element["image"], rng, self.views)
    return {"image": np.ascontiguousarray(view), "label": np.int32(element["label"])}


def create_train_iterator(
  source: Any,
  views: views_lib.ViewSpec,
  *,
  seed: int,
  batch_size: int,
  num_epochs: int,
  num_workers: int = 0,
) -> pipeline.BatchIterator:
  """This process's batches of single augmented views, reshuffled every epoch.

  The stream of ``pipeline.augmented_batches``, as pretraining's, with its checks.

  Returns:
    An iterator of ``{"image": uint8 (b, S, S, 3), "label": int32 (b,)}``, b = batch_size //
    process_count, ``num_epochs * (len(source) // batch_size)`` batches in all.
  """
  stream = pipeline.StreamSpec(
    seed=seed,
    global_batch_size=batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    num_workers=num_workers,
    num_epochs=num_epochs,
  )
  return pipeline.augmented_batches(source, OneView(views), views, stream, kind="classifier")


def _variables(state: Any, method: methods.Method) -> dict[str, Any]:
  """The ``{"params", "batch_stats"}`` that evaluation starts from (``Method.eval_variables``:
  DINO's teacher), of a TrainState or of a plain-orbax restored dict."""
  if isinstance(state, Mapping):
    state = types.SimpleNamespace(
      params=state["params"],
      batch_stats=state["batch_stats"],
      method_state=state.get("method_state"),
    )
  return method.eval_variables(state)


def _make_step(model: Classifier, tx: optax.GradientTransformation, mesh: Mesh):
  """The jitted SGD step: gradients for ``trainable`` only; ``fixed`` parameters stay as given."""

  def loss_fn(trainable, fixed, batch_stats, images, labels):
    variables = {"params": {**fixed, **trainable}, "batch_stats": batch_stats}
    x = augment.network_inputs(images)
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
    return loss, (updates["batch_stats"], accuracy)

  @functools.partial(jax.jit, donate_argnums=(0, 1), compiler_options=xla_options.for_mesh(mesh))
  def step(trainable, opt_state, fixed, batch_stats, images, labels):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (batch_stats, accuracy)), grads = grad_fn(trainable, fixed, batch_stats, images, labels)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, opt_state, batch_stats, {"loss": loss, "accuracy": accuracy}

  return step


def train_classifier(
  method: methods.Method,
  state: Any,
  train_source: Any,
  eval_source: Any,
  *,
  num_classes: int,
  frozen: bool,
  num_epochs: int,
  batch_size: int,
  base_lr: float,
  momentum: float = 0.9,
  crop_area: tuple[float, float] = (0.08, 1.0),
  seed: int = 0,
  mesh: Mesh | None = None,
  num_workers: int = 0,
  log_every_steps: int = 100,
) -> dict[str, float]:
  """Trains a linear layer on the encoder of ``state`` (and the encoder unless ``frozen``).

  Args:
    method: the pretraining method (its config: model and data sections; which network
      evaluation starts from).
    state: a TrainState, or the dict plain orbax restores, holding ``params["encoder"]``.
    train_source: random-access source of labelled training examples.
    eval_source: source of the examples to score (centre crops).
    num_classes: number of classes.
    frozen: True: SimCLR's linear protocol; False: fine-tune everything.
    num_epochs: passes over ``train_source``.
    batch_size: global batch size; a multiple of the device count, <= len(train_source).
    base_lr: learning rate per 256 examples (scaled linearly with the batch).
    momentum: Nesterov momentum.
    crop_area: range of the random crop's area fraction.
    seed: order, augmentation and nothing else (the layer starts at zero).
    mesh: devices to shard the batch over; default all.
    num_workers: grain worker processes.
    log_every_steps: log the training loss this often.

  Returns:
    ``{"top1", "top5", "train_loss", "train_accuracy", "steps", "seconds"}``.

  Raises:
    ValueError: if the training set is smaller than one batch or the batch does not split
      over the devices.
  """
  config = method.config
  mesh = mesh or sharding.create_mesh()
  sharding.check_global_batch(batch_size, mesh)
  if len(train_source) < batch_size or num_epochs < 1:
    raise ValueError(
      f"need num_epochs >= 1 and at least one batch of {batch_size}; got {num_epochs=} and "
      f"{len(train_source)} training examples, fewer than one batch: lower batch_size."
    )
  # Batches run across epoch boundaries (as the iterator deals them), so count them that way.
  usable = len(train_source) - len(train_source) % jax.process_count()
  num_steps = num_epochs * usable // batch_size
  model = Classifier(models.create_encoder(config.model), num_classes, frozen)
  variables = _variables(state, method)
  trainable, fixed, batch_stats = _initial_variables(model, variables, config, frozen)
  schedule = optax.cosine_decay_schedule(base_lr * batch_size / 256, num_steps)
  tx = optax.sgd(schedule, momentum=momentum, nesterov=True)
  rep = sharding.replicated(mesh)
  trainable, fixed, batch_stats = jax.device_put((trainable, fixed, batch_stats), rep)
  opt_state = jax.device_put(tx.init(trainable), rep)
  step_fn = _make_step(model, tx, mesh)
  # SimCLR's augmentation for these protocols: random resized crop and flip, nothing else.
  views = views_lib.ViewSpec(config.data.image_size, crop_area=crop_area, flip=True)
  it = create_train_iterator(
    train_source,
    views,
    seed=seed,
    batch_size=batch_size,
    num_epochs=num_epochs,
    num_workers=num_workers,
  )
  t0, history = time.time(), []
  steps = zip(range(1, num_steps + 1), it, strict=False)
  name = "linear (SGD)" if frozen else "fine-tuning"
  for step, batch in features.progress(steps, desc=name, total=num_steps, unit="step"):
    batch = sharding.host_to_global({"image": batch["image"], "label": batch["label"]}, mesh)
    trainable, opt_state, batch_stats, metrics = step_fn(
      trainable, opt_state, fixed, batch_stats, batch["image"], batch["label"]
    )
    history.append(metrics)
    if step % log_every_steps == 0 or step == num_steps:
      last = {k: float(np.mean([float(m[k]) for m in history])) for k in history[0]}
      logging.info("%s step %d/%d: %s", "linear" if frozen else "finetune", step, num_steps, last)
      history = []
  seconds = time.time() - t0
  variables = {"params": {**fixed, **trainable}, "batch_stats": batch_stats}
  result = evaluate_classifier(
    model, variables, eval_source, config=config, mesh=mesh, num_workers=num_workers
  )
  result.update(
    train_loss=last["loss"], train_accuracy=last["accuracy"], steps=num_steps, seconds=seconds
  )
  return result


def _initial_variables(model: Classifier, variables: dict, config, frozen: bool) -> tuple:
  """``(trainable, fixed, batch_stats)``: the pretrained encoder and a zero linear layer."""
  image_shape = (1, config.data.image_size, config.data.image_size, 3)
  # Shapes only: the layer starts at zero, and initialising a whole encoder would be wasted.
  shapes = jax.eval_shape(
    functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros(image_shape)
  )
  head = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["params"]["classifier"])
  params = {"encoder": variables["params"]["encoder"], "classifier": head}
  trainable_keys = ("classifier",) if frozen else ("encoder", "classifier")
  trainable = {k: params[k] for k in trainable_keys}
  fixed = {k: v for k, v in params.items() if k not in trainable_keys}
  return trainable, fixed, {"encoder": variables["batch_stats"].get("encoder", {})}


def evaluate_classifier(
  model: Classifier,
  variables: dict[str, Any],
  source: Any,
  *,
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  num_workers: int = 0,
) -> dict[str, float]:
  """Top-1 and top-5 of ``model`` on the centre crops of ``source``."""
  batches = features.eval_batches(config, "eval", source=source, num_workers=num_workers)
  logits_fn = lambda v, images: model.apply(v, augment.network_inputs(images), train=False)
  logits, labels, _ = features.extract(logits_fn, variables, batches, mesh)
  return linear.topk_accuracy(logits, labels)


def linear_probe_sgd(
  method: methods.Method,
  state: Any,
  *,
  train_source: Any | None = None,
  eval_source: Any | None = None,
  num_classes: int | None = None,
  num_epochs: int = 90,
  batch_size: int = 4096,
  base_lr: float = 0.1,
  **kwargs: Any,
) -> dict[str, float]:
  """SimCLR's linear evaluation: SGD on a linear layer over the frozen, augmented encoder.

  Args:
    method: the pretraining method; its config's data section names the sources by default.
    state: a TrainState or plain-orbax restored dict.
    train_source: labelled training examples (default: the config's train split).
    eval_source: examples to score (default: the config's eval split).
    num_classes: default: the source's class names, else 1 + the largest training label.
    num_epochs: SimCLR: 90.
    batch_size: SimCLR: 4096.
    base_lr: per 256 examples; SimCLR: 0.1 (1.6 at batch 4096).
    **kwargs: passed to ``train_classifier`` (momentum, crop_area, seed, mesh, ...).

  Returns:
    As ``train_classifier``.
  """
  config = method.config
  if train_source is None:
    train_source = sources.create_source(config.data, "train")
  if eval_source is None:
    eval_source = sources.create_source(config.data, "eval")
  num_classes = num_classes or _num_classes(train_source)
  return train_classifier(
    method,
    state,
    train_source,
    eval_source,
    num_classes=num_classes,
    frozen=True,
    num_epochs=num_epochs,
    batch_size=batch_size,
    base_lr=base_lr,
    **kwargs,
  )


def finetune(
  method: methods.Method,
  state: Any,
  *,
  label_fraction: float,
  subset_seed: int = 0,
  subset_indices: Sequence[int] | None = None,
  train_source: Any | None = None,
  eval_source: Any | None = None,
  num_classes: int | None = None,
  num_epochs: int | None = None,
  batch_size: int = 4096,
  base_lr: float = 0.05,
  **kwargs: Any,
) -> dict[str, float]:
  """Semi-supervised evaluation: fine-tunes encoder and a new linear layer on a label subset.

  Args:
    method: the pretraining method; its config's data section names the sources by default.
    state: a TrainState or plain-orbax restored dict (the pretrained encoder).
    label_fraction: fraction of the training labels used (0.01, 0.1), class-balanced.
    subset_seed: seed of the subset; fixed so that runs compare on the same labels.
    subset_indices: a given subset instead (e.g. SimCLR's published ImageNet 1% / 10% lists,
      mapped to source indices); ``label_fraction`` then only names the result.
    train_source: the full labelled training set (default: the config's train split).
    eval_source: examples to score (default: the config's eval split).
    num_classes: default: the source's class names, else 1 + the largest training label.
    num_epochs: default SimCLR's: 60 below 10% of the labels, else 30.
    batch_size: global batch; capped at the subset size (rounded down to whole devices).
    base_lr: per 256 examples; SimCLR: 0.05.
    **kwargs: passed to ``train_classifier`` (momentum, crop_area, seed, mesh, ...).

  Returns:
    As ``train_classifier``, plus ``label_fraction`` and ``num_labelled``.
  """
  config = method.config
  if train_source is None:
    train_source = sources.create_source(config.data, "train")
  if eval_source is None:
    eval_source = sources.create_source(config.data, "eval")
  if subset_indices is None:
    labels = source_labels(train_source)
    subset_indices = balanced_subset(labels, label_fraction, subset_seed)
    num_classes = num_classes or _num_classes(train_source, labels)
  num_classes = num_classes or _num_classes(train_source)
  subset = Subset(train_source, subset_indices)
  if num_epochs is None:
    num_epochs = 60 if label_fraction < 0.1 else 30
  devices = (kwargs.get("mesh") or sharding.create_mesh()).devices.size
  batch_size = max(devices, min(batch_size, len(subset)) // devices * devices)
  result = train_classifier(
    method,
    state,
    subset,
    eval_source,
    num_classes=num_classes,
    frozen=False,
    num_epochs=num_epochs,
    batch_size=batch_size,
    base_lr=base_lr,
    **kwargs,
  )
  result.update(label_fraction=label_fraction, num_labelled=len(subset))
  return result
