"""CLIP's text Transformer: causal pre-LN blocks, pooled at each sequence's end-of-text token.

Token ids (b, L) -> token + learned position embeddings -> ``depth`` pre-LN blocks with a
causal mask -> final LayerNorm -> the feature at the EOT position, (b, width). The projection
into the joint space lives in the dual encoder (``cljax.methods.clip``).

EOT pooling: the position of the first ``eot_id`` in each sequence (the tokenizer puts
exactly one there, truncating the caption before it if need be); a sequence without one is
pooled at its last position. Original CLIP takes ``argmax(tokens)`` instead, which is the
same thing in its vocabulary, where EOT has the highest id. Under the causal mask nothing
after the EOT (padding) reaches its feature.

Parameter names: ``token_embedding``, ``pos_embedding``, ``block_{i}`` and ``ln_final``.
CLIP's ``optim.decay_mask="kernels"`` (``cljax.optim.lars_mask``) exempts ``pos_embedding``,
biases and LayerNorm scales from weight decay, as open_clip does; ``token_embedding`` decays.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cljax.models import vit

# (width, depth, num_heads). "base" is the text tower of every CLIP ViT-B and ResNet-50
# model (Radford et al. 2021, Tables 19 and 20), "large" that of ViT-L/14; "tiny" and
# "small" are for CPUs and tests.
TEXT_SIZES = {
  "tiny": (128, 4, 2),
  "small": (256, 6, 4),
  "base": (512, 12, 8),
  "large": (768, 12, 12),
}


def eot_positions(tokens: jax.Array, eot_id: int) -> jax.Array:
  """(b,) index of the first ``eot_id`` in each row of (b, L) ``tokens``; L - 1 if none."""
  is_eot = tokens == eot_id
  return jnp.where(is_eot.any(axis=-1), jnp.argmax(is_eot, axis=-1), tokens.shape[-1] - 1)


class TextBlock(nn.Module):
  """Pre-LN Transformer block with a mask: x + MHSA(LN(x)), then x + MLP(LN(x))."""

  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    y = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      dtype=self.dtype,
      kernel_init=nn.initializers.xavier_uniform(),
      deterministic=True,
      force_fp32_for_softmax=True,
    )(y, y, mask=mask)
    x = x + y
    y = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)(x)
    return x + vit.MlpBlock(self.mlp_dim, dtype=self.dtype)(y)


class TextTransformer(nn.Module):
  """Causal Transformer over token ids returning the EOT features, (b, L) -> (b, width).

  Attributes:
    vocab_size: rows of the token embedding (at least the tokenizer's vocabulary).
    context_length: the longest sequence, the rows of the position embedding.
    width: token width.
    depth: number of blocks.
    num_heads: attention heads (``width`` must be divisible by it).
    eot_id: the end-of-text token id, where the sequence is pooled.
    mlp_ratio: the MLP's hidden width over ``width``.
    causal: mask attention to earlier positions (CLIP); False attends both ways, still
      pooling at the EOT.
    dtype: compute dtype; parameters stay float32.
  """

  vocab_size: int
  context_length: int = 77
  width: int = 512
  depth: int = 12
  num_heads: int = 8
  eot_id: int = 2
  mlp_ratio: int = 4
  causal: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = True) -> jax.Array:
    del train  # No dropout: training and evaluation are the same function.
    if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
      raise ValueError(
        f"tokens must have shape (batch, length <= {self.context_length}), got {tokens.shape}."
      )
    length = tokens.shape[1]
    # CLIP's initialisation: N(0, 0.02) token and N(0, 0.01) position embeddings.
    x = nn.Embed(
      self.vocab_size,
      self.width,
      embedding_init=nn.initializers.normal(0.02),
      dtype=self.dtype,
      name="token_embedding",
    )(tokens)
    pos = self.param(
      "pos_embedding", nn.initializers.normal(0.01), (self.context_length, self.width)
    )
    x = x + pos[:length].astype(self.dtype)
    mask = nn.make_causal_mask(tokens) if self.causal else None  # (b, 1, L, L)
    for i in range(self.depth):
      block = TextBlock(self.num_heads, self.mlp_ratio * self.width, self.dtype, name=f"block_{i}")
      x = block(x, mask)
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="ln_final")(x)
    index = eot_positions(tokens, self.eot_id)
    return x[jnp.arange(x.shape[0]), index].astype(jnp.float32)


def text_size(name: str) -> dict[str, int]:
  """``{"width", "depth", "num_heads"}`` of a named size in ``TEXT_SIZES``."""
  if name not in TEXT_SIZES:
    raise ValueError(f"Unknown text size {name!r}; available: {sorted(TEXT_SIZES)}.")
  width, depth, num_heads = TEXT_SIZES[name]
  return {"width": width, "depth": depth, "num_heads": num_heads}
