"""Everything a run needs, built once from its config: the one place a run is set up.

``create_run(config)`` builds the mesh, the training source, the method (with the run's
length), the learning-rate schedule, the placed initial state, the compiled train step and
the training iterator. The training loop (``cljax.train``), the benchmark
(``python -m cljax.bench``) and evaluation's random-init baseline all take a :class:`Run`
from here, so they run the same program::

    run = create_run(config)
    state = run.state
    for _ in range(run.num_steps):
      state, metrics = run.step_fn(state, run.global_batch(next(run.iterator)), run.step_rng)
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from cljax import errors, methods, modalities, optim, sharding, step, validate
from cljax.data import sources
from cljax.data import views as views_lib
from cljax.state import TrainState

# The values of optim.lr_schedule (create_learning_rate_fn).
LR_SCHEDULES = ("warmup_cosine", "constant")
# The image batch entries the train step reads (``Modality.batch_keys`` of each modality).
BATCH_KEYS = modalities.IMAGE.batch_keys


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
  # Zero is left to the command line's --allow_zero_lr; a negative rate is always refused.
  validate.check_config(config, allow_zero_lr=True)


def total_steps(config: ml_collections.ConfigDict, num_examples: int) -> tuple[int, int]:
  """``(steps_per_epoch, total_steps)``; ``train.num_steps > 0`` overrides the epochs.

  Raises:
    ValueError: the training split is smaller than one global batch (the pipeline drops
      the last partial batch, so it would yield none), with or without ``train.num_steps``.
  """
  steps_per_epoch = num_examples // config.data.global_batch_size
  if steps_per_epoch == 0:
    raise errors.DataError(
      f"data.global_batch_size={config.data.global_batch_size} is larger than the training "
      f"split data.train_split={config.data.train_split!r} ({num_examples} examples): lower "
      f"data.global_batch_size to at most {num_examples}."
    )
  if config.train.num_steps > 0:
    return steps_per_epoch, config.train.num_steps
  return steps_per_epoch, int(math.ceil(config.train.num_epochs * steps_per_epoch))


def create_learning_rate_fn(
  config: ml_collections.ConfigDict, steps_per_epoch: int, num_steps: int
) -> tuple[float, optax.Schedule]:
  """``(peak_lr, schedule)``: the scaled peak, linear warm-up, then cosine to the end
  (``optim.lr_schedule = "warmup_cosine"``), or the peak throughout ("constant": TS2Vec)."""
  peak_lr = optim.scaled_learning_rate(
    config.optim.base_lr, config.data.global_batch_size, config.optim.lr_scaling
  )
  if config.optim.get("lr_schedule", "warmup_cosine") == "constant":
    return peak_lr, optax.constant_schedule(peak_lr)
  warmup_steps = int(round(config.optim.warmup_epochs * max(steps_per_epoch, 1)))
  return peak_lr, optim.create_learning_rate_fn(peak_lr, warmup_steps, num_steps)


@dataclasses.dataclass(frozen=True)
class Run:
  """What ``create_run`` built. The state is the initial one; the step donates it.

  Attributes:
    config: the run's config.
    mesh: the 'data' mesh over all devices of all processes.
    source: the training source.
    num_classes: its class count (0 when unlabelled): sizes the online probe.
    method: the method, built once, with the run's length.
    views: how training views are cut (``views.ViewSpec``).
    steps_per_epoch: global batches per pass over ``source``.
    num_steps: the run's length in steps.
    peak_lr: the learning rate after warm-up.
    learning_rate_fn: the schedule.
    init_rng: the key of the initial state (``initial_state`` draws from it again).
    step_rng: the key the step's randomness derives from (with ``state.step``).
    state: the initial state, placed on ``mesh``.
    step_fn: the compiled train step, ``(state, batch, step_rng) -> (state, metrics)``.
    iterator: the training iterator (None when built without one).
  """

  config: ml_collections.ConfigDict
  mesh: Mesh
  source: Any
  num_classes: int
  method: methods.Method
  views: views_lib.ViewSpec
  steps_per_epoch: int
  num_steps: int
  peak_lr: float
  learning_rate_fn: optax.Schedule
  init_rng: jax.Array
  step_rng: jax.Array
  state: TrainState
  step_fn: Any
  iterator: Any

  @property
  def input_shape(self) -> tuple[int, ...]:
    """One network input's shape (``Modality.input_shape``)."""
    return self.method.modality.input_shape(self.config, self.source)

  @property
  def image_shape(self) -> tuple[int, ...]:
    """``input_shape`` (the name from before there were other modalities)."""
    return self.input_shape

  @property
  def views_per_step(self) -> int:
    """Full-size views the step processes (what views/s counts)."""
    return self.method.views_per_example * self.config.data.global_batch_size

  def initial_state(self, *, with_probe: bool = True) -> TrainState:
    """A fresh copy of the initial state, placed (the random-init baseline evaluates it)."""
    state = step.create_train_state(
      self.method,
      self.init_rng,
      self.learning_rate_fn,
      self.input_shape,
      mesh=self.mesh,
      num_classes=self.num_classes if with_probe else 0,
    )
    return step.place_state(state, self.mesh, self.method)

  def global_batch(self, batch: dict) -> dict:
    """The step's entries of ``batch`` as global arrays: a host batch (NumPy, this
    process's rows) is assembled from every process; device-resident batches already are."""
    batch = {k: batch[k] for k in self.method.modality.batch_keys if k in batch}
    if all(isinstance(x, jax.Array) for x in batch.values()):
      return batch
    return sharding.host_to_global(batch, self.mesh)

  def create_iterator(
    self, *, device_resident: bool | None = None, read_threads: int | None = None
  ) -> Any:
    """A training iterator from the start; ``device_resident`` default: the config's;
    ``read_threads``: the host pipeline's (``Method.create_train_iterator``)."""
    if device_resident is None:
      device_resident = self.config.data.device_resident
    return self.method.create_train_iterator(
      self.source, self.mesh, self.views, device_resident=device_resident, read_threads=read_threads
    )

  def describe(self) -> str:
    """The run's first log line."""
    c = self.config
    return (
      f"cljax {c.method}: {jax.process_count()} process(es), {jax.device_count()} device(s) "
      f"({jax.devices()[0].platform}); global batch {c.data.global_batch_size} examples"
      f"{self.method.describe()}; {len(self.source)} examples, {self.steps_per_epoch} steps "
      f"per epoch, {self.num_steps} steps; peak LR {self.peak_lr:.4g}."
    )


def create_run(
  config: ml_collections.ConfigDict, *, mesh: Mesh | None = None, with_iterator: bool = True
) -> Run:
  """Builds everything a run of ``config`` needs, once.

  Args:
    config: the run's config.
    mesh: default all devices of all processes.
    with_iterator: also open the training iterator (device-resident data is loaded here).

  Returns:
    The :class:`Run`.

  Raises:
    ValueError: a config value that would fail later (``check_config``), a batch that does
      not split over the devices, or data the method cannot train on.
  """
  check_config(config)
  mesh = mesh or sharding.create_mesh()
  sharding.check_global_batch(config.data.global_batch_size, mesh)
  views = views_lib.ViewSpec.from_config(config.data)
  source = sources.create_source(config.data, "train")
  num_classes = len(getattr(source, "class_names", None) or ())
  steps_per_epoch, num_steps = total_steps(config, len(source))
  method = methods.create_method(config, num_steps, steps_per_epoch)
  method.check_data(source, num_classes)
  peak_lr, learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch, num_steps)
  init_rng, step_rng = jax.random.split(jax.random.key(config.train.seed))
  run = Run(
    config=config,
    mesh=mesh,
    source=source,
    num_classes=num_classes,
    method=method,
    views=views,
    steps_per_epoch=steps_per_epoch,
    num_steps=num_steps,
    peak_lr=peak_lr,
    learning_rate_fn=learning_rate_fn,
    init_rng=init_rng,
    step_rng=step_rng,
    state=None,
    step_fn=step.make_train_step(method, mesh, learning_rate_fn),
    iterator=None,
  )
  iterator = run.create_iterator() if with_iterator else None
  return dataclasses.replace(run, state=run.initial_state(), iterator=iterator)
