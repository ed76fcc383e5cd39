"""A ViT train step, data-parallel against FSDP, in one run; and what scanning the blocks
saves in compile time.

    python benchmarks/fsdp_step.py                     # 8 CPU devices, ViT-S/16 at 32 px
    python benchmarks/fsdp_step.py --variant=B/16 --image_size=224 --batch=256  # accelerator

On 8 CPU devices of one 23 GB host the default is ViT-S/16: a replicated ViT-B/16 run keeps
eight copies of its AdamW state and writes eight new ones each step (over 23 GB: the process
is killed), which is the point of FSDP, but leaves nothing to time.

Builds SimCLR on the MoCo v3 ViT recipe's encoder and optimiser (``configs/mocov3_vits16.py``:
AdamW), as ``run.create_run`` builds a run, once per layout (``mesh.state_sharding``
replicated and fsdp), and times their steps on one synthetic batch with their windows
interleaved (``cljax.bench.timing``), so a shared machine's drift hits both: the ratio is
the figure. Then compiles the same step with the 12 blocks unrolled and scanned
(``model.scan_blocks``) and prints both compile times. On a CPU the script asks XLA for 8
devices unless ``XLA_FLAGS`` says otherwise.
"""

import argparse
import json
import os
import runpy
import statistics
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cljax import methods, sharding, step  # noqa: E402
from cljax import run as run_lib  # noqa: E402
from cljax.bench import memory, timing  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(args, **model):
  c = runpy.run_path(os.path.join(REPO, "configs/mocov3_vits16.py"))["get_config"]()
  c.method, c.predictor.num_layers = "simclr", 0
  c.model.variant = args.variant
  c.model.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  for key, value in model.items():
    c.model[key] = value
  c.data.source, c.data.num_examples, c.data.num_classes = "synthetic", 2 * args.batch, 10
  c.data.image_size, c.data.global_batch_size = args.image_size, args.batch
  c.data.crop_on_device, c.data.num_workers = False, 0
  c.evals.online_probe = False
  c.train.num_steps = 100
  return c


def _name(variant: str) -> str:
  return "vit_" + variant.replace("/", "").lower()


def _batch(run):
  n, size = run.config.data.global_batch_size, run.config.data.image_size
  rng = np.random.default_rng(0)
  images = lambda: rng.integers(0, 256, (n, size, size, 3), np.uint8)
  host = {"view_a": images(), "view_b": images(), "aug_seed": rng.integers(0, 2**31 - 1, n)}
  host["aug_seed"] = host["aug_seed"].astype(np.int32)
  host["label"] = np.zeros(n, np.int32)
  return sharding.host_to_global(host, run.mesh)


def throughput(args) -> dict:
  runs, loops = {}, {}
  for layout in ("replicated", "fsdp"):
    config = _config(args)
    config.mesh.state_sharding = layout
    run = run_lib.create_run(config, with_iterator=False)
    batch, box = _batch(run), {"state": run.state}

    def loop(k, run=run, batch=batch, box=box):
      for _ in range(k):
        box["state"], _ = run.step_fn(box["state"], batch, run.step_rng)
      return box["state"]

    runs[layout], loops[layout] = run, (loop, 2)
  results = timing.time_interleaved(loops, windows=args.windows, steps=args.steps)
  row = {"part": "fsdp_step", "device_kind": jax.devices()[0].device_kind}
  row["num_devices"], row["model"] = jax.device_count(), _name(args.variant)
  row["image_size"], row["global_batch_size"] = args.image_size, args.batch
  for layout, result in results.items():
    row[f"{layout}_steps_per_s"] = round(statistics.median(result["steps_per_s"]), 4)
  ratios = [
    f / r
    for f, r in zip(
      results["fsdp"]["steps_per_s"], results["replicated"]["steps_per_s"], strict=True
    )
  ]
  row["fsdp_over_replicated"] = round(statistics.median(ratios), 4)
  row["window_ratios"] = [round(r, 4) for r in ratios]
  return row


def compile_times(args) -> dict:
  row = {"part": "scan_compile", "model": _name(args.variant), "num_devices": jax.device_count()}
  for scan in (False, True):
    config = _config(args, scan_blocks=scan)
    config.mesh.state_sharding = "fsdp"
    mesh = sharding.create_mesh()
    method = methods.create_method(config, 100, 1)
    state = memory.abstract_state(method, mesh)
    batch = memory.abstract_batch(config, mesh, config.data.global_batch_size)
    step_fn = step.make_train_step(method, mesh, lambda _: 0.1)
    start = time.perf_counter()
    step_fn.lower(state, batch, jax.random.key(0)).compile()
    row["scanned_compile_s" if scan else "unrolled_compile_s"] = round(
      time.perf_counter() - start, 2
    )
  row["unrolled_over_scanned"] = round(row["unrolled_compile_s"] / row["scanned_compile_s"], 2)
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="S/16")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--windows", type=int, default=5)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--skip_compile", action="store_true")
  args = parser.parse_args()
  from cljax import compile_cache

  compile_cache.setup("none")  # Cold compiles: the figures are compile times.
  print(json.dumps(throughput(args)), flush=True)
  if not args.skip_compile:
    print(json.dumps(compile_times(args)), flush=True)


if __name__ == "__main__":
  main()
