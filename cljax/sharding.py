"""One data-parallel mesh over all devices of all processes, and batch placement."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from cljax import errors

DATA_AXIS = "data"


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis ``'data'`` over ``devices`` (default: all of them).

  The axis is Auto, not Explicit: under Explicit axes (the default of
  ``jax.make_mesh`` in recent JAX) global-array code such as ``z @ z.T`` on a
  batch-sharded ``z`` raises, and ``shard_map`` rejects closed-over values.
  """
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_global_batch(global_batch_size: int, mesh: Mesh) -> None:
  """Raises a ValueError unless the batch splits evenly over devices and processes."""
  num_devices = mesh.devices.size
  num_processes = jax.process_count()
  for count, what in ((num_devices, "devices"), (num_processes, "processes")):
    if global_batch_size % count:
      raise errors.DataError(
        f"data.global_batch_size={global_batch_size} is not divisible by the number of "
        f"{what} ({count}). Choose a multiple of {count}, e.g. "
        f"--config.data.global_batch_size={max(count, global_batch_size // count * count)}."
      )


def host_to_global(batch: Any, mesh: Mesh) -> Any:
  """Turns each process's local batch (a pytree of NumPy arrays) into global arrays."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def bn_axis_name(mesh: Mesh | None) -> str | None:
  """The axis BatchNorm averages its statistics over on ``mesh``: ``'data'``, or None alone.

  On a mesh of one device BatchNorm over the axis is BatchNorm over the device's batch, but
  its psum of the statistics would stay in the compiled step as a one-participant
  all-reduce per layer (47 in a ResNet-50 step), each a kernel and a fusion barrier. So the
  model is built without the axis there. None (no mesh known) keeps the axis: correct on
  any mesh.
  """
  return None if mesh is not None and mesh.devices.size == 1 else DATA_AXIS


def vary(tree: Any, axis: str) -> Any:
  """``tree``'s replicated arrays cast to device-varying over ``axis``, inside ``shard_map``
  (no data moves; the cast's transpose sums the cotangents over ``axis``)."""
  # JAX 0.8.2 deprecated jax.lax.pvary for pcast(..., to="varying"); 0.10 removed it.
  pcast = getattr(jax.lax, "pcast", None)
  if pcast is None:
    return jax.lax.pvary(tree, axis)
  return pcast(tree, axis, to="varying")


def varies_over(x: jax.Array, axis: str) -> bool:
  """Whether ``x`` is typed device-varying over ``axis`` (``shard_map``'s check_vma)."""
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)  # Up to JAX 0.9.
  if vma is None:
    mat = getattr(aval, "manual_axis_type", None)  # JAX 0.10.
    vma = getattr(mat, "varying", None)
  # Where neither is found, assume varying: callers then take a collective they may not need.
  return True if vma is None else axis in vma


def invariant(tree: Any, axis: str) -> Any:
  """``tree``'s device-varying arrays as replicated over ``axis``, for values that are equal
  on every device but typed varying (computed from a ``vary`` copy of replicated parameters
  alone), as ``shard_map`` out_specs ``P()`` require. The maximum over devices of equal
  values is each of them exactly (a mean would round)."""
  return jax.tree.map(lambda x: jax.lax.pmax(x, axis) if varies_over(x, axis) else x, tree)
