"""JAX's persistent compilation cache, on by default for cljax's commands.

``python -m cljax.main``, ``python -m cljax.evaluate`` and ``python -m cljax.bench`` call
``setup()`` before anything is compiled, so a resumed run, an evaluation or a benchmark
loads the executables an earlier start compiled instead of compiling them again.

Where: ``--compilation_cache_dir=DIR``; else ``$CLJAX_COMPILATION_CACHE_DIR``; else a
directory JAX was already given (``$JAX_COMPILATION_CACHE_DIR``); else
``$XDG_CACHE_HOME/cljax/jax`` (``~/.cache/cljax/jax``). ``none`` (flag or variable)
turns it off.

JAX keys every entry by the compiled program, the compile options and flags, the devices
and the JAX/jaxlib version, so one directory is safe across configs and upgrades; it only
grows (delete it to reclaim the space). Only process 0 writes. A directory that cannot be
written turns the cache off with a warning; an unreadable or corrupt entry is recompiled
(JAX warns and goes on). Programs with host callbacks are never cached (JAX's rule).

The cache is trusted: whoever can write to it can run code in your process, so do not point
it at a directory others can write to.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

from absl import flags, logging

# JAX is imported in setup(): the entry points import this module before parsing their
# flags (so that --compilation_cache_dir is known), and --help must not wait for JAX.

OFF = ("none", "off", "false", "0")

_DIR = flags.DEFINE_string(
  "compilation_cache_dir",
  None,
  "Persistent XLA compilation cache; default $CLJAX_COMPILATION_CACHE_DIR or "
  "$XDG_CACHE_HOME/cljax/jax (~/.cache/cljax/jax); 'none' turns it off.",
)


def default_dir(environ: Mapping[str, str] = os.environ) -> str | None:
  """The cache directory when no flag names one; None when turned off by the environment."""
  for name in ("CLJAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR"):
    if environ.get(name):
      return None if environ[name].lower() in OFF else environ[name]
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "cljax", "jax")


def _writable(path: str) -> bool:
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
    return True
  except OSError as e:
    logging.warning("Compilation cache off: cannot write to %s (%s).", path, e)
    return False


def setup(path: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache; call before the first compilation.

  Args:
    path: the directory; default the ``--compilation_cache_dir`` flag (when parsed) or
      ``default_dir()``. ``"none"`` turns the cache off.

  Returns:
    The directory in use, or None when the cache is off.
  """
  import jax

  if path is None and flags.FLAGS.is_parsed():
    path = _DIR.value
  if path is None:
    path = default_dir()
  if not path or path.lower() in OFF:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  path = os.path.abspath(os.path.expanduser(path))
  if not _writable(path):
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  # JAX's defaults skip programs that compile in under 1 s; on a CPU most of a run's
  # programs are such (eval features, kNN, metrics), and together they take seconds.
  # Every program is worth its small file.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  # A broken entry or a full disk must not stop a run: JAX warns and recompiles.
  jax.config.update("jax_raise_persistent_cache_errors", False)
  logging.info("Compilation cache: %s", path)
  return path
