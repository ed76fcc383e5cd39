"""TS2Vec's time-series encoder: input projection, timestamp masking, dilated residual convs.

A port of ``TSEncoder`` (``models/encoder.py``) and ``DilatedConvEncoder``
(``models/dilated_conv.py``) of the official TS2Vec code (Yue et al., AAAI 2022), in the
(B, T, C) layout: the same layers, shapes, PyTorch's default initialisation, exact (erf)
GELU and 'same' padding, so the parameter count and the receptive field are the official
ones.

One addition for static shapes: ``valid`` marks the timestamps of a fixed-length window
that belong to the crop (``cljax.data.ts_views``). Outside them every convolution sees
zeros, exactly the zero padding the official convolutions apply beyond the ends of a
shorter input, so at the valid timestamps the output equals the official encoder's on
the crop alone; the output is zero elsewhere. This differs from a NaN timestamp, which the
official encoder zeroes after the input projection only (the convolutions then run over
it like any other timestamp), as here.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# The values of TSEncoder.mask_mode and of its `mask` argument when a string.
MASK_MODES = ("binomial", "continuous", "all_true", "all_false", "mask_last")


def _torch_kernel_init() -> nn.initializers.Initializer:
  # PyTorch's default for Linear and Conv1d weights, kaiming_uniform(a=sqrt(5)):
  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _conv(features: int, kernel_size: int, fan_in: int, **kwargs) -> nn.Conv:
  return nn.Conv(
    features,
    (kernel_size,),
    kernel_init=_torch_kernel_init(),
    bias_init=_torch_bias_init(fan_in),
    **kwargs,
  )


def same_pad(kernel_size: int, dilation: int) -> tuple[int, int]:
  """The (left, right) zero padding of the official ``SamePadConv``.

  Its receptive field is ``r = (kernel_size - 1) * dilation + 1``; it pads ``r // 2`` on
  both sides and, when r is even, removes the last output step: a right padding one
  shorter. The output has the input's length.
  """
  field = (kernel_size - 1) * dilation + 1
  pad = field // 2
  return pad, pad - (1 if field % 2 == 0 else 0)


def receptive_field(depth: int = 10, kernel_size: int = 3) -> tuple[int, int]:
  """How many input steps before and after t the encoder's output at t depends on.

  The sum over the 2 ``SamePadConv`` of each of the ``depth + 1`` blocks (dilation 2^i) of
  their left and right paddings: (4094, 4094) for the official depth 10 and kernel 3.
  """
  left = right = 0
  for i in range(depth + 1):
    pad_left, pad_right = same_pad(kernel_size, 2**i)
    left, right = left + 2 * pad_left, right + 2 * pad_right
  return left, right


class ConvBlock(nn.Module):
  """The official ``ConvBlock``: GELU -> SamePadConv -> GELU -> SamePadConv, plus the input
  (through a 1x1 ``projector`` where the channels change or the block is the last)."""

  features: int
  kernel_size: int
  dilation: int
  final: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    in_features = x.shape[-1]
    residual = x
    if in_features != self.features or self.final:
      residual = _conv(self.features, 1, in_features, dtype=self.dtype, name="projector")(x)
    padding = [same_pad(self.kernel_size, self.dilation)]
    for i, fan_in in enumerate((in_features, self.features)):
      x = nn.gelu(x, approximate=False)  # PyTorch's F.gelu is the exact (erf) GELU.
      if valid is not None:
        x = jnp.where(valid[..., None], x, 0)
      x = _conv(
        self.features,
        self.kernel_size,
        fan_in * self.kernel_size,
        kernel_dilation=(self.dilation,),
        padding=padding,
        dtype=self.dtype,
        name=f"conv{i + 1}",
      )(x)
    return x + residual


def binomial_mask(key: jax.Array, shape: tuple[int, int], p: float = 0.5) -> jax.Array:
  """The official ``generate_binomial_mask``: each timestamp kept (True) with probability p."""
  return jax.random.bernoulli(key, p, shape)


def continuous_mask(
  key: jax.Array, shape: tuple[int, int], n: int | float = 5, length: int | float = 0.1
) -> jax.Array:
  """The official ``generate_continuous_mask``: per series, n spans of ``length`` masked
  (False) at uniform starts (spans may overlap); float n and length are fractions of T."""
  batch, steps = shape
  n = int(n * steps) if isinstance(n, float) else n
  n = max(min(n, steps // 2), 1)
  length = int(length * steps) if isinstance(length, float) else length
  length = max(length, 1)
  starts = jax.random.randint(key, (batch, n, 1), 0, steps - length + 1)
  t = jnp.arange(steps)
  return ~jnp.any((t >= starts) & (t < starts + length), axis=1)


def timestamp_mask(mode: str, key: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
  """The (B, T) timestamps a mask mode of ``MASK_MODES`` keeps (True); ``key`` draws the
  random modes ('binomial', 'continuous') and may be None for the others."""
  if mode not in MASK_MODES:
    raise ValueError(f"the mask mode must be one of {MASK_MODES}, got {mode!r}.")
  if mode == "binomial":
    return binomial_mask(key, shape)
  if mode == "continuous":
    return continuous_mask(key, shape)
  keep = jnp.full(shape, mode != "all_false")
  return keep.at[:, -1].set(False) if mode == "mask_last" else keep


class TSEncoder(nn.Module):
  """TS2Vec's encoder: (B, T, input_dims) series -> (B, T, output_dims) representations.

  Timestamps with a NaN in any channel are missing: zeroed before the input projection and
  after it. In training (``train=True``) the projected features of randomly chosen
  timestamps are zeroed too (``mask_mode``, drawn from the 'mask' rng stream), then come
  ``depth`` residual blocks of width ``hidden_dims`` and one of width ``output_dims``
  (dilations 1, 2, ..., 2^depth) and dropout (the 'dropout' stream) on the output.

  Attributes:
    hidden_dims: the width of the input projection and the hidden blocks (64).
    output_dims: the representation width (320).
    depth: the number of hidden blocks (10); the encoder has ``depth + 1`` blocks.
    kernel_size: of every dilated convolution (3).
    mask_mode: the training mask, one of ``MASK_MODES`` ('binomial', p = 0.5).
    dropout_rate: of the output (``repr_dropout``, 0.1).
    dtype: the computation dtype (parameters stay float32).
  """

  hidden_dims: int = 64
  output_dims: int = 320
  depth: int = 10
  kernel_size: int = 3
  mask_mode: str = "binomial"
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    train: bool = True,
    mask: str | jax.Array | None = None,
    valid: jax.Array | None = None,
  ) -> jax.Array:
    """Encodes ``x``.

    Args:
      x: (B, T, input_dims) float series; NaN marks missing values.
      train: training mode: ``mask_mode`` masking and dropout.
      mask: which projected timestamps to keep: a mode of ``MASK_MODES`` or a (B, T) bool
        array; None is ``mask_mode`` in training and 'all_true' otherwise (the official
        default). 'binomial' and 'continuous' draw from the 'mask' stream.
      valid: optional (B, T) bool, the timestamps of a fixed-length window that belong to
        the series (see the module docstring); the output is zero outside them.

    Returns:
      (B, T, output_dims) representations.
    """
    if x.ndim != 3:
      raise ValueError(f"x must have shape (batch, time, input_dims), got {x.shape}.")
    batch, steps, input_dims = x.shape
    if valid is not None and valid.shape != (batch, steps):
      raise ValueError(f"valid must have shape (B, T) = {(batch, steps)}, got {valid.shape}.")
    present = ~jnp.any(jnp.isnan(x), axis=-1)
    x = jnp.where(present[..., None], x, 0).astype(self.dtype)
    x = nn.Dense(
      self.hidden_dims,
      dtype=self.dtype,
      kernel_init=_torch_kernel_init(),
      bias_init=_torch_bias_init(input_dims),
      name="input_fc",
    )(x)
    keep = self._timestamp_mask(mask, train, (batch, steps)) & present
    if valid is not None:
      keep = keep & valid
    # Readable with `mutable=["intermediates"]`; a no-op otherwise.
    self.sow("intermediates", "keep", keep)
    x = jnp.where(keep[..., None], x, 0)
    widths = [self.hidden_dims] * self.depth + [self.output_dims]
    for i, features in enumerate(widths):
      x = ConvBlock(
        features,
        self.kernel_size,
        2**i,
        final=i == len(widths) - 1,
        dtype=self.dtype,
        name=f"block{i}",
      )(x, valid)
    x = nn.Dropout(self.dropout_rate, name="repr_dropout")(x, deterministic=not train)
    return x if valid is None else jnp.where(valid[..., None], x, 0)

  def _timestamp_mask(
    self, mask: str | jax.Array | None, train: bool, shape: tuple[int, int]
  ) -> jax.Array:
    if mask is None:
      mask = self.mask_mode if train else "all_true"
    if not isinstance(mask, str):
      if mask.shape != shape:
        raise ValueError(f"mask must have shape (B, T) = {shape}, got {mask.shape}.")
      return jnp.asarray(mask, bool)
    random = mask in ("binomial", "continuous")
    return timestamp_mask(mask, self.make_rng("mask") if random else None, shape)
