"""Vision Transformers (Dosovitskiy et al. 2021) as contrastive encoders, MoCo v3 style.

A pre-LN Transformer over non-overlapping patches with a class token; the
encoder returns the class token's features after the final LayerNorm, the
input of the projection head (as the ResNet returns its pooled features).

Parameter names: ``embedding`` (the patch projection; ``frozen_embedding``
when ``freeze_patch_embed``), ``cls_token``, ``pos_embedding`` (learned
position embeddings only), ``Transformer/encoderblock_{i}`` and
``Transformer/encoder_norm``. ``cljax.optim`` keys its weight-decay and LARS
masks on these names: ``cls_token`` and ``pos_embedding`` are decayed under
``optim.decay_mask="matrices"`` (DINO: its 3-D ``cls_token`` and ``pos_embed``) and
"all", not under "kernels" (CLIP: open_clip's ``no_weight_decay()``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# (hidden_dim, depth, num_heads, mlp_dim): Table 1 of Dosovitskiy et al. 2021,
# Ti and S from Touvron et al. 2021 (DeiT).
VARIANTS = {
  "Ti": (192, 12, 3, 768),
  "S": (384, 12, 6, 1536),
  "B": (768, 12, 12, 3072),
  "L": (1024, 24, 16, 4096),
  "H": (1280, 32, 16, 5120),
  # Zhai et al. 2022, "Scaling Vision Transformers", Table 2: open_clip's ViT-g-14 tower.
  "g": (1408, 40, 16, 6144),
}

# Keys of a "custom:..." variant and the ViT attributes they set.
_CUSTOM_KEYS = {
  "hidden": "hidden_dim",
  "depth": "depth",
  "heads": "num_heads",
  "mlp": "mlp_dim",
  "patch": "patch_size",
}

# Prefix of modules whose parameters never train; the optimiser leaves them alone.
FROZEN_PREFIX = "frozen_"
# Prefix of modules whose parameters are stacked over a leading layer axis (``scan_blocks``);
# the optimiser's masks do not count that axis (``cljax.optim``).
STACKED_PREFIX = "scan_"
POSEMBS = ("sincos2d", "learn")  # The values of model.posemb.


def posemb_sincos_2d(
  height: int, width: int, dim: int, temperature: float = 10_000.0
) -> np.ndarray:
  """Fixed 2-D sin-cos position embeddings of a (height, width) grid, MoCo v3's formula.

  Each quarter of the channels holds sin(x w), cos(x w), sin(y w), cos(y w) for
  frequencies ``w_k = temperature ** (-k / (dim / 4 - 1))``, x the column, y the row.

  Args:
    height: rows of the patch grid.
    width: columns of the patch grid.
    dim: embedding width, a multiple of 4 (and at least 8).
    temperature: the largest wavelength.

  Returns:
    A float32 array (height * width, dim), row-major over the grid.
  """
  if dim % 4 or dim < 8:
    raise ValueError(f"sin-cos position embeddings need a width multiple of 4 (>= 8), got {dim}.")
  y, x = np.mgrid[:height, :width]
  omega = 1.0 / temperature ** (np.arange(dim // 4) / (dim // 4 - 1))
  x = x.reshape(-1)[:, None] * omega[None, :]
  y = y.reshape(-1)[:, None] * omega[None, :]
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe.astype(np.float32)


class PatchEmbed(nn.Module):
  """A ``patch_size`` x ``patch_size`` convolution with stride ``patch_size`` (no overlap).

  Its kernel and bias are named as those of ``nn.Conv``. With ``frozen`` they are
  held by ``jax.lax.stop_gradient``: a fixed random projection (MoCo v3, sec. 5).
  """

  features: int
  patch_size: int
  frozen: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    # Xavier-uniform over the flattened (p * p * 3, features) projection, as MoCo v3
    # initialises its patch embedding (nn.initializers.xavier_uniform would also count the
    # receptive field in the fan-out).
    kernel_init = nn.initializers.variance_scaling(
      1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3
    )
    kernel = self.param("kernel", kernel_init, (p, p, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    if self.frozen:
      kernel, bias = jax.lax.stop_gradient(kernel), jax.lax.stop_gradient(bias)
    y = jax.lax.conv_general_dilated(
      x.astype(self.dtype),
      kernel.astype(self.dtype),
      window_strides=(p, p),
      padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + bias.astype(self.dtype)


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dense, back to the input width."""

  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n: nn.Dense(n, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform())
    y = nn.gelu(dense(self.mlp_dim)(x))  # tanh approximation, as big_vision.
    return dense(x.shape[-1])(y)


class Encoder1DBlock(nn.Module):
  """Pre-LN Transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      dtype=self.dtype,
      kernel_init=nn.initializers.xavier_uniform(),
      deterministic=True,
      force_fp32_for_softmax=True,
    )(y, y)
    x = x + y
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    return x + MlpBlock(self.mlp_dim, dtype=self.dtype)(y)


def _whole(variables: dict, expected: Any, axis: str) -> dict:
  """``variables`` with each parameter that arrives split (FSDP, inside ``shard_map``: this
  device's part, smaller than ``expected`` along one dimension) all-gathered whole."""

  def gather(x, full):
    dims = [d for d in range(x.ndim) if x.shape[d] != full.shape[d]]
    if not dims:
      return x
    (dim,) = dims
    return jax.lax.all_gather(x, axis, axis=dim, tiled=True)

  if "params" not in variables:
    return variables
  return {**variables, "params": jax.tree.map(gather, variables["params"], expected)}


class ScannedLayer(nn.Module):
  """One layer as a ``nn.scan`` body: (carry, unused) -> (carry, None).

  ``layer(*args, name="block")`` is the layer (``Encoder1DBlock`` here, DINOv2's ``Block``),
  its parameters stacked along the scan's leading axis. Under FSDP
  (``mesh.state_sharding="fsdp"``) the stacked parameters reach the loop split over the
  devices, and each iteration all-gathers its own layer's parameters just before the layer
  uses them (``_whole``): ZeRO-3 per layer. Differentiation turns each gather into a
  reduce-scatter of that layer's gradients inside the backward loop, and with ``remat`` the
  backward pass gathers the layer again instead of keeping it, so one layer is whole at a
  time (``step.train_step`` leaves these parameters to the model). Whole parameters (data
  parallelism, evaluation) pass through unchanged. Scan it with ``split_rngs={"dropout":
  True}`` where the layer draws dropout, so each layer draws its own masks.
  """

  layer: Any  # A flax Module class.
  args: tuple
  remat: bool = False
  axis_name: str = "data"

  @nn.compact
  def __call__(self, x, _):
    # One layer's parameter shapes; a 'dropout' key in case the layer draws masks.
    keys = {"params": jax.random.key(0), "dropout": jax.random.key(0)}
    expected = jax.eval_shape(lambda: self.layer(*self.args).init(keys, x[:1]))["params"]
    layer = nn.map_variables(
      self.layer,
      "params",
      trans_in_fn=lambda vs: _whole(vs, expected, self.axis_name),
      init=self.is_initializing(),
      mutable=self.is_initializing(),
    )
    layer = nn.remat(layer) if self.remat else layer
    return layer(*self.args, name="block")(x), None


class Encoder(nn.Module):
  """``depth`` Transformer blocks and the final LayerNorm.

  ``remat``: each block's activations are recomputed in the backward pass instead of kept
  (``nn.remat``, activation checkpointing): activation memory of about one block instead of
  ``depth``, for about one more forward pass. Parameters are unchanged.

  ``scan``: the blocks run as one ``nn.scan`` loop over parameters stacked along a leading
  axis of size ``depth`` (module ``scan_encoderblocks``): XLA compiles one block instead of
  ``depth``, and under FSDP each layer is gathered only while it is used (``ScannedLayer``).
  Another parameter tree: checkpoints of one form do not restore into the other.
  """

  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  remat: bool = False
  scan: bool = False

  @nn.compact
  def __call__(self, x):
    if self.scan:
      blocks = nn.scan(
        ScannedLayer,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=self.depth,
      )
      args = (self.num_heads, self.mlp_dim, self.dtype)
      name = STACKED_PREFIX + "encoderblocks"
      x, _ = blocks(Encoder1DBlock, args, self.remat, name=name)(x, None)
    else:
      block = nn.remat(Encoder1DBlock) if self.remat else Encoder1DBlock
      for i in range(self.depth):
        x = block(self.num_heads, self.mlp_dim, self.dtype, name=f"encoderblock_{i}")(x)
    return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="encoder_norm")(x)


class ViT(nn.Module):
  """A ViT trunk returning the class token's features (no classifier).

  Position embeddings are added to the patch tokens only; the class token has
  none (big_vision's convention; MoCo v3's zero class-token entry is the same).

  Attributes:
    hidden_dim: token width.
    depth: number of Transformer blocks.
    num_heads: attention heads (``hidden_dim`` must be divisible by it).
    mlp_dim: hidden width of each block's MLP.
    patch_size: side of the square patches; image sides must be multiples of it.
    posemb: "sincos2d" (fixed, built for whatever grid the input gives) or "learn"
      (a parameter for the grid of the image size the model was initialised with;
      it then only accepts images of that size).
    freeze_patch_embed: keep the random patch projection fixed (MoCo v3, sec. 5);
      its parameters are then named ``frozen_embedding`` so the optimiser skips them.
    dtype: compute dtype (bfloat16 on accelerators); parameters stay float32.
    remat: recompute each block's activations in the backward pass (``Encoder``).
    scan_blocks: the blocks as one scanned loop over stacked parameters (``Encoder``).
  """

  hidden_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_dim: int = 1536
  patch_size: int = 16
  posemb: str = "sincos2d"
  freeze_patch_embed: bool = False
  dtype: Any = jnp.float32
  remat: bool = False
  scan_blocks: bool = False

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train  # No dropout or BatchNorm: training and evaluation are the same function.
    b, h, w, _ = x.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"Image size {h}x{w} is not divisible by the patch size {p}.")
    name = FROZEN_PREFIX + "embedding" if self.freeze_patch_embed else "embedding"
    x = PatchEmbed(self.hidden_dim, p, self.freeze_patch_embed, self.dtype, name=name)(x)
    gh, gw = h // p, w // p
    x = x.reshape(b, gh * gw, self.hidden_dim)
    x = x + self._position_embeddings(gh, gw).astype(self.dtype)
    cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.hidden_dim), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.hidden_dim)), x], 1)
    x = Encoder(
      self.depth,
      self.num_heads,
      self.mlp_dim,
      self.dtype,
      remat=self.remat,
      scan=self.scan_blocks,
      name="Transformer",
    )(x)
    return x[:, 0].astype(jnp.float32)

  def _position_embeddings(self, gh: int, gw: int) -> jax.Array:
    if self.posemb == "sincos2d":
      return jnp.asarray(posemb_sincos_2d(gh, gw, self.hidden_dim))[None]
    if self.posemb == "learn":
      shape = (1, gh * gw, self.hidden_dim)
      if self.has_variable("params", "pos_embedding"):
        have = self.get_variable("params", "pos_embedding").shape
        if tuple(have) != shape:
          raise ValueError(
            f"Learned position embeddings were made for {have[1]} patches, the input has "
            f"{gh}x{gw}; use posemb='sincos2d' for several image sizes."
          )
      init = nn.initializers.normal(stddev=1 / np.sqrt(self.hidden_dim))
      return self.param("pos_embedding", init, shape, jnp.float32)
    raise ValueError(f"posemb must be one of {POSEMBS}, got {self.posemb!r}.")


def parse_variant(variant: str) -> dict[str, int]:
  """The size attributes of a ViT named ``variant``.

  Args:
    variant: "Ti/16", "S/16", "B/16", "L/16", "H/14", "g/14" (any patch size after the
      slash, e.g. "B/32"), or, for tests and toy models, "custom:" followed by comma-separated
      ``key=value`` pairs with all of the keys hidden, depth, heads, mlp and patch,
      e.g. "custom:hidden=32,depth=2,heads=2,mlp=64,patch=4".

  Returns:
    ``{"hidden_dim", "depth", "num_heads", "mlp_dim", "patch_size"}``.
  """
  if variant.startswith("custom:"):
    sizes = {}
    for item in filter(None, variant[len("custom:") :].split(",")):
      key, sep, value = item.partition("=")
      key = key.strip()
      if not sep or key not in _CUSTOM_KEYS or not value.strip().isdigit():
        raise ValueError(
          f"Bad item {item!r} in ViT variant {variant!r}; expected key=int with keys "
          f"{sorted(_CUSTOM_KEYS)}."
        )
      sizes[_CUSTOM_KEYS[key]] = int(value)
    missing = sorted(k for k, v in _CUSTOM_KEYS.items() if v not in sizes)
    if missing:
      raise ValueError(f"ViT variant {variant!r} lacks {missing}.")
    return sizes
  name, sep, patch = variant.partition("/")
  if name not in VARIANTS or not sep or not patch.isdigit():
    raise ValueError(
      f"Unknown ViT variant {variant!r}; expected NAME/PATCH with NAME one of "
      f"{sorted(VARIANTS)} (e.g. 'S/16'), or 'custom:hidden=..,depth=..,heads=..,mlp=..,patch=..'."
    )
  hidden_dim, depth, num_heads, mlp_dim = VARIANTS[name]
  return dict(
    hidden_dim=hidden_dim, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim, patch_size=int(patch)
  )


def create_vit(variant: str, **kwargs) -> ViT:
  """The ViT named by ``variant`` (see ``parse_variant``); ``kwargs`` set the other attributes."""
  return ViT(**parse_variant(variant), **kwargs)


def feature_dim(model: ViT) -> int:
  """Width of the class-token features that ``model`` returns."""
  return model.hidden_dim
