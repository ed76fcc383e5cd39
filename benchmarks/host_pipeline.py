"""Writes ImageNet-size photo JPEGs as an encoded .npz, for the host paths of ``cljax.bench``.

    python benchmarks/host_pipeline.py --out_dir=/tmp/jpeg224 --num_images=2048
    python -m cljax.bench --config=configs/simclr_r50.py --config.data.source=encoded_npz \
        --config.data.data_dir=/tmp/jpeg224 --config.data.global_batch_size=256

The images are ``cljax.bench.host.photo_jpegs`` (crops of real photographs at 500x375,
ImageNet's most common size, quality 90), stored as the "encoded_npz" source reads them
(``jpeg``, ``offsets``, ``labels``), so the full training path (b) decodes real JPEG bytes
through grain workers instead of reading already-decoded synthetic arrays.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from cljax.bench import host

_OUT_DIR = flags.DEFINE_string("out_dir", None, "Folder for train.npz.", required=True)
_NUM_IMAGES = flags.DEFINE_integer("num_images", 2048, "Distinct images.")
_HEIGHT = flags.DEFINE_integer("height", 375, "Image height.")
_WIDTH = flags.DEFINE_integer("width", 500, "Image width.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10, "Labels cycle through this many.")


def main(argv):
  del argv
  encoded = host.photo_jpegs(_NUM_IMAGES.value, _HEIGHT.value, _WIDTH.value)
  labels = np.arange(_NUM_IMAGES.value) % _NUM_CLASSES.value
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  path = os.path.join(_OUT_DIR.value, "train.npz")
  np.savez(path, jpeg=encoded.data, offsets=encoded.offsets, labels=labels)
  kb = np.diff(encoded.offsets).mean() / 1e3
  print(f"{path}: {_NUM_IMAGES.value} JPEGs of {_HEIGHT.value}x{_WIDTH.value}, {kb:.0f} KB each")


if __name__ == "__main__":
  app.run(main)
