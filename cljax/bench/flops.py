"""Hand-counted FLOPs of a SimCLR training step, and accelerators' peak bf16 TFLOP/s."""

from __future__ import annotations

import ml_collections

from cljax.models import resnet, vit

# Dense (no sparsity) bf16 peak TFLOP/s per chip from the vendors' data sheets, matched as
# substrings of the lower-cased device_kind, first match wins. The reference's 8192^3 bf16
# matmul reached 786 of the H100's 989, about the practical ceiling.
PEAK_BF16_TFLOPS = (
  ("h100 pcie", 756.0),
  ("h100 nvl", 835.0),
  ("h100", 989.4),
  ("h200", 989.4),
  ("a100", 312.0),
  ("tpu v4", 275.0),
  ("tpu v5 lite", 197.0),
  ("tpu v5e", 197.0),
  ("tpu v5p", 459.0),
  ("tpu v5", 459.0),
  ("tpu v6 lite", 918.0),
)


def peak_tflops(device_kind: str) -> float | None:
  """The chip's dense bf16 peak in TFLOP/s, or None when unknown (CPUs)."""
  kind = device_kind.lower()
  return next((peak for name, peak in PEAK_BF16_TFLOPS if name in kind), None)


def _conv_out(size: int, stride: int) -> int:
  return -(-size // stride)  # 'SAME' padding.


def vit_macs(model_config: ml_collections.ConfigDict, image_size: int) -> tuple[int, int]:
  """Multiply-accumulates of one image's forward pass through a ViT's matrix products.

  Mirrors ``models.vit.ViT``: the patch projection, and per block the Q, K, V and output
  projections, the two attention products (Q K^T and the weighted sum of V, over all heads)
  and the MLP's two Dense layers, over the patch tokens and the class token. LayerNorm,
  softmax, GELU and the residual additions (a few % at 224 px) are left out.

  Args:
    model_config: the config's ``model`` section (``model.variant`` gives the sizes).
    image_size: the input side, a multiple of the patch size.

  Returns:
    ``(macs, feature_dim)``.
  """
  sizes = vit.parse_variant(model_config.variant)
  d, p, mlp = sizes["hidden_dim"], sizes["patch_size"], sizes["mlp_dim"]
  patches = (image_size // p) ** 2
  tokens = patches + 1  # The class token.
  macs = patches * p * p * 3 * d
  per_block = 4 * tokens * d * d  # Q, K, V and output projections.
  per_block += 2 * tokens * tokens * d  # Q K^T and attention-weighted V; heads split d.
  per_block += 2 * tokens * d * mlp
  return macs + sizes["depth"] * per_block, d


def encoder_macs(model_config: ml_collections.ConfigDict, image_size: int) -> tuple[int, int]:
  """Multiply-accumulates of one image's forward pass through the encoder.

  A ViT (``model.name == "vit"``): see ``vit_macs``. A ResNet: mirrors
  ``models.create_encoder``; only convolutions count: BatchNorm, ReLU and pooling add
  well under 1% of the arithmetic (and are bound by memory, not FLOPs).

  Args:
    model_config: the config's ``model`` section.
    image_size: the input side.

  Returns:
    ``(macs, feature_dim)``.
  """
  if model_config.get("name", "resnet") == "vit":
    return vit_macs(model_config, image_size)
  stages = tuple(model_config.get("stage_sizes") or resnet.STAGE_SIZES[model_config.depth])
  bottleneck = model_config.depth >= 50
  width = model_config.num_filters * model_config.width_multiplier
  if model_config.stem == "imagenet":
    size = _conv_out(image_size, 2)
    macs = size * size * 7 * 7 * 3 * width
    size = _conv_out(size, 2)  # Max-pool.
  else:
    size = image_size
    macs = size * size * 3 * 3 * 3 * width
  channels = width
  for i, num_blocks in enumerate(stages):
    filters = width * 2**i
    out_channels = filters * 4 if bottleneck else filters
    for j in range(num_blocks):
      out = _conv_out(size, 2 if i > 0 and j == 0 else 1)
      if bottleneck:
        macs += size * size * channels * filters  # 1x1 reduction.
        macs += out * out * 9 * filters * filters  # 3x3, strided.
        macs += out * out * filters * out_channels  # 1x1 expansion.
      else:
        macs += out * out * 9 * channels * filters + out * out * 9 * filters * filters
      if channels != out_channels or out != size:
        macs += out * out * channels * out_channels  # Projection shortcut.
      channels, size = out_channels, out
  return macs, channels


def forward_macs_per_view(config: ml_collections.ConfigDict) -> int:
  """Encoder + projection head + the view's row of the (2B x 2B) logits, one view."""
  macs, features = encoder_macs(config.model, config.data.image_size)
  widths = [features] + [config.head.hidden_dim] * (config.head.num_layers - 1)
  widths.append(config.head.output_dim)
  macs += sum(a * b for a, b in zip(widths[:-1], widths[1:], strict=True))
  return macs + 2 * config.data.global_batch_size * config.head.output_dim


def train_flops_per_view(config: ml_collections.ConfigDict) -> float | None:
  """FLOPs of one augmented view through a training step; None for the encoders of other
  modalities than images (no hand count: the TS2Vec step's loss grows with the square of
  the drawn overlap, and its encoder with the series length).

  2 FLOPs per forward MAC, times 3: the backward pass computes gradients with respect to
  both activations and weights, each about one forward pass. CIFAR ResNet-18 at 32 px:
  3.4 GFLOP; ResNet-50 at 224 px: 24.6 GFLOP (the reference's figures); ViT-B/16 at 224 px:
  17.6 G forward MACs, 105 GFLOP.
  """
  if config.data.get("modality", "image") != "image":
    return None
  return 3 * 2 * float(forward_macs_per_view(config))
