"""SimCLR (Chen et al. 2020): NT-Xent between two views over the global batch."""

from __future__ import annotations

import functools
from typing import Any

import jax
import ml_collections

from cljax import losses
from cljax.methods.base import Method, StepOutput


def make_loss_fn(loss_config: ml_collections.ConfigDict):
  """NT-Xent as ``loss.implementation`` says: plain or blockwise (memory-bounded)."""
  if loss_config.implementation == "plain":
    return losses.nt_xent
  if loss_config.implementation == "blockwise":
    return functools.partial(losses.nt_xent_blockwise, block_size=loss_config.block_size)
  raise ValueError(
    f"loss.implementation must be 'plain' or 'blockwise', got {loss_config.implementation!r}."
  )


class SimCLR(Method):
  """Encoder + projection head, NT-Xent with the negatives of the whole global batch.

  References:
    Chen et al., "A Simple Framework for Contrastive Learning of Visual
    Representations", ICML 2020. https://arxiv.org/abs/2002.05709
  """

  name = "simclr"

  def loss(self, params: Any, state: Any, views: dict, batch: dict) -> tuple[jax.Array, StepOutput]:
    x = views["global"]
    n = x.shape[0] // 2
    h, z, batch_stats = self.forward(state.apply_fn, params, state.batch_stats, x)
    loss, metrics = make_loss_fn(self.config.loss)(
      z[:n], z[n:], self.config.loss.temperature, axis_name=self.axis_name, return_metrics=True
    )
    return loss, StepOutput(batch_stats, metrics, z, h, pairs=(z[:n], z[n:]))
