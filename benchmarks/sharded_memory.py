"""Per-device memory of the big towers, data-parallel against FSDP, at 8, 64 and 256 devices.

    python benchmarks/sharded_memory.py            # state only: shapes, no compile (seconds)
    python benchmarks/sharded_memory.py --compile  # + activations from CPU compiles (minutes)

For CLIP ViT-B/16, L/14, H/14 and g/14 (open_clip's towers, each at its published batch)
and the ViT-g/14 recipes of DINO and DINOv2, prints a Markdown table: parameters, the train
state per device under each layout (from each leaf's shape and ``step.state_specs``: exact,
any device count, nothing allocated), the step's floor (the state, plus the float32
gradients each device computes whole before they are summed and, under FSDP, the parameters
it gathers whole; a
scanned tower's only one layer at a time: ``docs/design.md``), and whether the step fits a
TPU v5e (16 GiB), v4 (32 GiB) and H100 (80 GiB) at the recipe's global batch. With
``--compile``, the bytes one more example costs a device, and the step's other
temporaries, come from XLA's memory analysis of the FSDP step compiled for 8 CPU devices at
1 and 2 examples a device (``cljax.bench.memory``), with ``model.remat`` as the recipes set
it; the total at N devices is then state(N) + temporaries + (batch / N) x per-example bytes.
A CPU compile fuses and schedules otherwise than a TPU's or GPU's, so the activation part is
an estimate; without ``--compile`` the fit columns count the floor alone (a lower bound).
"""

import argparse
import os
import runpy

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from cljax import sharding  # noqa: E402
from cljax.bench import memory  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (vision variant, embed, text width, text depth, text heads, global batch): open_clip's
# model configs (ViT-B-16, ViT-L-14, ViT-H-14, ViT-g-14) and the batches of the published
# runs (OpenAI's 32,768; laion2b_s32b_b79k, laion2b_s34b_b88k).
CLIP_TOWERS = {
  "CLIP ViT-B/16": ("B/16", 512, 512, 12, 8, 32768),
  "CLIP ViT-L/14": ("L/14", 768, 768, 12, 12, 32768),
  "CLIP ViT-H/14": ("H/14", 1024, 1024, 24, 16, 79104),
  "CLIP ViT-g/14": ("g/14", 1024, 1024, 24, 16, 88064),
}
DEVICES = (8, 64, 256)


def _configs():
  base = runpy.run_path(os.path.join(REPO, "configs/clip_vith14.py"))["get_config"]
  for name, (variant, embed, width, depth, heads, batch) in CLIP_TOWERS.items():
    c = base()
    c.model.variant, c.data.global_batch_size = variant, batch
    c.clip.embed_dim, c.clip.text_width, c.clip.text_depth, c.clip.text_heads = (
      embed,
      width,
      depth,
      heads,
    )
    # Offline: the built-in tokenizer and template captions build the same (n, 77) tokens.
    c.clip.tokenizer, c.clip.captions, c.clip.eot_id = "builtin", "templates", 2
    yield name, c
  for name, recipe in (
    ("DINO ViT-g/14", "dino_vitg14.py"),
    ("DINOv2 ViT-g/14", "dinov2_vitg14.py"),
  ):
    yield name, runpy.run_path(os.path.join(REPO, "configs", recipe))["get_config"]()


def _activations(config) -> tuple[int, int]:
  """(other temporaries, bytes per example) of the FSDP step on 8 devices, from compiles at
  1 and 2 examples a device."""
  c = config.copy_and_resolve_references()
  c.mesh.state_sharding = "fsdp"
  c.data.global_batch_size = 16
  row = memory.memory_row(c, sharding.create_mesh())
  per_example = row["bytes_per_example_per_device"]
  temp = row["total_bytes"] - row["state_bytes_per_device"] - 2 * per_example
  return max(temp, 0), per_example


def _gb(n: float) -> str:
  return f"{n / 1e9:.2f}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--compile", action="store_true", help="Also compile for activations.")
  args = parser.parse_args()
  chips = memory.CHIPS
  header = ["model", "params (M)", "batch", "devices", "layout", "state GB/device"]
  header += ["floor GB/device", "with activations GB/device" if args.compile else "-"]
  header += [f"fits {chip}" for chip in chips]
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for name, config in _configs():
    temp, per_example = _activations(config) if args.compile else (0, 0)
    for n in DEVICES:
      for layout in ("replicated", "fsdp"):
        config.mesh.state_sharding = layout
        table = memory.state_table(config, n)
        batch = config.data.global_batch_size
        floor = table["floor_bytes_per_device"]
        # The compiled temporaries hold the whole parameters and gradients already.
        total = table["state_bytes_per_device"] + temp + per_example * batch / n
        need = total if args.compile else floor
        fits = ["yes" if need <= capacity else "no" for capacity in chips.values()]
        cells = [name, f"{table['params'] / 1e6:.0f}", str(batch), str(n), layout]
        cells += [_gb(table["state_bytes_per_device"]), _gb(floor)]
        cells += [_gb(total) if args.compile else "-"]
        print("| " + " | ".join(cells + fits) + " |", flush=True)


if __name__ == "__main__":
  main()
