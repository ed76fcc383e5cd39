"""The README's commands and snippets that are cheap to run, run as a user would."""

import os
import pathlib
import runpy
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import xla_flags

from cljax import methods, sharding, train
from cljax.evaluate import features, runner

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

# The quickstart's recipe, shortened to two steps of a small batch.
_QUICKSTART_TINY = """
import runpy
def get_config():
  c = runpy.run_path({path!r})["get_config"]()
  c.train.num_steps = 2
  c.train.log_every_steps = 1
  c.data.global_batch_size = 32
  c.evals.knn_at_end = False
  return c
"""


def readme_snippet(name: str) -> str:
  """The fenced Python block after ``<!-- snippet: name -->``."""
  after = README.split(f"<!-- snippet: {name} -->", 1)[1]
  return after.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("quickstart")
  config_file = root / "quickstart_tiny.py"
  config_file.write_text(_QUICKSTART_TINY.format(path=str(REPO / "configs" / "quickstart.py")))
  workdir = root / "run"
  train.train_and_evaluate(runpy.run_path(str(config_file))["get_config"](), str(workdir))
  return workdir, config_file


def test_the_encoder_snippet_gives_the_evaluations_features(quickstart_run, tmp_path):
  workdir, config_file = quickstart_run
  snippet = readme_snippet("encoder")
  assert '"runs/quickstart", "configs/quickstart.py"' in snippet
  snippet = snippet.replace('"runs/quickstart"', repr(str(workdir)))
  snippet = snippet.replace('"configs/quickstart.py"', repr(str(config_file)))
  out_file = tmp_path / "features.npy"
  save = f"\nnp.save({str(out_file)!r}, np.asarray(features))\n"
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  out = subprocess.run(
    [sys.executable, "-c", snippet + save], cwd=REPO, env=env, capture_output=True, text=True,
    timeout=300,
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-3000:]
  got = np.load(out_file)
  # The same images through cljax's own evaluation path (restore, eval-mode encoder).
  config = runpy.run_path(str(config_file))["get_config"]()
  size = config.data.image_size
  images = np.random.default_rng(0).integers(0, 256, (8, size, size, 3), np.uint8)
  mesh = sharding.create_mesh()
  state, step = runner.restore_checkpoint(methods.create_method(config), str(workdir), mesh=mesh)
  want = features.encoder_features(state.apply_fn)(
    {"params": state.params, "batch_stats": state.batch_stats}, images
  )
  assert step == 2 and got.shape == (8, 64)  # The quickstart encoder's 64-d features.
  # Same program on 1 device vs 8: float32 rounding of the convolutions only (inputs of
  # order 1, ~1e3 terms per output: ~1e-4 relative at most), far below any wrong layer.
  np.testing.assert_allclose(got, np.asarray(jax.device_get(want)), rtol=1e-4, atol=1e-5)


def test_the_config_printing_command():
  cmd = "import runpy; print(runpy.run_path('configs/quickstart.py')['get_config']())"
  assert f'python -c "{cmd}"' in " ".join(README.split())  # As the README shows it.
  out = subprocess.run([sys.executable, "-c", cmd], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "temperature" in out.stdout and "global_batch_size: 128" in out.stdout


def test_the_terminal_config_lists_only_what_differs_from_the_defaults():
  from cljax import defaults

  assert train.non_default_lines(defaults.base_config()) == ""
  config = runpy.run_path(str(REPO / "configs" / "quickstart.py"))["get_config"]()
  lines = train.non_default_lines(config).splitlines()
  assert "  loss.temperature = 0.2" in lines and "  data.image_size = 28" in lines
  assert not any(line.startswith("  optim.name") for line in lines)  # A default value.
