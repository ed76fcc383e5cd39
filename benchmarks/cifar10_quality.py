"""CIFAR-10 quality: pretrain SimCLR for a time budget or epochs, then kNN and linear probe.

    python benchmarks/cifar10_quality.py --budget_minutes=15            # 2-core CPU preset
    python benchmarks/cifar10_quality.py --epochs=200 \\
        --config=configs/simclr_cifar10_shared.py --workdir=runs/c10_200  # one GPU

Reads the shared CIFAR-10 copy (``configs/simclr_cifar10_shared.py``; set
``--config.data.data_dir`` if it is not at ``../shared/data/cifar10``). With a time budget,
a short calibration run measures the step rate first and the schedule is sized to end within
the budget (warm-up and cosine decay complete, as in a full run). Then the latest checkpoint
is evaluated with ``cljax.evaluate``: kNN (k=200, T=0.07) and the L-BFGS linear probe on the
encoder features, next to the same evaluation of the randomly initialised encoder and of raw
pixels. Results go to ``WORKDIR/quality.json`` and ``WORKDIR/eval/``; a Markdown table is
printed. Rerunning with the same workdir resumes or re-evaluates instead of starting over.
"""

from __future__ import annotations

import os
import time

import budget
import jax
from absl import app, flags, logging
from ml_collections import config_flags

from cljax import metrics, train
from cljax.data import sources
from cljax.evaluate import runner

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
               "simclr_cifar10_shared.py:cpu"),
  "Pretraining config; override fields with --config.a.b=v.",
  lock_config=True,
)  # fmt: skip
_WORKDIR = flags.DEFINE_string("workdir", "runs/cifar10_quality", "Run folder.")
_BUDGET = flags.DEFINE_float(
  "budget_minutes", 15.0, "Pretraining time budget (ignored when --epochs > 0)."
)
_EPOCHS = flags.DEFINE_float("epochs", 0.0, "> 0: pretrain this many epochs instead.")
_CALIBRATION_STEPS = flags.DEFINE_integer(
  "calibration_steps", 12, "Steps timed (after compilation) to size a time budget."
)
_LINEAR_MAX_STEPS = flags.DEFINE_integer(
  "linear_max_steps", 300, "L-BFGS iterations per linear-probe fit (all three encoders)."
)


def _plan(config, workdir: str, num_examples: int) -> dict:
  """The steps of the run: --epochs if set, else what --budget_minutes allows."""
  steps_per_epoch = num_examples // config.data.global_batch_size
  return budget.plan(
    config,
    workdir,
    num_examples,
    path=os.path.join(workdir, "quality_plan.json"),
    budget_minutes=_BUDGET.value,
    num_steps=max(1, round(_EPOCHS.value * steps_per_epoch)) if _EPOCHS.value > 0 else 0,
    calibration_steps=_CALIBRATION_STEPS.value,
  )


def _table(result: dict) -> list[str]:
  rows = [("SimCLR (this run)", result)]
  rows += [(name, base) for name, base in result.get("baselines", {}).items()]
  lines = ["| encoder | kNN top-1 | linear top-1 | linear top-5 |", "|---|---|---|---|"]
  for name, r in rows:
    probe = r.get("linear_probe", {})
    lines.append(
      f"| {name} | {r['knn']['top1']:.2%} | {probe.get('top1', float('nan')):.2%} | "
      f"{probe.get('top5', float('nan')):.2%} |"
    )
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  metrics.setup_logging()
  config, workdir = _CONFIG.value, _WORKDIR.value
  num_examples = len(sources.create_source(config.data, "train"))
  plan = _plan(config, workdir, num_examples)
  config.train.num_steps = plan["num_steps"]
  config.evals.knn_at_end = False  # Evaluated below, with the baselines and the probe.
  logging.info("Plan: %s", plan)

  t0 = time.time()
  final = train.train_and_evaluate(config, workdir)
  train_seconds = time.time() - t0
  t0 = time.time()
  result = runner.evaluate_checkpoint(
    config, workdir, baselines=True, linear_max_steps=_LINEAR_MAX_STEPS.value
  )
  eval_seconds = time.time() - t0
  summary = budget.save_summary(
    os.path.join(workdir, "quality.json"),
    config,
    plan,
    train_seconds,
    eval_seconds,
    final,
    steps=result["step"],
    epochs=result["step"] * config.data.global_batch_size / num_examples,
    eval=result,
  )
  if jax.process_index() == 0:
    print(
      f"{summary['epochs']:.2f} epochs ({result['step']} steps) in {train_seconds / 60:.1f} "
      f"min on {summary['machine']['device']} x{summary['machine']['devices']}; "
      f"evaluation {eval_seconds / 60:.1f} min"
    )
    print("\n".join(_table(result)))


if __name__ == "__main__":
  app.run(main)
