"""Tests for cljax.data.augment against float64 NumPy references written here."""

import colorsys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.data import augment

# float32 ops against float64 references on values in [0, 1].
ATOL = 1e-5

NO_AUG = dict(color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
ALL_ON = dict(color_jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5, solarize_prob=0.2)
JITTER_ONLY = {**NO_AUG, "color_jitter_prob": 1.0}


# Jitted once per configuration and shape; eager runs dispatch op by op and are slow.
_augment = jax.jit(
  augment.photometric_augment,
  static_argnames=(
    "color_strength",
    "color_jitter_prob",
    "grayscale_prob",
    "blur_prob",
    "solarize_prob",
  ),
)


@jax.jit
def _augment_one(image: jax.Array, key: jax.Array) -> jax.Array:
  return augment.apply_params(image, augment.sample_params(key, **ALL_ON))


def _image(seed: int = 0, size: int = 8) -> np.ndarray:
  # Away from 0 and 1 so that no hue ties or clipping make a reference ambiguous.
  return np.random.default_rng(seed).uniform(0.05, 0.95, (size, size, 3))


def _batch(b: int, size: int = 24, seed: int = 0) -> jax.Array:
  images = np.random.default_rng(seed).uniform(0.0, 1.0, (b, size, size, 3))
  return jnp.asarray(images, jnp.float32)


def _keys(b: int, step: int = 0) -> jax.Array:
  return augment.example_keys(jax.random.key(42), jnp.int32(step), jnp.arange(b))


# NumPy references, float64 and independent of pix.


def _np_brightness(x, factor):
  return x * factor


def _np_contrast(x, factor):
  mean = x.mean(axis=(0, 1), keepdims=True)  # Per channel, as tf.image.adjust_contrast.
  return (x - mean) * factor + mean


def _np_hsv_map(x, fn):
  out = np.empty_like(x)
  for i, j in np.ndindex(x.shape[:2]):
    h, s, v = colorsys.rgb_to_hsv(*x[i, j])
    out[i, j] = colorsys.hsv_to_rgb(*fn(h, s, v))
  return out


def _np_saturation(x, factor):
  return _np_hsv_map(x, lambda h, s, v: (h, min(max(s * factor, 0.0), 1.0), v))


def _np_hue(x, delta):
  return _np_hsv_map(x, lambda h, s, v: ((h + delta) % 1.0, s, v))


def _np_grayscale(x):
  luma = x @ np.array([0.2989, 0.5870, 0.1140])  # tf.image.rgb_to_grayscale's weights.
  return np.repeat(luma[..., None], 3, axis=-1)


def _np_blur(x, sigma, kernel_size):
  radius = kernel_size // 2
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  g = np.exp(-(t**2) / (2 * sigma**2))
  kernel = np.outer(g, g) / g.sum() ** 2
  h, w, _ = x.shape
  padded = np.pad(x, ((radius, radius), (radius, radius), (0, 0)))  # Zero padding ("SAME").
  out = np.zeros_like(x)
  for di, dj in np.ndindex(kernel.shape):
    out += kernel[di, dj] * padded[di : di + h, dj : dj + w]
  return out


def _np_solarize(x, threshold=0.5):
  return np.where(x < threshold, x, 1.0 - x)


_NP_JITTER = (_np_brightness, _np_contrast, _np_saturation, _np_hue)


def _np_color_jitter(x, order, factors):
  for op in order:
    x = np.clip(_NP_JITTER[op](x, factors[op]), 0.0, 1.0)
  return x


def _run(fn, x, *args):
  return np.asarray(fn(jnp.asarray(x, jnp.float32), *args), np.float64)


# Single-image ops.


@pytest.mark.parametrize("factor", [0.3, 1.7])
def test_brightness_is_multiplicative(factor):
  x = _image()
  np.testing.assert_allclose(
    _run(augment.adjust_brightness, x, factor), _np_brightness(x, factor), atol=ATOL
  )


@pytest.mark.parametrize("factor", [0.2, 1.8])
def test_contrast_matches_numpy(factor):
  x = _image()
  np.testing.assert_allclose(
    _run(augment.adjust_contrast, x, factor), _np_contrast(x, factor), atol=ATOL
  )


@pytest.mark.parametrize("factor", [0.0, 0.4, 1.6, 5.0])
def test_saturation_matches_colorsys(factor):
  x = _image()
  np.testing.assert_allclose(
    _run(augment.adjust_saturation, x, factor), _np_saturation(x, factor), atol=ATOL
  )


@pytest.mark.parametrize("delta", [-0.2, 0.07, 0.5])
def test_hue_matches_colorsys(delta):
  x = _image()
  np.testing.assert_allclose(_run(augment.adjust_hue, x, delta), _np_hue(x, delta), atol=ATOL)


def test_grayscale_matches_rec601():
  x = _image()
  np.testing.assert_allclose(_run(augment.to_grayscale, x), _np_grayscale(x), atol=ATOL)


@pytest.mark.parametrize(("sigma", "kernel_size"), [(0.1, 3), (1.3, 5), (2.0, 7), (0.7, 1)])
def test_blur_matches_numpy_convolution(sigma, kernel_size):
  x = _image(size=16)
  got = _run(augment.gaussian_blur, x, sigma, kernel_size)
  np.testing.assert_allclose(got, _np_blur(x, sigma, kernel_size), atol=ATOL)


def test_blur_kernel_size_is_tenth_of_side_and_odd():
  assert augment.blur_kernel_size(224) == 23
  assert augment.blur_kernel_size(32) == 3
  assert augment.blur_kernel_size(8) == 1
  # An even kernel size is rounded up, as in SimCLR: 22 taps asked -> 23 applied.
  x = _image(size=32)
  np.testing.assert_allclose(
    _run(augment.gaussian_blur, x, 1.5, 22), _np_blur(x, 1.5, 23), atol=ATOL
  )


def test_solarize_matches_numpy():
  x = np.random.default_rng(0).uniform(0.0, 1.0, (8, 8, 3))
  x[0, 0] = 0.5  # The threshold itself is inverted.
  np.testing.assert_allclose(_run(augment.solarize, x), _np_solarize(x), atol=ATOL)
  assert _run(augment.solarize, x)[0, 0, 0] == 0.5


# Colour jitter.

FACTORS = np.array([1.5, 0.6, 1.7, 0.15])


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)])
def test_color_jitter_applies_ops_in_the_given_order(order):
  x = _image()
  got = _run(augment.color_jitter, x, jnp.array(order), jnp.asarray(FACTORS, jnp.float32))
  np.testing.assert_allclose(got, _np_color_jitter(x, order, FACTORS), atol=ATOL)


def test_color_jitter_order_changes_the_result():
  x = _image()
  factors = jnp.asarray(FACTORS, jnp.float32)
  a = _run(augment.color_jitter, x, jnp.array([0, 1, 2, 3]), factors)
  b = _run(augment.color_jitter, x, jnp.array([3, 2, 1, 0]), factors)
  assert np.abs(a - b).max() > 1e-2


def test_float32_images_stay_float32_under_x64():
  # The draws are float32 with float64 enabled too: float64 ones promoted some ops (a
  # TypeError in the switch over the jitter ops, and in the blur's convolution).
  with jax.enable_x64(True):
    got = augment.photometric_augment(_batch(4), _keys(4), **ALL_ON)
  assert got.dtype == jnp.float32


def test_sampled_orders_are_random_permutations_and_factors_in_range():
  keys = jax.random.split(jax.random.key(0), 256)
  orders, factors = jax.jit(jax.vmap(augment.sample_color_jitter))(keys)
  orders, factors = np.asarray(orders), np.asarray(factors)
  np.testing.assert_array_equal(np.sort(orders, axis=1), np.tile(np.arange(4), (256, 1)))
  # 256 draws over 24 orders: missing more than 4 has probability ~1e-15.
  assert len({tuple(o) for o in orders}) >= 20
  assert set(orders[:, 0]) == {0, 1, 2, 3}
  assert np.all((factors[:, :3] >= 0.2) & (factors[:, :3] <= 1.8))
  assert np.all(np.abs(factors[:, 3]) <= 0.2)
  # The full range is used, not a constant.
  assert factors[:, :3].min() < 0.3 and factors[:, :3].max() > 1.7
  assert factors[:, 3].min() < -0.18 and factors[:, 3].max() > 0.18


@pytest.mark.parametrize("strength", [0.5, 1.5])
def test_color_strength_scales_the_factor_ranges(strength):
  keys = jax.random.split(jax.random.key(0), 256)
  _, factors = jax.jit(jax.vmap(lambda k: augment.sample_color_jitter(k, strength)))(keys)
  factors = np.asarray(factors)
  low, high = max(1 - 0.8 * strength, 0.0), 1 + 0.8 * strength
  assert np.all((factors[:, :3] >= low) & (factors[:, :3] <= high))
  assert np.all(np.abs(factors[:, 3]) <= 0.2 * strength)
  assert factors[:, :3].max() > high - 0.05 and factors[:, 3].max() > 0.18 * strength


def test_color_strength_zero_is_the_identity():
  order, factors = augment.sample_color_jitter(jax.random.key(1), 0.0)
  np.testing.assert_array_equal(factors, [1.0, 1.0, 1.0, 0.0])
  x = _image()
  np.testing.assert_allclose(_run(augment.color_jitter, x, order, factors), x, atol=ATOL)


# Sampling.


def test_sample_params_follows_the_probabilities():
  keys = jax.random.split(jax.random.key(0), 4000)
  params = jax.jit(jax.vmap(lambda k: augment.sample_params(k, **ALL_ON)))(keys)
  # 4000 draws: the standard error of a rate is at most 0.008; 0.04 is 5 sigma.
  assert abs(np.mean(params.jitter) - 0.8) < 0.04
  assert abs(np.mean(params.grayscale) - 0.2) < 0.04
  assert abs(np.mean(params.blur) - 0.5) < 0.04
  assert abs(np.mean(params.solarize) - 0.2) < 0.04
  sigma = np.asarray(params.sigma)
  assert sigma.min() >= 0.1 and sigma.max() <= 2.0
  assert sigma.min() < 0.2 and sigma.max() > 1.9


def test_disabling_an_op_leaves_the_other_draws_unchanged():
  key = jax.random.key(3)
  full = augment.sample_params(key, **ALL_ON)
  part = augment.sample_params(key, **{**ALL_ON, "blur_prob": 0.0, "grayscale_prob": 0.0})
  assert part.blur is None and part.sigma is None and part.grayscale is None
  np.testing.assert_array_equal(full.order, part.order)
  np.testing.assert_array_equal(full.factors, part.factors)
  assert bool(full.jitter) == bool(part.jitter)
  assert bool(full.solarize) == bool(part.solarize)


# photometric_augment. Images are 24 px so that the blur kernel (10% of 24 -> 3 taps) is not a
# no-op, and most tests share one shape and configuration to reuse one compilation.


def test_output_shape_dtype_and_range():
  images = _batch(8)
  out = _augment(images, _keys(8), **ALL_ON)
  assert out.shape == images.shape and out.dtype == jnp.float32
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.mark.parametrize("b", [1, 8])
def test_batch_matches_per_example_params(b):
  images, keys = _batch(b), _keys(b)
  out = np.asarray(_augment(images, keys, **ALL_ON))
  expected = np.stack([_augment_one(images[i], keys[i]) for i in range(b)])
  np.testing.assert_allclose(out, expected, atol=1e-6)
  if b == 8:  # Not the identity.
    changed = np.abs(out - np.asarray(images)).max(axis=(1, 2, 3)) > 1e-3
    assert changed.any()


def test_eager_matches_jit():
  images, keys = _batch(8), _keys(8)
  eager = augment.photometric_augment(images, keys, **ALL_ON)
  # Values in [0, 1] through some twenty float32 operations, fused differently under jit:
  # a few ulps of 1 (7 measured on one CPU); 32 float32 eps allows for other kernels. A
  # wrong parameter or order moves pixels by > 1e-2 (test_color_jitter_order_changes_...).
  atol = 32 * np.finfo(np.float32).eps
  np.testing.assert_allclose(eager, _augment(images, keys, **ALL_ON), atol=atol)


def test_deterministic_for_the_same_keys_and_different_for_others():
  images = _batch(8)
  a = _augment(images, _keys(8, step=0), **ALL_ON)
  b = _augment(images, _keys(8, step=0), **ALL_ON)
  c = _augment(images, _keys(8, step=1), **ALL_ON)
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2
  # The same image with different keys gets different views (jitter always on,
  # since otherwise some views are left unchanged).
  same = jnp.broadcast_to(images[:1], images.shape)
  views = np.asarray(_augment(same, _keys(8), **JITTER_ONLY))
  assert np.abs(views[0] - views[1:]).max(axis=(1, 2, 3)).min() > 1e-3


def test_all_probabilities_zero_is_the_identity():
  images = _batch(8)
  out = augment.photometric_augment(images, _keys(8), **NO_AUG)
  np.testing.assert_array_equal(out, images)
  out = _augment(images, _keys(8), **NO_AUG)
  np.testing.assert_array_equal(out, images)


def test_grayscale_always_gives_equal_channels():
  images = _batch(8)
  out = np.asarray(_augment(images, _keys(8), **{**NO_AUG, "grayscale_prob": 1.0}))
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  np.testing.assert_allclose(out, np.stack([_np_grayscale(x) for x in images]), atol=ATOL)


def test_solarize_always_matches_numpy():
  images = _batch(8)
  out = _augment(images, _keys(8), **{**NO_AUG, "solarize_prob": 1.0})
  np.testing.assert_allclose(out, _np_solarize(np.asarray(images, np.float64)), atol=ATOL)


def test_jitter_always_matches_numpy_with_the_sampled_order():
  images, keys = _batch(8), _keys(8)
  out = np.asarray(_augment(images, keys, **JITTER_ONLY))
  params = jax.vmap(lambda k: augment.sample_params(k, **JITTER_ONLY))(keys)
  for i in range(8):
    x = np.asarray(images[i], np.float64)
    order, factors = np.asarray(params.order[i]), np.asarray(params.factors[i], np.float64)
    np.testing.assert_allclose(out[i], _np_color_jitter(x, order, factors), atol=ATOL)


@pytest.mark.parametrize(("size", "kernel_size"), [(24, 3), (224, 23)])
def test_blur_always_matches_numpy(size, kernel_size):
  images, keys = _batch(2, size=size), _keys(2)
  cfg = {**NO_AUG, "blur_prob": 1.0}
  out = np.asarray(_augment(images, keys, **cfg))
  sigmas = jax.vmap(lambda k: augment.sample_params(k, **cfg).sigma)(keys)
  for i in range(2):
    expected = _np_blur(np.asarray(images[i], np.float64), float(sigmas[i]), kernel_size)
    np.testing.assert_allclose(out[i], expected, atol=ATOL)


def test_compiles_once_and_does_not_loop_over_the_batch():
  fn = lambda x, k: augment.photometric_augment(x, k, **ALL_ON)
  counted = jax.jit(chex.assert_max_traces(fn, n=1))
  images = _batch(8)
  counted(images, _keys(8, step=0))
  counted(images + 0.0, _keys(8, step=1))  # New values, same shapes: no retrace.
  # A Python loop over examples would grow the program with the batch size.
  jaxpr = lambda b: jax.make_jaxpr(fn)(_batch(b), _keys(b))
  assert len(jaxpr(1).eqns) == len(jaxpr(8).eqns)


def test_shard_map_matches_single_device():
  mesh = jax.make_mesh((8,), ("data",))
  spec = jax.sharding.PartitionSpec("data")
  fn = lambda x, k: augment.photometric_augment(x, k, **ALL_ON)
  sharded = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec), out_specs=spec))
  images, keys = _batch(16), _keys(16)
  put = lambda a: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))
  expected = np.stack([_augment_one(images[i], keys[i]) for i in range(16)])
  # One image eagerly against the sharded batch under jit: the same bound as
  # test_eager_matches_jit (4.5 ulps of 1 measured with the suite's XLA flags, 0 with XLA's
  # defaults).
  atol = 32 * np.finfo(np.float32).eps
  np.testing.assert_allclose(sharded(put(images), put(keys)), expected, atol=atol)


def test_rejects_bad_arguments():
  images = _batch(2)
  with pytest.raises(ValueError, match="one key per image"):
    augment.photometric_augment(images, _keys(3))
  with pytest.raises(ValueError, match=r"\(batch, H, W, 3\)"):
    augment.photometric_augment(images[..., :1], _keys(2))
  with pytest.raises(ValueError, match="blur_prob"):
    augment.photometric_augment(images, _keys(2), blur_prob=1.5)
  with pytest.raises(ValueError, match="dtype"):
    augment.photometric_augment(images.astype(jnp.uint8), _keys(2))


# example_keys.


def test_example_keys_depend_on_step_and_global_index():
  rng = jax.random.key(0)
  data = lambda k: np.asarray(jax.random.key_data(k))
  keys = augment.example_keys(rng, jnp.int32(5), jnp.arange(4))
  assert keys.shape == (4,)
  np.testing.assert_array_equal(data(keys), data(augment.example_keys(rng, 5, jnp.arange(4))))
  expected = jax.random.fold_in(jax.random.fold_in(rng, 5), 2)
  np.testing.assert_array_equal(data(keys[2]), data(expected))
  # Only the global index matters, not the position in the local batch.
  swapped = augment.example_keys(rng, jnp.int32(5), jnp.array([3, 2]))
  np.testing.assert_array_equal(data(swapped), data(keys[jnp.array([3, 2])]))
  # All different across indices and across steps.
  other_step = augment.example_keys(rng, jnp.int32(6), jnp.arange(4))
  rows = {tuple(r) for r in np.concatenate([data(keys), data(other_step)])}
  assert len(rows) == 8
