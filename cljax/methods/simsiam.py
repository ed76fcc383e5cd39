"""SimSiam (Chen & He 2021): one network, a predictor and a stop-gradient."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from cljax import losses
from cljax.methods.base import Method, StepOutput


class SimSiam(Method):
  """Symmetric negative cosine between predictions and the other view's projections.

  ``(D(p_a, sg(z_b)) + D(p_b, sg(z_a))) / 2`` with ``D`` the negative cosine
  and ``sg`` the stop-gradient; one shared encoder, no momentum network, no
  negatives, SGD. ``simsiam.stop_gradient=False`` removes the stop-gradient,
  which the paper shows collapses to a constant (kept to demonstrate that
  the collapse diagnostics catch it).

  References:
    Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021.
    https://arxiv.org/abs/2011.10566
  """

  name = "simsiam"
  # The official code calls the encoder once per view: BatchNorm statistics per view.
  bn_views_default = "per_view"
  bn_views_choices = ("per_view", "pooled")

  @classmethod
  def config_sections(cls) -> dict[str, ml_collections.ConfigDict]:
    c = ml_collections.ConfigDict()
    c.stop_gradient = True  # False only to show that SimSiam then collapses.
    return {"simsiam": c}

  def loss(self, params: Any, state: Any, views: dict, batch: dict) -> tuple[jax.Array, StepOutput]:
    x = views["global"]
    n = x.shape[0] // 2
    h, z, p, stats = self.forward(
      state.apply_fn, params, state.batch_stats, x, num_views=2, predict=True
    )
    swapped = jnp.concatenate([z[n:], z[:n]])
    # The batch mean over both directions is the paper's average of the two.
    loss = losses.simsiam_loss(
      p, swapped, stop_gradient=self.config.simsiam.stop_gradient, axis_name=self.axis_name
    )
    return loss, StepOutput(stats, {}, z, h, pairs=(z[:n], z[n:]))
