"""Memory you can read before you rent a pod: the train step compiled for N devices, abstractly.

``python -m cljax.bench --config=configs/X.py --parts=memory`` builds the state and the
batch as shapes only (``jax.eval_shape``: nothing is allocated, a 1B-parameter tower included),
lays the state out as the config says (``step.state_specs``: replicated, or FSDP), compiles
the run's own train step for the devices JAX sees and reads XLA's memory analysis of one
device. On a CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` gives N devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m cljax.bench \\
        --config=configs/clip_vith14.py --parts=memory --config.mesh.state_sharding=fsdp

The step is compiled at the recipe's batch and at half of it; the difference gives the
bytes each further example costs, and from it the largest per-device batch that fits each
chip in ``CHIPS`` (a linear extrapolation, labelled so). A CPU compile is not the
accelerator's: XLA's TPU and GPU compilers fuse and schedule otherwise, so temporaries are
an estimate there; the state's bytes are exact on any backend.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from cljax import methods, run, sharding, step
from cljax.data import sources
from cljax.data import views as views_lib

GiB = 2**30
# Memory per chip that a program may use (HBM): TPU v5e, TPU v4, H100 SXM.
CHIPS = {"tpu_v5e": 16 * GiB, "tpu_v4": 32 * GiB, "h100": 80 * GiB}


def abstract_state(method: methods.Method, mesh: Mesh) -> Any:
  """The initial TrainState as ``jax.ShapeDtypeStruct``s laid out on ``mesh`` (no probe)."""
  shape = method.modality.input_shape(method.config)
  lr_fn = optax.constant_schedule(0.0)  # Any schedule gives the optimiser state its shapes.
  shapes = jax.eval_shape(
    lambda key: step.create_train_state(method, key, lr_fn, shape, mesh=mesh),
    jax.random.key(0),
  )
  specs = step.state_specs(shapes, method, mesh.devices.size)
  return jax.tree.map(
    lambda s, spec: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, spec)),
    shapes,
    specs,
  )


def state_table(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, Any]:
  """Per-device bytes of the config's train state on ``num_devices`` devices, computed from
  each leaf's shape and ``step.state_specs`` alone: no devices, no compile (any count).

  Returns:
    ``{"params", "state_bytes_replicated", "state_bytes_per_device", "largest_leaf_bytes"}``;
    per device is what each device holds under ``mesh.state_sharding``.
  """
  method = methods.create_method(config, max(config.train.num_steps, 1), 1)
  shape = method.modality.input_shape(config)
  lr_fn = optax.constant_schedule(0.0)
  shapes = jax.eval_shape(
    lambda key: step.create_train_state(method, key, lr_fn, shape), jax.random.key(0)
  )
  specs = step.state_specs(shapes, method, num_devices)
  nbytes = lambda x: math.prod(x.shape) * np.dtype(x.dtype).itemsize
  leaves, spec_leaves = jax.tree.leaves(shapes), jax.tree.leaves(specs)
  per_device = sum(
    nbytes(x) // (num_devices if sharding.split_dim(spec) is not None else 1)
    for x, spec in zip(leaves, spec_leaves, strict=True)
  )
  return {
    "params": sum(math.prod(x.shape) for x in jax.tree.leaves(shapes.params)),
    "state_bytes_replicated": sum(nbytes(x) for x in leaves),
    "state_bytes_per_device": per_device,
    "floor_bytes_per_device": per_device + _whole_in_step(shapes.params, specs.params),
    "largest_leaf_bytes": max(nbytes(x) for x in leaves),
  }


def _whole_in_step(params: Any, specs: Any) -> int:
  """Bytes a device holds whole during the step besides its state (``docs/design.md``): the
  gradient of every parameter before it is summed, and each split parameter gathered; for
  the split parameters of scanned blocks, which the model gathers a layer at a time, one
  layer of each (its parameters and gradient)."""
  total = 0
  per_layer = step.left_to_the_model(specs)
  for x, spec, layer in zip(*map(jax.tree.leaves, (params, specs, per_layer)), strict=True):
    size = math.prod(x.shape) * np.dtype(x.dtype).itemsize
    if layer:
      total += 2 * size // x.shape[0]
    elif sharding.split_dim(spec) is not None:
      total += 2 * size
    else:
      total += size
  return total


def state_bytes_per_device(state: Any) -> int:
  """Bytes of ``state`` (abstract, with shardings) that each device holds."""
  total = 0
  for x in jax.tree.leaves(state):
    shard = x.sharding.shard_shape(x.shape)
    total += math.prod(shard) * np.dtype(x.dtype).itemsize
  return total


def abstract_batch(config: ml_collections.ConfigDict, mesh: Mesh, global_batch: int) -> dict:
  """The step's batch for ``global_batch`` examples as shapes, split over ``mesh``.

  The keys and per-example shapes come from the method's own iterator over a few synthetic
  images (two views or one, local crops, caption tokens, canvases: whatever the config
  makes), so nothing here knows which method runs.
  """
  tiny = config.copy_and_resolve_references()
  n = mesh.devices.size
  with tiny.unlocked():
    tiny.data.source, tiny.data.num_examples, tiny.data.num_classes = "synthetic", 2 * n, 4
    tiny.data.global_batch_size, tiny.data.num_workers = n, 0
  source = sources.create_source(tiny.data, "train")
  method = methods.create_method(tiny)
  views = views_lib.ViewSpec.from_config(tiny.data)
  iterator = method.create_train_iterator(source, mesh, views, device_resident=False)
  try:
    example = next(iterator)
  finally:
    iterator.close()
  batch_sharding = sharding.batch_sharded(mesh)
  return {
    k: jax.ShapeDtypeStruct((global_batch, *v.shape[1:]), v.dtype, sharding=batch_sharding)
    for k, v in example.items()
    if k in run.BATCH_KEYS
  }


def compiled_memory(step_fn: Any, state: Any, batch: dict) -> dict[str, int]:
  """XLA's memory analysis of ``step_fn`` compiled for ``(state, batch)``, per device, and
  the seconds the compile took (``compile_s``; the persistent cache may serve it)."""
  start = time.perf_counter()
  analysis = step_fn.lower(state, batch, jax.random.key(0)).compile().memory_analysis()
  fields = ("argument", "output", "alias", "temp", "generated_code")
  out = {f"{f}_bytes": int(getattr(analysis, f"{f}_size_in_bytes")) for f in fields}
  out["compile_s"] = round(time.perf_counter() - start, 2)
  # Donated state: its outputs reuse the arguments' buffers (alias).
  out["total_bytes"] = (
    out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
  )
  return out


def memory_row(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> dict[str, Any]:
  """The "memory" row: per-device bytes of the run's step on ``mesh`` (default all devices)
  at ``data.global_batch_size`` and at half of it, and the largest per-device batch that fits
  each chip."""
  mesh = mesh or sharding.create_mesh()
  n = mesh.devices.size
  batch = config.data.global_batch_size
  half = max(n, batch // 2 // n * n)
  method = methods.create_method(config, max(config.train.num_steps, 1), 1)
  state = abstract_state(method, mesh)
  step_fn = step.make_train_step(method, mesh, optax.constant_schedule(0.0))
  full = compiled_memory(step_fn, state, abstract_batch(config, mesh, batch))
  row = {
    "part": "memory",
    "num_devices": n,
    "state_sharding": config.mesh.state_sharding,
    "global_batch_size": batch,
    "params": sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
    "state_bytes_per_device": state_bytes_per_device(state),
    "state_bytes_replicated": sum(
      math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)
    ),
    **{k: v for k, v in full.items()},
    "backend": jax.default_backend(),
  }
  if half < batch:
    smaller = compiled_memory(step_fn, state, abstract_batch(config, mesh, half))
    per_example = (full["total_bytes"] - smaller["total_bytes"]) / ((batch - half) / n)
    row["bytes_per_example_per_device"] = int(per_example)
    fixed = full["total_bytes"] - per_example * batch / n
    for chip, capacity in CHIPS.items():
      fits = (capacity - fixed) // per_example if per_example > 0 else None
      row[f"max_batch_per_device_{chip}"] = None if fits is None else max(int(fits), 0)
    row["max_batch_note"] = "linear in the batch, from compiles at the batch and at half of it"
  return row
