"""Pre-resized copies (cljax.data.prepare) and their source (sources.PreparedSource): sizes,
pixels and labels against Pillow, byte-for-byte copies, resuming, refusals, and training."""

import io
import json
import os
import pickle
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from helpers import photo_crops, tiny_config
from PIL import Image

from cljax import metrics, train
from cljax.data import prepare, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT_SIDE = 48
# (height, width): larger and smaller than SHORT_SIDE, portrait and landscape, one exactly at
# it; two are stored as PNGs, one large, one small.
SIZES = [(40, 60), (90, 70), (120, 160), (200, 150), (30, 30), (64, 100), (48, 300), (100, 49)]
SIZES += [(47, 47), (36, 44)]
PNGS = {3, 9}


def _folder(root, sizes, png=(), classes=3):
  """A folder of JPEGs (quality 95) and PNGs, one subfolder per class; returns its path."""
  for i, pixels in enumerate(photo_crops(sizes)):
    folder = root / f"class_{i % classes}"
    folder.mkdir(parents=True, exist_ok=True)
    if i in png:
      Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    else:
      Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=95)
  return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return sources.ImageFolderSource(_folder(tmp_path_factory.mktemp("images"), SIZES, PNGS))


def _files(folder):
  return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_resized_sizes():
  assert prepare.resized_hw(375, 500, 256) == (256, 341)  # 500 * 256 / 375 = 341.3.
  assert prepare.resized_hw(500, 375, 256) == (341, 256)
  assert prepare.resized_hw(300, 300, 256) == (256, 256)
  assert prepare.resized_hw(200, 900, 256) == (200, 900)  # Never enlarged.
  assert prepare.resized_hw(2000, 3000, 0) == (2000, 3000)  # 0: every size kept.
  assert prepare.resized_hw(1000, 2, 1) == (500, 1)
  assert sources.PreparedSource.file_prefix("train") == "train"
  assert sources.PreparedSource.file_prefix("train[:90%]") == "train_90"
  assert sources.PreparedSource.file_prefix("imagenet/val") == "imagenet_val"
  assert sources.PreparedSource.file_prefix(".") == "all"


def test_copy_of_a_folder_reads_back_resized(tmp_path, folder):
  """Tolerance: the stored image is Pillow's bicubic resize of the original, JPEG-encoded at
  quality 95 (bit for bit: the same Pillow calls, which pins the size and the filter); its
  pixels are within 4 levels on average of the resize itself (JPEG's loss on small, detailed
  crops: measured 0.7 to 2.6)."""
  summary = prepare.prepare(
    folder,
    tmp_path,
    "train",
    short_side=SHORT_SIDE,
    quality=95,
    records_per_shard=3,
    progress=False,
  )
  copy = sources.PreparedSource(tmp_path, "train")
  assert len(copy) == len(folder) == summary["num_records"] == len(SIZES)
  assert copy.class_names == folder.class_names == ("class_0", "class_1", "class_2")
  assert (copy.short_side, copy.quality) == (SHORT_SIDE, 95)
  meta = json.loads((tmp_path / "train.json").read_text())
  assert meta["num_classes"] == 3 and meta["num_shards"] == 4 and meta["num_records"] == 10
  assert meta["shards"] == [f"train-0000{k}-of-00004.array_record" for k in range(4)]
  assert meta["source"] == repr(folder) and not (tmp_path / "train.in_progress.json").exists()
  copied = 0
  for i in range(len(folder)):
    original, example = folder[i], copy[i]
    assert set(example) == set(original) == {"image", "label"}
    assert example["label"] == original["label"] and example["label"].dtype == np.int32
    assert example["image"].dtype == np.uint8
    h, w = original["image"].shape[:2]
    nh, nw, channels = example["image"].shape
    assert channels == 3 and min(nh, nw) == min(h, w, SHORT_SIDE)
    assert abs(nw - nh * w / h) <= 1 and abs(nh - nw * h / w) <= 1  # Aspect kept.
    data, label = copy.encoded(i)
    assert label == original["label"] and data[:2] == b"\xff\xd8"  # Always a JPEG.
    source_bytes = folder.encoded(i)[0]
    if min(h, w) <= SHORT_SIDE and folder.paths[i].endswith(".jpg"):
      assert data == source_bytes  # Small enough: copied byte for byte.
      copied += 1
      continue
    reference = Image.fromarray(original["image"]).resize((nw, nh), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    reference.save(buffer, "JPEG", quality=95)
    assert data == buffer.getvalue(), i
    image, reference = example["image"].astype(float), np.asarray(reference)
    diff = np.abs(image - reference).mean()
    assert diff < 4, (i, diff)
  assert copied == summary["copied"] == 4  # 40x60, 30x30, 48x300, 47x47; not the small PNG.
  # Pickles as its file names (grain workers), and reads the same.
  again = pickle.loads(pickle.dumps(copy))
  np.testing.assert_array_equal(again[5]["image"], copy[5]["image"])


def test_the_config_names_the_copy(tmp_path, folder):
  prepare.prepare(folder, tmp_path, "train", short_side=SHORT_SIDE, progress=False)
  config = ml_collections.ConfigDict(
    {"source": "prepared", "data_dir": str(tmp_path), "train_split": "", "eval_split": ""}
  )
  source = sources.create_source(config, "train")
  assert isinstance(source, sources.PreparedSource) and len(source) == len(folder)
  # The eval split ("test" by default) was not written: the error says how to write it.
  with pytest.raises(FileNotFoundError, match=r"test\.json.*python -m cljax\.data\.prepare"):
    sources.create_source(config, "eval")
  config.data_dir = ""
  with pytest.raises(ValueError, match="needs data.data_dir"):
    sources.create_source(config, "train")


class _Stops:
  """A source that fails at one record (a run killed there), otherwise the wrapped one."""

  def __init__(self, source, at):
    self.source, self.at, self.class_names = source, at, source.class_names

  def __len__(self):
    return len(self.source)

  def encoded(self, index):
    if index == self.at:
      raise KeyboardInterrupt(f"stopped at record {index}")
    return self.source.encoded(index)

  def __repr__(self):
    return repr(self.source)


def test_a_stopped_copy_resumes_to_the_same_bytes(tmp_path, folder, monkeypatch):
  kwargs = {"short_side": SHORT_SIDE, "quality": 90, "records_per_shard": 3, "progress": False}
  straight = tmp_path / "straight"
  prepare.prepare(folder, straight, "train", **kwargs)
  assert len([f for f in os.listdir(straight) if f.endswith(".array_record")]) == 4
  split = tmp_path / "split"
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(_Stops(folder, at=7), split, "train", **kwargs)  # In shard 2 of 0..3.
  left = sorted(os.listdir(split))
  assert left == [
    "train-00000-of-00004.array_record",
    "train-00001-of-00004.array_record",
    "train-00002-of-00004.array_record.tmp",  # The shard being written, never renamed.
    "train.in_progress.json",
  ]
  # A copy without its metadata is not read.
  with pytest.raises(FileNotFoundError, match="incomplete"):
    sources.PreparedSource(split, "train")
  # Also lose a whole shard: it is written again.
  os.remove(split / "train-00001-of-00004.array_record")
  first = split / "train-00000-of-00004.array_record"
  first_mtime = first.stat().st_mtime_ns
  written = []
  write_shard = prepare.write_shard
  monkeypatch.setattr(
    prepare,
    "write_shard",
    lambda s, p, k, *a, **kw: written.append(k) or write_shard(s, p, k, *a, **kw),
  )
  summary = prepare.prepare(folder, split, "train", **kwargs)
  assert written == [1, 2, 3] and summary["skipped_shards"] == 1 and summary["written"] == 7
  assert first.stat().st_mtime_ns == first_mtime
  assert _files(split) == _files(straight)
  # A rerun of a finished copy writes nothing and changes nothing.
  written.clear()
  assert prepare.prepare(folder, split, "train", **kwargs)["written"] == 0 and not written
  assert _files(split) == _files(straight)


def test_worker_processes_write_the_same_bytes(tmp_path, folder):
  kwargs = {"short_side": SHORT_SIDE, "quality": 90, "records_per_shard": 3, "progress": False}
  prepare.prepare(folder, tmp_path / "one", "train", **kwargs)
  summary = prepare.prepare(folder, tmp_path / "two", "train", workers=2, **kwargs)
  assert summary["written"] == len(folder)
  assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_other_settings_and_empty_sources_are_refused(tmp_path, folder):
  prepare.prepare(folder, tmp_path, "train", short_side=SHORT_SIDE, progress=False)
  with pytest.raises(ValueError, match=r"made with short_side=48, not short_side=32"):
    prepare.prepare(folder, tmp_path, "train", short_side=32, progress=False)
  with pytest.raises(ValueError, match=r"quality=90, not quality=80"):
    prepare.prepare(folder, tmp_path, "train", short_side=SHORT_SIDE, quality=80, progress=False)
  # Another split's copy may share the folder.
  prepare.prepare(folder, tmp_path, "validation", short_side=32, progress=False)
  empty = sources.ArraySource(np.zeros((0, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match="has no records"):
    prepare.prepare(empty, tmp_path / "empty", "train", progress=False)


def test_sources_of_decoded_pixels_are_encoded(tmp_path):
  # Synthetic images (no file bytes): resized and encoded; class names kept.
  synthetic = sources.SyntheticSource(5, image_size=40, num_classes=3)
  prepare.prepare(synthetic, tmp_path / "s", short_side=32, quality=95, progress=False)
  copy = sources.PreparedSource(tmp_path / "s")
  assert copy.class_names == synthetic.class_names
  for i in range(5):
    assert copy[i]["image"].shape == (32, 32, 3) and copy[i]["label"] == synthetic[i]["label"]
  # Unlabelled arrays: label -1, no class names, num_classes 0.
  pixels = np.random.default_rng(0).integers(0, 256, (3, 20, 24, 3), np.uint8)
  prepare.prepare(sources.ArraySource(pixels), tmp_path / "a", short_side=0, progress=False)
  copy = sources.PreparedSource(tmp_path / "a")
  assert copy.class_names is None and copy.metadata["num_classes"] == 0
  assert copy[2]["image"].shape == (20, 24, 3) and copy[2]["label"] == -1


def test_command_line(tmp_path):
  images = _folder(tmp_path / "images", SIZES[:4])
  out = tmp_path / "copy"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "cljax.data.prepare",
      "--config=configs/quickstart.py",
      f"--out_dir={out}",
      "--short_side=32",
      "--records_per_shard=3",
      "--config.data.source=folder",
      f"--config.data.data_dir={images}",
      "--config.data.train_split=.",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=False,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  assert "prepared 4 images in 2 shards" in result.stdout and "MB/image" in result.stdout
  copy = sources.PreparedSource(out, ".")  # Split "." is stored as "all".
  assert len(copy) == 4 and os.path.isfile(out / "all.json")
  assert min(copy[2]["image"].shape[:2]) == 32


def test_training_on_a_prepared_copy_with_crops_on_device(tmp_path):
  sizes = [(int(h), int(w)) for h, w in np.random.default_rng(2).integers(24, 64, (32, 2))]
  images = sources.ImageFolderSource(_folder(tmp_path / "images", sizes, classes=4))
  prepare.prepare(images, tmp_path / "copy", "train", short_side=32, progress=False)
  config = tiny_config()
  config.data.source = "prepared"
  config.data.data_dir = str(tmp_path / "copy")
  config.data.train_split = config.data.eval_split = "train"
  config.data.crop_on_device = True
  config.data.canvas_size = 48
  config.data.num_workers = 0
  config.train.num_steps = 2
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 100
  config.evals.knn_at_end = False
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  losses = {r["step"]: r["loss"] for r in metrics.read_jsonl(workdir / "metrics.jsonl")}
  assert sorted(losses) == [1, 2] and all(np.isfinite(list(losses.values())))
