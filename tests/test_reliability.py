"""Faults: SIGKILL and resume, corrupted checkpoints, NaN steps, full disks, bad workdirs."""

import errno
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import chex
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import tiny_config

from cljax import methods, metrics, optim, train
from cljax import step as step_lib
from cljax.data import sources

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(num_steps=6, every=2):
  c = tiny_config()
  c.data.source = "synthetic"
  c.data.num_examples = 256
  c.data.num_classes = 4
  c.data.num_workers = 0
  c.train.num_steps = num_steps
  c.train.log_every_steps = 1
  c.train.checkpoint_every_steps = every
  c.train.max_to_keep = 10
  c.evals.knn_at_end = False
  return c


def _losses(workdir):
  return {r["step"]: r["loss"] for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))}


def _state(workdir, step):
  return ocp.StandardCheckpointer().restore(
    os.path.join(workdir, "checkpoints", str(step), "state")
  )


def _kernel(state):
  return np.asarray(state["params"]["encoder"]["conv_init"]["kernel"])


def test_sigkill_at_random_moments_then_resume_is_bitwise_exact(tmp_path):
  spec = importlib.util.spec_from_file_location("fi", REPO / "benchmarks" / "fault_injection.py")
  fi = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fi)
  steps = 16
  fi.run_with_kills(tmp_path / "straight", steps, kills=0, seed=0)
  kills = fi.run_with_kills(tmp_path / "killed", steps, kills=2, seed=1)
  assert len(kills) == 2
  result = fi.compare(tmp_path / "straight", tmp_path / "killed", steps)
  assert result == {"loss_trace_equal": True, "final_state_bitwise_equal": True}


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
  straight = tmp_path / "straight"
  train.train_and_evaluate(_config(num_steps=6), str(straight))

  run = tmp_path / "run"
  config = _config(num_steps=6)
  config.train.stop_at_step = 4
  train.train_and_evaluate(config, str(run))
  # Damage step 4 (every file of its state emptied) and leave a half-written save behind.
  for f in (run / "checkpoints" / "4" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"")
  shutil.copytree(run / "checkpoints" / "2", run / "checkpoints" / "5.orbax-checkpoint-tmp-123")
  config.train.stop_at_step = 0
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(config, str(run))
  assert "step 4 cannot be restored" in caplog.text
  assert list((run / "checkpoints_unreadable").iterdir())  # Moved aside, not deleted.
  assert _losses(run) == _losses(straight)
  np.testing.assert_array_equal(_kernel(_state(run, 6)), _kernel(_state(straight, 6)))


def _poison_steps(monkeypatch, bad_steps):
  """Makes the inputs of the given (0-based) steps NaN inside the compiled step."""
  original = methods.Method.views

  def poisoned(self, batch, rng, step):
    views = original(self, batch, rng, step)
    bad = jnp.isin(step, jnp.asarray(bad_steps))
    return {k: jnp.where(bad, jnp.nan, v) for k, v in views.items()}

  monkeypatch.setattr(methods.Method, "views", poisoned)


def test_a_nan_step_leaves_the_state_unchanged_and_is_counted(tmp_path, monkeypatch):
  _poison_steps(monkeypatch, [2])  # The third step.
  result = train.train_and_evaluate(_config(num_steps=5, every=1), str(tmp_path))
  records = {r["step"]: r for r in metrics.read_jsonl(tmp_path / "metrics.jsonl")}
  assert records[3]["nonfinite_steps"] == 1 and np.isnan(records[3]["loss"])
  assert records[4]["nonfinite_steps"] == 0 and np.isfinite(records[4]["loss"])
  assert result["nonfinite_total"] == 1
  s2, s3, s4 = (_state(tmp_path, s) for s in (2, 3, 4))
  np.testing.assert_array_equal(_kernel(s3), _kernel(s2))  # Skipped...
  assert int(s3["step"]) == 3
  assert not np.array_equal(_kernel(s4), _kernel(s3))  # ...and training went on.


def test_consecutive_nan_steps_stop_the_run_and_keep_the_last_good_checkpoint(
  tmp_path, monkeypatch
):
  _poison_steps(monkeypatch, list(range(3, 100)))  # Steps 4, 5, ... fail.
  config = _config(num_steps=20, every=2)
  config.train.max_nonfinite_streak = 3
  config.train.log_every_steps = 5
  with pytest.raises(FloatingPointError, match=r"3 consecutive .* last at step 6 .* \(step 4\)"):
    train.train_and_evaluate(config, str(tmp_path))
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 4]
  # The checkpoint of step 4 holds the state after step 3, the last good update:
  # the same as a clean run stopped at step 3.
  monkeypatch.undo()
  config.train.stop_at_step = 3
  train.train_and_evaluate(config, str(tmp_path / "clean"))
  np.testing.assert_array_equal(
    _kernel(_state(tmp_path, 4)), _kernel(_state(tmp_path / "clean", 3))
  )


def test_a_full_disk_while_checkpointing_fails_clearly_and_keeps_earlier_checkpoints(
  tmp_path, monkeypatch
):
  original = grain.checkpoint.CheckpointHandler.save
  calls = []

  def disk_full_on_second_save(self, directory, *args, **kwargs):
    calls.append(directory)
    if len(calls) >= 2:
      raise OSError(errno.ENOSPC, "No space left on device")
    return original(self, directory, *args, **kwargs)

  monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", disk_full_on_second_save)
  with pytest.raises(RuntimeError, match=r"(?s)step 4 .*No space left.*intact \(steps \[2\]\)"):
    train.train_and_evaluate(_config(num_steps=6, every=2), str(tmp_path))
  assert int(_state(tmp_path, 2)["step"]) == 2
  monkeypatch.undo()
  # Space freed: the same command resumes from step 2 and finishes.
  result = train.train_and_evaluate(_config(num_steps=6, every=2), str(tmp_path))
  assert np.isfinite(result["loss"])
  assert int(_state(tmp_path, 6)["step"]) == 6


def test_a_workdir_that_cannot_be_written_fails_before_anything_runs(tmp_path, monkeypatch):
  def refuse(*args, **kwargs):  # The tests may run as root, who may write anywhere.
    raise PermissionError(errno.EACCES, "Permission denied")

  monkeypatch.setattr(os, "makedirs", refuse)
  with pytest.raises(PermissionError, match="cannot be created or written"):
    train.train_and_evaluate(_config(), str(tmp_path / "run"))


def test_a_workdir_that_is_a_file_is_reported_as_a_file_not_a_permission_problem(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  for workdir, where in (
    (blocker, "is a file"),
    (blocker / "run", "is inside .*a_file', which is a file"),
  ):
    with pytest.raises(NotADirectoryError, match=f"{where}, not a folder: pass a directory"):
      train.train_and_evaluate(_config(), str(workdir))
  assert blocker.read_text() == "not a folder"
  # The command line: one line, exit 1, before JAX is imported.
  cmd = [
    sys.executable, "-m", "cljax.main", "--config=configs/quickstart.py", f"--workdir={blocker}",
  ]  # fmt: skip
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines() == [
    f"Error: The workdir {str(blocker)!r} is a file, not a folder: pass a directory as --workdir."
  ]


def test_temperature_must_be_positive_before_compiling(tmp_path):
  config = _config()
  config.loss.temperature = 0.0
  with pytest.raises(ValueError, match=r"loss.temperature=0.0: must be > 0"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_float_pixels_such_as_nan_are_refused_by_array_sources():
  images = np.full((4, 8, 8, 3), np.nan, np.float32)
  with pytest.raises(ValueError, match="uint8 or uint16"):
    sources.ArraySource(images)


def _poison_updates(monkeypatch, bad_steps):
  """Makes the learning rate of the given (0-based) steps infinite: the loss and gradients
  stay finite, but the update, and so the new parameters, are not."""
  original = optim.create_learning_rate_fn

  def poisoned(*args, **kwargs):
    schedule = original(*args, **kwargs)
    return lambda count: jnp.where(
      jnp.isin(count, jnp.asarray(bad_steps)), jnp.inf, schedule(count)
    )

  monkeypatch.setattr(optim, "create_learning_rate_fn", poisoned)


def _all_finite(state):
  return all(
    np.all(np.isfinite(x)) for x in jax.tree.leaves(state) if np.issubdtype(x.dtype, np.inexact)
  )


def test_a_step_whose_update_is_nonfinite_leaves_the_state_unchanged(tmp_path, monkeypatch):
  # The schedule reads the optimiser's step count, which a skipped step leaves as it was, so
  # every step from the third on would write NaN parameters (with a finite loss and
  # gradients) and is skipped.
  _poison_updates(monkeypatch, [2])
  config = _config(num_steps=5, every=1)
  config.train.max_nonfinite_streak = 0
  train.train_and_evaluate(config, str(tmp_path))
  records = {r["step"]: r for r in metrics.read_jsonl(tmp_path / "metrics.jsonl")}
  assert [records[s]["nonfinite_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
  states = {s: _state(tmp_path, s) for s in range(1, 6)}
  assert all(_all_finite(s) for s in states.values())  # Never checkpointed...
  for s in (3, 4, 5):  # ...and everything but the step count as after step 2.
    assert int(states[s]["step"]) == s
    chex.assert_trees_all_equal(
      {k: v for k, v in states[s].items() if k != "step"},
      {k: v for k, v in states[2].items() if k != "step"},
    )
  assert not np.array_equal(_kernel(states[2]), _kernel(states[1]))


def test_rotation_keeps_the_last_good_checkpoint_and_the_error_names_it(tmp_path, monkeypatch):
  _poison_updates(monkeypatch, list(range(4, 100)))  # Steps 5, 6, ... would write NaNs.
  config = _config(num_steps=20, every=2)
  config.train.max_to_keep = 1
  config.train.max_nonfinite_streak = 3
  config.train.log_every_steps = 10
  with pytest.raises(FloatingPointError, match=r"last at step 7 .*\(step 6\) holds a finite"):
    train.train_and_evaluate(config, str(tmp_path))
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [6]  # Only one kept, and it is good: the state after step 4.
  # The same program stopped before the first poisoned step.
  config.train.stop_at_step = 4
  train.train_and_evaluate(config, str(tmp_path / "clean"))
  good, clean = _state(tmp_path, 6), _state(tmp_path / "clean", 4)
  chex.assert_trees_all_equal(
    {k: v for k, v in good.items() if k != "step"}, {k: v for k, v in clean.items() if k != "step"}
  )


def test_a_state_that_is_not_finite_is_never_checkpointed(tmp_path, monkeypatch):
  original = step_lib.create_train_state

  def nan_init(*args, **kwargs):
    state = original(*args, **kwargs)
    return state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))

  monkeypatch.setattr(step_lib, "create_train_state", nan_init)
  config = _config(num_steps=4, every=2)
  config.train.max_nonfinite_streak = 0  # Never stop: the checkpoint check alone must refuse.
  with pytest.raises(
    FloatingPointError, match=r"step 2 holds a NaN or Inf; it was not checkpointed"
  ):
    train.train_and_evaluate(config, str(tmp_path))
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
