"""Convolutions on CPU with XLA's defaults and with cljax's compiler options (xla_options).

    python benchmarks/cpu_convolutions.py            # a 3x3 convolution, then the quickstart step
    python benchmarks/cpu_convolutions.py --step=false

Prints milliseconds per call of a 3x3 convolution's forward pass and its gradients in the
input and in the weights (flax's NHWC/HWIO layout), and of the quickstart's train step,
compiled once with XLA's defaults (YNNPACK fusions on) and once with
``cljax.xla_options.for_devices`` (what cljax's train step, feature extraction and
fine-tuning use on CPU). One process, alternating, so the ratio is measured on one load.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
import time

import jax
import numpy as np
from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cljax import run, xla_options  # noqa: E402

_BATCH = flags.DEFINE_integer("batch", 512, "Images per convolution call.")
_SIZE = flags.DEFINE_integer("size", 28, "Image side.")
_CHANNELS = flags.DEFINE_integer("channels", 16, "Input and output channels.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (after one warm-up).")
_STEP = flags.DEFINE_bool("step", True, "Also time the quickstart's train step (~1 min).")


def _ms(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(_REPEATS.value):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / _REPEATS.value * 1e3


def _conv_rows(options: dict[str, str]) -> list[tuple[str, float]]:
  dims = ("NHWC", "HWIO", "NHWC")
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims)
  n, s, c = _BATCH.value, _SIZE.value, _CHANNELS.value
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, s, s, c)).astype(np.float32)
  w = rng.normal(size=(3, 3, c, c)).astype(np.float32)
  total = lambda x, w: conv(x, w).sum()
  jit = lambda f: jax.jit(f, compiler_options=options)
  return [
    ("conv forward", _ms(jit(conv), x, w)),
    ("conv gradient in the input", _ms(jit(jax.grad(total, 0)), x, w)),
    ("conv gradient in the weights", _ms(jit(jax.grad(total, 1)), x, w)),
  ]


def _step_ms(defaults: bool) -> float:
  """The quickstart's compiled train step, ms per step (its own batch)."""
  spec = importlib.util.spec_from_file_location("qs", REPO / "configs" / "quickstart.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  os.environ["CLJAX_XLA_CPU_DEFAULTS"] = "1" if defaults else "0"
  r = run.create_run(module.get_config())
  state, batch = r.state, r.global_batch(next(r.iterator))
  step = r.step_fn.lower(state, batch, r.step_rng).compile()
  r.iterator.close()
  holder = [state]

  def one(_):
    holder[0] = step(holder[0], batch, r.step_rng)[0]
    return holder[0]

  return _ms(one, None)


def main(argv):
  del argv
  if jax.default_backend() != "cpu":
    raise SystemExit("This benchmark is about XLA's CPU backend; run it with JAX_PLATFORMS=cpu.")
  options = xla_options.for_devices(jax.devices())
  if not options:
    raise SystemExit("cljax compiles with XLA's defaults here (jaxlib or $XLA_FLAGS): no change.")
  pairs = zip(_conv_rows({}), _conv_rows(options), strict=True)
  rows = [(name, a, b) for (name, a), (_, b) in pairs]
  if _STEP.value:
    rows.append(("quickstart train step", _step_ms(defaults=True), _step_ms(defaults=False)))
  print(f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores, options {options}")
  print(f"{'ms per call':32s} {'XLA defaults':>12s} {'cljax':>10s} {'speed-up':>9s}")
  for name, a, b in rows:
    print(f"{name:32s} {a:12.1f} {b:10.1f} {a / b:8.1f}x")


if __name__ == "__main__":
  app.run(main)
