"""What the quality benchmarks share: a time budget turned into steps, and the machine.

    plan = budget.plan(config, workdir, num_examples, path=..., budget_minutes=15)

A budget is sized by timing a few steps first (compilation excluded), and the plan is
written to ``path`` at the first invocation so that a rerun resumes the same run.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil

import jax
from absl import logging

from cljax import metrics, train


def steps_per_second(config, workdir: str, calibration_steps: int = 12) -> float:
  """Times ``calibration_steps`` training steps in a scratch workdir, excluding compilation."""
  scratch = os.path.join(workdir, "calibration")
  shutil.rmtree(scratch, ignore_errors=True)
  calib = config.copy_and_resolve_references()
  calib.train.num_steps = calibration_steps
  calib.train.log_every_steps = 1
  calib.train.checkpoint_every_steps = 10**9
  calib.evals.knn_at_end = False
  train.train_and_evaluate(calib, scratch)
  times = [r["time"] for r in metrics.read_jsonl(os.path.join(scratch, "metrics.jsonl"))]
  shutil.rmtree(scratch, ignore_errors=True)
  # The first two records include compilation and the first batch; time the rest.
  rate = (len(times) - 2) / (times[-1] - times[1])
  logging.info("Calibration: %.3f steps/s.", rate)
  return rate


def plan(
  config,
  workdir: str,
  num_examples: int,
  *,
  path: str,
  budget_minutes: float,
  num_steps: int = 0,
  calibration_steps: int = 12,
) -> dict:
  """``{"num_steps", "budget_minutes", "epochs"[, "calibrated_steps_per_s"]}``, kept at ``path``.

  ``num_steps > 0`` fixes the steps; otherwise they are what ``budget_minutes`` allows at
  the calibrated rate. An existing plan file wins, so that a rerun resumes the same run.
  """
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  if num_steps > 0:
    result = {"num_steps": num_steps, "budget_minutes": None}
  else:
    rate = steps_per_second(config, workdir, calibration_steps)
    result = {
      "num_steps": int(budget_minutes * 60 * rate),
      "budget_minutes": budget_minutes,
      "calibrated_steps_per_s": rate,
    }
  result["epochs"] = result["num_steps"] * config.data.global_batch_size / num_examples
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  return result


def machine() -> dict:
  """The platform, accelerator, device count, host cores and JAX version of this run."""
  device = jax.devices()[0]
  return {
    "platform": device.platform,
    "device": device.device_kind,
    "devices": jax.device_count(),
    "cpu_count": os.cpu_count(),
    "processor": platform.processor() or platform.machine(),
    "jax": jax.__version__,
  }


def save_summary(path: str, config, plan: dict, train_seconds: float, eval_seconds: float,
                 final: dict, **results) -> dict:  # fmt: skip
  """The run's summary (date, machine, plan, timings, last train metrics, ``results``,
  config), written as JSON to ``path`` by process 0; returned.

  ``train_seconds`` is of this invocation: 0 if the run had already finished and was
  only re-evaluated.
  """
  summary = {
    "date": datetime.date.today().isoformat(),
    "machine": machine(),
    "plan": plan,
    "train_seconds": train_seconds,
    "eval_seconds": eval_seconds,
    "final_train_metrics": final,
    **results,
    "config": config.to_dict(),
  }
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(summary, f, indent=2, sort_keys=True, default=str)
  return summary
