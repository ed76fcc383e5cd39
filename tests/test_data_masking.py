"""Tests for cljax.data.masking against a NumPy port of DINOv2's masking code written here."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage, stats

from cljax.data import masking

GRID = 16
NUM_PATCHES = GRID * GRID
# DINOv2's train.py: MaskingGenerator(max_num_patches=0.5 * num_patches).
MAX_NUM_PATCHES = 0.5 * NUM_PATCHES
BATCH = 16
NUM_BATCHES = 125  # 2,000 images, 1,000 of them masked.


# NumPy references: dinov2/data/masking.py `MaskingGenerator` and dinov2/data/collate.py
# `collate_data_and_cast`, with Python's `random` replaced by a np.random.Generator
# (random.uniform(a, b) is a + (b - a) * random(); random.randint(0, n) is integers(0, n + 1)).


def _uniform(rng, low, high):
  return low + (high - low) * rng.random()


def _np_mask(rng, mask, max_mask_patches, min_num_patches, log_aspect_ratio):
  """``MaskingGenerator._mask``: up to 10 rectangles, the first that adds patches is kept."""
  height, width = mask.shape
  delta = 0
  for _ in range(10):
    target_area = _uniform(rng, min_num_patches, max_mask_patches)
    aspect_ratio = math.exp(_uniform(rng, *log_aspect_ratio))
    h = int(round(math.sqrt(target_area * aspect_ratio)))
    w = int(round(math.sqrt(target_area / aspect_ratio)))
    if w < width and h < height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      num_masked = mask[top : top + h, left : left + w].sum()
      if 0 < h * w - num_masked <= max_mask_patches:
        delta += h * w - num_masked
        mask[top : top + h, left : left + w] = True
    if delta > 0:
      break
  return delta


def numpy_masking_generator(
  rng,
  input_size,
  num_masking_patches,
  *,
  min_num_patches=4,
  max_num_patches=None,
  min_aspect=0.3,
  max_aspect=None,
):
  """``MaskingGenerator(input_size, num_masking_patches, ...)(num_masking_patches)``."""
  height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
  max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
  max_aspect = max_aspect or 1 / min_aspect
  log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
  mask = np.zeros((height, width), bool)
  mask_count = 0
  while mask_count < num_masking_patches:
    max_mask_patches = min(num_masking_patches - mask_count, max_num_patches)
    delta = _np_mask(rng, mask, max_mask_patches, min_num_patches, log_aspect_ratio)
    if delta == 0:
      break
    mask_count += delta
  return mask


def numpy_collate_masks(rng, batch_size, grid, mask_ratio=(0.1, 0.5), mask_probability=0.5):
  """``collate_data_and_cast``'s masks: (B, H * W) bool, the first int(B p) stratified."""
  n_tokens = grid * grid
  n_samples_masked = int(batch_size * mask_probability)
  probs = np.linspace(*mask_ratio, n_samples_masked + 1, dtype=np.float32)  # torch.linspace
  masks = []
  for i in range(batch_size):
    target = int(n_tokens * _uniform(rng, probs[i], probs[i + 1])) if i < n_samples_masked else 0
    masks.append(numpy_masking_generator(rng, grid, target, max_num_patches=0.5 * n_tokens))
  masks = [masks[j] for j in rng.permutation(batch_size)]  # random.shuffle
  return np.stack(masks).reshape(batch_size, -1)


class _AttemptFeed:
  """Feeds (10, 4) attempt uniforms to ``_np_mask`` in place of its generator: attempt a's
  area and aspect from u[a, 0:2], its top and left from u[a, 2:4] (``add_block``'s layout)."""

  def __init__(self, u):
    self.u = np.asarray(u, np.float64)
    self.draws = 0

  def random(self):
    value = self.u[self.draws // 2, self.draws % 2]
    self.draws += 1
    self.placed = 0
    return value

  def integers(self, low, high):
    value = self.u[(self.draws - 1) // 2, 2 + self.placed]
    self.placed += 1
    return min(low + int(math.floor(value * (high - low))), high - 1)


@jax.jit
def _add_blocks(masks, u, max_mask_patches):
  log_aspect = (math.log(0.3), math.log(1 / 0.3))
  step = lambda m, v, r: masking.add_block(m, v, r, 4, log_aspect)
  return jax.vmap(step)(masks, u, max_mask_patches)


@jax.jit
def _many_batches(keys):
  return jax.vmap(lambda k: masking.block_masks(k, BATCH, GRID))(keys)


_masks = jax.jit(masking.block_masks, static_argnames=("batch_size", "grid", "mask_probability"))


@pytest.fixture(scope="module")
def mask_samples():
  """(NUM_BATCHES, BATCH, N) masks from cljax and from the NumPy reference."""
  keys = jax.random.split(jax.random.key(0), NUM_BATCHES)
  ours = np.asarray(_many_batches(keys))
  rng = np.random.default_rng(0)
  ref = np.stack([numpy_collate_masks(rng, BATCH, GRID) for _ in range(NUM_BATCHES)])
  return ours, ref


def _shape_stats(masks):
  """Per nonempty (H, W) mask: 4-connected components, bbox fill, |log bbox height / width|."""
  components, fill, log_aspect = [], [], []
  for mask in masks:
    rows, cols = np.nonzero(mask)
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    components.append(ndimage.label(mask)[1])
    fill.append(mask.sum() / (height * width))
    log_aspect.append(abs(math.log(height / width)))
  return {"components": components, "fill": fill, "abs_log_aspect": log_aspect}


def _assert_means_close(ours, ref, name, num_se=4.0):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  se = math.sqrt(ours.var(ddof=1) / ours.size + ref.var(ddof=1) / ref.size)
  diff = ours.mean() - ref.mean()
  assert abs(diff) < num_se * se, f"{name}: {ours.mean():.3f} vs {ref.mean():.3f} (se {se:.3f})"


def test_add_block_matches_reference_given_the_same_uniforms():
  rng = np.random.default_rng(1)
  n = 400
  starts = np.stack(
    [
      numpy_masking_generator(rng, GRID, int(rng.integers(0, 200)), max_num_patches=128)
      for _ in range(n)
    ]
  )
  u = np.asarray(jax.random.uniform(jax.random.key(1), (n, masking.BLOCK_ATTEMPTS, 4)))
  # Half the cases with few patches left, where all ten attempts often fail.
  remaining = np.where(np.arange(n) % 2, rng.integers(1, 129, n), rng.integers(1, 5, n))
  remaining = remaining.astype(np.float32)
  got_masks, got_delta = jax.device_get(_add_blocks(jnp.asarray(starts), u, remaining))
  for i in range(n):
    want = starts[i].copy()
    delta = _np_mask(_AttemptFeed(u[i]), want, remaining[i], 4, (math.log(0.3), math.log(1 / 0.3)))
    np.testing.assert_array_equal(got_masks[i], want, err_msg=f"case {i}")
    assert got_delta[i] == delta, f"case {i}"
  # The cases exercise both outcomes: a rectangle added, and ten attempts that all fail.
  assert 0 < np.mean(got_delta == 0) < 0.5


def test_exactly_the_official_number_of_images_is_masked(mask_samples):
  for masks in mask_samples:
    masked_per_batch = np.any(masks, axis=-1).sum(axis=-1)
    np.testing.assert_array_equal(masked_per_batch, int(BATCH * 0.5))


def test_masked_counts_are_stratified_like_collate(mask_samples):
  # collate's `upperbound`: the j-th smallest masked image has at most int(N * r_{j + 1}).
  bounds = np.linspace(0.1, 0.5, int(BATCH * 0.5) + 1, dtype=np.float32)[1:]
  upper = (NUM_PATCHES * bounds).astype(int)
  for masks in mask_samples:
    counts = np.sort(masks.sum(-1), axis=-1)[:, BATCH // 2 :]
    assert np.all(counts <= upper)
    # Stratified targets have a lower spread of the per-batch total than independent draws.
    assert counts.sum(-1).std() < 0.5 * counts.std() * math.sqrt(BATCH // 2)


def test_masked_counts_match_reference(mask_samples):
  ours, ref = (m.reshape(-1, NUM_PATCHES).sum(-1) for m in mask_samples)
  ours, ref = ours[ours > 0], ref[ref > 0]
  _assert_means_close(ours, ref, "masked patches")
  assert stats.ks_2samp(ours, ref).pvalue > 1e-3
  np.testing.assert_allclose(
    np.quantile(ours, [0.1, 0.5, 0.9]), np.quantile(ref, [0.1, 0.5, 0.9]), atol=6
  )
  # Uniform ratios in [0.1, 0.5] of 256 patches, truncated: mean ~ 76.3.
  assert 70 < ours.mean() < 83


def test_block_shapes_match_reference(mask_samples):
  ours, ref = (m.reshape(-1, GRID, GRID) for m in mask_samples)
  ours = _shape_stats(ours[ours.any(axis=(1, 2))])
  ref = _shape_stats(ref[ref.any(axis=(1, 2))])
  for name in ours:
    _assert_means_close(ours[name], ref[name], name)
  # Unions of a few rectangles, not scattered patches.
  assert 2.0 < np.mean(ours["components"]) < 3.5
  assert 0.4 < np.mean(ours["fill"]) < 0.55


def test_same_key_same_masks_and_other_key_other_masks():
  key = jax.random.key(3)
  a = _masks(key, batch_size=BATCH, grid=GRID)
  np.testing.assert_array_equal(a, _masks(key, batch_size=BATCH, grid=GRID))
  assert not np.array_equal(a, _masks(jax.random.key(4), batch_size=BATCH, grid=GRID))
  assert a.shape == (BATCH, NUM_PATCHES) and a.dtype == bool


def test_masks_do_not_depend_on_the_device_split():
  key = jax.random.fold_in(jax.random.key(5), 17)
  whole = _masks(key, batch_size=BATCH, grid=GRID)
  index = jnp.arange(BATCH, dtype=jnp.int32)
  halves = [_masks(key, batch_size=BATCH, grid=GRID, index=part) for part in jnp.split(index, 2)]
  np.testing.assert_array_equal(np.concatenate(halves), whole)
  shuffled = np.random.default_rng(0).permutation(BATCH).astype(np.int32)
  np.testing.assert_array_equal(
    _masks(key, batch_size=BATCH, grid=GRID, index=shuffled), np.asarray(whole)[shuffled]
  )


def test_mask_probability_zero_and_one():
  key = jax.random.key(6)
  assert not np.any(_masks(key, batch_size=8, grid=(6, 10), mask_probability=0.0))
  full = _masks(key, batch_size=8, grid=(6, 10), mask_probability=1.0)
  assert full.shape == (8, 60) and np.all(full.any(-1))


@pytest.mark.parametrize(
  "kwargs, name",
  [
    (dict(batch_size=0), "batch_size"),
    (dict(grid=(4, 0)), "grid"),
    (dict(grid=(4, 4, 4)), "grid"),
    (dict(mask_ratio=(0.5, 0.1)), "mask_ratio"),
    (dict(mask_ratio=(0.1, 1.5)), "mask_ratio"),
    (dict(mask_probability=1.5), "mask_probability"),
    (dict(min_num_patches=0), "min_num_patches"),
    (dict(max_num_patches=0.5), "max_num_patches"),
    (dict(min_aspect=0.0), "min_aspect"),
    (dict(min_aspect=0.5, max_aspect=0.4), "max_aspect"),
    (dict(index=jnp.zeros((2, 2), jnp.int32)), "index"),
    (dict(index=jnp.zeros(2)), "index"),
  ],
)
def test_invalid_arguments_raise(kwargs, name):
  kwargs = dict(dict(batch_size=4, grid=8), **kwargs)
  with pytest.raises(ValueError, match=name):
    masking.block_masks(jax.random.key(0), **kwargs)
