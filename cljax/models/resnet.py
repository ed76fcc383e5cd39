"""ResNets for SimCLR: depths 18-200, width multipliers, ImageNet or CIFAR stem."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any

# Blocks per stage for each depth, as in He et al. 2016 (and ResNet-200 of
# He et al. "Identity Mappings", used by SimCLR's largest models).
STEMS = ("imagenet", "cifar")  # The values of model.stem.
STAGE_SIZES = {
  18: (2, 2, 2, 2),
  34: (3, 4, 6, 3),
  50: (3, 4, 6, 3),
  101: (3, 4, 23, 3),
  152: (3, 8, 36, 3),
  200: (3, 24, 36, 3),
}


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    # Zero-init of the last BN scale makes each block start as the identity,
    # which SimCLR and Goyal et al. 2017 use for large-batch stability.
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
  """1x1 -> 3x3 -> 1x1 bottleneck with 4x expansion (ResNet-50 and deeper)."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """A ResNet trunk returning pooled features (no classifier).

  Attributes:
    stage_sizes: blocks per stage.
    block_cls: BasicBlock or BottleneckBlock.
    width_multiplier: channel multiplier (SimCLR's 1x, 2x, 4x), stem included.
    num_filters: channels of the first stage at 1x.
    stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool) or "cifar" (3x3/1 conv).
    dtype: compute dtype (bfloat16 on accelerators); parameters stay float32.
    bn_axis_name: mapped axis over which BatchNorm statistics are averaged
      during training (global BatchNorm), or None for per-device statistics.
    bn_momentum: decay of the BatchNorm running averages.
  """

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  width_multiplier: int = 1
  num_filters: int = 64
  stem: str = "imagenet"
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, padding="SAME")
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=1e-5,
      dtype=self.dtype,
      axis_name=self.bn_axis_name if train else None,
    )
    width = self.num_filters * self.width_multiplier
    x = x.astype(self.dtype)
    if self.stem == "imagenet":
      x = conv(width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
      x = nn.relu(norm(name="bn_init")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    elif self.stem == "cifar":
      x = conv(width, (3, 3), (1, 1), name="conv_init")(x)
      x = nn.relu(norm(name="bn_init")(x))
    else:
      raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}.")
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(width * 2**i, conv=conv, norm=norm, strides=strides)(x)
    return jnp.mean(x, axis=(1, 2))


def create_resnet(depth: int, **kwargs) -> ResNet:
  """ResNet-`depth` (18, 34, 50, 101, 152 or 200) trunk."""
  if depth not in STAGE_SIZES:
    raise ValueError(f"ResNet depth must be one of {sorted(STAGE_SIZES)}, got {depth}.")
  block_cls = BasicBlock if depth < 50 else BottleneckBlock
  return ResNet(stage_sizes=STAGE_SIZES[depth], block_cls=block_cls, **kwargs)


def feature_dim(model: ResNet) -> int:
  """Width of the pooled features that `model` returns."""
  expansion = 4 if model.block_cls is BottleneckBlock else 1
  last = model.num_filters * model.width_multiplier * 2 ** (len(model.stage_sizes) - 1)
  return last * expansion
