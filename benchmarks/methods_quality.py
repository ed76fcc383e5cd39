"""Every method on CIFAR-10 with the same budget: pretrain a fixed number of steps, then kNN.

    python benchmarks/methods_quality.py --methods=simclr,moco_v2,byol --steps=300
    python benchmarks/methods_quality.py --methods=all --steps=300 --workdir=runs/methods

Each method runs its CIFAR recipe's ``:cpu`` preset (``configs/<recipe>.py:cpu``: the tiny
CIFAR ResNet of ``configs/common/cifar10.py``, batch 256, on the shared CIFAR-10 copy) for
``--steps`` steps with the schedule sized to end there (warm-up and decay complete), then
the kNN top-1 (k=200, T=0.07) of the encoder features on the 10,000 test images against
the 50,000 training images; the first method also evaluates its randomly initialised
encoder, the baseline every method must beat. A method whose workdir already holds
``quality.json`` is not rerun. Results: ``WORKDIR/<method>/quality.json`` and a Markdown
table on stdout (also written to ``WORKDIR/table.md``).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import time

import jax
from absl import app, flags, logging

from cljax import collapse, metrics, train

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
RECIPES = {
  "simclr": "simclr_cifar10_shared.py",
  "moco_v2": "mocov2_cifar10.py",
  "moco_v3": "mocov3_cifar10.py",
  "byol": "byol_cifar10.py",
  "simsiam": "simsiam_cifar10.py",
  "dino": "dino_cifar10.py",
  "swav": "swav_cifar10.py",
  "barlow_twins": "barlow_twins_cifar10.py",
  "supcon": "supcon_cifar10.py",
  "supervised": "supervised_cifar10.py",
  "simclr_debiased": "simclr_debiased_cifar10.py",
  # The InfoNCE variants of Methods II: the debiased recipe with another loss.name.
  "simclr_hard_negative": "simclr_debiased_cifar10.py",
  "simclr_decoupled": "simclr_debiased_cifar10.py",
  # SwAV's CPU preset with fewer prototypes than the 512 global crops of a batch.
  "swav_k100": "swav_cifar10.py",
  # ... and with the recipe's queue (15 batches: 4,352 rows in Sinkhorn for 3,000 prototypes).
  "swav_queue": "swav_cifar10.py",
}
# Overrides of a recipe's ``:cpu`` config, for the entries that share a recipe file.
OVERRIDES = {
  "simclr_hard_negative": {"loss.name": "hard_negative", "loss.beta": 1.0},
  "simclr_decoupled": {"loss.name": "decoupled"},
  "swav_k100": {"swav.num_prototypes": 100},
  "swav_queue": {"swav.queue_size": 3840, "swav.queue_start_epoch": 0.2},
}

_METHODS = flags.DEFINE_list("methods", ["all"], f"Methods to run, or all: {sorted(RECIPES)}.")
_STEPS = flags.DEFINE_integer("steps", 300, "Pretraining steps per method (batch 256).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/methods_quality", "Folder of the runs.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "The CIFAR-10 copy, if not the recipes' default.")


def recipe_config(method: str):
  path = os.path.join(REPO, "configs", RECIPES[method])
  spec = importlib.util.spec_from_file_location(f"recipe_{method}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("cpu")
  for key, value in OVERRIDES.get(method, {}).items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def run_method(method: str, steps: int, workdir: str, baseline: bool) -> dict:
  path = os.path.join(workdir, "quality.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  config = recipe_config(method)
  if _DATA_DIR.value:
    config.data.data_dir = _DATA_DIR.value
  config.train.num_steps = steps
  config.evals.knn_at_end = True
  config.evals.knn_baseline = baseline
  t0 = time.time()
  final = train.train_and_evaluate(config, workdir)
  seconds = time.time() - t0
  records = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  losses = [r["loss"] for r in records if "loss" in r]
  result = {
    "method": method,
    "recipe": f"configs/{RECIPES[method]}:cpu"
    + "".join(f" {k}={v}" for k, v in OVERRIDES.get(method, {}).items()),
    "date": datetime.date.today().isoformat(),
    "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
    "steps": steps,
    "epochs": steps * config.data.global_batch_size / 50000,
    "seconds": seconds,
    "knn_top1": final.get("knn_top1"),
    "knn_top1_random_init": final.get("knn_top1_random_init"),
    "first_loss": losses[0] if losses else None,
    "last_loss": losses[-1] if losses else None,
    "embedding_std_ratio": final.get("embedding_std")
    and final["embedding_std"] * config.head.output_dim**0.5,
    "collapse_warnings": collapse.collapse_warnings(
      {
        "embedding_std_ratio": final.get("embedding_std", 0.0) * config.head.output_dim**0.5,
        "effective_rank": final.get("effective_rank", float("inf")),
      }
    ),
  }
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  return result


def table(results: list[dict]) -> str:
  lines = [
    "| method | recipe | steps (epochs) | minutes | kNN top-1 | loss first -> last | "
    "embedding std x sqrt(d) |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in results:
    lines.append(
      f"| {r['method']} | `{r['recipe']}` | {r['steps']} ({r['epochs']:.2f}) | "
      f"{r['seconds'] / 60:.1f} | **{r['knn_top1']:.2%}** | "
      f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} | {r['embedding_std_ratio']:.2f} |"
    )
  base = [r["knn_top1_random_init"] for r in results if r.get("knn_top1_random_init")]
  if base:
    lines.append(f"| random init (same architecture) | | 0 | | {base[0]:.2%} | | |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  metrics.setup_logging()
  names = sorted(RECIPES) if _METHODS.value == ["all"] else _METHODS.value
  unknown = [m for m in names if m not in RECIPES]
  if unknown:
    raise app.UsageError(f"Unknown methods {unknown}; available: {sorted(RECIPES)}.")
  results = []
  for i, method in enumerate(names):
    logging.info("=== %s ===", method)
    workdir = os.path.join(_WORKDIR.value, method)
    results.append(run_method(method, _STEPS.value, workdir, baseline=i == 0))
    print(table(results), flush=True)
  with open(os.path.join(_WORKDIR.value, "table.md"), "w") as f:
    f.write(table(results) + "\n")


if __name__ == "__main__":
  app.run(main)
