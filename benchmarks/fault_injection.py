"""Kills a training run with SIGKILL at random moments and checks it resumes exactly.

    python benchmarks/fault_injection.py --kills=10 --steps=120

Runs the quickstart recipe (small overrides for speed) once uninterrupted and
once killed ``--kills`` times at random moments, including during
asynchronous checkpoint writes (checkpoints every 2 steps), restarting after
each kill. Passes when the per-step loss trace and the final parameters of the
two runs are bitwise equal (CPU). Prints one JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def command(workdir: pathlib.Path, steps: int) -> list[str]:
  return [
    sys.executable, "-m", "cljax.main", "--config=configs/quickstart.py",
    f"--workdir={workdir}", f"--config.train.num_steps={steps}",
    "--config.train.log_every_steps=1", "--config.train.checkpoint_every_steps=2",
    "--config.train.max_to_keep=2", "--config.data.global_batch_size=32",
    "--config.model.stage_sizes=(1,)", "--config.evals.knn_at_end=False",
  ]  # fmt: skip


def _logged_steps(workdir: pathlib.Path) -> int:
  path = workdir / "metrics.jsonl"
  return len(path.read_text().splitlines()) if path.exists() else 0


def run_with_kills(workdir: pathlib.Path, steps: int, kills: int, seed: int) -> list[dict]:
  """Runs to completion, SIGKILLing the run ``kills`` times; returns one record per kill."""
  rng = random.Random(seed)
  records = []
  while True:
    proc = subprocess.Popen(
      command(workdir, steps), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    if len(records) < kills:
      # Wait for training to make progress in this life, then kill after a
      # random delay: at a random step, often mid-way through a checkpoint.
      seen = _logged_steps(workdir)
      while proc.poll() is None and _logged_steps(workdir) <= seen:
        time.sleep(0.05)
      time.sleep(rng.uniform(0.0, 1.5))
      if proc.poll() is None:
        proc.kill()
        proc.wait()
        ckpts = workdir / "checkpoints"
        records.append({
          "killed_after_logged_steps": _logged_steps(workdir),
          "partial_saves_on_disk": len(list(ckpts.glob("*.orbax-checkpoint-tmp*"))),
        })  # fmt: skip
        continue
    _, stderr = proc.communicate()
    if proc.returncode != 0:
      raise RuntimeError(f"training failed after {len(records)} kills:\n{stderr.decode()[-3000:]}")
    return records


def compare(straight: pathlib.Path, killed: pathlib.Path, steps: int) -> dict:
  """Bitwise comparison of the two runs' loss traces and final parameters."""
  import orbax.checkpoint as ocp

  from cljax import metrics  # Imported late: the runs themselves are subprocesses.

  def losses(workdir):
    return {r["step"]: r["loss"] for r in metrics.read_jsonl(workdir / "metrics.jsonl")}

  def state(workdir):
    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(steps) / "state")

  import jax

  a, b = state(straight), state(killed)
  same_params = all(
    np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )
  la, lb = losses(straight), losses(killed)
  return {
    "loss_trace_equal": la == lb and sorted(la) == list(range(1, steps + 1)),
    "final_state_bitwise_equal": same_params,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kills", type=int, default=10)
  parser.add_argument("--steps", type=int, default=120)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    t0 = time.time()
    run_with_kills(tmp / "straight", args.steps, kills=0, seed=args.seed)
    kills = run_with_kills(tmp / "killed", args.steps, kills=args.kills, seed=args.seed)
    result = compare(tmp / "straight", tmp / "killed", args.steps)
    result.update(kills=len(kills), kill_log=kills, seconds=round(time.time() - t0, 1))
  print(json.dumps(result))
  sys.exit(0 if result["loss_trace_equal"] and result["final_state_bitwise_equal"] else 1)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
