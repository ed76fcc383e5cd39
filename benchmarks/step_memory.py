"""Compiled memory of the full train step with and without gradient caching.

    python benchmarks/step_memory.py --batch=1024 --chunks=1,2,4,8

Compiles (does not run) cljax's SimCLR train step for the CIFAR ResNet-18
recipe on 8 simulated CPU devices and prints, per ``train.grad_chunks``, XLA's
memory analysis of one device: temporary buffers (activations and workspace)
and arguments. Works on any backend when XLA_FLAGS is left alone there.
"""

import argparse
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from cljax import methods, sharding  # noqa: E402
from cljax import step as step_lib  # noqa: E402


def _config(batch: int, chunks: int, image_size: int, dtype: str):
  import importlib.util
  import pathlib

  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "simclr_cifar10.py"
  spec = importlib.util.spec_from_file_location("recipe", path)
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  c = recipe.get_config()
  c.data.global_batch_size = batch
  c.data.image_size = image_size
  c.model.dtype = dtype
  c.train.grad_chunks = chunks
  return c


def measure(batch: int, chunks: int, image_size: int = 32, dtype: str = "float32") -> dict:
  config = _config(batch, chunks, image_size, dtype)
  mesh = sharding.create_mesh()
  lr_fn = optax.constant_schedule(0.1)
  shape = (image_size, image_size, 3)
  method = methods.create_method(config)
  create = lambda: step_lib.create_train_state(method, jax.random.key(0), lr_fn, shape, mesh=mesh)
  state = jax.eval_shape(create)
  views = jax.ShapeDtypeStruct((batch, *shape), jnp.uint8)
  batch_spec = {
    "view_a": views,
    "view_b": views,
    "aug_seed": jax.ShapeDtypeStruct((batch,), jnp.int32),
    "label": jax.ShapeDtypeStruct((batch,), jnp.int32),
  }
  step = step_lib.make_train_step(method, mesh, lr_fn)
  t0 = time.time()
  compiled = step.lower(state, batch_spec, jax.random.key(0)).compile()
  analysis = compiled.memory_analysis()
  return {
    "model": "resnet18_cifar",
    "global_batch_images": batch,
    "views_per_device": 2 * batch // mesh.devices.size,
    "grad_chunks": chunks,
    "temp_mib_per_device": round(analysis.temp_size_in_bytes / 2**20, 1),
    "argument_mib_per_device": round(analysis.argument_size_in_bytes / 2**20, 1),
    "compile_s": round(time.time() - t0, 1),
    "backend": jax.default_backend(),
    "devices": mesh.devices.size,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1024)
  parser.add_argument("--chunks", default="1,2,4,8")
  parser.add_argument("--image_size", type=int, default=32)
  args = parser.parse_args()
  for chunks in (int(c) for c in args.chunks.split(",")):
    print(json.dumps(measure(args.batch, chunks, args.image_size)), flush=True)


if __name__ == "__main__":
  main()
