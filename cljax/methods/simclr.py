"""SimCLR (Chen et al. 2020): NT-Xent between two views over the global batch.

``loss.name`` swaps NT-Xent for one of its variants on the same two-view
batch (every view an anchor, its partner view the positive, the other
2N - 2 views of the global batch its negatives):

- ``"nt_xent"``: SimCLR's loss, ``loss.implementation`` "plain" or
  "blockwise" (memory-bounded, same value and gradient).
- ``"debiased"``: debiased contrastive loss, class prior ``loss.tau_plus``
  (Chuang et al., "Debiased Contrastive Learning", NeurIPS 2020,
  https://arxiv.org/abs/2007.00224); ``tau_plus=0`` is NT-Xent.
- ``"hard_negative"``: the debiased loss with negatives reweighted by
  hardness, concentration ``loss.beta`` (Robinson et al., "Contrastive
  Learning with Hard Negative Samples", ICLR 2021,
  https://arxiv.org/abs/2010.04592).
- ``"decoupled"``: no positive in the denominator (Yeh et al., "Decoupled
  Contrastive Learning", ECCV 2022, https://arxiv.org/abs/2110.06848).

The variants exist only in the plain form: they need the whole row of
negatives of each anchor, which the blockwise streaming does not keep.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import ml_collections

from cljax import losses
from cljax.methods.base import Method, StepOutput

LOSS_NAMES = ("nt_xent", "debiased", "hard_negative", "decoupled")
LOSS_IMPLEMENTATIONS = ("plain", "blockwise")


def make_loss_fn(loss_config: ml_collections.ConfigDict):
  """The loss ``loss.name`` selects, called as ``fn(z_a, z_b, temperature, *, axis_name, ...)``.

  Raises:
    ValueError: for an unknown ``loss.name`` or ``loss.implementation``, or a
      variant asked for with ``implementation="blockwise"``.
  """
  name = loss_config.get("name", "nt_xent")
  implementation = loss_config.implementation
  if implementation not in LOSS_IMPLEMENTATIONS:
    raise ValueError(
      f"loss.implementation must be one of {LOSS_IMPLEMENTATIONS}, got {implementation!r}."
    )
  if name not in LOSS_NAMES:
    raise ValueError(f"loss.name must be one of {LOSS_NAMES}, got {name!r}.")
  if name != "nt_xent" and implementation == "blockwise":
    raise ValueError(
      f"loss.name={name!r} has no blockwise form; use loss.implementation='plain' "
      "(blockwise is only for loss.name='nt_xent')."
    )
  if name == "nt_xent":
    if implementation == "blockwise":
      return functools.partial(losses.nt_xent_blockwise, block_size=loss_config.block_size)
    return losses.nt_xent
  if name == "debiased":
    return functools.partial(losses.debiased_nt_xent, tau_plus=loss_config.tau_plus)
  if name == "hard_negative":
    return functools.partial(
      losses.hard_negative_nt_xent, tau_plus=loss_config.tau_plus, beta=loss_config.beta
    )
  return losses.decoupled_nt_xent


class SimCLR(Method):
  """Encoder + projection head, NT-Xent (or a variant) over the whole global batch.

  The loss is chosen when the method is built, so a bad ``loss.name`` fails
  before anything compiles.

  References:
    Chen et al., "A Simple Framework for Contrastive Learning of Visual
    Representations", ICML 2020. https://arxiv.org/abs/2002.05709
  """

  name = "simclr"

  def describe(self) -> str:
    return f"; {2 * self.config.data.global_batch_size - 2} negatives per anchor"

  def __init__(
    self, config: ml_collections.ConfigDict, num_steps: int = 0, steps_per_epoch: int = 0
  ):
    super().__init__(config, num_steps, steps_per_epoch)
    self.loss_fn = make_loss_fn(config.loss)

  def loss(self, params: Any, state: Any, views: dict, batch: dict) -> tuple[jax.Array, StepOutput]:
    x = views["global"]
    n = x.shape[0] // 2
    h, z, batch_stats = self.forward(state.apply_fn, params, state.batch_stats, x)
    loss, metrics = self.loss_fn(
      z[:n], z[n:], self.config.loss.temperature, axis_name=self.axis_name, return_metrics=True
    )
    return loss, StepOutput(batch_stats, metrics, z, h, pairs=(z[:n], z[n:]))
