"""Compiled memory of the plain versus blockwise NT-Xent loss and gradient, per device.

    python benchmarks/loss_memory.py                      # 8k, 32k, 64k global views
    python benchmarks/loss_memory.py --global_views=8192 --block_sizes=256,1024

Compiles (does not run) ``value_and_grad`` of ``losses.nt_xent`` and
``losses.nt_xent_blockwise`` inside ``shard_map`` over a mesh of
``--devices`` fake CPU devices, each device holding global_views / devices of
the 128-d embeddings (half first views, half second views), and prints one
JSON row per (global views, implementation, block size) with XLA's memory
analysis of the per-device program: ``temp_bytes`` (scratch buffers: logits,
softmax, gathered keys and their gradients), ``argument_bytes`` and
``output_bytes``, ``total_bytes`` = arguments + outputs + temp - aliased, and
``xla_peak_bytes`` as XLA reports it (on XLA:CPU it leaves out the temp
buffers, so ``total_bytes`` is the figure to read).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--global_views", default="8192,32768,65536")
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--block_sizes", default="1024", help="comma-separated, blockwise only")
  parser.add_argument("--temperature", type=float, default=0.1)
  return parser.parse_args(argv)


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  # Fake CPU devices must be requested before JAX is imported.
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
  ).strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from cljax import losses, sharding

  mesh = sharding.create_mesh(jax.devices()[: args.devices])

  def loss_fn(implementation: str, block_size: int):
    def per_device(z_a, z_b):
      if implementation == "plain":
        return losses.nt_xent(z_a, z_b, args.temperature, axis_name=sharding.DATA_AXIS)
      return losses.nt_xent_blockwise(
        z_a, z_b, args.temperature, axis_name=sharding.DATA_AXIS, block_size=block_size
      )

    spec = P(sharding.DATA_AXIS)
    return jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec), out_specs=P())

  configs = [("plain", None)] + [("blockwise", int(b)) for b in args.block_sizes.split(",")]
  for global_views in (int(g) for g in args.global_views.split(",")):
    z = jax.ShapeDtypeStruct(
      (global_views // 2, args.dim),
      jnp.float32,
      sharding=NamedSharding(mesh, P(sharding.DATA_AXIS)),
    )
    for implementation, block_size in configs:
      start = time.perf_counter()
      grad_fn = jax.jit(jax.value_and_grad(loss_fn(implementation, block_size), argnums=(0, 1)))
      stats = grad_fn.lower(z, z).compile().memory_analysis()
      total = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
      )
      row = {
        "global_views": global_views,
        "local_views": global_views // args.devices,
        "dim": args.dim,
        "devices": args.devices,
        "implementation": implementation,
        "block_size": block_size,
        "temp_bytes": stats.temp_size_in_bytes,
        "argument_bytes": stats.argument_size_in_bytes,
        "output_bytes": stats.output_size_in_bytes,
        "total_bytes": total,
        "xla_peak_bytes": getattr(stats, "peak_memory_in_bytes", None),
        "local_logits_bytes": 4 * (global_views // args.devices) * global_views,
        "compile_s": round(time.perf_counter() - start, 2),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
      }
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
