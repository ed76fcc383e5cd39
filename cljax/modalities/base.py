"""What a modality supplies to the shared run, step, methods and evaluation.

A modality is the kind of data a run trains on: images, time series. The train step, the
methods' losses and the evaluators work on arrays and embeddings and need not know which;
what differs lives in one :class:`Modality` object per kind, chosen by ``data.modality``:

- the data: its sources (``data.source``) and the shape of one network input;
- the training batches: which entries the step reads and the iterator that yields them;
- the views: how a batch becomes the augmented network inputs of a step (the instance
  methods' two views; multi-crop where the modality has it);
- evaluation: the iterator over a split once, in order, how its inputs become network
  inputs, and the raw-input baseline's features.

The encoder is the other piece (``cljax.models.ENCODERS``, a registry by ``model.name``).
Adding a modality is a module with its :class:`Modality` here, its sources in
``cljax.data``, its encoder in ``cljax.models``, and one line in each registry
(``docs/design.md``, "Modalities").
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import ml_collections


class Modality(abc.ABC):
  """The interface; :class:`cljax.modalities.image.Image` is the reference implementation.

  A subclass implements the abstract methods (Python refuses to instantiate it otherwise,
  naming the ones missing); the others have defaults."""

  name = "base"
  # The batch entries the train step reads; host batches may hold more (an index, a mask).
  batch_keys: tuple[str, ...] = ()
  # The entry of an evaluation batch holding the inputs (the others: label, mask, index).
  input_key = "input"

  @abc.abstractmethod
  def input_shape(self, config: ml_collections.ConfigDict, source: Any = None) -> tuple:
    """The shape of one network input (no batch axis), from the config (and the source where
    the data set sets it)."""

  @abc.abstractmethod
  def train_iterator(
    self,
    config: ml_collections.ConfigDict,
    source: Any,
    mesh: Any,
    views: Any,
    *,
    device_resident: bool,
    read_threads: int | None = None,
  ) -> Any:
    """The training batches of ``source``: this process's rows (host arrays) or global
    device arrays, each with the entries of ``batch_keys`` the step needs."""

  def prepare_batch(self, config: ml_collections.ConfigDict, batch: dict) -> dict:
    """Inside the step, before the views: what the host left to the device (decode-only
    images are cut into views here). Default: the batch as it is."""
    del config
    return batch

  @abc.abstractmethod
  def views(
    self, config: ml_collections.ConfigDict, batch: dict, rng: jax.Array, step: jax.Array
  ) -> dict[str, jax.Array]:
    """The augmented network inputs of this device's batch: ``{"global": (2n, ...)}``
    ordered ``[view_a; view_b]`` (and ``"local"`` with multi-crop)."""

  @abc.abstractmethod
  def eval_iterator(
    self, config: ml_collections.ConfigDict, source: Any, *, num_workers: int = 0
  ) -> Any:
    """This process's batches of ``source``, once, in order: ``{input_key, "label", "mask",
    "index"}``, padding rows masked out."""

  def network_inputs(self, x: jax.Array) -> jax.Array:
    """Evaluation batches' inputs as the network takes them (no augmentation)."""
    return x

  def raw_features(self, x: jax.Array) -> jax.Array:
    """The no-learning baseline's features of an evaluation batch: flattened raw inputs."""
    return x.reshape(x.shape[0], -1).astype(jax.numpy.float32)
