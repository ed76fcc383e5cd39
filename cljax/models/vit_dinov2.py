"""DINOv2's Vision Transformer (Oquab et al. 2024), with registers (Darcet et al. 2024).

A Flax port of facebookresearch/dinov2 ``dinov2/models/vision_transformer.py``
(``DinoVisionTransformer``, ``vit_small/base/large/giant2``) and ``dinov2/layers/``: a
pre-LN ViT with LayerScale, stochastic depth, an MLP or SwiGLU FFN, a learned mask token
(iBOT's masked patches), register tokens and learned position embeddings interpolated to
the input's patch grid. ``DinoV2ViT.__call__`` returns what the official
``forward_features`` does: the class, register and patch tokens after the final LayerNorm.

Images are NHWC (the official code takes NCHW). Parameter names follow the official
modules where Flax allows: ``patch_embed``, ``cls_token``, ``register_tokens``,
``pos_embed``, ``mask_token``, ``blocks_{i}/{norm1,attn,ls1,norm2,mlp,ls2}`` and ``norm``;
with ``scan_blocks`` the blocks are ``scan_blocks/block/...``, each parameter stacked over a
leading axis of size ``depth`` (``stack_blocks`` converts the first layout to it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cljax.models import vit

# (embed_dim, depth, num_heads, ffn_layer), mlp_ratio 4 throughout: the official
# vit_small, vit_base, vit_large and vit_giant2 (ffn_layer from the ViT-g/14 configs).
VARIANTS = {
  "S": (384, 12, 6, "mlp"),
  "B": (768, 12, 12, "mlp"),
  "L": (1024, 24, 16, "mlp"),
  "g": (1536, 40, 24, "swiglufused"),
}
# "swiglu" and "swiglufused" are the same layer in the official code (SwiGLUFFNFused).
FFN_LAYERS = ("mlp", "swiglu", "swiglufused")
DEFAULT_PATCH_SIZE = 14
# Keys of a "custom:..." variant and the attributes they set; "ffn" is optional ("mlp").
_CUSTOM_PREFIX = "custom:"
_CUSTOM_SIZES = {"dim": "embed_dim", "depth": "depth", "heads": "num_heads", "patch": "patch_size"}
_CUSTOM_FFN = "ffn"
# The module holding the stacked blocks of ``DinoV2ViT(scan_blocks=True)``: its prefix tells
# the optimiser (``cljax.optim``) and the FSDP train step (``step.left_to_the_model``) that
# its parameters carry a leading layer axis.
SCANNED_BLOCKS = vit.STACKED_PREFIX + "blocks"

# The official init_weights_vit_timm draws Linear weights with trunc_normal_(std=0.02),
# whose bounds (a=-2, b=2) are absolute, i.e. 100 standard deviations: a plain normal.
_LINEAR_INIT = nn.initializers.normal(stddev=0.02)


def swiglu_hidden_dim(dim: int, mlp_ratio: float) -> int:
  """Hidden width of the official ``SwiGLUFFNFused`` in a block of width ``dim``.

  The block asks for ``int(dim * mlp_ratio)`` hidden features; SwiGLUFFNFused keeps 2/3
  of them (the gated pair then costs what the MLP does) rounded up to a multiple of 8:
  ``(int(hidden * 2 / 3) + 7) // 8 * 8``; 4096 for ViT-g (1536 * 4 * 2 / 3).

  Args:
    dim: token width.
    mlp_ratio: the block's FFN expansion ratio.

  Returns:
    The width of each of the two gated halves.
  """
  hidden = int(dim * mlp_ratio)
  return (int(hidden * 2 / 3) + 7) // 8 * 8


def drop_path_rates(rate: float, depth: int, uniform: bool) -> list[float]:
  """Per-block stochastic-depth rates: all ``rate`` if ``uniform``, else linear from 0.

  Args:
    rate: the drop path rate, in [0, 1].
    depth: number of blocks.
    uniform: DINOv2's ``drop_path_uniform`` (True in its training configs).

  Returns:
    ``depth`` rates, as the official ``dpr`` list.

  Raises:
    ValueError: if ``rate`` is outside [0, 1].
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"drop_path_rate must be in [0, 1], got {rate}.")
  if uniform or depth == 1:
    return [float(rate)] * depth
  return [rate * i / (depth - 1) for i in range(depth)]  # torch.linspace(0, rate, depth)


def drop_path(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Stochastic depth: zero each example's ``x`` with probability ``rate``, scale the rest.

  As the official ``drop_path`` (``dinov2/layers/drop_path.py``): a Bernoulli(1 - rate)
  draw per example (leading axis), kept examples divided by 1 - rate so the expectation
  is unchanged. ``rate == 0`` or ``rng is None`` (evaluation) returns ``x`` itself.

  Args:
    x: a residual branch's output, (b, ...).
    rate: drop probability, in [0, 1].
    rng: a PRNG key, or None for the identity.

  Returns:
    An array like ``x``.
  """
  if rate == 0.0 or rng is None:
    return x
  keep = 1.0 - rate
  if keep == 0.0:
    return jnp.zeros_like(x)
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype))


def interpolate_pos_embed(
  pos: jax.Array,
  grid: tuple[int, int],
  offset: float = 0.1,
  antialias: bool = False,
) -> jax.Array:
  """Bicubic resampling of a square grid of position embeddings, as the official code.

  The official ``interpolate_pos_encoding`` calls ``F.interpolate(mode="bicubic",
  antialias=..., align_corners=False)`` with ``scale_factor = (g + offset) / M`` per axis
  (``size=(gh, gw)`` when ``offset`` is 0), M the side of the stored grid and g the
  wanted side: the output has ``floor(M * scale) = g`` rows, and output index i samples
  input coordinate ``(i + 0.5) / scale - 0.5``; the scale factor, not g / M, sets the
  sampling positions, so the 0.1 offset shifts them slightly. This calls
  ``jax.image.scale_and_translate`` with the same scale, zero translation and
  ``method="cubic-pytorch"``, which is torch's algorithm: without antialiasing, the
  cubic convolution kernel with A = -0.75 (torch's, not Keys' -0.5) on the 4 nearest
  rows, indices clamped to the border (edge padding); with antialiasing, the Keys
  kernel (A = -0.5) stretched by 1 / scale when downsampling and renormalised over the
  rows inside the grid (torch's ``_upsample_bicubic2d_aa``). The one difference left is
  rounding: JAX computes 1 / scale in float32 where torch takes ``1.0 / scale`` in
  float64 before its float32 arithmetic (~1e-7 relative in the sampling positions).
  At the stored grid this returns ``pos`` unchanged, as the official code does (its
  resampling with the offset would not be the identity).

  Args:
    pos: (M * M, d) patch position embeddings, row-major (no class-token entry).
    grid: the wanted (rows, columns).
    offset: the official ``interpolate_offset``.
    antialias: the official ``interpolate_antialias``.

  Returns:
    (rows * columns, d) float32 embeddings, row-major.

  Raises:
    ValueError: if ``pos`` does not hold a square grid.
  """
  n, dim = pos.shape
  m = math.isqrt(n)
  if m * m != n:
    raise ValueError(f"Position embeddings of {n} patches are not a square grid.")
  gh, gw = grid
  if (gh, gw) == (m, m):
    return pos
  scale = jnp.asarray([(gh + offset) / m, (gw + offset) / m], jnp.float32)
  out = jax.image.scale_and_translate(
    pos.astype(jnp.float32).reshape(m, m, dim),
    (gh, gw, dim),
    spatial_dims=(0, 1),
    scale=scale,
    translation=jnp.zeros(2, jnp.float32),
    method="cubic-pytorch",
    antialias=antialias,
  )
  return out.reshape(gh * gw, dim)


class LayerScale(nn.Module):
  """Multiplies by a learned per-channel ``gamma``, initialised to ``init_values``."""

  init_values: float

  @nn.compact
  def __call__(self, x):
    gamma = self.param(
      "gamma", nn.initializers.constant(self.init_values), (x.shape[-1],), jnp.float32
    )
    return x * gamma.astype(x.dtype)


class Mlp(nn.Module):
  """``fc1`` -> exact (erf) GELU -> ``fc2``: the official ``Mlp`` with torch's nn.GELU."""

  hidden_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, kernel_init=_LINEAR_INIT, name=name)
    y = nn.gelu(dense(self.hidden_dim, "fc1")(x), approximate=False)
    return dense(x.shape[-1], "fc2")(y)


class SwiGLUFFN(nn.Module):
  """``w3(silu(x1) * x2)`` with ``(x1, x2)`` the halves of ``w12(x)``: the official SwiGLU.

  ``hidden_dim`` is the width of each half (``swiglu_hidden_dim``).
  """

  hidden_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, kernel_init=_LINEAR_INIT, name=name)
    x1, x2 = jnp.split(dense(2 * self.hidden_dim, "w12")(x), 2, axis=-1)
    return dense(x.shape[-1], "w3")(nn.silu(x1) * x2)


class Block(nn.Module):
  """x + DropPath(LS1(Attn(LN(x)))), then x + DropPath(LS2(FFN(LN(x)))).

  The two branches draw independent drop masks from the 'dropout' stream when not
  ``deterministic``. No LayerScale (and no ``gamma``) when ``init_values`` is None or 0.
  """

  num_heads: int
  mlp_ratio: float = 4.0
  ffn_layer: str = "mlp"
  init_values: float | None = None
  drop_path_rate: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    active = not self.deterministic and self.drop_path_rate > 0
    rng = lambda: self.make_rng("dropout") if active else None
    scale = lambda name: LayerScale(self.init_values, name=name) if self.init_values else None
    ls1, ls2 = scale("ls1"), scale("ls2")
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      dtype=self.dtype,
      kernel_init=_LINEAR_INIT,
      deterministic=True,
      force_fp32_for_softmax=True,
      name="attn",
    )(y, y)
    x = x + drop_path(ls1(y) if ls1 else y, self.drop_path_rate, rng())
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm2")(x)
    if self.ffn_layer == "mlp":
      y = Mlp(int(dim * self.mlp_ratio), self.dtype, name="mlp")(y)
    else:
      y = SwiGLUFFN(swiglu_hidden_dim(dim, self.mlp_ratio), self.dtype, name="mlp")(y)
    return x + drop_path(ls2(y) if ls2 else y, self.drop_path_rate, rng())


class DinoV2ViT(nn.Module):
  """DINOv2's ViT trunk: class, register and patch tokens after the final LayerNorm.

  Attributes:
    embed_dim: token width.
    depth: number of blocks.
    num_heads: attention heads.
    mlp_ratio: FFN expansion ratio (of the MLP; SwiGLU keeps 2/3 of it).
    patch_size: side of the square patches; image sides must be multiples of it.
    img_size: the image side the position embeddings are made for: a square grid of
      ``img_size // patch_size`` patches (518 -> 37x37 in the released models; 224 ->
      16x16 to train from scratch at 224). Other inputs interpolate it.
    ffn_layer: "mlp" (GELU) or "swiglufused" (alias "swiglu"), as the official argument.
    init_values: LayerScale initial value (1e-5 in the official training configs); None
      or 0 for no LayerScale.
    drop_path_rate: stochastic depth rate, in [0, 1].
    drop_path_uniform: every block drops with ``drop_path_rate`` (True, the official
      training configs' value) or rates rise linearly from 0 to it (False).
    num_register_tokens: learned tokens after the class token, with no position
      embedding (Darcet et al. 2024).
    interpolate_offset: added to the wanted grid side in the interpolation's scale factor.
    interpolate_antialias: antialiased bicubic interpolation of position embeddings.
    dtype: compute dtype; parameters and outputs stay float32.
    remat: recompute each block's activations in the backward pass (``nn.remat``):
      activation memory of about one block instead of ``depth``, for about one more
      forward pass. Parameters are unchanged.
    scan_blocks: the blocks run as one ``nn.scan`` loop over parameters stacked along a
      leading axis of size ``depth`` (module ``scan_blocks/block``): XLA compiles one block
      instead of ``depth``, and under FSDP each layer is gathered only while it is used
      (``vit.ScannedLayer``). Another parameter tree: checkpoints of one layout do not restore
      into the other (``stack_blocks`` converts unscanned parameters). Every block must
      then have the same drop path rate: ``drop_path_uniform``, a rate of 0 or one block.
  """

  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  patch_size: int = DEFAULT_PATCH_SIZE
  img_size: int = 224
  ffn_layer: str = "mlp"
  init_values: float | None = 1e-5
  drop_path_rate: float = 0.0
  drop_path_uniform: bool = True
  num_register_tokens: int = 0
  interpolate_offset: float = 0.1
  interpolate_antialias: bool = False
  dtype: Any = jnp.float32
  remat: bool = False
  scan_blocks: bool = False

  @nn.compact
  def __call__(
    self, x: jax.Array, masks: jax.Array | None = None, train: bool = True
  ) -> dict[str, jax.Array]:
    """Tokens of NHWC images ``x``; patches where ``masks`` (b, P) is True get the mask token.

    Args:
      x: (b, h, w, c) images, h and w multiples of ``patch_size``.
      masks: None, or a boolean (b, P) array over the row-major patch grid.
      train: stochastic depth is active (it draws from the 'dropout' stream) if True
        and ``drop_path_rate`` > 0.

    Returns:
      ``{"cls": (b, d), "registers": (b, R, d), "patches": (b, P, d)}`` in float32.

    Raises:
      ValueError: on image sides not divisible by the patch size, a mask of another
        shape or dtype, an unknown ``ffn_layer``, or ``scan_blocks`` with drop path rates
        that differ between blocks.
    """
    rates = drop_path_rates(self.drop_path_rate, self.depth, self.drop_path_uniform)
    if self.scan_blocks and len(set(rates)) > 1:
      raise ValueError(
        f"scan_blocks runs one block {self.depth} times, so every block needs the same drop "
        f"path rate; got rates rising from 0 to {self.drop_path_rate} (drop_path_uniform="
        "False). Set drop_path_uniform=True, drop_path_rate=0 or scan_blocks=False."
      )
    x = self._prepare_tokens(x, masks)
    args = (self.num_heads, self.mlp_ratio, self.ffn_layer, self.init_values)
    if self.scan_blocks:
      blocks = nn.scan(
        vit.ScannedLayer,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},  # Each layer its own init and masks.
        length=self.depth,
      )
      rate = rates[0] if rates else 0.0  # One rate for all (checked above).
      block_args = (*args, rate, not train, self.dtype)
      x, _ = blocks(Block, block_args, self.remat, name=SCANNED_BLOCKS)(x, None)
    else:
      block = nn.remat(Block) if self.remat else Block
      for i, rate in enumerate(rates):
        x = block(*args, rate, deterministic=not train, dtype=self.dtype, name=f"blocks_{i}")(x)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x).astype(jnp.float32)
    r = self.num_register_tokens
    return {"cls": x[:, 0], "registers": x[:, 1 : 1 + r], "patches": x[:, 1 + r :]}

  def _prepare_tokens(self, x, masks):
    """The official ``prepare_tokens_with_masks``: (b, 1 + R + P, d) tokens."""
    if self.ffn_layer not in FFN_LAYERS:
      raise ValueError(f"ffn_layer must be one of {FFN_LAYERS}, got {self.ffn_layer!r}.")
    b, h, w, _ = x.shape
    p, d = self.patch_size, self.embed_dim
    if h % p or w % p:
      raise ValueError(f"Image size {h}x{w} is not divisible by the patch size {p}.")
    gh, gw = h // p, w // p
    x = vit.PatchEmbed(d, p, dtype=self.dtype, name="patch_embed")(x).reshape(b, gh * gw, d)
    # Created with or without masks, so that the parameters do not depend on the call.
    mask_token = self.param("mask_token", nn.initializers.zeros, (1, d), jnp.float32)
    if masks is not None:
      if masks.shape != (b, gh * gw) or masks.dtype != jnp.bool_:
        raise ValueError(
          f"masks must be a boolean ({b}, {gh * gw}) array, got {masks.dtype} {masks.shape}."
        )
      # Before the position embeddings: a masked patch keeps its position, not its pixels.
      x = jnp.where(masks[..., None], mask_token.astype(self.dtype)[None], x)
    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), x], axis=1)
    x = x + self._position_embeddings(gh, gw).astype(self.dtype)[None]
    if self.num_register_tokens:
      shape = (1, self.num_register_tokens, d)
      reg = self.param("register_tokens", nn.initializers.normal(1e-6), shape, jnp.float32)
      reg = jnp.broadcast_to(reg.astype(self.dtype), (b, *shape[1:]))
      x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)
    return x

  def _position_embeddings(self, gh: int, gw: int) -> jax.Array:
    """(1 + gh * gw, d): the class token's entry, then the (interpolated) patch grid."""
    m = self.img_size // self.patch_size
    shape = (1, 1 + m * m, self.embed_dim)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), shape, jnp.float32)[0]
    patches = interpolate_pos_embed(
      pos[1:], (gh, gw), self.interpolate_offset, self.interpolate_antialias
    )
    return jnp.concatenate([pos[:1], patches], axis=0)


def parse_variant(variant: str) -> dict[str, Any]:
  """The size attributes of the DINOv2 ViT named ``variant``.

  Args:
    variant: "S", "B", "L" or "g", optionally with a patch size: "S/14" (14 if none); or,
      for tests and small CPU recipes, "custom:" followed by comma-separated ``key=value``
      pairs with the positive integers dim, depth, heads (dividing dim) and patch, and
      optionally ffn (one of ``FFN_LAYERS``, "mlp" if absent), e.g.
      "custom:dim=64,depth=4,heads=4,patch=4" or "custom:dim=64,...,ffn=swiglufused".

  Returns:
    ``{"embed_dim", "depth", "num_heads", "ffn_layer", "patch_size"}``.

  Raises:
    ValueError: on an unknown name or a patch size that is not a positive integer; for a
      custom variant, on an unknown, repeated or missing key, a size that is not a
      positive integer, an unknown ffn, or a dim not divisible by heads.
  """
  if variant.startswith(_CUSTOM_PREFIX):
    return _parse_custom_variant(variant)
  name, sep, patch = variant.partition("/")
  if name not in VARIANTS or (sep and not patch.isdigit()) or patch == "0":
    raise ValueError(
      f"Unknown DINOv2 ViT variant {variant!r}; expected NAME or NAME/PATCH with NAME one "
      f"of {sorted(VARIANTS)} (e.g. 'g/14'), or "
      "'custom:dim=..,depth=..,heads=..,patch=..[,ffn=mlp|swiglufused]'."
    )
  embed_dim, depth, num_heads, ffn_layer = VARIANTS[name]
  return dict(
    embed_dim=embed_dim,
    depth=depth,
    num_heads=num_heads,
    ffn_layer=ffn_layer,
    patch_size=int(patch) if sep else DEFAULT_PATCH_SIZE,
  )


def _parse_custom_variant(variant: str) -> dict[str, Any]:
  """``parse_variant`` of a "custom:key=value,..." variant."""
  keys = sorted(_CUSTOM_SIZES) + [_CUSTOM_FFN]
  found: dict[str, str] = {}
  for item in filter(None, variant[len(_CUSTOM_PREFIX) :].split(",")):
    key, sep, value = (part.strip() for part in item.partition("="))
    if not sep or key not in keys:
      raise ValueError(
        f"Bad item {item!r} in DINOv2 ViT variant {variant!r}; expected key=value with keys "
        f"{keys} (ffn optional)."
      )
    if key in found:
      raise ValueError(f"DINOv2 ViT variant {variant!r} sets {key!r} twice.")
    found[key] = value
  missing = [k for k in sorted(_CUSTOM_SIZES) if k not in found]
  if missing:
    raise ValueError(f"DINOv2 ViT variant {variant!r} lacks {missing}.")
  sizes = {}
  for key, attribute in _CUSTOM_SIZES.items():
    value = found[key]
    # isascii: str.isdigit also accepts digits such as "²", which int() refuses.
    if not (value.isascii() and value.isdigit()) or int(value) == 0:
      raise ValueError(
        f"{key} must be a positive integer in DINOv2 ViT variant {variant!r}, got {value!r}."
      )
    sizes[attribute] = int(value)
  ffn_layer = found.get(_CUSTOM_FFN, "mlp")
  if ffn_layer not in FFN_LAYERS:
    raise ValueError(
      f"ffn must be one of {FFN_LAYERS} in DINOv2 ViT variant {variant!r}, got {ffn_layer!r}."
    )
  if sizes["embed_dim"] % sizes["num_heads"]:
    raise ValueError(
      f"dim={sizes['embed_dim']} is not divisible by heads={sizes['num_heads']} in DINOv2 "
      f"ViT variant {variant!r}."
    )
  return dict(
    embed_dim=sizes["embed_dim"],
    depth=sizes["depth"],
    num_heads=sizes["num_heads"],
    ffn_layer=ffn_layer,
    patch_size=sizes["patch_size"],
  )


def stack_blocks(params: Mapping[str, Any], depth: int) -> dict[str, Any]:
  """Unscanned ``DinoV2ViT`` parameters in the layout of ``scan_blocks=True``.

  ``blocks_0`` ... ``blocks_{depth-1}`` become ``scan_blocks/block``, each leaf stacked
  along a new leading axis of size ``depth``; the other entries are kept. To load
  unscanned checkpoints (or official weights converted to this module's names) into a
  scanned model; any tree laid out as the parameters (gradients, optimiser moments)
  converts alike.

  Args:
    params: the ``"params"`` collection of an unscanned ``DinoV2ViT``.
    depth: the model's number of blocks.

  Returns:
    A new dict; ``params`` is not modified.

  Raises:
    ValueError: if ``params`` does not hold exactly the blocks ``blocks_0`` to
      ``blocks_{depth-1}`` (``depth`` >= 1).
  """
  names = [f"blocks_{i}" for i in range(depth)]
  have = {k for k in params if k.startswith("blocks_")}
  if depth < 1 or have != set(names):
    raise ValueError(
      f"stack_blocks(depth={depth}) needs the blocks blocks_0 to blocks_{depth - 1}, got "
      f"{sorted(have, key=lambda k: (len(k), k))}."
    )
  stacked = {k: v for k, v in params.items() if k not in names}
  blocks = jax.tree.map(lambda *layers: jnp.stack(layers), *(params[n] for n in names))
  stacked[SCANNED_BLOCKS] = {"block": blocks}
  return stacked


def create_dinov2_vit(variant: str, **kwargs) -> DinoV2ViT:
  """The DINOv2 ViT named by ``variant`` (see ``parse_variant``); ``kwargs`` set the rest.

  ``kwargs`` may override the variant's sizes, e.g. ``ffn_layer="mlp"`` for a ViT-g with
  an MLP, or ``img_size=518`` for the released models' 37x37 position embeddings.
  """
  return DinoV2ViT(**{**parse_variant(variant), **kwargs})
