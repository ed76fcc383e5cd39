"""CLIP quality: train the CPU recipe for a time budget, then zero-shot and retrieval vs chance.

    python benchmarks/clip_quality.py --budget_minutes=9 --workdir=runs/clip_quality

Trains ``configs/clip_shared_cpu.py`` (CIFAR-10 images of ``../shared/data`` captioned from
their class names, see ``cljax.data.captions``) for a time budget: a short calibration run
measures the step rate and the schedule is sized to end within the budget (warm-up and
cosine decay complete). Then, on the held-out test split (10,000 images never trained on,
captioned with templates never trained on):

- zero-shot top-1/top-5 with CLIP's 18-prompt CIFAR-10 ensemble (chance 10% / 50%);
- image-to-text and text-to-image recall@1/5/10 over a fixed random 1,000 of those images
  and their distinct captions, with the exact chance level of each;

for the trained model and for the same model at its random initialisation. Results go to
``WORKDIR/clip_quality.json``; a Markdown table is printed. Rerunning with the same
workdir resumes or re-evaluates instead of starting over.
"""

from __future__ import annotations

import os
import time

import budget
import jax
from absl import app, flags, logging
from ml_collections import config_flags

from cljax import metrics, run, sharding, train
from cljax.data import sources
from cljax.evaluate import runner, zero_shot

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "clip_shared_cpu.py"),
  "CLIP config; override fields with --config.a.b=v.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/clip_quality", "Run folder.")
_BUDGET = flags.DEFINE_float("budget_minutes", 9.0, "Training time budget (without --steps).")
_STEPS = flags.DEFINE_integer("steps", 0, "> 0: train this many steps instead of a budget.")
_CALIBRATION_STEPS = flags.DEFINE_integer(
  "calibration_steps", 12, "Steps timed (after compilation) to size the time budget."
)


def _plan(config, workdir: str, num_examples: int) -> dict:
  """The steps of the run: --steps if set, else what --budget_minutes allows."""
  return budget.plan(
    config,
    workdir,
    num_examples,
    path=os.path.join(workdir, "clip_quality_plan.json"),
    budget_minutes=_BUDGET.value,
    num_steps=_STEPS.value,
    calibration_steps=_CALIBRATION_STEPS.value,
  )


def _table(results: dict) -> list[str]:
  lines = [
    "| model | zero-shot top-1 | top-5 | I->T R@1 | R@5 | R@10 | T->I R@1 | R@5 | R@10 |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  any_result = next(iter(results.values()))
  chance = {
    "zero_shot": {"top1": any_result["zero_shot"]["chance"], "top5": 0.5},
    "retrieval": {
      k: any_result["retrieval"][f"chance_{k}"] for k in ("image_to_text", "text_to_image")
    },
  }
  for name, r in [*results.items(), ("chance", chance)]:
    zs, ret = r["zero_shot"], r["retrieval"]
    cells = [zs["top1"], zs["top5"]]
    cells += [ret[d][f"r{k}"] for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
    lines.append(f"| {name} | " + " | ".join(f"{c:.1%}" for c in cells) + " |")
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  metrics.setup_logging()
  config, workdir = _CONFIG.value, _WORKDIR.value
  num_examples = len(sources.create_source(config.data, "train"))
  plan = _plan(config, workdir, num_examples)
  config.train.num_steps = plan["num_steps"]
  config.evals.knn_at_end = False
  logging.info("Plan: %s", plan)

  t0 = time.time()
  final = train.train_and_evaluate(config, workdir)
  train_seconds = time.time() - t0
  t0 = time.time()
  mesh = sharding.create_mesh()
  r = run.create_run(config, mesh=mesh, with_iterator=False)
  state, step = runner.restore_checkpoint(r.method, workdir, mesh=mesh)
  init = r.initial_state(with_probe=False)
  results = {
    f"CLIP, {plan['epochs']:.2f} epochs": zero_shot.evaluate_zero_shot(config, state, mesh),
    "same model, random init": zero_shot.evaluate_zero_shot(config, init, mesh),
  }
  eval_seconds = time.time() - t0
  budget.save_summary(
    os.path.join(workdir, "clip_quality.json"),
    config,
    plan,
    train_seconds,
    eval_seconds,
    final,
    steps=step,
    results=results,
  )
  if jax.process_index() == 0:
    print(
      f"{plan['epochs']:.2f} epochs ({step} steps) in {train_seconds / 60:.1f} min; "
      f"evaluation {eval_seconds / 60:.1f} min; held-out: "
      f"{next(iter(results.values()))['retrieval']['num_images']} images for retrieval."
    )
    print("\n".join(_table(results)))


if __name__ == "__main__":
  app.run(main)
