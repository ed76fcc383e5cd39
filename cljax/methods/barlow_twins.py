"""Barlow Twins (Zbontar et al. 2021): the cross-correlation of two views' embeddings to identity.

The projector's outputs of the two views are standardised per dimension over
the global batch, and their (d, d) cross-correlation is pushed to the
identity: ``sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2``
(``losses.barlow_twins_loss``; the statistics and C are summed over all
devices, so the loss is that of the global batch).

The projector. The official code's projector for "8192-8192-8192" is
Linear(2048, 8192) -> BN -> ReLU -> Linear(8192, 8192) -> BN -> ReLU ->
Linear(8192, 8192) without biases, followed in the loss by a BatchNorm
without affine parameters. In cljax that is ``head.num_layers=3,
head.hidden_dim=8192, head.output_dim=8192, head.output_norm="none"``: the
last Dense has a bias, but the loss's own standardisation subtracts the
batch mean, so that bias changes nothing and gets a zero gradient. With
``output_norm="bn"`` the head would add a learnable scale per dimension
that the loss's standardisation cancels too; "none" is the faithful choice.

Learning rates. The paper's LARS uses two learning rates: 0.2 x B/256 for
weights and 0.0048 x B/256 for biases and BatchNorm parameters (``p.ndim == 1``,
which also get no weight decay and no trust-ratio adaptation: one rule,
``exclude_bias_and_norm``, for the three). cljax's optimisers have one learning
rate, so this method scales the gradient of the parameters ``optim.decay_mask``
leaves out of weight decay and adaptation by ``barlow_twins.bias_lr_ratio``
(the paper's 0.0048 / 0.2 = 0.024) in the forward, by ``p_sg + r * (p - p_sg)``:
the value is ``p`` exactly, the gradient ``r`` times. With LARS and SGD these
parameters' updates are linear in their gradients (no trust ratio, no decay),
so scaling the gradient is exactly a smaller learning rate; with AdamW
(scale-invariant) it has no effect.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from cljax import losses, optim
from cljax.methods.base import Method, StepOutput

# The paper's learning rates: 0.0048 for biases and BatchNorm parameters, 0.2 for weights.
PAPER_BIAS_LR_RATIO = 0.0048 / 0.2


def scale_gradient(x: jax.Array, ratio: float) -> jax.Array:
  """``x`` in the forward pass; ``ratio`` times the incoming gradient in the backward pass."""
  frozen = jax.lax.stop_gradient(x)
  return frozen + ratio * (x - frozen)


class BarlowTwins(Method):
  """Encoder + projector, Barlow Twins' redundancy-reduction loss on the global batch.

  Hyperparameters: ``barlow_twins.lambda_`` (5e-3 in the paper for d = 8192),
  ``barlow_twins.bias_lr_ratio`` (see the module docstring; 0.024 when the
  config does not set it). Metrics: ``on_diagonal`` and ``off_diagonal``, the
  unweighted sums of the two terms.

  References:
    Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy
    Reduction", ICML 2021. https://arxiv.org/abs/2103.03230
  """

  name = "barlow_twins"
  # The official code calls backbone and projector once per view: BatchNorm statistics per
  # view (synchronised across GPUs).
  bn_views_default = "per_view"
  bn_views_choices = ("per_view", "pooled")

  @classmethod
  def config_sections(cls) -> dict[str, ml_collections.ConfigDict]:
    c = ml_collections.ConfigDict()
    c.lambda_ = 5e-3  # Weight of the off-diagonal terms.
    # Gradient scale on biases and BatchNorm parameters: the paper's 0.0048 learning
    # rate for them against 0.2 for weights (exact under LARS and SGD).
    c.bias_lr_ratio = 0.0048 / 0.2
    return {"barlow_twins": c}

  @property
  def bias_lr_ratio(self) -> float:
    return float(self.config.barlow_twins.get("bias_lr_ratio", PAPER_BIAS_LR_RATIO))

  def scale_unadapted_gradients(self, params: Any) -> Any:
    """``params``, with the gradient of those the optimiser neither decays nor adapts
    (``optim.decay_mask``: biases and BatchNorm parameters) scaled by ``bias_lr_ratio``."""
    ratio = self.bias_lr_ratio
    if ratio == 1.0:
      return params
    adapted = optim.decay_mask(self.config.optim)(params)
    return jax.tree.map(lambda p, a: p if a else scale_gradient(p, ratio), params, adapted)

  def loss(self, params: Any, state: Any, views: dict, batch: dict) -> tuple[jax.Array, StepOutput]:
    params = self.scale_unadapted_gradients(params)
    x = views["global"]
    n = x.shape[0] // 2
    h, z, batch_stats = self.forward(state.apply_fn, params, state.batch_stats, x, num_views=2)
    loss, metrics = losses.barlow_twins_loss(
      z[:n],
      z[n:],
      self.config.barlow_twins.lambda_,
      axis_name=self.axis_name,
      return_metrics=True,
    )
    return loss, StepOutput(batch_stats, metrics, z, h, pairs=(z[:n], z[n:]))
