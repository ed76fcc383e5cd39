"""Supervised training with cross-entropy: the baseline that SupCon is measured against.

The same encoder, the same two augmented views of every image and the same
train step as the self-supervised methods, but the head is a linear classifier
(``head.num_layers=1``, ``head.output_norm="none"``, ``head.output_dim`` = the
number of classes) trained with softmax cross-entropy on the labels of both
views. Khosla et al. (2020) compare SupCon against exactly this ("cross-entropy"
rows of their Table 2); ``configs/supervised_cifar10.py`` is the recipe.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from cljax.methods.base import Method, StepOutput
from cljax.methods.supcon import check_labelled


def check_classifier_head(config: Any, num_classes: int) -> None:
  """Raises ``ValueError`` unless ``config.head`` is a linear classifier over ``num_classes``."""
  head = config.head
  if num_classes < 2:
    raise ValueError(
      f"method='supervised' trains with labels, but the data source {config.data.source!r} "
      f"({config.data.name!r}) has {num_classes} classes. Use a labelled source."
    )
  if head.output_dim != num_classes or head.num_layers != 1 or head.output_norm != "none":
    raise ValueError(
      "method='supervised' needs a linear classifier head: head.num_layers=1, "
      f"head.output_norm='none', head.output_dim={num_classes} (the data's classes); got "
      f"num_layers={head.num_layers}, output_norm={head.output_norm!r}, "
      f"output_dim={head.output_dim}."
    )


class Supervised(Method):
  """Encoder + linear classifier, softmax cross-entropy over both views of the global batch.

  Labels come from ``batch["label"]``; a batch with a label < 0 (unlabelled
  data) raises ``ValueError`` as in SupCon. Logged: ``train_accuracy``, the
  top-1 of the classifier on the (augmented) training views.
  """

  name = "supervised"

  def views(self, batch: dict, rng: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
    """The two views, behind the check that the batch has labels (as SupCon's)."""
    views = super().views(batch, rng, step)
    labelled = check_labelled(jnp.asarray(batch["label"]), self.axis_name)
    views["global"] = jnp.where(labelled, views["global"], jnp.nan)
    return views

  def loss(self, params: Any, state: Any, views: dict, batch: dict) -> tuple[jax.Array, StepOutput]:
    x = views["global"]
    labels = jnp.tile(jnp.asarray(batch["label"]).astype(jnp.int32), 2)
    h, logits, batch_stats = self.forward(state.apply_fn, params, state.batch_stats, x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
    # Every device holds the same number of views: the mean of means is the global mean.
    loss = jax.lax.pmean(jnp.mean(ce), self.axis_name)
    accuracy = jax.lax.pmean(accuracy, self.axis_name)
    # No pairs: the collapse metrics of two embeddings do not apply to class logits.
    return loss, StepOutput(batch_stats, {"train_accuracy": accuracy}, h, h)
