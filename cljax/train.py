"""The training loop: a run's steps, metrics, checkpoints and preemption, then the final kNN.

Everything the loop runs is built once by ``cljax.run.create_run``; the step itself is
``cljax.step.train_step``. ``python -m cljax.main`` calls ``train_and_evaluate``.
"""

from __future__ import annotations

import signal
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from cljax import checkpoint, defaults, metrics, run
from cljax import step as step_lib
from cljax.evaluate import knn, runner

Metrics = dict[str, jax.Array]


class _StopSignal:
  """Turns SIGTERM (preemption) into a flag the loop checks between steps.

  With several processes the flag is agreed on (any process signalled means
  all stop) at the steps where the loop syncs anyway, so every process
  leaves the loop at the same step and joins the same final checkpoint.
  """

  def __init__(self):
    self._received = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting.")
    self._received = True

  def should_stop(self, at_sync_point: bool) -> bool:
    if jax.process_count() == 1:
      return self._received
    if not at_sync_point:
      return False
    flags = multihost_utils.process_allgather(np.asarray(self._received))
    return bool(np.any(flags))

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


class NonFiniteGuard:
  """Counts steps whose loss or gradients were NaN/Inf and stops a run that keeps failing.

  The step itself skips such updates; this host-side guard only reads the
  per-step flags when metrics are fetched anyway (log and checkpoint steps),
  so it costs no extra synchronisation.
  """

  def __init__(self, limit: int):
    self.limit = limit
    self.total = 0
    self.streak = 0

  def update(self, flags: list[float], first_step: int, last_good_checkpoint: int | None) -> None:
    """Takes the flags of steps ``first_step, first_step + 1, ...``; raises past the limit."""
    for i, flag in enumerate(flags):
      self.streak = self.streak + 1 if flag else 0
      self.total += int(bool(flag))
      if self.limit and self.streak >= self.limit:
        raise FloatingPointError(
          f"{self.streak} consecutive training steps had a NaN or Inf loss, gradient or "
          f"updated state, the last at step {first_step + i} "
          f"(train.max_nonfinite_streak={self.limit}). Each was skipped. "
          + _good_checkpoint_note(last_good_checkpoint)
          + " Check the input data and the learning rate, or raise the limit."
        )


def _good_checkpoint_note(step: int | None) -> str:
  # Every checkpoint is written from a state that passed the step's guard and a finiteness
  # check (``_check_savable``), so the newest one is good.
  if step is None:
    return "No checkpoint has been written in this run's workdir."
  return f"The last checkpoint (step {step}) holds a finite state that passed the guard."


_state_is_finite = jax.jit(step_lib.all_finite)


def _check_savable(state, step: int, last_good_checkpoint: int | None) -> None:
  """Refuses to checkpoint a state with a NaN or Inf anywhere (one reduction on device).

  The step never produces one from a finite state; this catches a state that was never
  finite (a bad initialisation) and, with it, keeps rotation from deleting good checkpoints.
  """
  if not bool(_state_is_finite(state)):
    raise FloatingPointError(
      f"The train state at step {step} holds a NaN or Inf; it was not checkpointed. "
      + _good_checkpoint_note(last_good_checkpoint)
    )


class PendingMetrics:
  """Per-step metrics kept on device until the loop needs them on the host."""

  def __init__(self, guard: NonFiniteGuard):
    self.guard = guard
    self.steps: list[tuple[int, Metrics]] = []
    self.checked = 0  # How many of `steps` the guard has seen.

  def append(self, step: int, step_metrics: Metrics) -> None:
    self.steps.append((step, step_metrics))

  def check(self, last_checkpoint: int | None) -> None:
    """Feeds the not yet checked steps' non-finite flags to the guard (one transfer)."""
    new = self.steps[self.checked :]
    if new:
      flags = jax.device_get([m["nonfinite"] for _, m in new])
      self.guard.update([float(f) for f in flags], new[0][0], last_checkpoint)
      self.checked = len(self.steps)

  def drain(self, last_checkpoint: int | None) -> dict[str, float]:
    """Averages over the finite steps since the last drain, on the host, and clears."""
    self.check(last_checkpoint)
    host = jax.device_get([m for _, m in self.steps])
    good = [m for m in host if not m["nonfinite"]]
    keys = [k for k in host[0] if k != "nonfinite"]
    out = {k: float(np.mean([m[k] for m in good])) if good else float("nan") for k in keys}
    out["nonfinite_steps"] = float(len(host) - len(good))
    out["nonfinite_total"] = float(self.guard.total)
    self.steps, self.checked = [], 0
    return out


def non_default_lines(config: ml_collections.ConfigDict) -> str:
  """``  key = value`` lines of the config's values that differ from ``defaults.base_config``."""

  def flat(tree, prefix=""):
    for k, v in tree.items():
      yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]

  base = dict(flat(defaults.base_config().to_dict()))
  now = dict(flat(config.to_dict()))
  return "\n".join(
    f"  {k} = {v!r}" for k, v in sorted(now.items()) if k not in base or base[k] != v
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, force_resume: bool = False
) -> dict[str, float]:
  """Pretrains as the config says, checkpointing into and resuming from ``workdir``.

  Returns:
    The last logged training metrics, plus kNN accuracies when evaluated.
  """
  checkpoint.check_workdir(workdir)
  r = run.create_run(config)
  logging.info(r.describe())
  logging.info(
    "Config (in full: %s), where not the default:\n%s", "config.json", non_default_lines(config)
  )
  manager = checkpoint.create_manager(workdir, config)
  try:
    state, start_step = checkpoint.restore_latest(
      manager, r.state, r.iterator, config, force_resume
    )
  except BaseException:
    manager.close()  # Its background threads would otherwise outlive the error.
    raise
  writer = metrics.MetricWriter(
    workdir,
    total_steps=r.num_steps,
    views_per_step=r.views_per_step,
    enabled=jax.process_index() == 0,
  )
  writer.write_config(config.to_dict())
  stop_at = min(r.num_steps, config.train.stop_at_step or r.num_steps)
  stop = _StopSignal()
  pending = PendingMetrics(NonFiniteGuard(config.train.max_nonfinite_streak))
  last, step, saved = {}, start_step, (start_step if start_step else None)
  try:
    while step < stop_at and not stop.should_stop(step % config.train.log_every_steps == 0):
      # Dispatch is asynchronous: the host fetches the next batch while the
      # device runs this step. Metrics stay on device until a log step.
      first, t0 = step == start_step, time.perf_counter()
      if first:
        logging.info("Compiling the train step (loaded instead if an earlier run compiled it)...")
      state, step_metrics = r.step_fn(state, r.global_batch(next(r.iterator)), r.step_rng)
      if first:
        logging.info("Train step compiled in %.1fs.", time.perf_counter() - t0)
      step += 1
      pending.append(step, step_metrics)
      if step % config.train.log_every_steps == 0 or step == r.num_steps:
        last = dict(pending.drain(saved), epoch=step / max(r.steps_per_epoch, 1))
        writer.write_scalars(step, last)
      if step % config.train.checkpoint_every_steps == 0:
        pending.check(saved)  # Never checkpoint past a run of failed steps.
        _check_savable(state, step, saved)
        saved = checkpoint.save(manager, step, state, r.iterator, config) or saved
    if saved != step:
      pending.check(saved)
      _check_savable(state, step, saved)
      saved = checkpoint.save(manager, step, state, r.iterator, config, force=True) or saved
    checkpoint.wait(manager, saved)
  finally:
    stop.restore()
    manager.close()

  if step >= r.num_steps and config.evals.knn_at_end:
    logging.info("Final kNN: encoding the train and eval splits...")
    knn_result = knn.final_knn(r, state)
    if knn_result and config.evals.knn_baseline:
      knn_result.update(runner.pixel_knn(config, r.mesh))
    if knn_result:
      writer.write_scalars(step, knn_result)
      last.update(knn_result)
  writer.close()
  return last
