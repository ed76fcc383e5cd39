"""Supervised contrastive learning (SupCon, Khosla et al. 2020): SimCLR with label positives.

Both views of every image of the global batch are anchors; an anchor's
positives are every other view (across all devices) whose image has the same
class label, its contrast set every other view (``losses.supcon_loss``, the
paper's :math:`L^{sup}_{out}`). With one image per class in the batch the
only positive is the partner view and the loss is SimCLR's NT-Xent (scaled by
``loss.temperature / supcon.base_temperature``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from cljax import losses
from cljax.methods.base import Method, StepOutput


def _raise_unlabelled(method: str, count: Any) -> Any:
  raise ValueError(
    f"method={method!r} needs class labels, but {int(count)} labels of the global batch are < 0 "
    "(a data set without labels: an unlabelled image folder, or data.num_classes=0 for "
    "synthetic data). Use a labelled source or a self-supervised method."
  )


def check_labelled(labels: jax.Array, axis_name: str | None, method: str = "supcon") -> jax.Array:
  """True; raises ``ValueError`` through a host callback if a label of the global batch is < 0.

  The count of negative labels is summed over ``axis_name`` first, so every
  device takes the same branch and raises at the same point; callers make
  the rest of the step depend on the result, so that no device is left
  waiting in a later collective for one that raised. The callback runs only
  when a label is negative: a labelled step costs a scalar ``psum`` and
  ``cond``, no host round trip. A ``pure_callback`` (not a debug callback)
  so that its error does not outlive the step in JAX's effect tokens. The
  error surfaces when the step's outputs are next read.
  """
  count = jnp.sum(labels < 0).astype(jnp.int32)
  if axis_name is not None:
    count = jax.lax.psum(count, axis_name)
  raise_unlabelled = functools.partial(_raise_unlabelled, method)
  fail = lambda c: jax.pure_callback(raise_unlabelled, jax.ShapeDtypeStruct((), jnp.bool_), c)
  return jax.lax.cond(count > 0, fail, lambda c: jnp.asarray(True), count)


class SupCon(Method):
  """Encoder + projection head, SupCon's loss over the views of the global batch.

  Labels come from ``batch["label"]`` (int32, one per image), repeated for the
  two views. Data without labels (``label < 0``, what cljax's sources give
  for unlabelled data) is an error: the step checks the global batch
  (:func:`check_labelled`) and raises ``ValueError``, which surfaces when
  the step's results are next read (at the latest on the next log step).

  Hyperparameters: ``loss.temperature`` (the paper's 0.1 on CIFAR) and
  ``supcon.base_temperature`` (0.07 in the official code; the loss is
  scaled by ``temperature / base_temperature``).

  References:
    Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020.
    https://arxiv.org/abs/2004.11362
  """

  name = "supcon"

  @classmethod
  def config_sections(cls) -> dict[str, ml_collections.ConfigDict]:
    c = ml_collections.ConfigDict()
    c.base_temperature = 0.07
    return {"supcon": c}

  def check_data(self, source: Any, num_classes: int) -> None:
    if num_classes < 2:
      raise ValueError(
        f"method={self.name!r} trains with labels, but the data source "
        f"{self.config.data.source!r} ({self.config.data.name!r}) has {num_classes} classes. "
        "Use a labelled source."
      )

  def views(self, batch: dict, rng: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
    """The two views, behind the check that the batch has labels (:func:`check_labelled`).

    The views depend on the check's result (they are NaN if it were ever
    false), so no device starts the forward pass, and its collectives,
    before every device has passed the check or raised.
    """
    views = super().views(batch, rng, step)
    labelled = check_labelled(jnp.asarray(batch["label"]), self.axis_name, self.name)
    views["global"] = jnp.where(labelled, views["global"], jnp.nan)
    return views

  def loss(self, params: Any, state: Any, views: dict, batch: dict) -> tuple[jax.Array, StepOutput]:
    x = views["global"]
    n = x.shape[0] // 2
    labels = jnp.asarray(batch["label"]).astype(jnp.int32)
    h, z, batch_stats = self.forward(state.apply_fn, params, state.batch_stats, x)
    loss, metrics = losses.supcon_loss(
      z,
      jnp.tile(labels, 2),
      self.config.loss.temperature,
      base_temperature=self.config.supcon.base_temperature,
      axis_name=self.axis_name,
      return_metrics=True,
    )
    return loss, StepOutput(batch_stats, metrics, z, h, pairs=(z[:n], z[n:]))
