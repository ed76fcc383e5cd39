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

from cljax.methods.base import StepOutput
from cljax.methods.supcon import SupCon


def check_classifier_head(config: Any, num_classes: int) -> None:
  """Raises ``ValueError`` unless ``config.head`` is a linear classifier over ``num_classes``."""
  head = config.head
  if head.output_dim != num_classes or head.num_layers != 1 or head.output_norm != "none":
    raise ValueError(
      "method='supervised' needs a linear classifier head: head.num_layers=1, "
      f"head.output_norm='none', head.output_dim={num_classes} (the data's classes); got "
      f"num_layers={head.num_layers}, output_norm={head.output_norm!r}, "
      f"output_dim={head.output_dim}."
    )


class Supervised(SupCon):
  """Encoder + linear classifier, softmax cross-entropy over both views of the global batch.

  SupCon's views and label checks (a batch with a label < 0 raises
  ``ValueError``), its loss replaced by cross-entropy. Multi-crop's local views,
  if the data has them, are not used. Logged:
  ``train_accuracy``, the top-1 of the classifier on the (augmented) training
  views.
  """

  name = "supervised"

  def check_data(self, source: Any, num_classes: int) -> None:
    super().check_data(source, num_classes)
    check_classifier_head(self.config, num_classes)

  def loss(self, params: Any, state: Any, views: dict, batch: dict) -> tuple[jax.Array, StepOutput]:
    x = views["global"]
    labels = jnp.tile(jnp.asarray(batch["label"]).astype(jnp.int32), 2)
    h, logits, batch_stats = self.forward(state.apply_fn, params, state.batch_stats, x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
    # Every device holds the same number of views: the mean of means is the global mean.
    loss = jax.lax.pmean(jnp.mean(ce), self.axis_name)
    accuracy = jax.lax.pmean(accuracy, self.axis_name)
    # The logits are the embeddings (embedding_std: their spread over the batch); no pairs,
    # as the collapse metrics of two views' embeddings do not apply to class logits.
    return loss, StepOutput(batch_stats, {"train_accuracy": accuracy}, logits, h)
