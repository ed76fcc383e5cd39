"""Multi-crop (SwAV, DINO) local views, on the host path and the device-resident path."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config, with_views

from cljax import methods, sharding
from cljax.data import augment, crops, device, pipeline, sources

# A small batch of 48x48 images; global views at 16 from (0.4, 1), four local views at 24.
N, SIDE, BATCH, VIEW, LOCAL, NUM_LOCAL = 16, 48, 8, 16, 24, 4
GLOBAL_AREA, LOCAL_AREA = (0.4, 1.0), (0.05, 0.4)
# Pixel (y, x) of example i is (STEP * x, STEP * y, STEP * i): a view shows where it was cut.
STEP = 5
SETTINGS = dict(
  seed=3,
  global_batch_size=BATCH,
  image_size=VIEW,
  crop_area=GLOBAL_AREA,
  num_local_crops=NUM_LOCAL,
  local_crop_size=LOCAL,
  local_crop_area=LOCAL_AREA,
)


def _coordinate_source():
  y, x = np.mgrid[0:SIDE, 0:SIDE]
  images = [np.stack([x, y, np.full_like(x, i)], -1) * STEP for i in range(N)]
  return sources.ArraySource(np.stack(images).astype(np.uint8), np.arange(N))


def _host(**kwargs):
  views, args = with_views(SETTINGS | kwargs)
  return pipeline.create_pretrain_iterator(_coordinate_source(), views, **args)


def _device(mesh, **kwargs):
  views, args = with_views(SETTINGS | kwargs)
  return device.create_device_iterator(_coordinate_source(), mesh, views, **args)


@pytest.fixture(scope="module")
def mesh8():
  return sharding.create_mesh()


@pytest.fixture(scope="module")
def batches(mesh8):
  """Two batches from each path, and the device path's state after the first."""
  host = _host()
  dev = _device(mesh8)
  first = next(dev)
  state = json.loads(json.dumps(dev.get_state()))
  return {
    "host": [next(host), next(host)],
    "device": jax.device_get([first, next(dev)]),
    "device_state": state,
    "device_iterator": dev,
  }


def _box(view):
  """(top, left, height, width, flipped) of the source region a view of the coordinate image
  shows, to within a pixel: resizing keeps the linear ramps linear, and output pixel o
  samples the crop at (o + 0.5) * length / size."""
  v = view.astype(float)
  size = v.shape[0]
  r, g = v[..., 0], v[..., 1]
  width = (r[:, -1].mean() - r[:, 0].mean()) / STEP * size / (size - 1)
  height = (g[-1].mean() - g[0].mean()) / STEP * size / (size - 1)
  left = min(r[:, 0].mean(), r[:, -1].mean()) / STEP + 0.5 - 0.5 * abs(width) / size
  top = g[0].mean() / STEP + 0.5 - 0.5 * height / size
  return top, left, height, abs(width), width < 0


@pytest.mark.parametrize("path", ["host", "device"])
def test_local_views_shapes_and_dtypes(batches, path):
  for batch in batches[path]:
    assert set(batch) == {"view_a", "view_b", "label", "aug_seed", "local_views"}
    assert batch["local_views"].shape == (BATCH, NUM_LOCAL, LOCAL, LOCAL, 3)
    assert batch["local_views"].dtype == np.uint8
    assert batch["view_a"].shape == batch["view_b"].shape == (BATCH, VIEW, VIEW, 3)


def test_without_local_crops_batches_are_as_before_and_global_views_do_not_depend_on_them(
  batches,
):
  plain = next(_host(num_local_crops=0))
  assert set(plain) == {"view_a", "view_b", "label", "aug_seed"}
  with_local = batches["host"][0]
  for key in plain:
    np.testing.assert_array_equal(plain[key], with_local[key], err_msg=key)


@pytest.mark.parametrize("path", ["host", "device"])
def test_local_views_are_crops_of_their_image_with_the_local_area(batches, path):
  boxes = {"local": [], "global": []}
  for batch in batches[path]:
    for i in range(BATCH):
      # The third channel names the example: every view shows its own image.
      label = int(batch["label"][i])
      assert np.all(batch["local_views"][i, ..., 2] == STEP * label)
      assert np.all(batch["view_a"][i, ..., 2] == STEP * label)
      locals_ = [_box(v) for v in batch["local_views"][i]]
      globals_ = [_box(batch[k][i]) for k in ("view_a", "view_b")]
      boxes["local"] += locals_
      boxes["global"] += globals_
      # Every view is a different region (or the same region mirrored).
      regions = [np.round(b[:4]).astype(int).tolist() + [b[4]] for b in locals_ + globals_]
      assert len({str(r) for r in regions}) == len(regions), regions
      for view in batch["local_views"][i]:
        # The ramps stay linear: the view is a resized crop of the source, not other pixels.
        r = view[..., 0].astype(float).mean(0)
        fit = np.polyval(np.polyfit(np.arange(LOCAL), r, 1), np.arange(LOCAL))
        assert np.abs(r - fit).max() < 3
  for kind, (low, high) in (("local", LOCAL_AREA), ("global", GLOBAL_AREA)):
    top, left, h, w, flipped = np.array(boxes[kind]).T
    # Inside the image, and of an area in range, to within a pixel of each side.
    assert np.all((top > -1) & (left > -1) & (top + h < SIDE + 1) & (left + w < SIDE + 1))
    area = np.array([(h - 1) * (w - 1), (h + 1) * (w + 1)]) / SIDE**2
    assert np.all(area[0] <= high) and np.all(area[1] >= low), (kind, area)
    fraction = h * w / SIDE**2
    # The whole range is used: the smallest and largest of 32 or 64 crops are near its ends.
    assert fraction.min() < low + 0.2 * (high - low) and fraction.max() > high - 0.2 * (high - low)
    assert 0.2 < flipped.mean() < 0.8


@pytest.mark.parametrize("path", ["host", "device"])
def test_local_views_differ_from_each_other(batches, path):
  for batch in batches[path]:
    local = batch["local_views"]
    for i in range(BATCH):
      for j in range(NUM_LOCAL):
        for k in range(j):
          assert not np.array_equal(local[i, j], local[i, k])


def test_host_local_views_are_deterministic_resume_and_do_not_depend_on_processes(batches):
  want = batches["host"]
  chex.assert_trees_all_equal(want, [next(it) for it in [_host()] for _ in range(2)])
  it = _host()
  next(it)
  state = json.loads(json.dumps(it.get_state()))
  restored = _host()
  restored.set_state(state)
  chex.assert_trees_all_equal(want[1], next(restored))
  # Process p of two reads the p-th half of the global batch's rows: the same records, the
  # same local views.
  for p in range(2):
    half = next(_host(process_index=p, process_count=2))
    n = len(half["aug_seed"])
    for key in want[0]:
      np.testing.assert_array_equal(half[key], want[0][key][p * n : (p + 1) * n], err_msg=key)


@pytest.mark.xla_default_codegen
def test_device_local_views_resume_and_do_not_depend_on_the_device_count(batches):
  # A state saved on eight devices resumes on one (a fresh build) with the same batches.
  one = _device(sharding.create_mesh(jax.devices()[:1]))
  one.set_state(batches["device_state"])
  chex.assert_trees_all_equal(batches["device"][1], jax.device_get(next(one)))
  # And rewinds the iterator that saved it.
  saver = batches["device_iterator"]
  saver.set_state(batches["device_state"])
  chex.assert_trees_all_equal(batches["device"][1], jax.device_get(next(saver)))


def test_states_with_and_without_local_crops_are_not_interchangeable(mesh8):
  with_local = _host().get_state()
  without = _host(num_local_crops=0).get_state()
  assert "num_local_crops" not in without["pipeline"]
  with pytest.raises(ValueError, match="different pipeline.*num_local_crops"):
    _host(num_local_crops=0).set_state(with_local)
  with pytest.raises(ValueError, match="different pipeline.*num_local_crops"):
    _host().set_state(without)
  with pytest.raises(ValueError, match="different pipeline.*local_crop_size"):
    _host(local_crop_size=LOCAL + 8).set_state(with_local)
  _host().set_state(with_local)
  # The device iterator checks the same way (nothing is compiled before the first batch).
  with pytest.raises(ValueError, match="different pipeline.*num_local_crops"):
    _device(mesh8, num_local_crops=0).set_state(_device(mesh8).get_state())


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"num_local_crops": -1}, "num_local_crops must be an integer >= 0"),
    ({"num_local_crops": 2.5}, "num_local_crops must be an integer >= 0"),
    ({"local_crop_size": 0}, "local_crop_size must be an integer >= 1"),
    ({"local_crop_area": (0.0, 0.4)}, "local_crop_area must be"),
    ({"local_crop_area": (0.5, 0.4)}, "local_crop_area must be"),
    ({"local_crop_area": (0.1, 1.5)}, "local_crop_area must be"),
    ({"local_crop_area": 0.4}, "local_crop_area must be"),
  ],
)
def test_bad_multicrop_arguments_are_refused(mesh8, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _host(**kwargs)
  with pytest.raises(ValueError, match=match):
    _device(mesh8, **kwargs)


class _UniformRng:
  """A NumPy generator that answers from the numbers the device path reads for one view."""

  def __init__(self, u):
    self.u, self.next_uniform, self.next_integer = u, 0, 2 * crops.CROP_ATTEMPTS

  def uniform(self, low, high):
    value = self.u[self.next_uniform]
    self.next_uniform += 1
    return low + (high - low) * value

  def integers(self, low, high):
    value = self.u[self.next_integer]
    self.next_integer += 1
    return low + int(np.floor(value * (high - low)))

  def random(self):
    return self.u[-1]


def test_device_local_views_are_the_host_views_for_the_same_numbers():
  """The paths draw different numbers (device.py says why); given the same, same views."""
  source = _coordinate_source()
  images = np.stack([source[i]["image"] for i in range(N)])
  u = np.random.default_rng(0).random((N, crops.NUM_VIEW_UNIFORMS), np.float32)
  views = jax.jit(crops.views_from_uniforms, static_argnums=(2, 3, 4, 5))
  ours = views(jnp.asarray(images), jnp.asarray(u), LOCAL, LOCAL_AREA, (3 / 4, 4 / 3), True)
  theirs = np.stack(
    [
      pipeline.random_view(image, _UniformRng(x), LOCAL, LOCAL_AREA, (3 / 4, 4 / 3), True)
      for image, x in zip(images, u, strict=True)
    ]
  )
  diff = np.abs(np.asarray(ours).astype(int) - theirs.astype(int))
  # As for global views: the same box, then Pillow's pixels up to fixed-point roundings
  # (and the pass order when shrinking).
  assert diff.max() <= 2 and diff.mean() < 0.1, (diff.max(), diff.mean())


@pytest.mark.parametrize("local_prob, expected", [(-1.0, 1.0), (0.5, 0.5)])
def test_local_views_take_their_own_blur_probability(monkeypatch, local_prob, expected):
  # DINO: global views blurred with 1.0 and 0.1, local views with 0.5.
  config = tiny_config()
  aug = config.data.augment
  aug.photometric, aug.blur_prob, aug.blur_prob_b, aug.blur_prob_local = True, 1.0, 0.1, local_prob
  seen = []
  monkeypatch.setattr(augment, "photometric", lambda x, keys, aug, **probs: seen.append(probs) or x)
  n, size = 4, 8
  rng = np.random.default_rng(0)
  batch = {
    "view_a": rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
    "view_b": rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
    "local_views": rng.integers(0, 256, (n, 2, size, size, 3), dtype=np.uint8),
    "aug_seed": np.arange(n, dtype=np.int32),
  }
  methods.create_method(config).views(batch, jax.random.key(0), jnp.zeros((), jnp.int32))
  blur = [probs.get("blur_prob") for probs in seen]
  # First view: the section's own (no override); second: blur_prob_b; locals: their own.
  assert blur[0] is None and blur[1] == 0.1
  assert [b if b is not None else aug.blur_prob for b in blur[2:]] == [expected, expected]
