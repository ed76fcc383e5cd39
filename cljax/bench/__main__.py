"""Throughput benchmark: ``python -m cljax.bench --config=configs/X.py [--config.a.b=v ...]``.

Prints one JSON object per line (process 0 only), each with a "part":

- ``env``: JAX version, devices, host cores, date, model and batch.
- ``matmul`` (accelerators only): an 8192^3 bf16 matmul's TFLOP/s, the practical peak.
- ``step`` (a): the run's compiled train step (``run.create_run``) alone on a synthetic batch
  (random values in the real batch's keys, shapes and dtypes) on the devices: views/s,
  compile time, peak device memory, achieved TFLOP/s from a hand count of the model's FLOPs
  (``flops.py``; image encoders only, None for others) and its fraction of the chip's peak.
- ``full`` (b): the training loop's per-step work on the config's data: next batch (host
  grain iterator + ``host_to_global``, or device-resident batches), the step, and every
  ``train.log_every_steps`` the metric average fetched and written (checkpoints excluded);
  one row per mode, with ``ratio_to_step`` = (b)/(a).
- ``input`` (c): the input pipeline alone: the host iterator as configured, the host
  iterator on one core (no workers, one read thread), or the device-resident batches.
- ``host_jpeg`` (image configs only): the two host paths through grain workers on
  ImageNet-size JPEGs of real photos (500x375, quality 90) encoded in memory, per worker
  count: ``pil_crops`` (Pillow decodes, two random-resized crops on the host) and
  ``decode_only`` (libjpeg-turbo decodes onto a canvas; the step crops,
  ``data.crop_on_device``), with images/s per core, views/s, bytes sent to the device per
  image and the ratio of the paths; cores needed = accelerator images/s divided by
  ``images_per_s_per_core``.
- ``memory`` (only when named): the step compiled for the devices JAX sees from shapes
  alone, nothing allocated (``cljax.bench.memory``): per-device bytes of the state, the
  arguments and the temporaries from XLA's memory analysis, and the largest per-device batch
  that fits a TPU v5e, v4 and H100. On a CPU,
  ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` gives N devices.
- ``summary``: the headline figures.

Each timing warms up, synchronises with ``jax.block_until_ready`` and reports the median
of ``--windows`` windows of ``--steps_per_window`` steps (default one logging interval, so
each window of (b) holds one metric fetch, as in training); input windows last at least 2 s.
``recompiles`` counts XLA compilations inside the timed windows (0 expected). The persistent
compilation cache (``cljax.compile_cache``) is on: a second benchmark of the same config loads
the step instead of compiling it (``compile_cache_hits``; ``--compilation_cache_dir=none``
measures a cold compile).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
from absl import app, flags
from ml_collections import config_flags

from cljax import cli, compile_cache
from cljax.bench import run

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "A config file from configs/; override fields with --config.a.b=v.",
  lock_config=True,
)
_WINDOWS = flags.DEFINE_integer("windows", 5, "Timed windows per measurement (median reported).")
_STEPS = flags.DEFINE_integer(
  "steps_per_window", 0, "Steps per window of step/full; 0: the config's train.log_every_steps."
)
_WARMUP = flags.DEFINE_integer("warmup_steps", 2, "Untimed steps before the step/full windows.")
_PARTS = flags.DEFINE_list("parts", list(run.DEFAULT_PARTS), f"Measurements, any of {run.PARTS}.")
_MODES = flags.DEFINE_list(
  "modes", [], "Data paths for full and input: host, device; default: as the config says."
)
_JPEG_WORKERS = flags.DEFINE_list(
  "jpeg_workers", [], "grain worker counts for host_jpeg; default: 0 (one core) and all cores."
)
_OUTPUT = flags.DEFINE_string("output", None, "Also append the rows to this JSONL file.")
flags.mark_flags_as_required(["config"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  compile_cache.setup()

  def emit(row):
    if jax.process_index() != 0:
      return
    line = json.dumps(row)
    print(line, flush=True)
    if _OUTPUT.value:
      with open(_OUTPUT.value, "a") as f:
        f.write(line + "\n")

  with cli.user_errors():
    run.run_benchmark(
      _CONFIG.value,
      windows=_WINDOWS.value,
      steps_per_window=_STEPS.value,
      warmup_steps=_WARMUP.value,
      parts=_PARTS.value,
      modes=_MODES.value,
      jpeg_workers=[int(w) for w in _JPEG_WORKERS.value],
      emit=emit,
    )


if __name__ == "__main__":
  app.run(main)
