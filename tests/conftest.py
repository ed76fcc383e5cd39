"""Test set-up, before JAX is imported anywhere: 8 fake CPU devices, XLA flags that compile
faster, and one persistent compilation cache for the whole run."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

# Most of the suite's time is XLA compiling small programs: a tiny ResNet's train step takes
# ~10 s of CPU with XLA's defaults, ~3 s with LLVM unoptimised and XLA's classic fusion
# emitters (measured on 2 cores); the tiny programs run a little slower, which costs far
# less. Tests compare values with tolerances from the errors they check, not from one code
# generator's rounding; the few that compare two programs bit for bit are marked
# `xla_default_codegen` and run in a process of their own with XLA's defaults. Dropped if
# this jaxlib does not know a flag (XLA aborts on an unknown one).
# $CLJAX_TEST_FAST_COMPILE_FLAGS replaces them ("" for XLA's defaults everywhere).
FAST_COMPILE_FLAGS = os.environ.get(
  "CLJAX_TEST_FAST_COMPILE_FLAGS",
  "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
)


def _xla_accepts(flags: str) -> bool:
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  probe = [sys.executable, "-c", "import jax; jax.devices()"]
  return subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0


_flags = os.environ.get("XLA_FLAGS", "")
if FAST_COMPILE_FLAGS and _xla_accepts(FAST_COMPILE_FLAGS):
  _flags += " " + FAST_COMPILE_FLAGS
else:
  FAST_COMPILE_FLAGS = ""
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same programs (a tiny config's step, restarted to check a resume;
# one loss in several tests): with JAX's persistent cache each is compiled once per run, in
# this process and in the `python -m cljax.*` subprocesses, which read this variable
# (cljax.compile_cache). A fresh directory per run, so no test depends on an earlier run;
# test_compile_cache.py tests the cache itself in directories of its own.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="cljax-tests-jax-cache-")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
os.environ["CLJAX_COMPILATION_CACHE_DIR"] = _COMPILATION_CACHE

import pathlib  # noqa: E402

import pytest  # noqa: E402
from absl import flags  # noqa: E402

from cljax import compile_cache  # noqa: E402

# grain's worker processes read absl flags; tests do not run under absl.app.
flags.FLAGS.mark_as_parsed()
# Before anything compiles: JAX decides once per process whether it uses the cache.
compile_cache.setup(_COMPILATION_CACHE)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_configure(config):
  config.addinivalue_line(
    "markers",
    "xla_default_codegen: compares two compiled programs bit for bit, a property of XLA's "
    "default code generation; runs in a process of its own without FAST_COMPILE_FLAGS",
  )


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
  """A test marked ``xla_default_codegen`` runs again in a fresh pytest process with XLA's
  default flags (its fixtures here are set up for nothing), and passes or fails with it."""
  if not FAST_COMPILE_FLAGS or not pyfuncitem.get_closest_marker("xla_default_codegen"):
    return None
  env = dict(os.environ, CLJAX_TEST_FAST_COMPILE_FLAGS="")
  env["XLA_FLAGS"] = env["XLA_FLAGS"].replace(FAST_COMPILE_FLAGS, "").strip()
  cmd = [sys.executable, "-m", "pytest", pyfuncitem.nodeid, "-q", "-p", "no:cacheprovider"]
  out = subprocess.run(
    cmd, cwd=pyfuncitem.config.rootpath, env=env, capture_output=True, text=True, timeout=600
  )
  if out.returncode != 0:
    pytest.fail(f"with XLA's default flags:\n{out.stdout[-6000:]}{out.stderr[-2000:]}", False)
  return True


# The modules that take longest (seconds on 2 cores, one worker), run first: `make test`
# spreads the suite's modules over one pytest-xdist worker per core (`--dist loadfile`,
# handed out in this order), and a long module started last would leave the other core idle
# at the end. Order only; a module missing here runs after these, in the usual order.
LONGEST_FIRST = (
  "test_documented_commands.py",  # ~300 s
  "test_fsdp.py",  # ~80 s
  "test_methods_dinov2.py",
  "test_multiprocess.py",
  "test_main.py",
  "test_methods_momentum.py",
  "test_reliability.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """The project's shared real data sets; tests that need them skip without them."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"shared data not found at {SHARED_DATA}")
  return SHARED_DATA
