"""Models: ResNet encoders and projection heads, built from a config."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from cljax.models import heads, resnet

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class EncoderWithHead(nn.Module):
  """An encoder followed by a projection head; returns (features, embeddings)."""

  encoder: nn.Module
  head: nn.Module

  def __call__(self, x, train: bool = True):
    features = self.encoder(x, train=train)
    return features, self.head(features, train=train)


def dtype_from_name(name: str) -> Any:
  if name not in _DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {name!r}.")
  return _DTYPES[name]


def create_encoder(model_config: ml_collections.ConfigDict, bn_axis_name: str | None = None):
  """The encoder trunk named by ``model_config.name``."""
  if model_config.name != "resnet":
    raise ValueError(f"Unknown model.name {model_config.name!r}; available: 'resnet'.")
  kwargs = dict(
    width_multiplier=model_config.width_multiplier,
    num_filters=model_config.num_filters,
    stem=model_config.stem,
    dtype=dtype_from_name(model_config.dtype),
    bn_axis_name=bn_axis_name,
    bn_momentum=model_config.bn_momentum,
  )
  if model_config.get("stage_sizes"):
    # Test and toy models: an explicit list of blocks per stage.
    block = resnet.BottleneckBlock if model_config.depth >= 50 else resnet.BasicBlock
    return resnet.ResNet(stage_sizes=tuple(model_config.stage_sizes), block_cls=block, **kwargs)
  return resnet.create_resnet(model_config.depth, **kwargs)


def encoder_feature_dim(config: ml_collections.ConfigDict) -> int:
  """Width of the encoder's output features (the input of the projection head)."""
  return resnet.feature_dim(create_encoder(config.model))


def create_model(config: ml_collections.ConfigDict, bn_axis_name: str | None = None):
  """Encoder + projection head for ``config.model`` and ``config.head``."""
  encoder = create_encoder(config.model, bn_axis_name)
  head = heads.ProjectionHead(
    num_layers=config.head.num_layers,
    hidden_dim=config.head.hidden_dim,
    output_dim=config.head.output_dim,
    dtype=dtype_from_name(config.model.dtype),
    bn_axis_name=bn_axis_name,
    bn_momentum=config.model.bn_momentum,
  )
  return EncoderWithHead(encoder=encoder, head=head)
