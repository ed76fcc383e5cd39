"""benchmarks/time_to_accuracy.py: a tiny run, its JSON, its clock and its figure."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO
from helpers import xla_flags
from tta_tiny_config import get_config as _config

_spec = importlib.util.spec_from_file_location("tta", REPO / "benchmarks" / "time_to_accuracy.py")
tta = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tta)

_SLEEP = 1.0  # Seconds added to every evaluation: far more than the few tiny steps between.


def test_eval_steps_every_interval_and_the_end():
  assert tta.eval_steps(10, 25, 1.0, True) == [0, 10, 20, 25]
  assert tta.eval_steps(4, 8, 0.5, False) == [2, 4, 6, 8]
  with pytest.raises(ValueError, match="eval_every_epochs"):
    tta.eval_steps(4, 8, 0.0, False)


def test_training_clock_excludes_evaluation(monkeypatch):
  # The sleep goes inside the part of the evaluation that `tta.evaluate` times (the probes,
  # after feature extraction), so `eval_seconds` must include it and `train_seconds` must not.
  spans = []  # (start, end) of each slowed part, on the same clock as the tool's.
  fit = tta.runner.frozen_feature_evals

  def slow_fit(*args, **kwargs):
    start = time.perf_counter()
    time.sleep(_SLEEP)
    out = fit(*args, **kwargs)
    spans.append((start, time.perf_counter()))
    return out

  monkeypatch.setattr(tta.runner, "frozen_feature_evals", slow_fit)
  result = tta.train_with_evals(_config(), epochs=2, every_epochs=1, at_start=False)
  evals = result["evaluations"]
  assert [e["step"] for e in evals] == [4, 8]  # 64 examples / batch 16 = 4 steps an epoch.
  assert [e["epoch"] for e in evals] == [1.0, 2.0]
  # Training between two evaluations can only have run in the gap between them; a clock that
  # also ran during the (>= 1 s) evaluation would exceed that gap.
  gap = spans[1][0] - spans[0][1]
  delta = evals[1]["train_seconds"] - evals[0]["train_seconds"]
  assert 0 < delta <= gap
  assert result["train_seconds"] == evals[-1]["train_seconds"]
  assert all(e["eval_seconds"] >= _SLEEP for e in evals)
  assert result["eval_seconds"] == sum(e["eval_seconds"] for e in evals)
  assert result["compile_seconds"] > 0


def test_command_writes_json_and_figure(tmp_path):
  config = REPO / "tests" / "tta_tiny_config.py"
  cmd = [
    sys.executable,
    str(REPO / "benchmarks" / "time_to_accuracy.py"),
    f"--config={config}",
    f"--workdir={tmp_path}",
    "--epochs=2",
    "--eval_every_epochs=1",
    "--linear_probe",
    "--linear_max_steps=5",
    "--set=optim.base_lr=0.2",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))  # One device, as a user has.
  subprocess.run(cmd, check=True, cwd=REPO, env=env, capture_output=True, timeout=300)
  record = json.loads((tmp_path / "tta_tiny_config.json").read_text())
  assert record["complete"]
  for key in ("machine", "commit", "config", "compile_seconds", "train_seconds", "eval_seconds"):
    assert key in record, key
  assert record["machine"]["jax"] and record["machine"]["device"]
  assert record["config"]["optim"]["base_lr"] == 0.2  # --set reached the run.
  evals = record["evaluations"]
  assert [e["step"] for e in evals] == [0, 4, 8]  # The initial encoder, then every epoch.
  for e in evals:
    assert 0 <= e["knn_top1"] <= 1 and 0 <= e["linear_top1"] <= 1
  assert evals[0]["train_seconds"] == 0 and evals[1]["train_seconds"] < evals[2]["train_seconds"]
  png = tmp_path / "time_to_accuracy.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # Redrawn from the saved JSON alone.
  redrawn = tmp_path / "again.png"
  subprocess.run(
    [*cmd[:2], f"--redraw={tmp_path / 'tta_tiny_config.json'}", f"--figure={redrawn}"],
    check=True, cwd=REPO, env=env, capture_output=True, timeout=120,
  )  # fmt: skip
  assert redrawn.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
