"""Command line: a pre-resized JPEG copy of any image source, in ArrayRecord shards.

    python -m cljax.data.prepare --config=configs/X.py --out_dir=DIR [--split=train] \\
      [--short_side=400] [--quality=90] [--records_per_shard=10000] [--workers=0] \\
      [--config.data.x=v ...]

As FFCV does, the copy stores every image of the config's source (``data.source`` with its
``data_dir`` and split) as a JPEG whose shorter side is at most ``short_side`` pixels:
Pillow's antialiased bicubic resize, aspect kept, never enlarged (0 keeps every size), then
encoded at ``quality``. A JPEG already small enough is copied byte for byte (lossless, and
no decoding). Recipes read the copy with ``--config.data.source=prepared
--config.data.data_dir=DIR`` (``sources.PreparedSource``); the decode-only path
(``data.crop_on_device``) then decodes small JPEGs.

Files, for the split the config names ``S`` (``data.train_split`` or ``data.eval_split``;
``prefix = sources.PreparedSource.file_prefix(S)``, e.g. "train", "validation")::

  DIR/<prefix>-00000-of-000NN.array_record  records_per_shard records each, in the source's
      order, group_size 1 and uncompressed (JPEGs do not compress): each record a 4-byte
      little-endian int32 label, then the JPEG file's bytes.
  DIR/<prefix>.json  num_records, shards, num_classes, class_names, short_side, quality, the
      source's repr, ...: written last, so its presence means the copy is complete.
  DIR/<prefix>.in_progress.json  the settings of a copy being written; removed at the end.

Resuming: a shard is written as ``<shard>.tmp`` and renamed when whole. A rerun of the same
command keeps every shard present under its final name with the expected record count and
writes the others, so a stopped run, rerun, ends with the same bytes as an uninterrupted one
(the bytes depend only on the source and the settings). A rerun with other settings (or
another source) into the same folder is refused. Two runs must not write the same split into
the same folder at once.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from cljax.data import sources
from cljax.data.images import decode_image

# What the records are; a copy in another format is refused rather than mixed with.
FORMAT = "cljax.prepared.v1: ArrayRecord group_size 1; record = int32 LE label + JPEG bytes"
_SHARD_OPTIONS = "group_size:1,uncompressed"
# The settings a copy is made with: a rerun with other values is refused.
_SETTINGS = ("format", "source", "num_records", "short_side", "quality", "records_per_shard")
_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"


def resized_hw(height: int, width: int, short_side: int) -> tuple[int, int]:
  """The (height, width) an image is stored at: shorter side at most ``short_side`` (0: any),
  aspect kept (the longer side rounded), never enlarged."""
  if short_side <= 0 or min(height, width) <= short_side:
    return height, width
  scale = short_side / min(height, width)
  if height <= width:
    return short_side, max(1, round(width * scale))
  return max(1, round(height * scale)), short_side


def jpeg_hw(data: bytes) -> tuple[int, int] | None:
  """(height, width) of a whole JPEG file from its header (no decoding); None for any other
  bytes, a cut-off JPEG (no end-of-image marker) included."""
  if data[:2] != _JPEG_SOI or not data[-4096:].rstrip(b"\0").endswith(_JPEG_EOI):
    return None
  try:
    with Image.open(io.BytesIO(data)) as image:
      return (image.height, image.width) if image.format == "JPEG" else None
  except Exception:  # Pillow raises many types for bad files: not a JPEG to copy.
    return None


def to_jpeg(
  data: bytes | None,
  image: np.ndarray | None,
  short_side: int,
  quality: int,
  what: str = "image",
) -> bytes:
  """One stored image: a small enough JPEG's own bytes, else a resized, re-encoded JPEG.

  Args:
    data: an encoded image file's bytes, or None when ``image`` is given.
    image: (H, W, 3) uint8 pixels, for sources without file bytes.
    short_side: the largest shorter side kept (0: every size kept).
    quality: the JPEG quality of re-encoded images (1-100).
    what: names the image in errors.

  Returns:
    JPEG bytes: ``data`` itself when it is a whole JPEG whose shorter side is at most
    ``short_side``; else the image resized with Pillow's bicubic filter (antialiased when
    shrinking) to ``resized_hw`` and encoded at ``quality``.

  Raises:
    ValueError: ``data`` is not an image (naming ``what``).
  """
  if data is not None:
    hw = jpeg_hw(data)
    if hw is not None and resized_hw(*hw, short_side) == hw:
      return data
    image = decode_image(data, what)
  height, width = image.shape[:2]
  pil = Image.fromarray(image)
  new_h, new_w = resized_hw(height, width, short_side)
  if (new_h, new_w) != (height, width):
    pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
  buffer = io.BytesIO()
  pil.save(buffer, "JPEG", quality=quality)
  return buffer.getvalue()


def uses_file_bytes(source: Any) -> bool:
  """Whether `source` gives its files' bytes (``encoded``), as ``decode.EncodedRecords`` asks."""
  return bool(callable(getattr(source, "encoded", None)) and getattr(source, "is_encoded", True))


def shard_name(prefix: str, index: int, num_shards: int) -> str:
  """``<prefix>-00003-of-00012.array_record``."""
  return f"{prefix}-{index:05d}-of-{num_shards:05d}.array_record"


class ShardResult(NamedTuple):
  """What writing one shard did."""

  index: int
  records: int
  copied: int  # JPEGs stored byte for byte.
  source_bytes: int  # Bytes of the source's files read (0 for decoded sources).
  max_label: int


def _records(path: str) -> int | None:
  """The number of records in an ArrayRecord file; None if it is missing or unreadable."""
  from array_record.python.array_record_module import ArrayRecordReader

  if not os.path.isfile(path):
    return None
  try:
    reader = ArrayRecordReader(path)
    try:
      return reader.num_records()
    finally:
      reader.close()
  except Exception:  # A damaged file reads as not there: it is rewritten.
    return None


def _max_label(path: str, chunk: int = 256) -> int:
  """The largest label in a written shard (-1 if none)."""
  from array_record.python.array_record_module import ArrayRecordReader

  reader = ArrayRecordReader(path)
  try:
    n, largest = reader.num_records(), -1
    for start in range(0, n, chunk):
      for record in reader.read(list(range(start, min(n, start + chunk)))):
        largest = max(largest, int(sources.PreparedSource.unpack(record)[1]))
    return largest
  finally:
    reader.close()


def write_shard(
  source: Any,
  path: str,
  index: int,
  start: int,
  stop: int,
  *,
  short_side: int,
  quality: int,
  tick: Callable[[], Any] | None = None,
) -> ShardResult:
  """Writes records ``start..stop-1`` of `source` as the shard `path` (via ``path.tmp``).

  ``tick`` is called after each record (a progress bar).
  """
  from array_record.python.array_record_module import ArrayRecordWriter

  encoded = uses_file_bytes(source)
  tmp = path + ".tmp"
  if os.path.exists(tmp):
    os.remove(tmp)  # Left by a stopped run.
  copied = source_bytes = 0
  largest = -1
  writer = ArrayRecordWriter(tmp, _SHARD_OPTIONS)
  try:
    for i in range(start, stop):
      if encoded:
        data, label = source.encoded(i)
        data, image = bytes(data), None
        source_bytes += len(data)
      else:
        example = source[i]
        data, image, label = None, example["image"], example["label"]
      jpeg = to_jpeg(data, image, short_side, quality, f"record {i} of {source!r}")
      copied += jpeg is data
      largest = max(largest, int(label))
      writer.write(sources.PreparedSource.pack(int(label), jpeg))
      if tick is not None:
        tick()
  finally:
    writer.close()
  with open(tmp, "rb") as f:
    os.fsync(f.fileno())  # On disk before its final name says it is whole.
  os.replace(tmp, path)
  return ShardResult(index, stop - start, copied, source_bytes, largest)


# The source of a worker process, sent once when the pool starts.
_WORKER_SOURCE: Any = None


def _init_worker(source: Any) -> None:
  global _WORKER_SOURCE
  _WORKER_SOURCE = source


def _worker_job(job: tuple[int, str, int, int, int, int]) -> ShardResult:
  index, path, start, stop, short_side, quality = job
  return write_shard(
    _WORKER_SOURCE, path, index, start, stop, short_side=short_side, quality=quality
  )


def _write_json(path: str, value: dict[str, Any]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def _check_settings(out_dir: str, split: str, paths: list[str], settings: dict[str, Any]) -> None:
  """Refuses a folder holding a copy of this split made with other settings."""
  for path in paths:
    if not os.path.isfile(path):
      continue
    with open(path) as f:
      old = json.load(f)
    differ = [k for k in _SETTINGS if old.get(k) != settings[k]]
    if differ:
      made = ", ".join(f"{k}={old.get(k)!r}" for k in differ)
      asked = ", ".join(f"{k}={settings[k]!r}" for k in differ)
      raise ValueError(
        f"{out_dir} already holds a copy of split {split!r} made with {made}, not {asked} "
        f"({path}); give another --out_dir, or delete that copy's files to rewrite it"
      )


def prepare(
  source: Any,
  out_dir: str | os.PathLike,
  split: str = "train",
  *,
  short_side: int = 400,
  quality: int = 90,
  records_per_shard: int = 10000,
  workers: int = 0,
  progress: bool = True,
) -> dict[str, Any]:
  """Writes (or finishes writing) the pre-resized copy of `source` in `out_dir`.

  Args:
    source: any random-access image source (``sources.create_source``'s): its
      ``encoded(i)`` file bytes are used when it has them, else its decoded ``source[i]``.
    out_dir: the folder of the copy (created if needed).
    split: the split's name in the config (``data.train_split`` / ``data.eval_split``); the
      files are named after ``PreparedSource.file_prefix(split)``.
    short_side: the largest shorter side stored (0: sizes kept).
    quality: JPEG quality of the re-encoded images.
    records_per_shard: records in each shard (the last holds the rest).
    workers: processes writing whole shards in parallel; 0 writes in this process. They are
      spawned (fresh interpreters), so a script calling this with workers needs Python's
      ``if __name__ == "__main__":`` guard; the command line has it.
    progress: show a progress bar and print a summary line.

  Returns:
    A summary: num_records, num_shards, written (records written by this call), copied
    (of those, JPEGs stored byte for byte), skipped_shards, total_bytes (of the shards),
    source_bytes (of the source files read by this call), seconds, metadata (the json).

  Raises:
    ValueError: an empty source, bad settings, or `out_dir` holding a copy of this split made
      with other settings or from another source.
  """
  from tqdm import tqdm

  if short_side < 0:
    raise ValueError(f"short_side must be >= 0 (0 keeps every size), got {short_side}")
  if not 1 <= quality <= 100:
    raise ValueError(f"quality must be in 1..100, got {quality}")
  if records_per_shard < 1 or workers < 0:
    raise ValueError(
      f"need records_per_shard >= 1 and workers >= 0, got {records_per_shard}, {workers}"
    )
  num_records = len(source)
  if num_records == 0:
    raise ValueError(f"{source!r} has no records: nothing to prepare")
  began = time.perf_counter()
  out_dir = os.path.abspath(os.path.expanduser(os.fspath(out_dir)))
  os.makedirs(out_dir, exist_ok=True)
  prefix = sources.PreparedSource.file_prefix(split)
  meta_path = os.path.join(out_dir, f"{prefix}.json")
  progress_path = os.path.join(out_dir, f"{prefix}.in_progress.json")
  settings = {
    "format": FORMAT,
    "source": repr(source),
    "num_records": num_records,
    "short_side": int(short_side),
    "quality": int(quality),
    "records_per_shard": int(records_per_shard),
  }
  _check_settings(out_dir, split, [meta_path, progress_path], settings)
  if not os.path.isfile(progress_path):
    _write_json(progress_path, settings)

  num_shards = math.ceil(num_records / records_per_shard)
  names = [shard_name(prefix, k, num_shards) for k in range(num_shards)]
  paths = [os.path.join(out_dir, name) for name in names]
  bounds = [
    (k * records_per_shard, min(num_records, (k + 1) * records_per_shard))
    for k in range(num_shards)
  ]
  todo = [k for k in range(num_shards) if _records(paths[k]) != bounds[k][1] - bounds[k][0]]
  done = sorted(set(range(num_shards)) - set(todo))
  skipped_records = sum(bounds[k][1] - bounds[k][0] for k in done)
  bar = tqdm(
    total=num_records,
    initial=skipped_records,
    unit="img",
    desc=f"prepare {prefix}",
    disable=not progress,
    smoothing=0.1,
  )
  results: list[ShardResult] = []
  with bar:
    if workers and len(todo) > 1:
      # spawn: a fresh interpreter per worker, whatever threads this process runs.
      context = multiprocessing.get_context("spawn")
      jobs = [(k, paths[k], *bounds[k], short_side, quality) for k in todo]
      with context.Pool(min(workers, len(todo)), _init_worker, (source,)) as pool:
        for result in pool.imap_unordered(_worker_job, jobs):
          results.append(result)
          bar.update(result.records)
    else:
      for k in todo:
        results.append(
          write_shard(
            source,
            paths[k],
            k,
            *bounds[k],
            short_side=short_side,
            quality=quality,
            tick=lambda: bar.update(1),
          )
        )

  class_names = getattr(source, "class_names", None)
  if class_names is not None:
    num_classes = len(class_names)
  else:
    largest = max([r.max_label for r in results] + [_max_label(paths[k]) for k in done])
    num_classes = largest + 1
  total_bytes = sum(os.path.getsize(p) for p in paths)
  metadata = {
    **settings,
    "split": split,
    "num_shards": num_shards,
    "shards": names,
    "num_classes": int(num_classes),
    "class_names": None if class_names is None else [str(c) for c in class_names],
    "total_bytes": total_bytes,
  }
  _write_json(meta_path, metadata)
  os.remove(progress_path)
  seconds = time.perf_counter() - began
  written = sum(r.records for r in results)
  summary = {
    "num_records": num_records,
    "num_shards": num_shards,
    "written": written,
    "copied": sum(r.copied for r in results),
    "skipped_shards": len(done),
    "total_bytes": total_bytes,
    "source_bytes": sum(r.source_bytes for r in results),
    "seconds": seconds,
    "metadata": metadata,
  }
  if progress:
    print(summary_line(summary, out_dir))
  return summary


def summary_line(summary: dict[str, Any], out_dir: str = "") -> str:
  """The final line: images, MB, MB/image, seconds (and what this run wrote)."""
  n, written, seconds = summary["num_records"], summary["written"], summary["seconds"]
  mb = summary["total_bytes"] / 1e6
  line = (
    f"prepared {n} images in {summary['num_shards']} shards{' in ' + out_dir if out_dir else ''}"
    f": {mb:.1f} MB, {mb / n:.4f} MB/image; wrote {written} ({summary['copied']} copied "
    f"as they were, {summary['skipped_shards']} shards already done) in {seconds:.1f} s"
  )
  if written:
    line += f" ({written / max(seconds, 1e-9):.0f} images/s)"
  if summary["source_bytes"]:
    source_mb = summary["source_bytes"] / 1e6
    line += f"; the source's files: {source_mb:.1f} MB, {source_mb / written:.4f} MB/image"
  return line


def prepare_split(
  data_config: Any, out_dir: str | os.PathLike, split: str = "train", **kwargs: Any
) -> dict[str, Any]:
  """``prepare`` of the source a config's ``data`` section names, at `split`.

  Args:
    data_config: the config's ``data`` (``sources.create_source``'s fields).
    out_dir: the folder of the copy.
    split: "train" or "eval"; the files are named after the config's name for it
      (``data.train_split`` / ``data.eval_split``), which ``PreparedSource`` then finds.
    **kwargs: ``prepare``'s settings.
  """
  source = sources.create_source(data_config, split)
  return prepare(source, out_dir, sources._split_name(data_config, split), **kwargs)


def _define_flags() -> dict[str, Any]:
  # Defined only when run as a program: cljax.main defines --config too, and both modules may
  # be imported by one process (tests).
  from absl import flags
  from ml_collections import config_flags

  return {
    "config": config_flags.DEFINE_config_file(
      "config",
      None,
      "A config file from configs/ naming the source to copy; override fields with "
      "--config.data.x=v.",
      lock_config=True,
    ),
    "out_dir": flags.DEFINE_string("out_dir", None, "Folder of the copy; resumed if present."),
    "split": flags.DEFINE_enum("split", "train", ["train", "eval"], "Which split to copy."),
    "short_side": flags.DEFINE_integer(
      "short_side", 400, "Largest shorter side stored, in pixels (0: keep every size)."
    ),
    "quality": flags.DEFINE_integer("quality", 90, "JPEG quality of re-encoded images."),
    "records_per_shard": flags.DEFINE_integer(
      "records_per_shard", 10000, "Records in each ArrayRecord shard."
    ),
    "workers": flags.DEFINE_integer(
      "workers", 0, "Processes writing shards in parallel (0: this process)."
    ),
  }


def main(argv: list[str], flag_values: dict[str, Any]) -> None:
  from absl import app

  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  values = {name: holder.value for name, holder in flag_values.items()}
  if values["config"] is None or not values["out_dir"]:
    raise app.UsageError("--config and --out_dir are required")
  from cljax import cli

  with cli.user_errors():
    prepare_split(
      values["config"].data,
      values["out_dir"],
      values["split"],
      short_side=values["short_side"],
      quality=values["quality"],
      records_per_shard=values["records_per_shard"],
      workers=values["workers"],
    )


if __name__ == "__main__":
  from absl import app

  _FLAGS = _define_flags()
  app.run(lambda argv: main(argv, _FLAGS))
