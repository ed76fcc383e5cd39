"""Compiler options for the programs cljax compiles: ``jax.jit(..., compiler_options=...)``.

On CPU, XLA hands convolutions to the YNNPACK library by default (the flag
``--xla_cpu_experimental_ynn_fusion_type``). That path computes a convolution's weight
gradient as a convolution with a window the size of the image, about 12x slower than XLA's
own kernels: on a 2-core CPU the backward pass of the quickstart's ResNet took 10x its
forward pass. ``python benchmarks/cpu_convolutions.py`` compares both compilations (idle
2-core CPU: weight gradient 7.6x, quickstart train step 1.8x faster without YNNPACK;
``CLJAX_XLA_CPU_DEFAULTS=1`` compiles with XLA's defaults). So the
convolution-heavy programs (the train step, feature extraction, fine-tuning, on-device
augmentation) are compiled on CPU without YNNPACK fusions.

Only the CPU is concerned; on GPU and TPU the options are empty. An option this jaxlib does
not know (a renamed flag in another JAX version) is dropped after one probe, with an info
line, so it can never stop a run. A user who sets the flag in ``$XLA_FLAGS`` keeps theirs.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _supported_cpu_options() -> dict[str, str]:
  user = os.environ.get("XLA_FLAGS", "")
  options = {k: v for k, v in _CPU_OPTIONS.items() if k not in user}
  if not options:
    return {}
  try:
    cpu = jax.local_devices(backend="cpu")[0]  # This process's own, in a multi-process run.
    jax.jit(lambda x: x + 1, compiler_options=options)(jax.device_put(np.float32(0), cpu))
  except Exception as e:  # noqa: BLE001 - any refusal means: compile with XLA's defaults.
    logging.info("CPU compiler options %s not used: %s", options, e)
    return {}
  return options


def for_devices(devices) -> dict[str, str]:
  """The compiler options for a program that runs on ``devices`` (empty off CPU)."""
  platforms = {d.platform for d in np.ravel(devices)}
  if platforms != {"cpu"} or os.environ.get("CLJAX_XLA_CPU_DEFAULTS", "") == "1":
    return {}
  return dict(_supported_cpu_options())


def for_mesh(mesh: Mesh) -> dict[str, str]:
  """The compiler options for a program sharded over ``mesh``."""
  return for_devices(mesh.devices)
