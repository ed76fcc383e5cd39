"""Image folders: one subfolder per class, unreadable files found up front and skipped."""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from absl import logging
from PIL import Image

from cljax import errors
from cljax.data.images import Example, _example, decode_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class SkippedFile(NamedTuple):
  """A file that ImageFolderSource left out, and why."""

  path: str
  reason: str


def _check_image_file(path: str) -> str | None:
  """Returns why `path` is unreadable, or None when it looks whole (a cheap, no-decode check)."""
  try:
    if os.path.getsize(path) == 0:
      return "empty file (0 bytes)"
    with Image.open(path) as image:
      fmt = image.format
      # verify() checks the structure, and for PNG every chunk's CRC up to the end marker.
      image.verify()
    if fmt == "JPEG":
      # verify() does not read a JPEG's entropy-coded data, so a cut-off file passes it; a
      # whole one ends with the EOI marker (some writers pad with NUL bytes after it).
      with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 4096))
        if not f.read().rstrip(b"\0").endswith(b"\xff\xd9"):
          return "truncated JPEG (no end-of-image marker)"
  except Exception as e:  # PIL raises many types for bad files; any of them means skip.
    return f"{type(e).__name__}: {e}"
  return None


class ImageFolderSource:
  """JPEG/PNG files, one subfolder per class (classes sorted by name), as torchvision lays out.

  Unreadable files are found once, at construction, without decoding: 0-byte files, files
  Pillow cannot identify, PNGs failing their CRC check and JPEGs without an end-of-image
  marker (cut off). They are skipped, logged with their paths and listed in `skipped`; with
  `strict=True` the first one is an error instead. A folder with no class subfolders is read
  as unlabelled images (label -1).

  Attributes:
    class_names: the subfolder names, sorted; label i is class_names[i].
    skipped: a SkippedFile (path, reason) for every file left out.
  """

  def __init__(
    self,
    root: str | os.PathLike,
    *,
    strict: bool = False,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    check_threads: int = 16,
  ):
    """Indexes and checks every image under `root`.

    Args:
      root: the folder; images are found recursively inside each class subfolder.
      strict: raise on the first unreadable file instead of skipping it.
      extensions: file name endings (case-insensitive) that count as images.
      check_threads: threads for the file check (it is I/O bound).

    Raises:
      FileNotFoundError: root is not a folder.
      ValueError: no readable image was found, or (strict) an unreadable one was.
    """
    self.root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(self.root):
      raise errors.DataNotFoundError(f"image folder {self.root} does not exist")
    exts = tuple(e.lower() for e in extensions)
    subdirs = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
    self.class_names = tuple(subdirs) if subdirs else None
    candidates: list[tuple[str, int]] = []
    for label, folder in enumerate(subdirs) if subdirs else [(-1, "")]:
      base = os.path.join(self.root, folder)
      walk = os.walk(base, followlinks=True) if subdirs else [(base, [], os.listdir(base))]
      for dirpath, dirnames, filenames in walk:
        dirnames.sort()
        candidates += [
          (os.path.join(dirpath, f), label) for f in sorted(filenames) if f.lower().endswith(exts)
        ]
    with concurrent.futures.ThreadPoolExecutor(max(1, check_threads)) as pool:
      problems = list(pool.map(_check_image_file, [p for p, _ in candidates]))
    self.skipped = [
      SkippedFile(p, why) for (p, _), why in zip(candidates, problems, strict=True) if why
    ]
    if strict and self.skipped:
      first = self.skipped[0]
      raise errors.DataError(
        f"{len(self.skipped)} unreadable image(s) in {self.root}; the first: {first.path} "
        f"({first.reason}). Remove them, or skip them with --config.data.strict=False "
        "(ImageFolderSource(..., strict=False))."
      )
    for item in self.skipped:
      logging.warning("ImageFolderSource: skipping %s (%s)", item.path, item.reason)
    if self.skipped:
      logging.warning("ImageFolderSource: skipped %d unreadable files", len(self.skipped))
    good = [c for c, why in zip(candidates, problems, strict=True) if not why]
    if not good:
      raise errors.DataError(
        f"no readable images ({', '.join(exts)}) in {self.root} "
        f"({len(self.skipped)} unreadable); expected one subfolder of images per class"
      )
    self.paths = [p for p, _ in good]
    self.labels = np.asarray([label for _, label in good], np.int32)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> Example:
    path = self.paths[index]
    with open(path, "rb") as f:
      return _example(decode_image(f.read(), path), self.labels[index])

  def encoded(self, index: int) -> tuple[bytes, np.int32]:
    """The file's bytes and label, undecoded (``decode.py``'s decode-only path)."""
    with open(self.paths[index], "rb") as f:
      return f.read(), self.labels[index]

  def __repr__(self) -> str:
    return f"ImageFolderSource(root={self.root!r}, num_examples={len(self)})"
