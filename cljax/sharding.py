"""One mesh over all devices of all processes, batch placement, and the state's layout on it.

The batch is split over the mesh's one axis, 'data'. The train state is either replicated
(data parallelism) or, with ``mesh.state_sharding="fsdp"``, each large leaf split over the
same axis along one of its dimensions (fully sharded data parallelism, ZeRO-3): the step
gathers the parameters at use and reduce-scatters their gradients (``gather``,
``sum_gradients``), and whatever needs a whole leaf takes its norm over the axis
(``global_norm``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from cljax import errors

DATA_AXIS = "data"
# The values of mesh.state_sharding.
STATE_SHARDINGS = ("replicated", "fsdp")


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
  cast = (
    (lambda x: jax.lax.pvary(x, axis))
    if pcast is None
    else (lambda x: pcast(x, axis, to="varying"))
  )
  # Leaves already varying (gathered from FSDP shards) stay as they are.
  return jax.tree.map(lambda x: x if varies_over(x, axis) else cast(x), tree)


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


def fsdp_spec(shape: Sequence[int], num_devices: int, min_elements: int) -> PartitionSpec:
  """Where FSDP splits a leaf of ``shape`` over ``num_devices``: its largest dimension that
  splits evenly (the first of equal ones), or nowhere (``P()``) for a leaf of fewer than
  ``min_elements`` elements or without such a dimension.

  The spec depends on the shape alone, so a parameter, its optimiser moments and its copy
  in a target network are laid out alike and combine elementwise shard by shard.
  """
  if num_devices <= 1 or math.prod(shape) < max(min_elements, 1):
    return PartitionSpec()
  splits = [d for d in range(len(shape)) if shape[d] % num_devices == 0]
  if not splits:
    return PartitionSpec()
  dim = max(splits, key=lambda d: (shape[d], -d))
  return PartitionSpec(*(DATA_AXIS if d == dim else None for d in range(len(shape))))


def split_dim(spec: PartitionSpec) -> int | None:
  """The dimension ``spec`` splits over 'data', or None (replicated)."""
  for dim, axis in enumerate(spec):
    if axis == DATA_AXIS:
      return dim
  return None


def gather(tree: Any, specs: Any, axis: str = DATA_AXIS) -> Any:
  """Inside ``shard_map``: the whole value of each leaf that ``specs`` split (an all-gather
  along its split dimension); other leaves as they are."""

  def whole(x, spec):
    dim = split_dim(spec)
    return x if dim is None else jax.lax.all_gather(x, axis, axis=dim, tiled=True)

  return jax.tree.map(whole, tree, specs)


def sum_gradients(grads: Any, specs: Any, axis: str = DATA_AXIS, summed: Any = None) -> Any:
  """Inside ``shard_map``: each device's gradients summed over ``axis``, once: for a leaf that
  ``specs`` split, only this device's part of the sum (a reduce-scatter, the transpose of
  ``gather``); for the others the whole sum (an all-reduce). Leaves where the tree
  ``summed`` is True are already this device's part of the sum (the model gathered them,
  and differentiation reduce-scattered their gradients) and stay as they are."""
  summed = jax.tree.map(lambda _: False, specs) if summed is None else summed

  def reduce(g, spec, done):
    if done:
      return g
    dim = split_dim(spec)
    if dim is None:
      return jax.lax.psum(g, axis)
    return jax.lax.psum_scatter(g, axis, scatter_dimension=dim, tiled=True)

  return jax.tree.map(reduce, grads, specs, summed)


def squared_norm(
  x: jax.Array, axis: str | None = DATA_AXIS, dims: tuple[int, ...] | None = None
) -> jax.Array:
  """The squared L2 norm of a whole leaf (over ``dims``, keeping them; default all): inside
  ``shard_map`` the sum over ``axis`` of the parts when the leaf is device-varying (split,
  or per device); else of ``x`` itself."""
  sq = jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32)))
  sq = jnp.sum(sq) if dims is None else jnp.sum(sq, axis=dims, keepdims=True)
  if axis is not None and _in_shard_map(axis) and varies_over(sq, axis):
    sq = jax.lax.psum(sq, axis)
  return sq


def global_norm(tree: Any, axis: str | None = DATA_AXIS) -> jax.Array:
  """``optax.tree.norm`` of the whole tree, whichever of its leaves FSDP split over ``axis``."""
  squares = [squared_norm(x, axis) for x in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(squares, jnp.zeros((), jnp.float32)))


def device_index(axis: str = DATA_AXIS) -> jax.Array | int:
  """This device's position on ``axis`` inside ``shard_map`` over it (0 outside: one device
  holding the global batch)."""
  return jax.lax.axis_index(axis) if _in_shard_map(axis) else 0


def _in_shard_map(axis: str) -> bool:
  """Whether ``axis`` is a mapped axis here (inside ``shard_map`` over it)."""
  try:
    jax.lax.axis_index(axis)
  except NameError:
    return False
  return True
