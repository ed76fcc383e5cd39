"""The persistent compilation cache: where it goes, when it is off, and that it is used."""

import json
import os
import subprocess
import sys

import jax
import pytest

from cljax import compile_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_KEYS = (
  "jax_enable_compilation_cache",
  "jax_compilation_cache_dir",
  "jax_persistent_cache_min_compile_time_secs",
  "jax_persistent_cache_min_entry_size_bytes",
  "jax_raise_persistent_cache_errors",
)


@pytest.fixture
def jax_config():
  """Restores the cache options ``setup`` changes, so no other test uses a cache."""
  saved = {k: getattr(jax.config, k) for k in _KEYS}
  yield
  for k, v in saved.items():
    jax.config.update(k, v)


def test_default_dir_follows_the_environment():
  assert compile_cache.default_dir({"XDG_CACHE_HOME": "/c"}) == "/c/cljax/jax"
  home = os.path.expanduser("~")
  assert compile_cache.default_dir({}) == os.path.join(home, ".cache", "cljax", "jax")
  assert compile_cache.default_dir({"CLJAX_COMPILATION_CACHE_DIR": "/x", "XDG_CACHE_HOME": "/c"})
  assert compile_cache.default_dir({"JAX_COMPILATION_CACHE_DIR": "/j"}) == "/j"
  assert compile_cache.default_dir({"CLJAX_COMPILATION_CACHE_DIR": "none"}) is None


def test_setup_turns_the_cache_on_with_every_program_written(tmp_path, jax_config):
  path = compile_cache.setup(str(tmp_path / "cache"))
  assert path == str(tmp_path / "cache") and os.path.isdir(path)
  assert jax.config.jax_enable_compilation_cache
  assert jax.config.jax_compilation_cache_dir == path
  # CPU programs compile in well under JAX's default 1 s threshold; all must be written.
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
  assert not jax.config.jax_raise_persistent_cache_errors


@pytest.mark.parametrize("how", ["none", "unwritable"])
def test_off_or_unwritable_turns_the_cache_off(tmp_path, jax_config, how):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  path = "none" if how == "none" else str(blocker / "cache")  # Cannot be created.
  assert compile_cache.setup(path) is None
  assert not jax.config.jax_enable_compilation_cache


def _python(code: str, cache: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-c", code, cache], cwd=REPO, env=env, capture_output=True, text=True,
    timeout=120,
  )  # fmt: skip


_PROGRAM = """
import sys, jax, jax.numpy as jnp, numpy as np
from cljax import compile_cache
compile_cache.setup(sys.argv[1])
events = []
jax.monitoring.register_event_listener(lambda e, **k: events.append(e))
print(float(jax.jit(lambda x: jnp.sum(jnp.sin(x) @ x.T))(np.ones((4, 4), np.float32))))
count = lambda name: sum(e.endswith(name) for e in events)
print(count("cache_hits"), count("cache_misses"))
"""


def test_a_corrupt_cache_entry_is_recompiled_not_fatal(tmp_path):
  cache = str(tmp_path / "cache")
  first = _python(_PROGRAM, cache)
  assert first.returncode == 0, first.stderr
  value, counts = first.stdout.split("\n")[:2]
  assert counts == "0 1" and os.listdir(cache)
  for name in os.listdir(cache):
    with open(os.path.join(cache, name), "wb") as f:
      f.write(b"\x00garbage")
  again = _python(_PROGRAM, cache)
  assert again.returncode == 0, again.stderr
  assert again.stdout.split("\n")[0] == value  # Same result, recompiled.
  assert again.stdout.split("\n")[1] == "0 1"


def _bench(cache: str) -> dict:
  """The quickstart's train step, shrunk, benchmarked once by the command line."""
  cmd = [
    sys.executable, "-m", "cljax.bench", "--config=configs/quickstart.py",
    "--config.data.source=synthetic", "--config.data.image_size=16",
    "--config.model.stage_sizes=(1,)", "--config.model.num_filters=8",
    "--config.head.hidden_dim=32", "--config.head.output_dim=16",
    "--config.data.global_batch_size=8", "--config.evals.collapse_metrics=False",
    "--config.data.augment.photometric=False", "--parts=step", "--windows=1",
    "--steps_per_window=1", "--warmup_steps=0", f"--compilation_cache_dir={cache}",
  ]  # fmt: skip
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  return next(r for r in rows if r["part"] == "step")


def test_a_second_start_compiles_nothing_new(tmp_path):
  cache = str(tmp_path / "cache")
  first, second = _bench(cache), _bench(cache)
  # The train step (donated state, shardings, shard_map) is written on the first start and
  # loaded on the second: no XLA compilation is left but tracing and lowering.
  assert first["compile_cache_misses"] >= 1 and first["compile_cache_hits"] == 0
  assert second["compile_cache_misses"] == 0
  assert second["compile_cache_hits"] == first["compile_cache_misses"]
  assert second["compile_s"] < first["compile_s"]
