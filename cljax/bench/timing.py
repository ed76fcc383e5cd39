"""Timing windows with warm-up and a median, compile counting, peak device memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
from absl import logging

from cljax.evaluate import features

_COMPILE_EVENTS = (
  "/jax/core/compile/jaxpr_trace_duration",
  "/jax/core/compile/jaxpr_to_mlir_module_duration",
  "/jax/core/compile/backend_compile_duration",
)
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_CACHE_MISS = "/jax/compilation_cache/cache_misses"


class CompileCounter:
  """Counts XLA compilations and sums trace + lowering + compile seconds while entered.

  Listens to JAX's monitoring events, so it sees every jit in the process, and costs
  nothing: ``jit(f).lower(...).compile()`` would compile a second time, because the
  result does not enter ``jit(f)``'s call cache. A program loaded from the persistent
  compilation cache (``cljax.compile_cache``) counts as a compilation (its load time is
  in ``seconds``) and in ``cache_hits``; one compiled afresh with the cache on, in
  ``cache_misses``.
  """

  def __init__(self):
    self.count, self.seconds = 0, 0.0
    self.cache_hits, self.cache_misses = 0, 0

  def __call__(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event in _COMPILE_EVENTS:
      self.seconds += duration
      self.count += event == _COMPILE_EVENTS[-1]

  def _event(self, event: str, **kwargs) -> None:
    del kwargs
    self.cache_hits += event == _CACHE_HIT
    self.cache_misses += event == _CACHE_MISS

  def __enter__(self) -> CompileCounter:
    jax.monitoring.register_event_duration_secs_listener(self)
    jax.monitoring.register_event_listener(self._event)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self)
    jax.monitoring.unregister_event_listener(self._event)


def peak_memory_bytes() -> int | None:
  """Largest ``peak_bytes_in_use`` over this process's devices; None where not reported (CPU)."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  peaks = [p for p in peaks if p is not None]
  return max(peaks) if peaks else None


def time_windows(
  run: Callable[[int], Any],
  *,
  windows: int,
  steps: int,
  warmup: int,
  warmup_s: float = 0.0,
  min_window_s: float = 0.0,
  desc: str = "timing",
) -> dict[str, Any]:
  """Times ``run`` over ``windows`` windows of ``steps`` steps (repeated to ``min_window_s``).

  Args:
    run: runs k steps and returns arrays to wait for (``jax.block_until_ready``).
    windows: number of timed windows.
    steps: steps per call of ``run`` in a window.
    warmup: untimed steps first.
    warmup_s: then untimed single steps until this many seconds have passed, so that
      worker processes have started and their prefetch buffers are in their steady state.
    min_window_s: a window repeats ``run(steps)`` until it has lasted this long, so that
      buffering and timer resolution do not bias fast loops.
    desc: the progress bar's label (on a terminal).

  Returns:
    {"steps_per_s": per window, "seconds": window lengths, "recompiles": XLA compilations
    inside the windows}.
  """
  start = time.perf_counter()
  if warmup:
    jax.block_until_ready(run(warmup))
  while time.perf_counter() - start < warmup_s:
    jax.block_until_ready(run(1))
  rates, seconds = [], []
  with CompileCounter() as compiles:
    for _ in features.progress(range(windows), desc=desc, unit="window"):
      start, done = time.perf_counter(), 0
      while done == 0 or time.perf_counter() - start < min_window_s:
        jax.block_until_ready(run(steps))
        done += steps
      seconds.append(time.perf_counter() - start)
      rates.append(done / seconds[-1])
  return {"steps_per_s": rates, "seconds": seconds, "recompiles": compiles.count}


def time_iterator(
  iterator: Any, *, windows: int, warmup_s: float, window_s: float, desc: str = "input"
) -> dict[str, Any]:
  """``time_windows`` of taking batches from ``iterator`` (one batch a step), after one
  batch and ``warmup_s`` seconds of warm-up, in windows of at least ``window_s``."""
  return time_windows(
    lambda k: [next(iterator) for _ in range(k)][-1],
    windows=windows,
    steps=1,
    warmup=1,
    warmup_s=warmup_s,
    min_window_s=window_s,
    desc=desc,
  )


def rates(timing: dict[str, Any], views_per_step: int) -> dict[str, Any]:
  """The median and per-window views/s of a ``time_windows`` result."""
  per_window = [views_per_step * r for r in timing["steps_per_s"]]
  return {
    "views_per_s": round(statistics.median(per_window), 2),
    "window_views_per_s": [round(r, 2) for r in per_window],
    "recompiles": timing["recompiles"],
  }


def time_interleaved(
  runs: dict[str, tuple[Callable[[int], Any], int]], *, windows: int, steps: int
) -> dict[str, dict[str, Any]]:
  """``time_windows`` for several loops at once, their windows taken in turn.

  On a shared machine the load drifts; alternating the loops' windows exposes them to the
  same drift, so their ratio stays meaningful.

  Args:
    runs: name -> (run, warmup steps); ``run(k)`` runs k steps, returns arrays to wait for.
    windows: timed windows per loop.
    steps: steps per window.

  Returns:
    name -> {"steps_per_s", "seconds", "recompiles"} as ``time_windows``.
  """
  for name, (run, warmup) in runs.items():
    if warmup:
      start = time.perf_counter()
      jax.block_until_ready(run(warmup))
      logging.info("Warm-up of %s: %d steps in %.1fs.", name, warmup, time.perf_counter() - start)
  results = {name: {"steps_per_s": [], "seconds": [], "recompiles": 0} for name in runs}
  for _ in features.progress(range(windows), desc=f"timing {', '.join(runs)}", unit="window"):
    for name, (run, _) in runs.items():
      with CompileCounter() as compiles:
        start = time.perf_counter()
        jax.block_until_ready(run(steps))
        seconds = time.perf_counter() - start
      results[name]["seconds"].append(seconds)
      results[name]["steps_per_s"].append(steps / seconds)
      results[name]["recompiles"] += compiles.count
  return results
