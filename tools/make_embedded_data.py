"""Builds cljax/data/embedded/: the class-balanced Fashion-MNIST subset shipped in the package.

    .venv/bin/python tools/make_embedded_data.py [--fashion_mnist=DIR] [--out=DIR] [--seed=0]

Reads the original gzipped IDX files (by default from ../shared/data/fashion_mnist beside the
repository), keeps 1,000 train images per class (from the train files) and 200 test images per
class (from the t10k files), and writes them as gzipped IDX files, with the MIT notice and a
README. The output is byte-for-byte reproducible for a given seed.
"""

import argparse
import gzip
import hashlib
import pathlib
import shutil

import numpy as np

from cljax.data import sources

REPO = pathlib.Path(__file__).resolve().parents[1]
PER_CLASS = {"train": 1000, "test": 200}
ORIGINAL_PREFIX = {"train": "train", "test": "t10k"}

README = """\
# Embedded Fashion-MNIST subset

A small, class-balanced subset of Fashion-MNIST (28x28 grayscale, 10 classes), shipped inside
the package so that tests, the quickstart and the `embedded` data source work with no network
and no data folder. Load it with `cljax.data.sources.ArraySource.embedded("train" | "test")` or
`data.source = "embedded"` in a config.

| split | from            | images | per class | images file | labels file |
|-------|-----------------|--------|-----------|-------------|-------------|
{rows}

Images are kept in their original order within each split; which ones were kept was drawn with
`numpy.random.default_rng({seed})` (a permutation of each class's indices, first N taken).
Format: MNIST IDX, gzip'd. Rebuild with `python tools/make_embedded_data.py --seed={seed}`.

Class ids: {classes}.

Fashion-MNIST is Copyright 2017 Zalando SE, MIT licence: see `LICENSE-fashion-mnist`.
Source: https://github.com/zalandoresearch/fashion-mnist

sha256:
{hashes}
"""


def write_idx(path: pathlib.Path, array: np.ndarray) -> None:
  """Writes a uint8 array as a gzipped IDX file, byte-for-byte reproducibly (no gzip mtime)."""
  array = np.ascontiguousarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  path.write_bytes(gzip.compress(header + array.tobytes(), compresslevel=9, mtime=0))


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
  """Returns sorted indices of `per_class` examples of every class, drawn with `rng`."""
  chosen = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    if len(members) < per_class:
      raise ValueError(f"class {c} has only {len(members)} examples, {per_class} wanted")
    chosen.append(rng.permutation(members)[:per_class])
  return np.sort(np.concatenate(chosen))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--fashion_mnist", type=pathlib.Path, default=REPO.parent / "shared" / "data" / "fashion_mnist"
  )
  parser.add_argument("--out", type=pathlib.Path, default=REPO / "cljax" / "data" / "embedded")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(args.seed)
  rows, hashes = [], []
  for split, per_class in PER_CLASS.items():
    prefix = args.fashion_mnist / ORIGINAL_PREFIX[split]
    images = sources.read_idx(f"{prefix}-images-idx3-ubyte.gz")
    labels = sources.read_idx(f"{prefix}-labels-idx1-ubyte.gz")
    keep = balanced_subset(labels, per_class, rng)
    images_name, labels_name = sources.EMBEDDED_FILES[split]
    write_idx(args.out / images_name, images[keep])
    write_idx(args.out / labels_name, labels[keep])
    rows.append(
      f"| {split} | {prefix.name}-* | {len(keep)} | {per_class} | "
      f"`{images_name}` | `{labels_name}` |"
    )
    for name in (images_name, labels_name):
      hashes.append(f"    {hashlib.sha256((args.out / name).read_bytes()).hexdigest()}  {name}")
  shutil.copyfile(args.fashion_mnist / "COPYRIGHT", args.out / "LICENSE-fashion-mnist")
  classes = ", ".join(f"{i} {n}" for i, n in enumerate(sources.FASHION_MNIST_CLASSES))
  text = README.format(
    rows="\n".join(rows), seed=args.seed, classes=classes, hashes="\n".join(hashes)
  )
  (args.out / "README.md").write_text(text)
  for path in sorted(args.out.iterdir()):
    print(f"{path.stat().st_size:>10,d}  {path}")


if __name__ == "__main__":
  main()
