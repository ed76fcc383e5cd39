"""What a self-supervised method is to the train step: views in, a loss and its state out.

The train step (``cljax.step.train_step``) is the same for every method: it
asks the method for the augmented views of the batch, differentiates the
method's loss with respect to the online parameters, applies the optimiser,
and then lets the method update its own state (a momentum target network, a
queue of keys, a centre) from the new parameters. All of it runs inside one
``jax.shard_map`` over the ``'data'`` axis, jit-compiled once; the method's
losses see the global batch through the collectives in ``cljax.losses``.

A method subclasses :class:`Method` and overrides what differs from SimCLR:

- ``config_sections``: its own sections of the base config, with their defaults
  (``defaults.base_config`` collects them from the registry, ``cljax.methods.METHODS``).
- ``views_per_example``, ``create_train_iterator``, ``describe``, ``zero_shot``: what the
  run asks of the method instead of asking which method runs (CLIP: one view per example,
  caption batches, zero-shot evaluation).
- ``create_model``: the online network (default: encoder + projection head
  [+ predictor] from the config). Its ``apply`` must return
  ``(features, embeddings)`` so evaluation can read the encoder features.
- ``init_state``/``state_specs``: the method's extra state, which lives in
  ``TrainState.method_state`` (checkpointed with everything else), and how it
  is laid out over the mesh (``PartitionSpec()`` replicates; a MoCo queue is
  sharded over ``'data'``).
- ``loss``: the loss of the online parameters, and a :class:`StepOutput`.
- ``update_state``: the method state after the optimiser step.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import PartitionSpec

from cljax import modalities, models, optim, sharding
from cljax.data import views as views_lib
from cljax.losses import schedules


class StepOutput(NamedTuple):
  """What a method's loss hands back to the train step besides the loss value.

  Attributes:
    batch_stats: the online network's updated BatchNorm statistics.
    metrics: global scalar metrics of the loss.
    embeddings: (m, d) online embeddings of this device, for ``embedding_std``.
    features: (k * n, f) encoder features of k views of the local batch of n,
      in view order, for the online linear probe.
    pairs: ``(z_a, z_b)`` (n, d) embeddings of the two views of the same
      images, for the optional collapse metrics (alignment), or None.
    extra: anything ``update_state`` needs (keys to enqueue, teacher outputs).
  """

  batch_stats: Any
  metrics: dict[str, jax.Array]
  embeddings: jax.Array
  features: jax.Array
  pairs: tuple[jax.Array, jax.Array] | None = None
  extra: Any = None


def forward(
  apply_fn: Any,
  params: Any,
  batch_stats: Any,
  views: jax.Array,
  num_chunks: int = 1,
  num_groups: int = 1,
  **kwargs,
) -> tuple:
  """The network's outputs on ``views`` and its updated BatchNorm statistics.

  Returns ``(*outputs, batch_stats)``: ``(features, embeddings, batch_stats)``
  for the plain model, with the predictions before the statistics when
  ``predict=True`` is passed through ``kwargs``.

  ``num_groups > 1`` splits ``views`` into that many equal groups (the views
  of a batch, ``[view_a; view_b]``) that pass through the network one after
  another, as separate forward passes: BatchNorm normalises each group with
  its own statistics (still averaged across devices), and the running
  averages are updated group after group. That is per-view BatchNorm, what
  the official code of BYOL, MoCo v3, SimSiam and Barlow Twins does by calling
  the network once per view; ``num_groups=1`` pools the statistics of all
  views in one pass (SimCLR's reference code).

  With ``num_chunks > 1`` this is gradient caching (GradCache, Gao et al.
  2021) by rematerialisation: each group passes through the network in chunks
  under ``lax.scan``, and ``jax.checkpoint`` keeps only each chunk's input, so
  the backward pass recomputes one chunk's activations at a time. Activation
  memory falls by about ``num_chunks`` while the loss still sees every
  embedding of the global batch. BatchNorm then normalises each chunk with its
  own statistics (ghost BatchNorm, still averaged across devices), and the
  running averages are updated chunk after chunk; gradients equal those of
  the same chunked forward without rematerialisation.
  """

  def apply(stats, x):
    variables = {"params": params, "batch_stats": stats}
    outputs, new_vars = apply_fn(variables, x, train=True, mutable=["batch_stats"], **kwargs)
    return new_vars.get("batch_stats", stats), outputs

  if num_chunks < 1 or num_groups < 1:
    raise ValueError(f"num_chunks={num_chunks} and num_groups={num_groups} must be >= 1.")
  if num_chunks == 1 and num_groups == 1:
    stats, outputs = apply(batch_stats, views)
    return (*outputs, stats)
  if views.shape[0] % num_groups:
    raise ValueError(f"the {views.shape[0]} views on each device are not {num_groups} groups.")
  if (views.shape[0] // num_groups) % num_chunks:
    raise ValueError(
      f"train.grad_chunks={num_chunks} must divide the {views.shape[0] // num_groups} views "
      f"of each of the {num_groups} BatchNorm groups on each device."
    )
  # The groups one after another, unrolled like the official code's separate calls (a
  # lax.scan over the groups had not finished compiling the BYOL :cpu step after 30 minutes
  # on a shared 2-core CPU); each group's chunks under a scan, rematerialised.
  outputs, stats = [], batch_stats
  for group in jnp.split(views, num_groups):
    if num_chunks == 1:
      stats, out = apply(stats, group)
    else:
      chunk = jax.checkpoint(apply, prevent_cse=False)
      chunks = group.reshape(num_chunks, -1, *group.shape[1:])
      stats, out = jax.lax.scan(chunk, stats, chunks)
      out = tuple(o.reshape(-1, *o.shape[2:]) for o in out)
    outputs.append(out)
  return (*(jnp.concatenate(parts) for parts in zip(*outputs, strict=True)), stats)


def ema_config() -> ml_collections.ConfigDict:
  """The ``ema`` section: the momentum target network of MoCo, BYOL and DINO.

  Decay ``ema.base``, ramped to ``ema.final`` over the run by a half cosine ("cosine": BYOL,
  MoCo v3, DINO) or kept constant ("constant": MoCo v2).
  """
  c = ml_collections.ConfigDict()
  c.base = 0.996
  c.final = 1.0
  c.schedule = "cosine"
  return c


EMA_SCHEDULES = ("cosine", "constant")  # The values of ema.schedule.


def ema_decay(config: ml_collections.ConfigDict, step: jax.Array, num_steps: int) -> jax.Array:
  """The momentum of a target network at ``step``: ``ema.base``, ramped to ``ema.final``.

  ``ema.schedule="cosine"`` is BYOL's / MoCo v3's / DINO's
  ``final - (final - base) * (cos(pi k / K) + 1) / 2`` over the run's K steps;
  ``"constant"`` (MoCo v2) keeps ``ema.base``. Without a known number of steps
  (``num_steps=0``) the schedule stays at ``ema.base``.
  """
  if config.ema.schedule == "constant" or num_steps <= 0:
    return jnp.asarray(config.ema.base, jnp.float32)
  if config.ema.schedule == "cosine":
    return schedules.cosine_ramp(step, num_steps, config.ema.base, config.ema.final)
  raise ValueError(f"ema.schedule must be one of {EMA_SCHEDULES}, got {config.ema.schedule!r}.")


def copy_tree(tree: Any) -> Any:
  """A copy with its own buffers (a target network must not alias the donated online one)."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


class Method:
  """SimCLR's choices, which other methods override piece by piece.

  Args:
    config: the run config.
    num_steps: the run's total steps, for schedules (0: unknown, schedules
      stay at their start values).
    steps_per_epoch: for schedules given in epochs (0: unknown).
  """

  name = "base"
  # Full-size views each example gives the step (multi-crop's local views not counted).
  views_per_example = 2
  # Whether evaluation runs zero-shot classification and retrieval by default (CLIP).
  zero_shot = False
  # Which network eval_variables returns, recorded with cached features.
  eval_network = "online"
  # Keys of the method state holding a copy of (part of) the online parameters (a target
  # network): laid out like them under FSDP and gathered whole for the forward pass
  # (``step.state_specs``, ``step.gathered``).
  mirrors_params: tuple[str, ...] = ()
  # How BatchNorm sees the views of a step (``model.bn_views``): "pooled" (one forward pass
  # over all of them, SimCLR's reference code) or "per_view" (one pass per view, as the
  # official code of BYOL, MoCo v3, SimSiam and Barlow Twins calls its network). The default
  # is what the method's official code does; ``bn_views_choices`` are the ones it offers.
  bn_views_default = "pooled"
  bn_views_choices = ("pooled",)

  @classmethod
  def config_sections(cls) -> dict[str, ml_collections.ConfigDict]:
    """This method's own sections of the base config, with their defaults (none: ``{}``).

    ``defaults.base_config`` adds every registered method's sections, so each key exists
    (and ``--config.x.y=v`` overrides are checked) whichever method a config selects.
    """
    return {}

  def __init__(
    self, config: ml_collections.ConfigDict, num_steps: int = 0, steps_per_epoch: int = 0
  ):
    self.config = config
    self.num_steps = num_steps
    self.steps_per_epoch = steps_per_epoch
    self.axis_name = sharding.DATA_AXIS
    self.bn_views = self._bn_views(config.model.get("bn_views", "default"))
    # What the data is (images, series): its iterators, views and evaluation inputs.
    self.modality = modalities.get(config)

  def _bn_views(self, choice: str) -> str:
    if choice == "default":
      return self.bn_views_default
    if choice not in self.bn_views_choices:
      offered = " or ".join(repr(c) for c in ("default", *self.bn_views_choices))
      raise ValueError(f"model.bn_views must be {offered} for {self.name}, got {choice!r}.")
    return choice

  # ---- The model and the method's state.

  def create_model(self, bn_axis_name: str | None = None):
    """The online network; ``apply`` returns ``(features, embeddings)``."""
    return models.create_model(self.config, bn_axis_name)

  def init_variables(self, rng: jax.Array, input_shape: tuple[int, ...]) -> dict:
    """The online network's initial ``{"params", "batch_stats"}`` for inputs of
    ``input_shape`` (one example: (H, W, 3) images, (T, C) series)."""
    model = self.create_model()
    kwargs = {"predict": True} if self.config.predictor.num_layers > 0 else {}
    init = jax.jit(functools.partial(model.init, train=False, **kwargs))
    variables = init(rng, jnp.zeros((2, *input_shape), jnp.float32))
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

  def create_optimizer(self, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
    """The optimiser of the online parameters: the ``optim`` section's (DINO and SwAV add a
    freeze)."""
    return optim.create_optimizer(self.config.optim, learning_rate_fn, self.num_steps)

  def init_state(self, rng: jax.Array, variables: dict) -> Any:
    """The method's extra state (None for SimCLR)."""
    del rng, variables
    return None

  def state_specs(self) -> Any:
    """A ``PartitionSpec`` prefix of the method state (inside ``shard_map``)."""
    return PartitionSpec()

  def eval_variables(self, state: Any) -> dict:
    """The ``{"params", "batch_stats"}`` that evaluation (kNN, linear probe) embeds with:
    the online network's, but for methods whose papers evaluate another (DINO's teacher)."""
    return {"params": state.params, "batch_stats": state.batch_stats}

  def knn_features(self, features: Any) -> Any:
    """The columns of the (n, f) evaluation features that kNN compares (all of them; DINOv2:
    the class token of its class-token + pooled-patch features)."""
    return features

  def check_data(self, source: Any, num_classes: int) -> None:
    """Raises ``ValueError`` before anything compiles if the method cannot train on ``source``
    (``num_classes``: the number of class names it has, 0 for unlabelled data)."""
    del source, num_classes

  # ---- What the run asks of the method.

  def create_train_iterator(
    self,
    source: Any,
    mesh: Any,
    views: views_lib.ViewSpec,
    *,
    device_resident: bool,
    read_threads: int | None = None,
  ) -> Any:
    """The training batches: the modality's (``Modality.train_iterator``; images: two views
    and local crops from grain, or device-resident). CLIP adds captions."""
    return self.modality.train_iterator(
      self.config,
      source,
      mesh,
      views,
      device_resident=device_resident,
      read_threads=read_threads,
    )

  def describe(self) -> str:
    """What the run's first log line says about the method beyond its name ("" for nothing)."""
    return ""

  # ---- One step.

  def views(self, batch: dict, rng: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
    """The augmented network inputs of this device's batch: the modality's
    (``Modality.views``; images: ``{"global": (2n, h, w, 3)}`` ordered ``[view_a; view_b]``
    and with multi-crop ``{"local": (L * n, s, s, 3)}``, each example's photometric keys
    from its ``aug_seed``, so augmentations do not depend on how the batch is split)."""
    return self.modality.views(self.config, batch, rng, step)

  def forward(self, apply_fn, params, batch_stats, x, num_views: int = 1, **kwargs) -> tuple:
    """:func:`forward` with the config's ``train.grad_chunks`` and ``model.bn_views``.

    ``x`` stacks ``num_views`` views of this device's batch, ``[view_a; view_b; ...]``;
    with per-view BatchNorm each passes through the network alone. A network without
    BatchNorm (a ViT and a head without it) takes them in one pass either way.
    """
    per_view = self.bn_views == "per_view" and bool(jax.tree.leaves(batch_stats))
    groups = num_views if per_view else 1
    chunks = self.config.train.grad_chunks
    return forward(apply_fn, params, batch_stats, x, chunks, groups, **kwargs)

  def loss(self, params: Any, state: Any, views: dict, batch: dict) -> tuple[jax.Array, StepOutput]:
    """The loss of the online ``params`` and a :class:`StepOutput`; every method defines it."""
    raise NotImplementedError(
      f"{type(self).__name__} does not define loss(); subclass Method and implement it."
    )

  def project_params(self, params: Any) -> Any:
    """The online parameters just updated by the optimiser, projected onto the method's
    constraints (CLIP clamps its logit scale, as open_clip does after each step); by
    default as they are."""
    return params

  def update_state(self, state: Any, params: Any, out: StepOutput) -> Any:
    """The method state after the step; ``params`` are the updated online parameters."""
    del params, out
    return state.method_state
