"""Projection heads: the MLP between the encoder and the contrastive loss."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# The values of head.output_norm (and predictor.output_norm) and head.hidden_norm.
OUTPUT_NORMS = ("bn", "bn_no_affine", "none", "none_no_bias")
HIDDEN_NORMS = ("bn", "none")


class ProjectionHead(nn.Module):
  """The projection (or prediction) MLP between the encoder and the loss.

  ``num_layers - 1`` hidden layers of Dense -> BatchNorm -> ReLU, then a
  Dense to ``output_dim``. With ``output_norm="bn"`` that Dense is followed by
  BatchNorm with a learned scale and no bias (as in the SimCLR v2 reference
  code); with ``"bn_no_affine"`` by BatchNorm with neither (PyTorch's
  ``BatchNorm1d(affine=False)``: MoCo v3's projector and predictor, SimSiam's
  projector); with ``"none"`` the last Dense has a bias and nothing follows
  (BYOL's projector and predictor, SimSiam's predictor); with ``"none_no_bias"`` it has
  neither (MoCo v3's ResNet predictor, the official ``_build_mlp(..., last_bn=False)``).
  ``num_layers=2`` is SimCLR v1, 3 is v2. ``hidden_norm="none"`` drops the
  hidden layers' BatchNorm (their Dense then has a bias): MoCo v2's head.
  """

  num_layers: int = 2
  hidden_dim: int = 2048
  output_dim: int = 128
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9
  output_norm: str = "bn"  # "bn" | "bn_no_affine" | "none" | "none_no_bias"
  hidden_norm: str = "bn"  # "bn" | "none"

  @nn.compact
  def __call__(self, x, train: bool = True):
    if self.num_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {self.num_layers}.")
    if self.output_norm not in OUTPUT_NORMS:
      raise ValueError(f"output_norm must be one of {OUTPUT_NORMS}, got {self.output_norm!r}.")
    if self.hidden_norm not in HIDDEN_NORMS:
      raise ValueError(f"hidden_norm must be one of {HIDDEN_NORMS}, got {self.hidden_norm!r}.")

    def norm(**kwargs):
      return nn.BatchNorm(
        use_running_average=not train,
        momentum=self.bn_momentum,
        epsilon=1e-5,
        dtype=self.dtype,
        axis_name=self.bn_axis_name if train else None,
        **kwargs,
      )

    for _ in range(self.num_layers - 1):
      if self.hidden_norm == "none":
        x = nn.relu(nn.Dense(self.hidden_dim, dtype=self.dtype)(x))
        continue
      x = nn.Dense(self.hidden_dim, use_bias=False, dtype=self.dtype)(x)
      x = nn.relu(norm()(x))
    x = nn.Dense(self.output_dim, use_bias=self.output_norm == "none", dtype=self.dtype)(x)
    if self.output_norm in ("bn", "bn_no_affine"):
      x = norm(use_bias=False, use_scale=self.output_norm == "bn")(x)
    return x.astype(jnp.float32)
