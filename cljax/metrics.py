"""Host-side metric writing: TensorBoard events, a metrics.jsonl log and a progress line.

The training loop keeps per-step metrics on device and, on the steps it logs, calls
``writer.write_scalars(step, metrics.to_host(metrics.average(history)))`` so values reach
the host once per log step, in one ``jax.device_get``. Layout written under ``workdir``:

    metrics.jsonl   one JSON object per write, appended across restarts
    config.json     the run's config, overwritten by each run
    tensorboard/    tensorboardX event files (scalars and the config as text)

Strict JSON has no NaN/Inf, so metrics.jsonl stores them as "nan"/"inf"/"-inf" and
``read_jsonl`` restores them. A resumed run may re-log steps: keep the last per step.
"""

from __future__ import annotations

import json
import logging as py_logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import tensorboardX
import tqdm


def to_host(metrics_tree: Mapping[str, Any]) -> dict[str, float]:
  """Fetches a dict of device scalars to the host with one ``jax.device_get``.

  Args:
    metrics_tree: dict of scalar arrays (JAX, NumPy or Python numbers).

  Returns:
    A dict of plain Python floats.
  """
  # One transfer for the whole tree: per-value float() would sync once per metric.
  host = jax.device_get(metrics_tree)
  return {key: float(value) for key, value in host.items()}


def average(trees: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Per-key mean of the metric dicts of several steps, computed (and left) on device.

  Args:
    trees: non-empty list of dicts with the same keys and scalar values.

  Returns:
    A dict of the same keys holding device scalars; pass it to ``to_host``.
  """
  if not trees:
    raise ValueError("average() needs at least one metrics dict.")
  return jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *trees)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads a metrics.jsonl file.

  A line that is not valid JSON (the last line of a run killed while writing
  it) is skipped.

  Args:
    path: a file written by ``MetricWriter``.

  Returns:
    One dict per line, with the strings "nan", "inf" and "-inf" turned back into floats.
  """
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  non_finite = ("nan", "inf", "-inf")
  return [{k: float(v) if v in non_finite else v for k, v in r.items()} for r in records]


def _format_duration(seconds: float) -> str:
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class MetricWriter:
  """Writes scalars to TensorBoard, metrics.jsonl and the terminal.

  On a TTY the terminal shows a tqdm bar; otherwise (CI logs, files) it prints one line
  per write, ``step 100/1000 loss 5.1200 views/s 420 eta 3m10s``. ``views/s`` is measured
  between consecutive writes, so the first write (which includes compilation) has none;
  from the second on it is also logged as the scalar ``views_per_sec``.

  Args:
    workdir: directory for the files listed in the module docstring; created if missing.
    total_steps: the run's last step, for the progress display and ETA.
    views_per_step: augmented views processed per step (all hosts), for ``views/s``.
    enabled: False makes every method a no-op; pass ``jax.process_index() == 0``.
    progress: False turns off the terminal output only.
  """

  def __init__(
    self,
    workdir: str | os.PathLike,
    *,
    total_steps: int,
    views_per_step: int,
    enabled: bool = True,
    progress: bool = True,
  ):
    self._enabled = enabled
    if not enabled:
      return
    self._workdir = os.fspath(workdir)
    self._total_steps = total_steps
    self._views_per_step = views_per_step
    os.makedirs(self._workdir, exist_ok=True)
    # tensorboardX names event files by the second and host and opens them with "wb": a
    # restart within the same second would truncate the earlier run's file without this.
    self._tb = tensorboardX.SummaryWriter(
      os.path.join(self._workdir, "tensorboard"), filename_suffix=f".{time.time_ns()}"
    )
    self._jsonl = open(os.path.join(self._workdir, "metrics.jsonl"), "a+")
    # A run killed mid-write leaves a partial last line: start on a fresh one.
    if self._jsonl.tell() > 0:
      self._jsonl.seek(self._jsonl.tell() - 1)
      if self._jsonl.read(1) != "\n":
        self._jsonl.write("\n")
    self._stream = sys.stdout if progress else None
    self._use_bar = progress and sys.stdout.isatty()
    self._bar = None
    self._last: tuple[int, float] | None = None  # (step, monotonic time) of last write.

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs ``scalars`` at ``step`` to TensorBoard, metrics.jsonl and the terminal.

    Args:
      step: the training step (x axis); ints of any kind.
      scalars: name -> value; Python, NumPy or (already fetched) JAX scalars.
    """
    if not self._enabled:
      return
    step = int(step)
    values = {key: float(value) for key, value in scalars.items()}
    now = time.monotonic()
    rate = None
    if self._last is not None and step > self._last[0] and now > self._last[1]:
      rate = (step - self._last[0]) / (now - self._last[1])
      values["views_per_sec"] = rate * self._views_per_step
    self._last = (step, now)
    for key, value in values.items():
      self._tb.add_scalar(key, value, step)
    self._tb.flush()
    record = {"step": step, "time": time.time()}
    # str() of a non-finite float is "nan", "inf" or "-inf", which read_jsonl maps back.
    record.update({k: v if math.isfinite(v) else str(v) for k, v in values.items()})
    self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
    self._jsonl.flush()
    self._show_progress(step, values, rate)

  def _show_progress(self, step: int, values: Mapping[str, float], rate: float | None) -> None:
    parts = []
    if "loss" in values:
      parts.append(f"loss {values['loss']:.4f}")
    if rate is not None:
      parts.append(f"views/s {values['views_per_sec']:.0f}")
    parts += [f"{k} {v:.4f}" for k, v in values.items() if k.startswith("knn_")]
    if self._use_bar:
      # Created at the first write so a resumed run's rate is not inflated by its start step.
      if self._bar is None:
        self._bar = tqdm.tqdm(
          total=self._total_steps, initial=step, file=self._stream, unit="step", dynamic_ncols=True
        )
      # Postfix without a redraw, so the bar draws once per write with the new values.
      self._bar.set_postfix_str(" ".join(parts), refresh=False)
      if step > self._bar.n:
        self._bar.update(step - self._bar.n)
      else:
        self._bar.refresh()
    elif self._stream is not None:
      if rate is not None:
        parts.append(f"eta {_format_duration(max(self._total_steps - step, 0) / rate)}")
      print(" ".join([f"step {step}/{self._total_steps}", *parts]), file=self._stream, flush=True)

  def write_config(self, config_dict: Mapping[str, Any]) -> None:
    """Saves the config as ``workdir/config.json`` and as text in TensorBoard.

    Args:
      config_dict: the run's config, e.g. ``config.to_dict()``; non-JSON values as str().
    """
    if not self._enabled:
      return
    text = json.dumps(config_dict, indent=2, sort_keys=True, default=str)
    with open(os.path.join(self._workdir, "config.json"), "w") as f:
      f.write(text + "\n")
    # TensorBoard renders text as Markdown; indenting makes it a code block.
    self._tb.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)
    self._tb.flush()

  write_hparams = write_config

  def close(self) -> None:
    """Flushes and closes every sink; safe to call twice."""
    if not self._enabled:
      return
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    self._tb.close()
    if not self._jsonl.closed:
      self._jsonl.close()


class _QuietLibraries(py_logging.Filter):
  """Drops INFO lines from orbax and grain (dozens per checkpoint) and JAX's backend probing
  ("Unable to initialize backend 'tpu'" on every CPU or GPU host); keeps warnings, except
  orbax's "Metadata file does not exist" for a checkpoint's item directory, which has none
  by design (the step directory holds it)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    path = record.pathname
    if "/orbax/" in path and str(record.msg).startswith("Metadata file does not exist"):
      return False
    noisy = "/orbax/" in path or "/grain/" in path or path.endswith("xla_bridge.py")
    return record.levelno >= py_logging.WARNING or not noisy


def setup_logging() -> None:
  """INFO logging for cljax through absl, without the libraries' per-checkpoint chatter."""
  from absl import logging  # Deferred: only entry points configure logging.

  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
