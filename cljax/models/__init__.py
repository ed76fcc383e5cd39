"""Models: ResNet and ViT encoders and projection heads, built from a config."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from cljax.models import heads, resnet, ts2vec, vit, vit_dinov2

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class EncoderWithHead(nn.Module):
  """An encoder, a projection head and optionally a predictor.

  Returns ``(features, embeddings)``, or ``(features, embeddings,
  predictions)`` with ``predict=True`` (BYOL, SimSiam, MoCo v3). A momentum
  target network applies the same module without ``predict``, so its
  parameters need no ``predictor`` subtree.
  """

  encoder: nn.Module
  head: nn.Module
  predictor: nn.Module | None = None

  def __call__(self, x, train: bool = True, predict: bool = False):
    features = self.encoder(x, train=train)
    z = self.head(features, train=train)
    if not predict:
      return features, z
    if self.predictor is None:
      raise ValueError("predict=True needs a predictor: set predictor.num_layers >= 1.")
    return features, z, self.predictor(z, train=train)


def dtype_from_name(name: str) -> Any:
  if name not in _DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {name!r}.")
  return _DTYPES[name]


def _vit(model_config: ml_collections.ConfigDict, bn_axis_name: str | None) -> nn.Module:
  """A ViT from ``model.variant``: "Ti/16", "S/16", "B/16", "L/16", "H/14", "g/14" (the number
  is the patch size), or for tests and toy models "custom:hidden=32,depth=2,heads=2,mlp=64,
  patch=4" (``vit.parse_variant``); also ``model.posemb``, ``freeze_patch_embed``, ``dtype``,
  ``remat``, ``scan_blocks``. No BatchNorm: ``bn_axis_name`` does not apply."""
  del bn_axis_name
  return vit.create_vit(
    model_config.variant,
    posemb=model_config.get("posemb", "sincos2d"),
    freeze_patch_embed=bool(model_config.get("freeze_patch_embed", False)),
    dtype=dtype_from_name(model_config.dtype),
    remat=bool(model_config.get("remat", False)),
    scan_blocks=bool(model_config.get("scan_blocks", False)),
  )


def _vit_dinov2(model_config: ml_collections.ConfigDict, bn_axis_name: str | None) -> nn.Module:
  """DINOv2's ViT (``create_dinov2_backbone``), its class token as the features."""
  del bn_axis_name
  return ClassToken(create_dinov2_backbone(model_config))


def _resnet(model_config: ml_collections.ConfigDict, bn_axis_name: str | None) -> nn.Module:
  """A ResNet of ``model.depth`` (or toy ``stage_sizes``), ``width_multiplier``, ``stem``,
  with BatchNorm averaged over ``bn_axis_name``."""
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


@dataclasses.dataclass(frozen=True)
class Encoder:
  """A registry entry: how to build the encoder named by ``model.name`` from the ``model``
  section, and the width of its features (the online probe's input)."""

  build: Callable[[ml_collections.ConfigDict, str | None], nn.Module]
  feature_dim: Callable[[nn.Module], int]


# model.name -> its encoder. A modality's encoder joins with one line (``register_encoder``).
ENCODERS: dict[str, Encoder] = {}


def register_encoder(name: str, build, feature_dim) -> None:
  """Adds an encoder under ``name`` (a value of ``model.name``).

  Args:
    name: the ``model.name`` that selects it.
    build: ``(model_config, bn_axis_name) -> flax module`` whose ``__call__(x, train)``
      returns (n, feature_dim) features.
    feature_dim: ``module -> int``, the width of those features.

  Raises:
    ValueError: another encoder is registered under ``name``.
  """
  if name in ENCODERS and ENCODERS[name].build is not build:
    raise ValueError(f"an encoder is already registered as model.name={name!r}.")
  ENCODERS[name] = Encoder(build, feature_dim)


def create_tsencoder(model_config: ml_collections.ConfigDict) -> ts2vec.TSEncoder:
  """TS2Vec's dilated-convolution encoder (``models.ts2vec``) from ``model.tsencoder``."""
  c = model_config.tsencoder
  return ts2vec.TSEncoder(
    hidden_dims=c.hidden_dims,
    output_dims=c.output_dims,
    depth=c.depth,
    mask_mode=c.mask_mode,
    dropout_rate=c.dropout,
    dtype=dtype_from_name(model_config.dtype),
  )


class MaxPooledSeries(nn.Module):
  """A series encoder for the instance-level methods: (B, T, C) -> (B, output_dims), the
  encoder's outputs max-pooled over time (TS2Vec's whole-series representation). Its
  timestamp masking and dropout run where the caller passes their rng streams."""

  encoder: ts2vec.TSEncoder

  def __call__(self, x, train: bool = True):
    train = train and self.has_rng("mask") and self.has_rng("dropout")
    return jnp.max(self.encoder(x, train=train), axis=1)


def _ts2vec(model_config: ml_collections.ConfigDict, bn_axis_name: str | None) -> nn.Module:
  del bn_axis_name
  return MaxPooledSeries(create_tsencoder(model_config))


register_encoder("resnet", _resnet, resnet.feature_dim)
register_encoder("ts2vec", _ts2vec, lambda m: m.encoder.output_dims)
register_encoder("vit", _vit, vit.feature_dim)
register_encoder("vit_dinov2", _vit_dinov2, lambda m: m.backbone.embed_dim)


def create_encoder(model_config: ml_collections.ConfigDict, bn_axis_name: str | None = None):
  """The encoder trunk named by ``model_config.name`` (``ENCODERS``: "resnet", "vit",
  "vit_dinov2", ...), BatchNorm, where it has some, averaged over ``bn_axis_name``."""
  if model_config.name not in ENCODERS:
    raise ValueError(f"Unknown model.name {model_config.name!r}; available: {sorted(ENCODERS)}.")
  return ENCODERS[model_config.name].build(model_config, bn_axis_name)


class ClassToken(nn.Module):
  """A DINOv2 ViT as an encoder: its class token after the final norm (``tokens``: all).

  Stochastic depth runs where the caller passes a 'dropout' stream (the DINOv2 method);
  without one (the other methods' steps, fine-tuning) the blocks are deterministic.
  """

  backbone: vit_dinov2.DinoV2ViT

  def __call__(self, x, train: bool = True):
    return self.tokens(x, train=train)["cls"]

  def tokens(self, x, masks=None, train: bool = True) -> dict:
    return self.backbone(x, masks, train=train and self.has_rng("dropout"))


def create_dinov2_backbone(model_config: ml_collections.ConfigDict) -> vit_dinov2.DinoV2ViT:
  """DINOv2's ViT (``models.vit_dinov2``) for ``model.variant`` and the DINOv2 keys of the
  ``model`` section (``img_size``, ``drop_path_rate``, ``layerscale``, ``num_register_tokens``,
  ``ffn_layer``, ``dtype``, ``remat``, ``scan_blocks``); its outputs are token dicts."""
  kwargs = dict(
    img_size=model_config.img_size,
    drop_path_rate=model_config.drop_path_rate,
    init_values=model_config.layerscale or None,
    num_register_tokens=model_config.num_register_tokens,
    dtype=dtype_from_name(model_config.dtype),
    remat=bool(model_config.get("remat", False)),
  )
  if model_config.get("scan_blocks", False):
    kwargs["scan_blocks"] = True
  if model_config.ffn_layer != "default":
    kwargs["ffn_layer"] = model_config.ffn_layer
  return vit_dinov2.create_dinov2_vit(model_config.variant, **kwargs)


def encoder_feature_dim(config: ml_collections.ConfigDict) -> int:
  """Width of the encoder's output features (the input of the projection head)."""
  encoder = create_encoder(config.model)
  return ENCODERS[config.model.name].feature_dim(encoder)


def create_model(config: ml_collections.ConfigDict, bn_axis_name: str | None = None):
  """Encoder + projection head (+ predictor) for ``config.model``, ``head``, ``predictor``."""
  encoder = create_encoder(config.model, bn_axis_name)
  mlp = functools.partial(
    heads.ProjectionHead,
    dtype=dtype_from_name(config.model.dtype),
    bn_axis_name=bn_axis_name,
    bn_momentum=config.model.bn_momentum,
  )
  head = mlp(
    num_layers=config.head.num_layers,
    hidden_dim=config.head.hidden_dim,
    output_dim=config.head.output_dim,
    output_norm=config.head.output_norm,
    hidden_norm=config.head.hidden_norm,
  )
  predictor = None
  if config.predictor.num_layers > 0:
    predictor = mlp(
      num_layers=config.predictor.num_layers,
      hidden_dim=config.predictor.hidden_dim,
      output_dim=config.head.output_dim,
      output_norm=config.predictor.output_norm,
    )
  return EncoderWithHead(encoder=encoder, head=head, predictor=predictor)
