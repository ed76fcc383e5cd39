"""Times the checkpoint digests (``cljax.integrity``) at quickstart and ResNet-50 size.

    python benchmarks/checkpoint_integrity.py

Builds the train state's shapes of configs/quickstart.py and of the same recipe with a
ResNet-50 at 224x224 (about 2 x 25.6M parameters with the optimiser's trace), fills them with
random values on the CPU, and prints one JSON line per size: the state's bytes and the
seconds to digest it (paid once per save and once per restore).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # This checkout's cljax, not an installed one.


def _config(resnet50: bool):
  spec = importlib.util.spec_from_file_location("quickstart", REPO / "configs" / "quickstart.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  if resnet50:
    c.model.depth, c.model.stage_sizes, c.model.num_filters = 50, (3, 4, 6, 3), 64
    c.model.stem, c.data.image_size = "imagenet", 224
  return c


def measure(resnet50: bool, repeats: int = 3) -> dict:
  import jax
  import numpy as np

  from cljax import integrity, methods, step

  config = _config(resnet50)
  method = methods.create_method(config)
  size = config.data.image_size
  shapes = jax.eval_shape(
    lambda k: step.create_train_state(method, k, lambda _: 0.0, (size, size, 3)),
    jax.random.key(0),
  )
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    integrity.state_digests(state)
    times.append(time.perf_counter() - t0)
  return {
    "size": "resnet50_224" if resnet50 else "quickstart",
    "state_mb": round(nbytes / 2**20, 1),
    "digest_seconds_best": round(min(times), 3),
    "mb_per_second": round(nbytes / 2**20 / min(times)),
  }


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  for big in (False, True):
    print(json.dumps(measure(big)))
