"""End to end: the command line, checkpoints, exact resume, plain-orbax restore."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import assert_resumes_exactly, tiny_config, xla_flags

from cljax import checkpoint, defaults, metrics, train

REPO = pathlib.Path(__file__).resolve().parents[1]


def _resume_config():
  c = tiny_config()
  c.data.source = "synthetic"
  c.data.num_examples = 256
  c.data.num_classes = 4
  c.data.num_workers = 0
  c.data.augment.photometric = True
  c.train.num_steps = 6
  c.train.log_every_steps = 1
  c.train.checkpoint_every_steps = 100
  c.evals.knn_at_end = False
  return c


def _losses(workdir) -> dict[int, float]:
  # A resumed run may log a step twice; the last record of a step wins.
  return {r["step"]: r["loss"] for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))}


def _restore_state(workdir, step):
  return ocp.StandardCheckpointer().restore(
    os.path.join(workdir, "checkpoints", str(step), "state")
  )


def test_main_runs_quickstart_end_to_end(tmp_path):
  workdir = tmp_path / "run"
  cmd = [
    sys.executable,
    "-m",
    "cljax.main",
    "--config=configs/quickstart.py",
    f"--workdir={workdir}",
    "--config.train.num_steps=3",
    "--config.train.log_every_steps=1",
    "--config.data.global_batch_size=32",
    "--config.evals.knn_at_end=False",
    # On the quickstart's embedded data; a one-stage encoder compiles in half the time.
    "--config.model.stage_sizes=(1,)",
    "--config.model.num_filters=8",
  ]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "negatives per anchor" in out.stderr
  final = json.loads(out.stdout.strip().splitlines()[-1])["final"]
  assert np.isfinite(final["loss"])
  records = metrics.read_jsonl(workdir / "metrics.jsonl")
  assert [r["step"] for r in records] == [1, 2, 3]
  assert 0 <= records[-1]["probe_top1"] <= 1  # The online probe trains on the labels.
  assert records[-1]["effective_rank"] > 1  # Collapse diagnostics are logged.
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert (workdir / "checkpoints" / "3" / "state").is_dir()
  assert (workdir / "checkpoints" / "3" / "data").is_dir()


def test_unknown_config_key_is_an_error(tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "cljax.main",
    "--config=configs/quickstart.py",
    f"--workdir={tmp_path}",
    "--config.train.num_stepz=3",
  ]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  # One line that names the argument and the key it meant, not three chained tracebacks.
  assert out.stderr.strip().splitlines() == [
    "Error: --config.train.num_stepz=3: train has no key 'num_stepz'. Did you mean "
    "'train.num_steps'?"
  ]
  out = subprocess.run(
    [*cmd[:-1], "--config.data.bogus=1"], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [
    "Error: --config.data.bogus=1: data has no key 'bogus'."
  ]


def test_a_missing_config_file_is_one_line_and_exit_1(tmp_path):
  for overrides in ([], ["--config.train.num_steps=3"]):
    cmd = [
      sys.executable, "-m", "cljax.main", "--config=configs/nope.py", f"--workdir={tmp_path}",
      *overrides,
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
      "Error: --config=configs/nope.py cannot be loaded: [Errno 2] No such file or directory: "
      "'configs/nope.py'"
    ]


def test_resume_is_exact(tmp_path):
  config = _resume_config()
  straight = tmp_path / "straight"
  train.train_and_evaluate(config, str(straight))

  split = tmp_path / "split"
  config.train.stop_at_step = 3
  train.train_and_evaluate(config, str(split))
  assert sorted(_losses(split)) == [1, 2, 3]
  config.train.stop_at_step = 0
  train.train_and_evaluate(config, str(split))

  assert _losses(split) == _losses(straight)  # Bitwise equal floats.
  a, b = _restore_state(straight, 6), _restore_state(split, 6)
  assert int(a["step"]) == int(b["step"]) == 6
  chex.assert_trees_all_equal(a, b)


def readme_snippet(name: str) -> str:
  """The fenced Python block after ``<!-- snippet: name -->`` in the README."""
  text = (REPO / "README.md").read_text()
  after = text.split(f"<!-- snippet: {name} -->", 1)[1]
  return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_device_resident_mode_trains_and_resumes_exactly(tmp_path):
  config = _resume_config()
  config.data.device_resident = True
  assert_resumes_exactly(config, tmp_path)


def test_readme_restore_snippet_with_plain_orbax_on_another_device_count(tmp_path):
  config = _resume_config()
  config.train.num_steps = 2
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  saved = _restore_state(workdir, 2)
  np.save(tmp_path / "kernel.npy", saved["params"]["encoder"]["conv_init"]["kernel"])
  snippet = readme_snippet("restore").replace('"runs/quickstart"', repr(str(workdir)))
  check = f"""
import numpy as np
assert jax.device_count() == 1
kernel = state["params"]["encoder"]["conv_init"]["kernel"]
np.testing.assert_array_equal(kernel, np.load({str(tmp_path / "kernel.npy")!r}))
assert int(state["step"]) == 2
"""
  # A fresh process that sees 1 device; the checkpoint was written from 8.
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  out = subprocess.run(
    [sys.executable, "-c", snippet + check], env=env, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith("2 ['encoder', 'head']")


def test_readme_losses_snippet_runs_on_8_devices():
  out = subprocess.run(
    [sys.executable, "-c", readme_snippet("losses")], capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr[-3000:]


def test_changed_config_refuses_to_resume_unless_forced(tmp_path):
  config = _resume_config()
  config.train.num_steps = 2
  train.train_and_evaluate(config, str(tmp_path))
  config.loss.temperature = 0.3
  config.train.num_steps = 3
  with pytest.raises(ValueError, match=r"(?s)loss.temperature: saved 0.5, now 0.3.*--force_resume"):
    train.train_and_evaluate(config, str(tmp_path))
  result = train.train_and_evaluate(config, str(tmp_path), force_resume=True)
  assert np.isfinite(result["loss"])


def test_configs_saved_before_a_key_was_added_still_resume():
  current = defaults.base_config()
  saved = json.loads(json.dumps(current.to_dict()))
  for key in checkpoint.ADDED_KEYS:  # As a run saved before these keys existed.
    section, *rest = key.split(".")
    node = saved[section]
    for part in rest[:-1]:
      node = node[part]
    del node[rest[-1]]
  assert checkpoint.config_differences(saved, current) == []
  # A value other than the one the old runs used is still a difference.
  current.head.hidden_norm = "none"
  assert checkpoint.config_differences(saved, current) == [
    "head.hidden_norm: saved 'bn', now 'none'"
  ]


def test_global_batch_not_divisible_by_devices_fails_before_compiling(tmp_path):
  config = _resume_config()
  config.data.global_batch_size = 12
  with pytest.raises(ValueError, match=r"global_batch_size=12 is not divisible .* 8"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_every_config_builds_its_model_and_optimizer():
  """And its state's tree (what a checkpoint holds) does not depend on the run's length:
  evaluation builds the method without it (DINO's and SwAV's freeze groups once did)."""
  import importlib.util
  import inspect

  import optax
  from ml_collections import config_flags  # noqa: F401  (the loader main uses)

  from cljax import methods, step

  for path in sorted((REPO / "configs").glob("*.py")):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.__doc__ and "python -m cljax.main" in module.__doc__ or "make " in module.__doc__
    presets = [()]
    if "preset" in inspect.signature(module.get_config).parameters:
      presets.append(("cpu",))
      with pytest.raises(ValueError, match=r"preset must be one of \('gpu', 'cpu'\)"):
        module.get_config("tpu")
    for preset in presets:
      config = module.get_config(*preset)
      trees = []
      # The state builds the model's variables and initialises the method's optimiser
      # (cljax.optim.create_optimizer of the config's optim section) on its parameters.
      for num_steps, steps_per_epoch in ((0, 0), (1000, 50)):
        run_method = methods.create_method(config, num_steps, steps_per_epoch)
        shape = run_method.modality.input_shape(config)
        state = jax.eval_shape(
          lambda k, m=run_method, s=shape: step.create_train_state(
            m, k, optax.constant_schedule(0.1), s
          ),
          jax.random.key(0),
        )
        leaves = jax.tree_util.tree_flatten_with_path(state)[0]
        trees.append([(jax.tree_util.keystr(k), x.shape, x.dtype) for k, x in leaves])
      assert trees[0] == trees[1], (path.name, preset)


def test_sigterm_saves_exits_cleanly_and_the_next_start_resumes(tmp_path):
  workdir = tmp_path / "run"
  cmd = [
    sys.executable,
    "-m",
    "cljax.main",
    "--config=configs/quickstart.py",
    f"--workdir={workdir}",
    "--config.train.num_steps=100000",
    "--config.train.log_every_steps=1",
    "--config.data.global_batch_size=16",
    "--config.model.stage_sizes=(1,)",
  ]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  jsonl = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 3:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  last_logged = max(_losses(workdir))
  assert saved and saved[-1] >= last_logged >= 3

  resume = cmd + [f"--config.train.stop_at_step={saved[-1] + 2}"]
  out = subprocess.run(resume, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"at step {saved[-1]}." in out.stderr
  assert max(_losses(workdir)) == saved[-1] + 2
