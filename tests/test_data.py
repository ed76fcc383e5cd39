"""Tests for cljax.data: sources (tfds, folder, arrays, IDX, synthetic) and grain pipelines."""

import gzip
import io
import json
import logging
import os
import pickle

import grain
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import with_views
from PIL import Image

from cljax.data import pipeline, sources


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _index_source(n, size=12):
  """Example i is a constant image of value 10 * i with label i: crops keep both readable."""
  images = np.repeat((np.arange(n, dtype=np.uint8) * 10)[:, None, None], size * size, 1)
  return sources.ArraySource(images.reshape(n, size, size), np.arange(n))


def _pretrain(source, **kwargs):
  views, args = with_views(dict(seed=0, global_batch_size=4, image_size=8) | kwargs)
  return pipeline.create_pretrain_iterator(source, views, **args)


def _labels(batches):
  return np.concatenate([b["label"] for b in batches])


def _encode(array, fmt, **save_kwargs):
  buf = io.BytesIO()
  (array if isinstance(array, Image.Image) else Image.fromarray(array)).save(
    buf, fmt, **save_kwargs
  )
  return buf.getvalue()


def _smooth_rgb(h, w):
  """A smooth image: survives JPEG with small errors."""
  y, x = np.mgrid[0:h, 0:w]
  return np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (h + w) + 64], -1).astype(np.uint8)


def test_pretrain_batch_shapes_and_dtypes():
  batch = next(_pretrain(sources.SyntheticSource(16, 20, seed=1), image_size=10))
  assert batch["view_a"].shape == batch["view_b"].shape == (4, 10, 10, 3)
  assert batch["view_a"].dtype == batch["view_b"].dtype == np.uint8
  assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32


def test_same_seed_same_batches_and_different_seed_different_batches():
  source = sources.SyntheticSource(16, 20, seed=1)
  first = _take(_pretrain(source, seed=7), 5)  # 5 batches of 4 cross an epoch boundary.
  _assert_same_batches(first, _take(_pretrain(source, seed=7), 5))
  other = _take(_pretrain(source, seed=8), 5)
  assert not np.array_equal(first[0]["view_a"], other[0]["view_a"])
  assert not np.array_equal(_labels(first), _labels(other))


def test_two_views_differ():
  batch = next(_pretrain(sources.SyntheticSource(16, 24, seed=2), global_batch_size=8))
  for a, b in zip(batch["view_a"], batch["view_b"], strict=True):
    assert not np.array_equal(a, b)


def test_two_processes_cover_every_epoch_exactly_once_and_reshuffle():
  n, epochs = 24, 3
  seen = []
  for p in range(2):
    it = _pretrain(
      _index_source(n), global_batch_size=8, process_index=p, process_count=2, num_epochs=epochs
    )
    batches = list(it)
    assert len(batches) == epochs * (n // 2) // 4
    for b in batches:
      # The views are crops of image `label`: pixels and labels travel together.
      expected = (b["label"] * 10).astype(np.uint8)[:, None, None, None]
      assert np.all(b["view_a"] == expected) and np.all(b["view_b"] == expected)
    seen.append(_labels(batches).reshape(epochs, n // 2))
  for e in range(epochs):
    assert sorted(np.concatenate([seen[0][e], seen[1][e]])) == list(range(n))
  for p in range(2):
    assert not np.array_equal(seen[p][0], seen[p][1])
    assert not np.array_equal(seen[p][1], seen[p][2])


def test_global_batches_are_the_same_stream_on_any_process_count():
  """Global batch k (the processes' batches in process order) is the same examples, in the
  same order and with the same crops, on 1, 2 and 4 processes: a checkpoint resumes on
  another count (``pipeline.remap_state``). 25 examples: batches straddle the epochs."""
  source = sources.SyntheticSource(25, 20, seed=4)

  def global_batches(count):
    its = [
      _pretrain(source, global_batch_size=8, process_index=p, process_count=count)
      for p in range(count)
    ]
    shares = [_take(it, 7) for it in its]  # 56 positions: more than two epochs.
    return [
      {
        k: np.concatenate([share[b][k] for share in shares])
        for k in ("label", "view_a", "aug_seed")
      }
      for b in range(7)
    ]

  one = global_batches(1)
  for count in (2, 4):
    for a, b in zip(one, global_batches(count), strict=True):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_a_state_saved_by_two_processes_continues_on_one():
  source = _index_source(24)
  its = [_pretrain(source, global_batch_size=8, process_index=p, process_count=2) for p in range(2)]
  for it in its:
    _take(it, 3)
  saved = [json.loads(json.dumps(it.get_state())) for it in its]
  reference = _pretrain(source, global_batch_size=8)
  _take(reference, 3)
  one = _pretrain(source, global_batch_size=8)
  one.set_state(pipeline.remap_state(saved, one.get_state()))
  _assert_same_batches(_take(one, 4), _take(reference, 4))
  # States of another pipeline, or that disagree on the batches consumed, are refused.
  with pytest.raises(ValueError, match="different pipeline"):
    other = _pretrain(source, global_batch_size=8, seed=1)
    other.set_state(pipeline.remap_state(saved, other.get_state()))
  with pytest.raises(ValueError, match="disagree"):
    pipeline.remap_state([saved[0], {**saved[1], "next_batch": 2}], one.get_state())


def test_a_round_robin_state_of_several_processes_is_refused():
  """States saved before blocks were dealt (no "dealing" key) resume on one process, whose
  stream was the same, and are refused from several, whose stream was not."""
  it = _pretrain(_index_source(24), global_batch_size=8)
  state = it.get_state()
  legacy = {k: v for k, v in state["pipeline"].items() if k != "dealing"}
  it.set_state({"pipeline": legacy, "next_batch": 1})
  two = _pretrain(_index_source(24), global_batch_size=8, process_index=0, process_count=2)
  old_two = {k: v for k, v in two.get_state()["pipeline"].items() if k != "dealing"}
  with pytest.raises(ValueError, match="round_robin"):
    two.set_state({"pipeline": old_two, "next_batch": 1})


def test_global_batch_not_divisible_by_process_count():
  with pytest.raises(ValueError, match="multiple of the process count 3"):
    _pretrain(_index_source(24), global_batch_size=8, process_count=3)
  with pytest.raises(ValueError, match="fewer than one global batch"):
    _pretrain(_index_source(6), global_batch_size=8)


def test_restored_iterator_continues_with_the_same_batches():
  source = sources.SyntheticSource(12, 16, seed=3)
  it = _pretrain(source, seed=5)
  _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))  # Checkpoints store it as JSON.
  want = _take(it, 4)  # Crosses into the second epoch (3 batches per epoch).
  restored = _pretrain(source, seed=5)
  restored.set_state(state)
  _assert_same_batches(want, _take(restored, 4))
  # set_state also rewinds an iterator that has run ahead.
  it.set_state(state)
  _assert_same_batches(want, _take(it, 4))


def test_state_of_another_pipeline_is_refused():
  source = sources.SyntheticSource(12, 16, seed=3)
  it = _pretrain(source, seed=5)
  next(it)
  with pytest.raises(ValueError, match="different pipeline.*seed"):
    _pretrain(source, seed=6).set_state(it.get_state())


def test_orbax_checkpoint_of_the_iterator(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  source = sources.SyntheticSource(12, 16, seed=3)
  it = _pretrain(source)
  _take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  want = _take(it, 2)
  restored = _pretrain(source)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    step = manager.latest_step()
    manager.restore(
      step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored))
    )
  _assert_same_batches(want, _take(restored, 2))


def test_workers_give_the_same_batches_and_restore_across_worker_counts():
  source = _index_source(16)
  reference = _take(_pretrain(source, seed=4), 6)
  it = _pretrain(source, seed=4, num_workers=2)
  try:
    _assert_same_batches(reference[:3], _take(it, 3))
    state = it.get_state()
    single = _pretrain(source, seed=4)
    single.set_state(state)
    _assert_same_batches(reference[3:5], _take(single, 2))
    it.set_state(single.get_state())
    _assert_same_batches(reference[5:], _take(it, 1))
  finally:
    it.close()


def test_random_resized_crop_box():
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, h, w = pipeline.random_resized_crop_box(30, 50, rng)
    assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 50
    assert 0.08 * 1500 * 0.8 <= h * w <= 1500
  # No (area, aspect) pair fits: centre crop with the aspect clamped into range.
  box = pipeline.random_resized_crop_box(10, 10, rng, area=(1.0, 1.0), aspect=(2.0, 2.0))
  assert box == (2, 0, 5, 10)


def test_images_smaller_than_the_crop_are_upscaled():
  source = sources.ArraySource(np.full((8, 3, 5), 77, np.uint8))
  batch = next(_pretrain(source, image_size=16))
  assert batch["view_a"].shape == (4, 16, 16, 3) and np.all(batch["view_a"] == 77)
  assert np.all(batch["label"] == -1)


def test_eval_iterator_pads_the_last_batch_and_keeps_order():
  source = _index_source(10)
  batches = list(pipeline.create_eval_iterator(source, batch_size=4, image_size=6))
  assert len(batches) == 3
  index = np.concatenate([b["index"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(index, list(range(10)) + [-1, -1])
  np.testing.assert_array_equal(mask, [True] * 10 + [False] * 2)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:10], range(10))
  assert batches[1]["image"].shape == (4, 6, 6, 3) and batches[1]["image"].dtype == np.uint8
  assert np.all(batches[1]["image"][2] == 60) and np.all(batches[2]["image"][3] == 0)


def test_eval_crop_fraction_never_crops_below_image_size():
  framed = np.zeros((2, 40, 40), np.uint8)
  framed[:, :5], framed[:, -5:], framed[:, :, :5], framed[:, :, -5:] = 255, 255, 255, 255
  source = sources.ArraySource(framed)
  eval_batch = lambda size: next(
    pipeline.create_eval_iterator(source, batch_size=2, image_size=size, crop_fraction=0.75)
  )["image"]
  assert np.all(eval_batch(16) == 0)  # The centre 30 pixels, frame cut off.
  assert eval_batch(40).max() == 255  # 30 < 40: the whole image.


def test_eval_iterator_splits_processes_evenly():
  source = _index_source(11)
  indices = []
  for p in range(2):
    batches = list(
      pipeline.create_eval_iterator(
        source, batch_size=4, image_size=4, process_index=p, process_count=2
      )
    )
    assert len(batches) == 3  # ceil(ceil(11 / 2) / 2) for both processes.
    indices.append(np.concatenate([b["index"] for b in batches]))
  real = np.concatenate(indices)
  assert sorted(real[real >= 0].tolist()) == list(range(11))


def test_tfds_source_under_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    source = sources.TfdsSource("mnist", "train", tmp_path)
    assert len(source) == 12
    example = source[3]
    assert example["image"].shape == (28, 28, 3) and example["image"].dtype == np.uint8
    assert example["label"].dtype == np.int32 and 0 <= example["label"] < 10
    assert len(source.class_names) == 10
    assert repr(source) == (
      f"TfdsSource(name='mnist', split='train', data_dir={str(tmp_path)!r}, num_examples=12)"
    )
    batch = next(_pretrain(source))
  assert batch["view_a"].shape == (4, 8, 8, 3)


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
  """A real (not mocked) ArrayRecord tfds data set of variable-size images, built without TF."""

  # Unregistered: the source must find it from its files, as a reader without the code would.
  with tfds.core.registered.skip_registration():

    class CljaxTinyImages(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        features = {
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

      def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(6), "test": self._generate_examples(3)}

      def _generate_examples(self, n):
        for i in range(n):
          # Encoded bytes: encoding arrays would need TensorFlow.
          png = _encode(np.full((5 + i, 4, 3), 40 * i, np.uint8), "PNG")
          yield i, {"image": io.BytesIO(png), "label": i % 3}

  data_dir = tmp_path_factory.mktemp("tfds")
  CljaxTinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_source_reads_a_real_array_record_data_set(tiny_tfds_dir):
  source = sources.TfdsSource("cljax_tiny_images", "train", tiny_tfds_dir)
  assert len(source) == 6 and source.class_names == ("a", "b", "c")
  for i in range(6):
    example = source[i]
    value = example["image"][0, 0, 0] // 40  # Which generated image this is.
    assert example["image"].shape == (5 + value, 4, 3)
    assert np.all(example["image"] == 40 * value) and example["label"] == value % 3
  assert len(sources.TfdsSource("cljax_tiny_images", "test", tiny_tfds_dir)) == 3
  with pytest.raises(ValueError, match="split 'nope'"):
    sources.TfdsSource("cljax_tiny_images", "nope", tiny_tfds_dir)


def test_tfds_missing_data_dir_unprepared_and_unknown_name(tmp_path):
  missing = tmp_path / "missing"
  with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist.*tfds build mnist"):
    sources.TfdsSource("mnist", "train", missing)
  with pytest.raises(FileNotFoundError, match=f"not prepared in {tmp_path}/mnist.*tfds build"):
    sources.TfdsSource("mnist", "train", tmp_path)
  with pytest.raises(FileNotFoundError, match="downloads/manual"):
    sources.TfdsSource("imagenet2012", "train", tmp_path)
  with pytest.raises(ValueError, match="unknown tfds data set 'no_such_data_set_xyz'"):
    sources.TfdsSource("no_such_data_set_xyz", "train", tmp_path)


@pytest.fixture
def image_folder(tmp_path):
  root = tmp_path / "images"
  (root / "cat").mkdir(parents=True)
  (root / "dog" / "nested").mkdir(parents=True)
  rgb = _smooth_rgb(40, 48)
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
  palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
  palette.info["transparency"] = 0
  good = {
    "cat/a.jpg": _encode(rgb, "JPEG", quality=95),
    "cat/b.png": _encode(rgb, "PNG"),
    "cat/gray.png": _encode(rgb[..., 0], "PNG"),
    "cat/rgba.png": _encode(np.dstack([rgb, np.full((40, 48), 128, np.uint8)]), "PNG"),
    "cat/palette.png": _encode(palette, "PNG", transparency=0),
    "dog/deep.png": _encode(rgb[..., 1].astype(np.uint16) * 257, "PNG"),
    "dog/cmyk.jpg": _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95),
    "dog/tiny.jpg": _encode(rgb[:5, :6], "JPEG"),
    "dog/nested/upper.JPG": _encode(rgb, "JPEG"),
  }
  jpeg, png = _encode(noise, "JPEG"), _encode(noise, "PNG")
  bad = {
    "cat/corrupt.jpg": b"this is not an image " * 20,
    "dog/truncated.jpg": jpeg[: len(jpeg) * 2 // 3],
    "dog/cut.png": png[: len(png) // 2],
    "dog/empty.png": b"",
  }
  for name, data in (good | bad).items():
    (root / name).write_bytes(data)
  (root / "cat" / "notes.txt").write_text("not an image")
  expected = {"cat/palette.png": np.asarray(palette.convert("RGBA"))[..., :3]}
  return root, rgb, expected, sorted(good), sorted(str(root / name) for name in bad)


def test_folder_source_skips_and_reports_bad_files(image_folder, caplog):
  root, rgb, expected, good, bad = image_folder
  with caplog.at_level(logging.WARNING):
    source = sources.ImageFolderSource(root)
  assert sorted(s.path for s in source.skipped) == bad
  assert all(s.reason for s in source.skipped)
  for path in bad:
    assert path in caplog.text
  assert "skipped 4 unreadable files" in caplog.text
  assert source.class_names == ("cat", "dog") and len(source) == len(good)
  assert repr(source) == f"ImageFolderSource(root={str(root)!r}, num_examples={len(good)})"
  decoded = {}
  for i in range(len(source)):
    example = source[i]
    name = os.path.relpath(source.paths[i], root)
    assert example["image"].dtype == np.uint8 and example["image"].shape[-1] == 3, name
    assert example["label"] == ("cat", "dog").index(name.split("/")[0])
    decoded[name] = example["image"].astype(int)
  np.testing.assert_array_equal(decoded["cat/b.png"], rgb)
  np.testing.assert_array_equal(decoded["cat/rgba.png"], rgb)
  np.testing.assert_array_equal(decoded["cat/gray.png"], np.repeat(rgb[..., :1], 3, -1))
  np.testing.assert_array_equal(decoded["dog/deep.png"], np.repeat(rgb[..., 1:2], 3, -1))
  assert np.abs(decoded["cat/a.jpg"] - rgb).mean() < 3
  assert np.abs(decoded["dog/cmyk.jpg"] - rgb).mean() < 4
  np.testing.assert_array_equal(decoded["cat/palette.png"], expected["cat/palette.png"])
  assert decoded["dog/tiny.jpg"].shape == (5, 6, 3)
  batch = next(_pretrain(source, image_size=16, global_batch_size=8))
  assert batch["view_a"].shape == (8, 16, 16, 3)


def test_folder_source_strict_mode_names_the_file(image_folder):
  root, _, _, _, bad = image_folder
  with pytest.raises(ValueError, match="4 unreadable image") as error:
    sources.ImageFolderSource(root, strict=True)
  assert any(path in str(error.value) for path in bad)
  # The way out, as the command line spells it (the run reads data.strict).
  assert "--config.data.strict=False" in str(error.value)


def test_folder_source_empty_and_missing_folders(tmp_path):
  with pytest.raises(ValueError, match=f"no readable images.*{tmp_path}"):
    sources.ImageFolderSource(tmp_path)
  (tmp_path / "cls").mkdir()
  (tmp_path / "cls" / "bad.jpg").write_bytes(b"")
  with pytest.raises(ValueError, match="1 unreadable"):
    sources.ImageFolderSource(tmp_path)
  with pytest.raises(FileNotFoundError, match="missing"):
    sources.ImageFolderSource(tmp_path / "missing")


def test_folder_without_class_subfolders_is_unlabelled(tmp_path):
  (tmp_path / "x.png").write_bytes(_encode(_smooth_rgb(8, 8), "PNG"))
  source = sources.ImageFolderSource(tmp_path)
  assert len(source) == 1 and source.class_names is None and source[0]["label"] == -1


def test_encoded_npz_source(tmp_path):
  images = [_smooth_rgb(10 + i, 12) for i in range(4)]
  blobs = [_encode(images[0], "JPEG", quality=95)] + [_encode(im, "PNG") for im in images[1:]]
  offsets = np.cumsum([0] + [len(b) for b in blobs])
  path = tmp_path / "tiny.npz"
  data = np.frombuffer(b"".join(blobs), np.uint8)
  np.savez(path, jpeg=data, offsets=offsets, labels=np.array([3, 1, 4, 1]))
  source = sources.ArraySource.from_npz(path)
  assert (
    len(source) == 4 and repr(source) == f"ArraySource(origin='encoded_npz:{path}', num_examples=4)"
  )
  for i in range(1, 4):
    np.testing.assert_array_equal(source[i]["image"], images[i])
  assert np.abs(source[0]["image"].astype(int) - images[0]).mean() < 3
  np.testing.assert_array_equal([source[i]["label"] for i in range(4)], [3, 1, 4, 1])
  clone = pickle.loads(pickle.dumps(source))  # Workers rebuild it from the file name.
  assert repr(clone) == repr(source) and clone._rebuild is not None
  np.testing.assert_array_equal(clone[2]["image"], images[2])


def test_cifar10_encoded_npz_from_shared_data(shared_data):
  source = sources.ArraySource.from_npz(shared_data / "cifar10" / "test.npz")
  assert len(source) == 10_000 and source.class_names[0] == "airplane"
  for index, label in [(0, 0), (999, 0), (1000, 1), (9999, 9)]:
    example = source[index]
    assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
    assert example["label"] == label


@pytest.mark.parametrize("keys", [("images", "labels"), ("image", "label"), ("x", "y")])
def test_npz_source(tmp_path, keys):
  images = np.random.default_rng(0).integers(0, 256, (5, 6, 7), np.uint8)
  np.savez(tmp_path / "d.npz", **{keys[0]: images, keys[1]: np.arange(5)})
  source = sources.ArraySource.from_npz(tmp_path / "d.npz")
  np.testing.assert_array_equal(source[2]["image"], np.repeat(images[2][..., None], 3, -1))
  assert source[4]["label"] == 4


def test_embedded_fashion_mnist_is_balanced():
  for split, n in [("train", 10_000), ("test", 2_000)]:
    source = sources.ArraySource.embedded(split)
    assert len(source) == n and len(source.class_names) == 10
    np.testing.assert_array_equal(np.bincount(source.labels), [n // 10] * 10)
    example = source[n - 1]
    assert example["image"].shape == (28, 28, 3) and example["image"].dtype == np.uint8
    assert np.array_equal(example["image"][..., 0], example["image"][..., 2])
    assert example["image"].max() > 0
    assert pickle.loads(pickle.dumps(source)).origin == f"embedded:fashion_mnist/{split}"


def test_idx_source_matches_shared_fashion_mnist(shared_data):
  folder = shared_data / "fashion_mnist"
  source = sources.ArraySource.from_idx(
    folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz"
  )
  assert len(source) == 10_000 and source.class_names[9] == "Ankle boot"
  assert source[0]["image"].shape == (28, 28, 3) and source[0]["label"] == 9


def test_read_idx(tmp_path):
  array = np.random.default_rng(1).integers(0, 256, (3, 4, 5), np.uint8)
  raw = bytes([0, 0, 0x08, 3, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0, 5]) + array.tobytes()
  (tmp_path / "a-idx3-ubyte").write_bytes(raw)
  (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
  for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
    np.testing.assert_array_equal(sources.read_idx(tmp_path / name), array)
  (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
  with pytest.raises(ValueError, match="not an IDX file"):
    sources.read_idx(tmp_path / "bad")


def test_array_to_rgb_conversions():
  gray = np.arange(6, dtype=np.uint8).reshape(2, 3)
  np.testing.assert_array_equal(sources.array_to_rgb(gray)[..., 1], gray)
  np.testing.assert_array_equal(sources.array_to_rgb(gray[..., None])[..., 2], gray)
  rgba = np.dstack([gray, gray + 1, gray + 2, gray + 3])
  np.testing.assert_array_equal(sources.array_to_rgb(rgba), rgba[..., :3])
  np.testing.assert_array_equal(sources.array_to_rgb(np.uint16(gray) * 257)[..., 0], gray)
  with pytest.raises(ValueError, match="uint8 or uint16"):
    sources.array_to_rgb(gray.astype(np.float32))


def _data_config(**fields):
  return ml_collections.ConfigDict(
    dict(source="synthetic", name="", data_dir="", train_split="train", eval_split="test") | fields
  )


def test_create_source_from_config(image_folder, tmp_path):
  root = image_folder[0]
  embedded = os.path.join(os.path.dirname(sources.__file__), "embedded")
  cases = [
    (_data_config(source="embedded"), "train", 10_000),
    (_data_config(source="embedded"), "eval", 2_000),
    (_data_config(source="idx", data_dir=embedded, eval_split="fmnist-test"), "eval", 2_000),
    (_data_config(source="folder", data_dir=str(root.parent), train_split="images"), "train", 9),
    (_data_config(source="synthetic", num_examples=7, image_size=5), "train", 7),
  ]
  for config, split, n in cases:
    assert len(sources.create_source(config, split)) == n, config.source
  synthetic = _data_config(num_examples=3, image_size=5)
  train, eval_ = sources.create_source(synthetic, "train"), sources.create_source(synthetic, "eval")
  assert not np.array_equal(train[0]["image"], eval_[0]["image"])
  with pytest.raises(ValueError, match="data.source must be one of"):
    sources.create_source(_data_config(source="parquet"), "train")
  with pytest.raises(ValueError, match="split must be"):
    sources.create_source(_data_config(), "validation")
  with pytest.raises(ValueError, match="needs data.data_dir"):
    sources.create_source(_data_config(source="npz"), "train")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.create_source(
      _data_config(source="tfds", name="mnist", data_dir=str(tmp_path / "x")), "train"
    )


def test_synthetic_source_is_deterministic():
  a, b = sources.SyntheticSource(5, 8, 3, seed=1), sources.SyntheticSource(5, 8, 3, seed=1)
  np.testing.assert_array_equal(a[4]["image"], b[4]["image"])
  assert repr(a) == "SyntheticSource(num_examples=5, image_size=8, num_classes=3, seed=1)"
  assert not np.array_equal(a[4]["image"], sources.SyntheticSource(5, 8, 3, seed=2)[4]["image"])
