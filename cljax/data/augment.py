"""SimCLR's photometric augmentations as jittable JAX functions, run on device in the train step.

Colour jitter (brightness, contrast, saturation and hue in a random order per
example), random grayscale, Gaussian blur and solarization, following SimCLR
(Chen et al. 2020, appendix A, and its ``data_util.py``) with BYOL's solarize.
Geometric augmentation (random resized crop, flip) happens before, in the input
pipeline (host: ``pipeline.random_view``; device-resident: ``crops.views_from_uniforms``),
as ``views.ViewSpec`` describes; this module only changes pixel values.

Usage inside a train step (``Method.views``): each example's keys come from its
``aug_seed``, drawn by the pipeline from the example's place in the shuffled stream, so
its augmentation does not depend on the sharding:

    keys = augment.example_keys(rng, state.step, batch["aug_seed"])
    x = augment.photometric(batch["view_a"].astype(jnp.float32) / 255.0, keys, config.data.augment)

Randomness is split in two halves so that every draw can be inspected and
tested: ``sample_params`` turns one key into an ``AugmentParams`` record,
``apply_params`` applies it to one image, and ``photometric_augment`` vmaps the
two over the batch. The single-image ops take explicit parameters and match
``tf.image`` (which SimCLR uses); only brightness differs from ``dm_pix``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import dm_pix as pix
import jax
import jax.numpy as jnp

# Positions of the colour-jitter ops in `order` and `factors`.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
NUM_JITTER_OPS = 4

SOLARIZE_THRESHOLD = 0.5
BLUR_SIGMA_RANGE = (0.1, 2.0)


class AugmentParams(NamedTuple):
  """The random draws for one example. A field is None when its op is disabled statically.

  Attributes:
    jitter: () bool, whether colour jitter is applied.
    order: (4,) int32, a permutation of (BRIGHTNESS, CONTRAST, SATURATION, HUE).
    factors: (4,) float32 indexed by op: brightness, contrast and saturation
      factors, and the hue delta.
    grayscale: () bool, whether the image is turned to grayscale.
    blur: () bool, whether the image is blurred.
    sigma: () float32, the blur's standard deviation in pixels.
    solarize: () bool, whether the image is solarized.
  """

  jitter: jax.Array | None
  order: jax.Array | None
  factors: jax.Array | None
  grayscale: jax.Array | None
  blur: jax.Array | None
  sigma: jax.Array | None
  solarize: jax.Array | None


def example_keys(rng: jax.Array, step: jax.Array, indices: jax.Array) -> jax.Array:
  """Derives one key per example from the run key, the step and the global example index.

  Because the key depends on the example's global index and not its position in
  the local batch, the augmentation is the same however the batch is sharded.

  Args:
    rng: the run's PRNG key (typed, or a raw uint32 key).
    step: () integer, the training step.
    indices: (b,) integer global example indices.

  Returns:
    (b,) keys, ``fold_in(fold_in(rng, step), index)`` for each index ((b, 2)
    uint32 for a raw key).
  """
  step_key = jax.random.fold_in(rng, step)
  return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(indices)


def adjust_brightness(image: jax.Array, factor: jax.Array | float) -> jax.Array:
  """Multiplies every pixel by ``factor``, unclipped.

  This is SimCLR v2's brightness (``impl='simclrv2'``, the default); ``pix.adjust_brightness``
  is SimCLR v1's additive ``tf.image.adjust_brightness``, hence our own.

  Args:
    image: (H, W, 3) float image in [0, 1].
    factor: () the multiplicative factor.

  Returns:
    (H, W, 3) the brightness-adjusted image, possibly outside [0, 1].
  """
  return image * jnp.asarray(factor, image.dtype)


def adjust_contrast(image: jax.Array, factor: jax.Array | float) -> jax.Array:
  """Scales each channel's deviation from its spatial mean by ``factor``, unclipped.

  As ``tf.image.adjust_contrast`` (used by SimCLR), the mean is per channel;
  torchvision's ColorJitter uses the grayscale mean instead.

  Args:
    image: (H, W, 3) float image in [0, 1].
    factor: () the contrast factor.

  Returns:
    (H, W, 3) the contrast-adjusted image, possibly outside [0, 1].
  """
  return pix.adjust_contrast(image, factor)


def adjust_saturation(image: jax.Array, factor: jax.Array | float) -> jax.Array:
  """Multiplies the HSV saturation by ``factor``, clipped to [0, 1] (``tf.image``'s rule).

  Args:
    image: (H, W, 3) float image in [0, 1].
    factor: () the saturation factor.

  Returns:
    (H, W, 3) the saturation-adjusted image.
  """
  return pix.adjust_saturation(image, factor)


def adjust_hue(image: jax.Array, delta: jax.Array | float) -> jax.Array:
  """Rotates the HSV hue by ``delta`` (a fraction of the full circle), as ``tf.image``.

  Args:
    image: (H, W, 3) float image in [0, 1].
    delta: () the hue shift, in [-1, 1].

  Returns:
    (H, W, 3) the hue-adjusted image.
  """
  return pix.adjust_hue(image, delta)


def to_grayscale(image: jax.Array) -> jax.Array:
  """Converts to luma with ``tf.image``'s Rec. 601 weights (0.2989, 0.5870, 0.1140).

  Args:
    image: (H, W, 3) float image in [0, 1].

  Returns:
    (H, W, 3) the grayscale image replicated to three equal channels.
  """
  return pix.rgb_to_grayscale(image, keep_dims=True)


def gaussian_blur(image: jax.Array, sigma: jax.Array | float, kernel_size: int) -> jax.Array:
  """Blurs with a separable Gaussian kernel and zero padding, as SimCLR and BYOL do.

  Zero padding darkens a border of about ``2 * sigma`` pixels slightly; we keep
  it to match the reference implementations (torchvision reflects instead).

  Args:
    image: (H, W, 3) float image in [0, 1].
    sigma: () the standard deviation in pixels.
    kernel_size: static kernel side; the kernel has ``2 * (kernel_size // 2) + 1``
      taps, so an even size is rounded up to the next odd one.

  Returns:
    (H, W, 3) the blurred image.
  """
  return pix.gaussian_blur(image, sigma, kernel_size, padding="SAME")


def solarize(image: jax.Array, threshold: float = SOLARIZE_THRESHOLD) -> jax.Array:
  """Inverts the pixels at or above ``threshold``: ``where(x < t, x, 1 - x)``.

  Args:
    image: (H, W, 3) float image in [0, 1].
    threshold: the inversion threshold.

  Returns:
    (H, W, 3) the solarized image.
  """
  return pix.solarize(image, threshold)


def blur_kernel_size(side: int) -> int:
  """SimCLR's blur kernel for an image side: 10% of it, made odd (224 -> 23, 32 -> 3)."""
  return 2 * ((side // 10) // 2) + 1


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(image: jax.Array, order: jax.Array, factors: jax.Array) -> jax.Array:
  """Applies the four colour ops in ``order``, clipping to [0, 1] after each (as SimCLR).

  Args:
    image: (H, W, 3) float image in [0, 1].
    order: (4,) integer permutation of (BRIGHTNESS, CONTRAST, SATURATION, HUE).
    factors: (4,) float, indexed by op: brightness, contrast and saturation
      factors, and the hue delta.

  Returns:
    (H, W, 3) the jittered image in [0, 1].
  """
  branches = [lambda x, f, op=op: jnp.clip(op(x, f), 0.0, 1.0) for op in _JITTER_OPS]

  def body(position, x):
    op = order[position]
    # Under vmap a per-example `op` turns the switch into a select over all four
    # branches; that is 4x the arithmetic of one op, still cheap next to the model.
    return jax.lax.switch(op, branches, x, factors[op])

  return jax.lax.fori_loop(0, NUM_JITTER_OPS, body, image)


# Each example draws all its random numbers in one `uniform` call (one threefry
# evaluation): separate `split`/`permutation`/`bernoulli` calls each inline their
# own threefry, which made the sampler alone take over a second to compile.
_JITTER_DRAWS = 2 * NUM_JITTER_OPS  # Sort keys for the order, then the factors.
_COIN_DRAWS = 4  # Jitter, grayscale, blur, solarize.
_NUM_DRAWS = _JITTER_DRAWS + _COIN_DRAWS + 1  # And the blur sigma.


def _jitter_from_uniforms(u: jax.Array, color_strength: float) -> tuple[jax.Array, jax.Array]:
  # The argsort of iid uniforms is a uniformly random permutation (ties have
  # probability ~2^-23 and only bias the order, not the factors).
  order = jnp.argsort(u[:NUM_JITTER_OPS]).astype(jnp.int32)
  delta = 0.8 * color_strength
  hue = 0.2 * color_strength
  low = jnp.array([max(1.0 - delta, 0.0)] * 3 + [-hue], jnp.float32)
  high = jnp.array([1.0 + delta] * 3 + [hue], jnp.float32)
  factors = low + (high - low) * u[NUM_JITTER_OPS:_JITTER_DRAWS]
  return order, factors


def sample_color_jitter(key: jax.Array, color_strength: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Draws a random op order and SimCLR's factors for strength ``s``.

  Brightness, contrast and saturation factors are uniform in
  ``[max(1 - 0.8 s, 0), 1 + 0.8 s]`` (SimCLR clamps only brightness at 0;
  ``tf.image`` rejects negative contrast and saturation bounds, so we clamp all
  three); the hue delta is uniform in ``[-0.2 s, 0.2 s]``.

  Args:
    key: a PRNG key.
    color_strength: SimCLR's ``s``, a non-negative Python float.

  Returns:
    ``(order, factors)``: (4,) int32 permutation and (4,) float32 factors, as
    taken by ``color_jitter``.
  """
  return _jitter_from_uniforms(jax.random.uniform(key, (_JITTER_DRAWS,)), color_strength)


def sample_params(
  key: jax.Array,
  *,
  color_strength: float = 1.0,
  color_jitter_prob: float = 0.8,
  grayscale_prob: float = 0.2,
  blur_prob: float = 0.5,
  solarize_prob: float = 0.0,
) -> AugmentParams:
  """Draws one example's augmentation; an op with probability 0 gets None fields.

  Each draw has a fixed slot in one uniform vector, so disabling one op leaves
  the draws of the others unchanged.

  Args:
    key: one example's PRNG key.
    color_strength: SimCLR's colour-jitter strength ``s``.
    color_jitter_prob: probability of colour jitter.
    grayscale_prob: probability of grayscale.
    blur_prob: probability of Gaussian blur, sigma uniform in [0.1, 2.0].
    solarize_prob: probability of solarization.

  Returns:
    The example's ``AugmentParams``.
  """
  u = jax.random.uniform(key, (_NUM_DRAWS,), jnp.float32)  # float32 under x64 too.
  order, factors = _jitter_from_uniforms(u[:_JITTER_DRAWS], color_strength)
  coins = u[_JITTER_DRAWS : _JITTER_DRAWS + _COIN_DRAWS]
  low, high = BLUR_SIGMA_RANGE
  sigma = low + (high - low) * u[-1]
  jitter_on, blur_on = color_jitter_prob > 0, blur_prob > 0

  def coin(i, p):
    # `u < p` with u in [0, 1): p = 0 is never true and p = 1 always is.
    return coins[i] < p if p > 0 else None

  return AugmentParams(
    jitter=coin(0, color_jitter_prob),
    order=order if jitter_on else None,
    factors=factors if jitter_on else None,
    grayscale=coin(1, grayscale_prob),
    blur=coin(2, blur_prob),
    sigma=sigma if blur_on else None,
    solarize=coin(3, solarize_prob),
  )


def apply_params(image: jax.Array, params: AugmentParams) -> jax.Array:
  """Applies jitter, grayscale, blur and solarize (BYOL's order) to one image.

  Args:
    image: (H, W, 3) float32 image in [0, 1].
    params: the example's draws from ``sample_params``.

  Returns:
    (H, W, 3) float32 augmented image in [0, 1].
  """
  # Ops are computed and then selected with `where`: under vmap a `lax.cond`
  # would compute both branches anyway, and `where` keeps the skip exact.
  if params.jitter is not None:
    image = jnp.where(params.jitter, color_jitter(image, params.order, params.factors), image)
  if params.grayscale is not None:
    image = jnp.where(params.grayscale, to_grayscale(image), image)
  # SimCLR sizes the kernel from the height only; a 1-tap kernel is the identity.
  kernel_size = blur_kernel_size(image.shape[0])
  if params.blur is not None and kernel_size > 1:
    blurred = gaussian_blur(image, params.sigma, kernel_size)
    image = jnp.where(params.blur, blurred, image)
  if params.solarize is not None:
    image = jnp.where(params.solarize, solarize(image), image)
  return jnp.clip(image, 0.0, 1.0)


def _check_args(images: jax.Array, keys: jax.Array, probs: dict[str, float], strength: float):
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must have shape (batch, H, W, 3), got shape {images.shape}.")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images must be floats in [0, 1], got dtype {images.dtype}.")
  if keys.shape[0] != images.shape[0]:
    raise ValueError(
      f"need one key per image: keys have shape {keys.shape}, images {images.shape}."
    )
  for name, p in probs.items():
    if not 0.0 <= p <= 1.0:
      raise ValueError(f"{name} must be in [0, 1], got {p!r}.")
  if not strength >= 0.0:
    raise ValueError(f"color_strength must be >= 0, got {strength!r}.")


def photometric_augment(
  images: jax.Array,
  keys: jax.Array,
  *,
  color_strength: float = 1.0,
  color_jitter_prob: float = 0.8,
  grayscale_prob: float = 0.2,
  blur_prob: float = 0.5,
  solarize_prob: float = 0.0,
) -> jax.Array:
  """SimCLR's photometric augmentation of a batch, one independent draw per example.

  The probabilities and strength are static Python floats; an op with
  probability 0 is not even computed, and with all of them 0 the function
  returns the images (clipped to [0, 1]) unchanged.

  Args:
    images: (b, H, W, 3) float images in [0, 1].
    keys: (b,) PRNG keys, one per example (see ``example_keys``).
    color_strength: SimCLR's ``s``: brightness, contrast and saturation factors
      within ``1 +- 0.8 s``, hue delta within ``+-0.2 s``.
    color_jitter_prob: probability of colour jitter (random op order).
    grayscale_prob: probability of grayscale.
    blur_prob: probability of Gaussian blur, kernel 10% of the height, sigma
      uniform in [0.1, 2.0]; a no-op for images under 20 pixels high.
    solarize_prob: probability of solarization at 0.5 (BYOL's second view).

  Returns:
    (b, H, W, 3) float32 augmented images in [0, 1].

  Raises:
    ValueError: if the shapes, dtype, probabilities or strength are invalid.
  """
  probs = dict(
    color_jitter_prob=color_jitter_prob,
    grayscale_prob=grayscale_prob,
    blur_prob=blur_prob,
    solarize_prob=solarize_prob,
  )
  _check_args(images, keys, probs, color_strength)

  def augment_one(image, key):
    params = sample_params(key, color_strength=color_strength, **probs)
    return apply_params(image, params)

  return jax.vmap(augment_one)(images.astype(jnp.float32), keys)


# Per-channel ImageNet statistics; inputs arrive as uint8 and are normalised
# on device so that the host ships 4x fewer bytes.
_MEAN_RGB = (0.485, 0.456, 0.406)
_STDDEV_RGB = (0.229, 0.224, 0.225)


def normalize_images(images: jax.Array) -> jax.Array:
  """(b, h, w, 3) float images in [0, 1] -> zero-mean, unit-variance channels."""
  mean = jnp.asarray(_MEAN_RGB, jnp.float32)
  std = jnp.asarray(_STDDEV_RGB, jnp.float32)
  return (images - mean) / std


def photometric(
  images: jax.Array,
  keys: jax.Array,
  aug,
  *,
  blur_prob: float | None = None,
  solarize_prob: float | None = None,
) -> jax.Array:
  """The photometric augmentation a config's ``data.augment`` section describes.

  ``blur_prob``/``solarize_prob`` override the section's (a second view that
  is augmented differently, as in BYOL).
  """
  return photometric_augment(
    images,
    keys,
    color_strength=aug.color_strength,
    color_jitter_prob=aug.color_jitter_prob,
    grayscale_prob=aug.grayscale_prob,
    blur_prob=aug.blur_prob if blur_prob is None else blur_prob,
    solarize_prob=aug.solarize_prob if solarize_prob is None else solarize_prob,
  )


def network_inputs(
  images: jax.Array,
  aug: Any = None,
  rng: jax.Array | None = None,
  step: jax.Array | int = 0,
  seeds: jax.Array | None = None,
  **probs: float | None,
) -> jax.Array:
  """uint8 views -> what a network takes: floats in [0, 1], photometrically augmented, normalised.

  The one path from a batch's pixels to a network's input, for training (``Method.views``)
  and evaluation alike; evaluation's centre crops pass no ``aug`` and are only normalised.

  Args:
    images: (b, h, w, 3) uint8 views.
    aug: the config's ``data.augment`` section; None, or ``aug.photometric`` False, for no
      photometric augmentation.
    rng: the key of the augmentation, required with it.
    step: the training step.
    seeds: (b,) the examples' ``aug_seed``; default their positions in the batch. Each
      example's key is ``example_keys(rng, step, seeds)``.
    **probs: ``blur_prob``/``solarize_prob`` overrides, as ``photometric`` takes them.

  Returns:
    (b, h, w, 3) float32 normalised images.

  Raises:
    ValueError: photometric augmentation without ``rng``.
  """
  x = images.astype(jnp.float32) / 255.0
  if aug is not None and aug.photometric:
    if rng is None:
      raise ValueError("photometric augmentation needs an rng.")
    seeds = jnp.arange(x.shape[0]) if seeds is None else seeds
    x = photometric(x, example_keys(rng, step, seeds), aug, **probs)
  return normalize_images(x)
