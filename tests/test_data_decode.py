"""The decode-only host path (cljax.data.decode): libjpeg-turbo decoding into a canvas on the
host, every crop on the device; checked against Pillow and the host-crop path."""

import gc
import io
import os
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_resumes_exactly, photo_crops, sample_photos, tiny_config
from PIL import Image

from cljax.data import decode, images, pipeline, sources
from cljax.data import views as views_lib


def _jpeg(pixels: np.ndarray, quality: int = 90, **kwargs) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "JPEG", quality=quality, **kwargs)
  return buf.getvalue()


def _encoded_source(blobs, labels=None):
  offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])])
  data = np.concatenate([np.frombuffer(b, np.uint8) for b in blobs])
  labels = np.arange(len(blobs)) % 3 if labels is None else labels
  return sources.ArraySource(sources.EncodedImages(data, offsets), labels, origin="test_jpegs")


def test_jpeg_decoding_is_pillows_bit_for_bit_on_photos():
  # Exact DCT and fancy upsampling (not simplejpeg's fast options): the same libjpeg-turbo
  # arithmetic as Pillow, so no tolerance. Colour 4:2:0 and 4:4:4, and grayscale.
  for i, pixels in enumerate(photo_crops([(375, 500), (427, 320), (99, 131)])):
    for kwargs in ({}, {"subsampling": 0}):
      blob = _jpeg(pixels, **kwargs)
      np.testing.assert_array_equal(decode.decode(blob, 512), images.decode_image(blob), str(i))
  gray = _jpeg(sample_photos()[0][:120, :160].mean(-1).astype(np.uint8))
  np.testing.assert_array_equal(decode.decode(gray, 512), images.decode_image(gray))


def test_large_jpegs_are_dct_scaled_to_fit_the_canvas():
  blob = _jpeg(sample_photos()[0])  # 427 x 640
  assert decode.dct_eighths(427, 640, 512) == 6  # 640 * 6/8 = 480 <= 512 < 640 * 7/8.
  image = decode.decode(blob, 512)
  assert image.shape == (321, 480, 3)  # ceil(427 * 6 / 8), ceil(640 * 6 / 8).
  # The DCT-scaled decode is the photo at 3/4 size: as close to Pillow's bilinear resize as
  # different filters on a detailed photo get (measured 8.3 levels on average), and closer
  # than the same resize one row off (14.9) or mirrored (80).
  photo = Image.fromarray(sample_photos()[0])
  reference = np.asarray(photo.resize((480, 321), Image.Resampling.BILINEAR))
  image = image.astype(float)
  close = np.abs(image - reference).mean()
  assert close < 10 and close < np.abs(image[1:] - reference[:-1]).mean() - 4
  # More than 8 canvases: 1/8 by DCT, then Pillow shrinks to fit.
  assert decode.dct_eighths(427, 640, 64) == 0
  small = decode.decode(blob, 64)
  assert max(small.shape[:2]) == 64 and small.shape[2] == 3
  assert abs(small.shape[1] / small.shape[0] - 640 / 427) < 0.05


def test_other_formats_and_bad_bytes():
  pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "PNG")
  np.testing.assert_array_equal(decode.decode(buf.getvalue(), 64), pixels)
  # CMYK JPEGs (ImageNet has a few): libjpeg-turbo converts them to RGB itself, rounding
  # differently from Pillow's CMYK -> RGB by one level.
  buf = io.BytesIO()
  Image.fromarray(pixels).convert("CMYK").save(buf, "JPEG", quality=95)
  cmyk = decode.decode(buf.getvalue(), 64).astype(int) - images.decode_image(buf.getvalue())
  assert np.abs(cmyk).max() <= 1
  with pytest.raises(ValueError, match="cannot decode record 7"):
    decode.decode(b"\xff\xd8not a jpeg", 64, "record 7")


def _views(spec, n=24):
  sizes = [(int(h), int(w)) for h, w in np.random.default_rng(1).integers(20, 60, (n, 2))]
  return _encoded_source([_jpeg(p) for p in photo_crops(sizes)])


@pytest.mark.parametrize("local", [0, 2])
def test_device_views_equal_the_host_paths_views(local):
  """Same seed, same boxes, flips and aug_seed: the device-cut views are Pillow's crops.

  Tolerance: crops.py reproduces Pillow's bicubic resize with float32 weights where Pillow
  uses 22-bit fixed point, so a pixel can round to the next level (measured: at most 1, on
  a few percent of pixels); when shrinking, Pillow 13 may run the vertical pass first,
  which moves a few percent of pixels by a few levels. A wrong box, flip or offset would
  move most pixels by tens of levels.
  """
  spec = views_lib.ViewSpec(16, num_local_crops=local, local_crop_size=8)
  source = _views(spec)
  kwargs = {"seed": 3, "global_batch_size": 8}
  host = pipeline.create_pretrain_iterator(source, spec, **kwargs)
  canvas = decode.create_canvas_iterator(source, spec, canvas=64, **kwargs)
  for _ in range(3):
    expected, batch = next(host), next(canvas)
    assert batch["canvas"].shape == (8, 64, 64, 3) and batch["boxes"].shape == (8, 2 + local, 4)
    got = jax.jit(decode.views_from_canvas, static_argnums=1)(batch, spec)
    assert set(got) == set(expected)
    for key in ("label", "aug_seed"):
      np.testing.assert_array_equal(got[key], expected[key])
    for key in ("view_a", "view_b", "local_views")[: 3 if local else 2]:
      diff = np.abs(np.asarray(got[key]).astype(int) - expected[key])
      assert diff.mean() < 0.5 and np.mean(diff > 3) < 0.01, (key, diff.mean(), diff.max())


def test_canvas_iterator_resumes_from_its_state_and_refuses_the_host_paths():
  spec = views_lib.ViewSpec(16)
  source = _views(spec)
  kwargs = {"seed": 0, "global_batch_size": 8}
  it = decode.create_canvas_iterator(source, spec, canvas=64, **kwargs)
  next(it)
  state = it.get_state()
  assert state["pipeline"]["kind"] == "pretrain_canvas" and state["pipeline"]["canvas_size"] == 64
  rest = [next(it) for _ in range(4)]  # Crosses the epoch boundary (24 examples, 8 a batch).
  # Resumed in worker processes, whose canvases are built in shared memory.
  resumed = decode.create_canvas_iterator(source, spec, canvas=64, num_workers=2, **kwargs)
  resumed.set_state(state)
  again = [next(resumed) for _ in range(4)]
  resumed.close()
  for a, b in zip(rest, again, strict=True):
    chex.assert_trees_all_equal(a, b)
  # Each image packed at the start of its canvas, zeros after it, in this process and in the
  # workers' shared memory; unpacked, the canvas holds the image in its top-left corner.
  for batch in (rest[0], again[0]):
    for canvas, (h, w) in zip(batch["canvas"], batch["image_hw"], strict=True):
      assert canvas.reshape(-1)[h * w * 3 :].max(initial=0) == 0
  unpacked = decode.unpack(jnp.asarray(rest[0]["canvas"]), jnp.asarray(rest[0]["image_hw"][:, 1]))
  for image, packed, (h, w) in zip(unpacked, rest[0]["canvas"], rest[0]["image_hw"], strict=True):
    np.testing.assert_array_equal(image[:h, :w], packed.reshape(-1)[: h * w * 3].reshape(h, w, 3))
  with pytest.raises(ValueError, match="different pipeline"):
    pipeline.create_pretrain_iterator(source, spec, **kwargs).set_state(state)
  with pytest.raises(ValueError, match="different pipeline"):
    decode.create_canvas_iterator(source, spec, canvas=32, **kwargs).set_state(state)


def test_sources_without_file_bytes_are_placed_on_the_canvas():
  source = sources.SyntheticSource(16, image_size=40)
  spec = views_lib.ViewSpec(16)
  batch = next(decode.create_canvas_iterator(source, spec, canvas=32, seed=0, global_batch_size=8))
  # 40 > 32: shrunk to fit, the true size recorded.
  np.testing.assert_array_equal(batch["image_hw"], np.full((8, 2), 32))
  views = decode.views_from_canvas(jax.tree.map(jnp.asarray, batch), spec)
  assert views["view_a"].shape == (8, 16, 16, 3)


def _folder(tmp_path, n=48):
  sizes = [(int(h), int(w)) for h, w in np.random.default_rng(2).integers(24, 48, (n, 2))]
  for i, pixels in enumerate(photo_crops(sizes)):
    folder = tmp_path / "images" / f"class_{i % 4}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{i}.jpg").write_bytes(_jpeg(pixels))
  return tmp_path / "images"


def test_training_with_crops_on_device_resumes_exactly(tmp_path):
  """A run on a folder of JPEGs through the decode-only path, stopped and resumed, equals an
  uninterrupted one bitwise: the host's draws follow the stream position, and the iterator's
  state is its batch number."""
  config = tiny_config()
  config.data.source = "folder"
  config.data.data_dir = str(_folder(tmp_path))
  config.data.train_split = config.data.eval_split = "."
  config.data.crop_on_device = True
  config.data.canvas_size = 48
  config.data.num_workers = 0
  config.data.augment.photometric = True
  config.train.num_steps = 6
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 100
  config.evals.knn_at_end = False

  assert_resumes_exactly(config, tmp_path)


def test_settings_that_cannot_work_are_refused_before_compiling():
  from cljax import methods, run

  config = tiny_config()
  config.data.crop_on_device = True
  config.data.device_resident = True
  with pytest.raises(ValueError, match="set one of them False"):
    run.check_config(config)
  config.data.device_resident = False
  config.data.canvas_size = config.data.image_size - 1
  with pytest.raises(
    ValueError, match=r"data.canvas_size=15: must be at least data.image_size \(16\)"
  ):
    run.check_config(config)
  config.data.canvas_size = config.data.image_size
  run.check_config(config)
  config.method = "clip"
  clip = methods.create_method(config)
  with pytest.raises(ValueError, match="set data.crop_on_device=False"):
    clip.create_train_iterator(None, None, None, device_resident=False)


def _shm_blocks() -> set[str]:
  return set(os.listdir("/dev/shm"))


def _wait_until_unlinked(names) -> set[str]:
  """The names still in /dev/shm after unlinking had time (grain's deletion threads)."""
  for _ in range(100):
    gc.collect()
    if not set(names) & _shm_blocks():
      break
    time.sleep(0.05)
  return set(names) & _shm_blocks()


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="shared memory is not in /dev/shm")
def test_worker_batches_are_made_in_shared_memory_owned_by_the_worker_until_handed_over(
  monkeypatch,
):
  # With workers, each batch's canvas is made in shared memory (the main process maps it;
  # grain would otherwise copy it there). The worker unlinks a block it never hands over (a
  # batch that fails, or one still buffered when the iterator closes); grain hands a block
  # over by sending its metadata, and the receiver unlinks it. The blocks are followed by
  # name: other processes (grain workers of earlier tests) make blocks too.
  import grain

  made = []

  class Recorded(decode._WorkerCanvas):
    def __new__(cls, shape, dtype=float):
      array = super().__new__(cls, shape, dtype)
      made.append(array.shm.name.lstrip("/"))
      return array

  monkeypatch.setattr(decode, "_WorkerCanvas", Recorded)
  records = [
    {"image": np.full((3, 2, 3), 7, np.uint8), "image_hw": np.array([3, 2], np.int32)},
    {"encoded": _jpeg(photo_crops([(5, 4)])[0]), "what": "r1", "image_hw": np.array([5, 4])},
  ]
  make = decode.CanvasBatch(8, shared_memory=True)
  batch = make(records)
  assert isinstance(batch["canvas"], grain.multiprocessing.SharedMemoryArray)
  flat = batch["canvas"].reshape(2, -1)
  assert (flat[0, :18] == 7).all() and not flat[0, 18:].any() and not flat[1, 60:].any()
  del batch, flat  # Never handed over: the worker frees it.
  assert len(made) == 1 and not _wait_until_unlinked(made), "an unsent batch's block outlived it"

  sent = make(records)["canvas"]
  metadata = sent.metadata  # What grain sends to the main process.
  del sent
  gc.collect()
  assert made[1] in _shm_blocks(), "the worker freed a block it had handed over"
  received = grain.multiprocessing.SharedMemoryArray.from_metadata(metadata)
  received.unlink_on_del()  # What grain's receiving side does.
  np.testing.assert_array_equal(received.reshape(2, -1)[0, :18], 7)
  del received
  assert not _wait_until_unlinked(made[1:]), "the received block outlived its use"

  records[1] = dict(records[1], encoded=b"\xff\xd8 not a jpeg")
  with pytest.raises(ValueError, match="r1"):
    make(records)
  assert len(made) == 3 and not _wait_until_unlinked(made), "a failed batch's block outlived it"


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="shared memory is not in /dev/shm")
def test_closing_a_worker_iterator_mid_stream_leaves_no_shared_memory():
  # The workers have batches buffered, made but not sent, when the iterator closes; before
  # the workers owned them these blocks outlived the run (4 here) and Python's resource
  # tracker warned of "leaked shared_memory objects" at exit.
  spec = views_lib.ViewSpec(16)
  before = _shm_blocks()
  it = decode.create_canvas_iterator(
    _views(spec), spec, canvas=64, num_workers=2, seed=0, global_batch_size=8
  )
  next(it)
  it.close()
  assert not _wait_until_unlinked(_shm_blocks() - before), "blocks outlived the closed iterator"


def test_fast_dct_is_opt_in_and_moves_pixels_within_the_stated_bound():
  # data.jpeg_fast_dct: libjpeg-turbo's fast DCT and merged upsampling. Stated (defaults.py,
  # decode.py): up to 91 levels off, 1.7 on average over CIFAR-10, 1.6 over the benchmark's
  # photos. Exact decoding stays the default, and the stream (boxes, flips, seeds) is the same.
  from cljax import checkpoint, defaults

  assert defaults.base_config().data.jpeg_fast_dct is False
  assert checkpoint.ADDED_KEYS["data.jpeg_fast_dct"] is False  # Older runs decoded exactly.
  spec = views_lib.ViewSpec(16)
  source = _encoded_source([_jpeg(p) for p in photo_crops([(96, 128)] * 8)])
  kwargs = {"crop_on_device": True, "canvas": 128, "seed": 0, "global_batch_size": 8}
  exact = next(decode.create_host_iterator(source, spec, **kwargs))
  fast = next(decode.create_host_iterator(source, spec, jpeg_fast_dct=True, **kwargs))
  for key in ("image_hw", "boxes", "flips", "label", "aug_seed"):
    np.testing.assert_array_equal(fast[key], exact[key])
  # Images as wide as the canvas: its first 96 rows are theirs (packed or not).
  diff = np.abs(fast["canvas"].astype(int) - exact["canvas"])[:, :96]
  assert 0.5 < diff.mean() < 2.5 and diff.max() <= 91, (diff.mean(), diff.max())
