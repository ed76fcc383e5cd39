"""cljax.data.ts_views: TS2Vec's crops on static shapes (compared only on their overlap, equal
to the official variable-length crops end to end) and TS-TCC's augmentations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.data import ts_views
from cljax.losses import ts2vec as ts2vec_losses
from cljax.models import ts2vec as ts2vec_models


def _draws(num, batch, ts_l, temporal_unit=0, seed=0):
  keys = jax.random.split(jax.random.key(seed), num)
  sample = jax.jit(
    jax.vmap(lambda k: ts_views.sample_crops(k, batch, ts_l, temporal_unit)),
  )
  return jax.tree.map(np.asarray, sample(keys))


def _np_take_per_row(a, indx, num_elem):
  """The official utils.take_per_row."""
  all_indx = indx[:, None] + np.arange(num_elem)
  return a[np.arange(all_indx.shape[0])[:, None], all_indx]


def _official_overlaps(x, crops):
  """``out1[:, -crop_l:]`` and ``out2[:, :crop_l]`` of the official fit(), identity encoder."""
  c = {name: np.asarray(v) for name, v in crops._asdict().items()}
  out1 = _np_take_per_row(x, c["crop_offset"] + c["crop_eleft"], c["crop_right"] - c["crop_eleft"])
  out2 = _np_take_per_row(x, c["crop_offset"] + c["crop_left"], c["crop_eright"] - c["crop_left"])
  return out1[:, -c["crop_l"] :], out2[:, : c["crop_l"]]


# -- The draws. --


@pytest.mark.parametrize("temporal_unit", [0, 1])
def test_crop_lengths_and_offsets_stay_in_range_over_many_draws(temporal_unit):
  num, batch, ts_l = 4000, 4, 12
  c = _draws(num, batch, ts_l, temporal_unit)
  shortest = 2 ** (temporal_unit + 1)
  assert np.all((shortest <= c.crop_l) & (c.crop_l <= ts_l))
  assert np.all(c.crop_right == c.crop_left + c.crop_l)
  assert np.all((0 <= c.crop_eleft) & (c.crop_eleft <= c.crop_left))
  assert np.all((c.crop_right <= c.crop_eright) & (c.crop_eright <= ts_l))
  start = c.crop_offset + c.crop_eleft[:, None]
  end = c.crop_offset + c.crop_eright[:, None]
  assert np.all(start >= 0) and np.all(end <= ts_l)
  # Every length the official randint can draw occurs, about uniformly.
  counts = np.bincount(c.crop_l, minlength=ts_l + 1)[shortest:]
  expected = num / len(counts)
  assert np.all(np.abs(counts - expected) < 0.25 * expected), counts
  # Offsets reach both extremes: a view touching t = 0 and one touching t = ts_l.
  assert start.min() == 0 and end.max() == ts_l


def test_sample_crops_rejects_a_series_shorter_than_the_shortest_overlap():
  ts_views.sample_crops(jax.random.key(0), 2, 4, temporal_unit=1)
  with pytest.raises(ValueError, match="shorter than the shortest overlap"):
    ts_views.sample_crops(jax.random.key(0), 2, 3, temporal_unit=1)


def test_take_per_row_equals_the_official_and_fills_outside():
  x = np.random.default_rng(0).normal(size=(5, 9, 2)).astype(np.float32)
  indx = np.array([0, 3, 4, 1, 2])
  np.testing.assert_array_equal(ts_views.take_per_row(x, indx, 5), _np_take_per_row(x, indx, 5))
  out = np.asarray(ts_views.take_per_row(x, np.array([-2, 7, 0, 0, 0]), 4, fill_value=-1.0))
  np.testing.assert_array_equal(out[0, :2], -1.0)
  np.testing.assert_array_equal(out[0, 2:], x[0, :2])
  np.testing.assert_array_equal(out[1, :2], x[1, 7:])
  np.testing.assert_array_equal(out[1, 2:], -1.0)


# -- THE KEY TEST: the crops are compared only on their overlap. --


def _stamped_series(batch, ts_l):
  """x[b, t] = (t, 1000 b): each value names its own timestamp and series."""
  t = np.arange(ts_l, dtype=np.float32)
  series = 1000.0 * np.arange(batch, dtype=np.float32)
  return np.stack(np.broadcast_arrays(t[None, :], series[:, None]), axis=-1)


def _holds_same_timestamps(z1, z2, valid):
  """Whether every valid row of both overlaps is the same timestamp of the same series."""
  z1, z2, valid = np.asarray(z1), np.asarray(z2), np.asarray(valid)
  return bool(np.all(z1[:, valid] == z2[:, valid]))


def test_crops_are_compared_only_on_their_overlap():
  batch, ts_l = 6, 20
  x = _stamped_series(batch, ts_l)

  @jax.jit
  def identity_pipeline(key, shift):
    crops = ts_views.sample_crops(key, batch, ts_l)
    views = ts_views.crop_views(x, crops)
    # The identity "encoder"; `shift` displaces view 2's outputs by that many steps.
    z2 = jnp.roll(views.view2, shift, axis=1)
    return crops, ts_views.overlap(views.view1, z2, crops)

  for seed in range(40):
    key = jax.random.key(seed)
    crops, (z1, z2, valid) = identity_pipeline(key, 0)
    crop_l = int(crops.crop_l)
    assert np.asarray(valid).tolist() == [i < crop_l for i in range(ts_l)]
    assert _holds_same_timestamps(z1, z2, valid)
    # The rows are the overlap's timestamps, crop_offset + crop_left + i, of the right series,
    # exactly the official out1[:, -crop_l:] and out2[:, :crop_l].
    expected_t = np.asarray(crops.crop_offset)[:, None] + int(crops.crop_left) + np.arange(crop_l)
    np.testing.assert_array_equal(z1[:, :crop_l, 0], expected_t)
    series = np.broadcast_to(1000.0 * np.arange(batch)[:, None], (batch, crop_l))
    np.testing.assert_array_equal(z1[:, :crop_l, 1], series)
    official1, official2 = _official_overlaps(x, crops)
    np.testing.assert_array_equal(z1[:, :crop_l], official1)
    np.testing.assert_array_equal(z2[:, :crop_l], official2)
    # Nothing outside the overlap: zeros, no NaN from the invalid window positions.
    assert np.all(np.asarray(z1)[:, crop_l:] == 0) and np.all(np.isfinite(z2))
    # The check fails when the alignment is off by one timestamp, either way.
    for shift in (1, -1):
      _, (w1, w2, w_valid) = identity_pipeline(key, shift)
      assert not _holds_same_timestamps(w1, w2, w_valid)


def test_views_hold_the_official_crops_at_their_valid_positions():
  batch, ts_l = 5, 16
  x = _stamped_series(batch, ts_l)
  c = _draws(30, batch, ts_l, seed=1)
  for i in range(30):
    crops = jax.tree.map(lambda a, i=i: a[i], c)
    views = jax.tree.map(np.asarray, ts_views.crop_views(x, crops))
    official1 = _np_take_per_row(
      x, crops.crop_offset + crops.crop_eleft, crops.crop_right - crops.crop_eleft
    )
    official2 = _np_take_per_row(
      x, crops.crop_offset + crops.crop_left, crops.crop_eright - crops.crop_left
    )
    np.testing.assert_array_equal(views.view1[views.valid1].reshape(official1.shape), official1)
    np.testing.assert_array_equal(views.view2[views.valid2].reshape(official2.shape), official2)
    # Each view is a window of its own: its crop fills its first positions.
    for view, valid, official in ((views.view1, views.valid1, official1),
                                  (views.view2, views.valid2, official2)):  # fmt: skip
      size = official.shape[1]
      assert valid[:, :size].all() and not valid[:, size:].any()
      np.testing.assert_array_equal(view[:, :size], official)
    assert np.all(np.isnan(views.view1[~views.valid1]))
    assert np.all(np.isnan(views.view2[~views.valid2]))


def test_shorter_windows_and_fronts_are_prefixes_of_the_full_length_ones():
  batch, ts_l = 4, 30
  x = _stamped_series(batch, ts_l)
  c = _draws(8, batch, ts_l, seed=5)
  z = np.random.default_rng(0).normal(size=(batch, ts_l, 3)).astype(np.float32)
  cut = jax.jit(ts_views.cut, static_argnums=2)
  front = jax.jit(ts_views.front, static_argnums=3)
  for i in range(8):
    crops = jax.tree.map(lambda a, i=i: jnp.asarray(a[i]), c)
    for window in ts_views.windows(crops):
      full_view, full_valid = cut(x, window, ts_l)
      full_front = np.asarray(front(jnp.asarray(z), window, crops.crop_l, ts_l))
      for length in range(int(window.size), ts_l + 1, 7):
        view, valid = cut(x, window, length)
        np.testing.assert_array_equal(valid, full_valid[:, :length])
        np.testing.assert_array_equal(view, full_view[:, :length])
        # The window's outputs at this length: the full-length ones where valid.
        short = jnp.where(valid[..., None], z[:, :length], 0)
        for out in (int(crops.crop_l), length):
          fronted = np.asarray(front(short, window, crops.crop_l, out))
          np.testing.assert_array_equal(fronted, full_front[:, :out])


def test_bucket_lengths_and_the_switch_take_the_shortest_length_that_holds_n():
  assert ts_views.bucket_lengths(427, 4) == (107, 214, 321, 427)
  assert ts_views.bucket_lengths(3, 8) == (1, 2, 3)  # Lengths that coincide are kept once.
  assert ts_views.bucket_lengths(150, 1) == (150,)
  with pytest.raises(ValueError, match="count >= 1"):
    ts_views.bucket_lengths(150, 0)
  lengths = (5, 10, 15)
  chosen = jax.jit(lambda n: ts_views.switch_on_length(lengths, n, lambda length: length))
  assert [int(chosen(n)) for n in (1, 5, 6, 10, 11, 15)] == [5, 5, 10, 10, 15, 15]
  # A masked loss at the chosen length equals it at the full length, gradients included.
  z = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 15, 3)), jnp.float32)

  def loss(z, n, lengths):
    def at(length, z):
      return ts2vec_losses.hierarchical_contrastive_loss(
        z[0, :, :length], z[1, :, :length], mask=jnp.arange(length) < n
      )

    return ts_views.switch_on_length(lengths, n, at, z)

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=2)
  for n in (2, 7, 15):
    value, grad = value_and_grad(z, n, lengths)
    full_value, full_grad = value_and_grad(z, n, (15,))
    np.testing.assert_allclose(value, full_value, rtol=1e-6)
    np.testing.assert_allclose(grad, full_grad, rtol=1e-5, atol=1e-7)


# -- End to end: static shapes == the official variable-length crops. --


def test_static_pipeline_equals_the_official_variable_length_step():
  """Encoder + crops + hierarchical loss: value and parameter gradients equal the official
  fit() step (variable-length crops, ``out1[:, -crop_l:]``, ``out2[:, :crop_l]``)."""
  batch, ts_l = 4, 24
  model = ts2vec_models.TSEncoder(hidden_dims=8, output_dims=6, depth=2, dropout_rate=0.0)
  x = np.random.default_rng(3).normal(size=(batch, ts_l, 2)).astype(np.float32)
  params = model.init(jax.random.key(0), x, train=False)

  @jax.jit
  def static_step(params, crops):
    def loss_fn(params):
      views = ts_views.crop_views(x, crops)
      z1 = model.apply(params, views.view1, train=False, valid=views.valid1)
      z2 = model.apply(params, views.view2, train=False, valid=views.valid2)
      z1, z2, valid = ts_views.overlap(z1, z2, crops)
      return ts2vec_losses.hierarchical_contrastive_loss(z1, z2, mask=valid)

    return jax.value_and_grad(loss_fn)(params)

  def official_step(params, crops):
    c = {name: np.asarray(v) for name, v in crops._asdict().items()}
    crop_l = int(c["crop_l"])
    x1 = _np_take_per_row(x, c["crop_offset"] + c["crop_eleft"], c["crop_right"] - c["crop_eleft"])
    x2 = _np_take_per_row(x, c["crop_offset"] + c["crop_left"], c["crop_eright"] - c["crop_left"])

    def loss_fn(params):
      out1 = model.apply(params, x1, train=False)[:, -crop_l:]
      out2 = model.apply(params, x2, train=False)[:, :crop_l]
      return ts2vec_losses.hierarchical_contrastive_loss(out1, out2)

    return jax.jit(jax.value_and_grad(loss_fn))(params)

  c = _draws(3, batch, ts_l, seed=7)
  for i in range(3):
    crops = jax.tree.map(lambda a, i=i: jnp.asarray(a[i]), c)
    value, grads = static_step(params, crops)
    expected_value, expected_grads = official_step(params, crops)
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    jax.tree.map(
      lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6), grads, expected_grads
    )


# -- TS-TCC's augmentations. --


def _batch_apply(fn, seed, x, **kwargs):
  keys = jax.random.split(jax.random.key(seed), x.shape[0])
  return np.asarray(jax.jit(jax.vmap(lambda k, s: fn(k, s, **kwargs)))(keys, x))


def test_jitter_adds_gaussian_noise():
  x = np.random.default_rng(0).normal(size=(64, 50, 3)).astype(np.float32)
  noise = _batch_apply(ts_views.jitter, 1, x, sigma=0.8) - x
  assert abs(noise.mean()) < 0.02 and abs(noise.std() - 0.8) < 0.02


def test_scaling_multiplies_each_channel_by_one_factor_around_two():
  x = np.random.default_rng(1).uniform(1.0, 2.0, size=(2000, 8, 3)).astype(np.float32)
  factor = _batch_apply(ts_views.scaling, 2, x, sigma=1.1) / x  # (B, T, C)
  np.testing.assert_allclose(factor, np.broadcast_to(factor[:, :1], factor.shape), rtol=1e-5)
  per_channel = factor[:, 0]
  assert abs(per_channel.mean() - 2.0) < 0.08 and abs(per_channel.std() - 1.1) < 0.05
  # Factors differ between channels and series.
  assert np.all(np.abs(np.diff(per_channel, axis=1)) > 0)


def _breaks(warp):
  """Where consecutive output steps are not consecutive input steps (cuts that show)."""
  return int(np.sum(np.diff(warp) != 1))


def _np_permutation(rng, steps, max_segments):
  """The official TS-TCC permutation on one series (seg_mode="random"): its warp."""
  orig_steps = np.arange(steps)
  num_segs = rng.integers(1, max_segments)
  if num_segs == 1:
    return orig_steps
  split_points = np.sort(rng.choice(steps - 2, num_segs - 1, replace=False))
  splits = np.split(orig_steps, split_points)
  return np.concatenate([splits[i] for i in rng.permutation(len(splits))])


def test_permutation_shuffles_segments_like_the_official():
  num, steps, max_segments = 4000, 10, 5
  x = np.broadcast_to(np.arange(steps, dtype=np.float32)[None, :, None], (num, steps, 2)).copy()
  x[..., 1] += 100.0
  out = _batch_apply(ts_views.permutation, 3, x, max_segments=max_segments)
  warp = out[..., 0].astype(int)
  # A permutation of the timestamps, the same for every channel.
  np.testing.assert_array_equal(
    np.sort(warp, axis=1), np.broadcast_to(np.arange(steps), warp.shape)
  )
  np.testing.assert_array_equal(out[..., 1], out[..., 0] + 100.0)
  # At most max_segments - 1 segments; the distribution of the visible cuts is the official's.
  got = np.bincount([_breaks(w) for w in warp], minlength=max_segments - 1) / num
  rng = np.random.default_rng(0)
  official = [_breaks(_np_permutation(rng, steps, max_segments)) for _ in range(num)]
  expected = np.bincount(official, minlength=max_segments - 1) / num
  assert len(got) == max_segments - 1, got
  np.testing.assert_allclose(got, expected, atol=0.035)
  assert np.all(got > 0.02)
  with pytest.raises(ValueError, match="max_segments"):
    ts_views.permutation(jax.random.key(0), x[0, :4], max_segments=5)


def test_weak_and_strong_augmentations_compose_the_official_ops():
  x = np.random.default_rng(4).normal(size=(12, 3)).astype(np.float32)
  key = jax.random.key(5)
  k1, k2 = jax.random.split(key)
  np.testing.assert_array_equal(ts_views.weak_augment(key, x), ts_views.scaling(k2, x, 1.1))
  np.testing.assert_allclose(
    ts_views.weak_augment(key, x, jitter_sigma=0.5),
    ts_views.scaling(k2, ts_views.jitter(k1, x, 0.5), 1.1),
    rtol=1e-6,
  )
  np.testing.assert_array_equal(
    ts_views.strong_augment(key, x, max_segments=8),
    ts_views.jitter(k2, ts_views.permutation(k1, x, 8), 0.8),
  )
  with pytest.raises(ValueError, match=r"one series of shape \(T, C\)"):
    ts_views.jitter(key, x[None])
