"""The benchmark's measurements: (a) the step alone, (b) the full path, (c) the input alone."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from cljax import methods, metrics, train
from cljax import run as run_lib
from cljax.bench import flops, host, memory, timing
from cljax.data import decode, device

PARTS = ("step", "full", "input", "host_jpeg", "matmul", "memory")
# What runs when no part is named: "memory" compiles twice more and only on request.
DEFAULT_PARTS = ("step", "full", "input", "host_jpeg", "matmul")
Row = dict[str, Any]


class Trainer:
  """The run the benchmark times: ``run.create_run``'s, as training builds it, and its state."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.run = run_lib.create_run(config, with_iterator=False)
    self.batch = config.data.global_batch_size
    self.views_per_step = self.run.views_per_step
    self.state = self.run.state
    self.step = 0
    self.flops_per_view = flops.train_flops_per_view(config)
    self._device_iterator = None
    self.device_load_s = None

  def synthetic_batch(self) -> dict[str, jax.Array]:
    """A random batch with the keys and shapes of the training iterator's, on the devices."""
    rng = np.random.default_rng(jax.process_index())
    it = self.run.create_iterator(device_resident=False)
    try:
      # One real batch gives the keys and shapes (tokens for CLIP, local views for
      # multi-crop); its contents are replaced by random values of the same dtype.
      spec = next(it)
    finally:
      it.close()
    # The decode-only path's boxes, flips and image sizes stay real: random ones would not
    # be crops of the canvas.
    batch = {k: spec[k] for k in decode.CANVAS_KEYS if k in spec and k != "canvas"}
    for key, value in spec.items():
      if key in batch:
        continue
      high = {"aug_seed": 2**31 - 1, "label": max(self.run.num_classes, 1)}.get(key, 256)
      batch[key] = rng.integers(0, high, value.shape, np.int64).astype(value.dtype)
    return self.run.global_batch(batch)

  def iterator(self, mode: str) -> Any:
    """The run's training iterator, on the host or device-resident as ``mode`` says."""
    return self.run.create_iterator(device_resident=mode == "device")

  def device_iterator(self) -> device.DeviceBatchIterator:
    """The device-resident batches (the data set is loaded once, on first use)."""
    if self._device_iterator is None:
      start = time.perf_counter()
      self._device_iterator = self.iterator("device")
      self.device_load_s = round(time.perf_counter() - start, 3)
    return self._device_iterator

  def host_batches(self) -> Iterator[dict[str, jax.Array]]:
    """As the training loop: this process's batch from grain, then global arrays."""
    train_iter = self.iterator("host")
    try:
      for host_batch in train_iter:
        yield self.run.global_batch(host_batch)
    finally:
      train_iter.close()


def _throughput(views_per_s: float, flops_per_view: float | None) -> Row:
  peak = flops.peak_tflops(jax.devices()[0].device_kind)
  if flops_per_view is None:  # No hand count for this encoder.
    return {"tflops": None, "peak_tflops_per_chip": peak, "fraction_of_peak": None}
  tflops = views_per_s * flops_per_view / 1e12
  return {
    "tflops": _sig(tflops),
    "peak_tflops_per_chip": peak,
    "fraction_of_peak": None if peak is None else _sig(tflops / jax.device_count() / peak),
  }


def _sig(x: float, digits: int = 4) -> float:
  """``x`` to ``digits`` significant digits (figures span 1e-3 to 1e3)."""
  return float(f"{x:.{digits}g}")


def _step_run(trainer: Trainer) -> Callable[[int], Any]:
  """(a): the jitted train step alone, on a synthetic batch already on the devices."""
  batch = trainer.synthetic_batch()
  trainer.step_batch = batch

  def run(k: int):
    for _ in range(k):
      trainer.state, _ = trainer.run.step_fn(trainer.state, batch, trainer.run.step_rng)
    return trainer.state

  return run


def _step_memory(trainer: Trainer) -> dict[str, Any]:
  """XLA's memory analysis of the step just timed, as the "memory" part reports it (after
  the timing: lowering it again must not stand in for the first step's compile)."""
  shapes = lambda tree: jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
  )
  state, batch = shapes(trainer.state), shapes(trainer.step_batch)
  figures = memory.compiled_memory(trainer.run.step_fn, state, batch)
  figures.pop("compile_s")  # Served from the cache: the step's compile_s is the row's.
  return figures | {"state_bytes_per_device": memory.state_bytes_per_device(state)}


def _full_run(trainer: Trainer, mode: str, stack: contextlib.ExitStack) -> Callable[[int], Any]:
  """(b): the loop body of ``train.train_and_evaluate``, checkpoints excepted.

  Each step takes the next batch (host: grain + ``Run.global_batch``; device: the
  device-resident iterator), runs the run's step and keeps its metrics on device; every
  ``log_every_steps`` it fetches and averages them on the host and writes them, with the
  loop's own ``PendingMetrics``.
  """
  if mode == "device":
    batches = iter(trainer.device_iterator())
  else:
    batches = trainer.host_batches()
    stack.callback(batches.close)
  log_every = trainer.config.train.log_every_steps
  # A guard with no limit: a NaN on random benchmark data must not stop the timing.
  pending = train.PendingMetrics(train.NonFiniteGuard(0))
  writer = metrics.MetricWriter(
    stack.enter_context(tempfile.TemporaryDirectory()),
    total_steps=10**9,
    views_per_step=trainer.views_per_step,
    enabled=jax.process_index() == 0,
    progress=False,
  )
  stack.callback(writer.close)

  def run(k: int):
    for _ in range(k):
      trainer.state, step_metrics = trainer.run.step_fn(
        trainer.state, next(batches), trainer.run.step_rng
      )
      trainer.step += 1
      pending.append(trainer.step, step_metrics)
      if trainer.step % log_every == 0:
        writer.write_scalars(trainer.step, pending.drain(None))
    return trainer.state

  return run


def bench_training(
  trainer: Trainer, modes: Sequence[str], *, step: bool, windows: int, steps: int, warmup: int
) -> list[Row]:
  """(a) and (b) for each of ``modes``, their windows interleaved.

  Returns:
    The "step" row (if ``step``), then one "full" row per mode.
  """
  runs, rows = {}, []
  with contextlib.ExitStack() as stack:
    if step:
      run = _step_run(trainer)
      logging.info("Compiling the train step (loaded if in the compilation cache)...")
      with timing.CompileCounter() as compiles:
        start = time.perf_counter()
        jax.block_until_ready(run(1))
        first_step_s = time.perf_counter() - start
      logging.info(
        "First step: %.1fs, of which compiling %.1fs (%d programs from the cache).",
        first_step_s,
        compiles.seconds,
        compiles.cache_hits,
      )
      runs["step"] = (run, warmup)
    for mode in modes:
      # Warm up through a log step, so that everything a log step runs has compiled.
      log_every = trainer.config.train.log_every_steps
      runs[mode] = (_full_run(trainer, mode, stack), max(warmup, log_every))
    results = timing.time_interleaved(runs, windows=windows, steps=steps)
  if step:
    result = results["step"]
    row = {"part": "step", **timing.rates(result, trainer.views_per_step)}
    row["ms_per_step"] = round(1e3 / statistics.median(result["steps_per_s"]), 3)
    row["compile_s"] = round(compiles.seconds, 3)
    row["compile_cache_hits"] = compiles.cache_hits
    row["compile_cache_misses"] = compiles.cache_misses
    row["first_step_s"] = round(first_step_s, 3)
    row["peak_memory_bytes"] = timing.peak_memory_bytes()
    row["state_sharding"] = trainer.config.mesh.state_sharding
    row |= {f"compiled_{k}": v for k, v in _step_memory(trainer).items()}
    flop = trainer.flops_per_view
    row["gflop_per_view"] = None if flop is None else _sig(flop / 1e9)
    rows.append(row | _throughput(row["views_per_s"], trainer.flops_per_view))
  for mode in modes:
    result = results[mode]
    row = {"part": "full", "mode": mode, **timing.rates(result, trainer.views_per_step)}
    row["log_every_steps"] = trainer.config.train.log_every_steps
    if step:
      step_rates = results["step"]["steps_per_s"]
      row["ratio_to_step"] = round(row["views_per_s"] / rows[0]["views_per_s"], 4)
      # Each full window against the step window next to it in time.
      paired = [f / s for f, s in zip(result["steps_per_s"], step_rates, strict=True)]
      row["ratio_to_step_paired"] = round(statistics.median(paired), 4)
    if mode == "device":
      row["device_load_s"] = trainer.device_load_s
    row["peak_memory_bytes"] = timing.peak_memory_bytes()
    rows.append(row | _throughput(row["views_per_s"], trainer.flops_per_view))
  return rows


def create_one_core_iterator(run: run_lib.Run) -> Any:
  """The run's host training iterator, as its method builds it, read on one core.

  The method is rebuilt for a copy of the config with ``data.num_workers=0``, so the batches
  are the training iterator's (a CLIP run's captioned views too), read in this process.
  """
  config = run.config.copy_and_resolve_references()
  config.data.num_workers = 0
  method = methods.create_method(config, run.num_steps, run.steps_per_epoch)
  one_core = dataclasses.replace(run, config=config, method=method)
  return one_core.create_iterator(device_resident=False, read_threads=1)


def create_input_iterators(trainer: Trainer, mode: str) -> list[tuple[Row, Any]]:
  """(c)'s iterators, each with its row's fields: the host iterator as configured and on
  one core, or the device-resident batches."""
  if mode == "device":
    return [({"mode": "device"}, trainer.device_iterator())]
  return [
    (
      {"mode": "host", "num_workers": trainer.config.data.num_workers, "cores_used": None},
      trainer.iterator("host"),
    ),
    ({"mode": "host", "num_workers": 0, "cores_used": 1}, create_one_core_iterator(trainer.run)),
  ]


def bench_input(
  trainer: Trainer, mode: str, windows: int, warmup_s: float = 3.0, window_s: float = 2.0
) -> list[Row]:
  """(c): the input pipeline alone: as configured, and on one host core; or device batches."""
  rows = []
  for fields, it in create_input_iterators(trainer, mode):
    result = timing.time_iterator(
      it, windows=windows, warmup_s=warmup_s, window_s=window_s, desc=f"input {mode}"
    )
    if mode == "host":
      it.close()
    row = {"part": "input", **fields, **timing.rates(result, trainer.views_per_step)}
    row["images_per_s"] = round(row["views_per_s"] * trainer.batch / trainer.views_per_step, 2)
    if fields.get("cores_used") == 1:
      row["images_per_s_per_core"] = row["images_per_s"]
    rows.append(row)
  return rows


def bench_matmul(size: int = 8192, repeats: int = 20) -> Row:
  """A bf16 ``size``^3 matmul on one device, as the reference measures its peak."""
  a = jax.random.normal(jax.random.key(1), (size, size), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(2), (size, size), jnp.bfloat16)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  start = time.perf_counter()
  for _ in range(repeats):
    c = matmul(a, b)
  jax.block_until_ready(c)
  seconds = (time.perf_counter() - start) / repeats
  return {"part": "matmul", "size": size, "tflops": round(2 * size**3 / seconds / 1e12, 2)}


def model_name(model_config: ml_collections.ConfigDict) -> str:
  """The encoder's short name: "resnet50", "resnet50x2", "resnet18_cifar", "vit_b16",
  "vit_dinov2_g14", or another modality's encoder's ``model.name`` ("ts2vec").

  A ViT is named by ``model.variant`` ("S/16": "vit_s16"; a "custom:..." variant keeps its
  sizes). A ResNet by its depth, then "x" and the width multiplier when it is not 1 (SimCLR's
  ResNet-50 (2x)), "_cifar" for the CIFAR stem, and a toy model's ``stage_sizes`` and a
  ``num_filters`` other than 64.
  """
  if model_config.name in ("vit", "vit_dinov2"):
    return model_config.name + "_" + model_config.variant.replace("/", "").lower()
  if model_config.name not in ("resnet", "", None):  # Another modality's encoder: "ts2vec".
    return model_config.name
  name = f"resnet{model_config.depth}"
  if model_config.width_multiplier != 1:
    name += f"x{model_config.width_multiplier}"
  if model_config.stem == "cifar":
    name += "_cifar"
  if model_config.get("stage_sizes"):
    name += "_stages" + "-".join(str(n) for n in model_config.stage_sizes)
  if model_config.num_filters != 64:
    name += f"_filters{model_config.num_filters}"
  return name


def env_row(config: ml_collections.ConfigDict, views_per_step: int | None = None) -> Row:
  """What ran where: versions, devices, host cores, the model and batch."""
  modality = config.data.get("modality", "image")
  return {
    "part": "env",
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "device_kind": jax.devices()[0].device_kind,
    "num_devices": jax.device_count(),
    "num_processes": jax.process_count(),
    "host_cores": host.host_cores(),
    "model": model_name(config.model),
    "model_dtype": config.model.dtype,
    "modality": modality,
    "image_size": config.data.image_size if modality == "image" else None,
    "global_batch_size": config.data.global_batch_size,
    "views_per_step": views_per_step,
    "data_source": config.data.source,
  }


def summary_row(rows: Sequence[Row]) -> Row:
  """The headline figures of ``rows``."""
  step = next((r for r in rows if r["part"] == "step"), {})
  summary = {"part": "summary"}
  for key in ("views_per_s", "compile_s", "peak_memory_bytes", "tflops", "fraction_of_peak"):
    summary[f"step_{key}"] = step.get(key)
  for r in rows:
    if r["part"] == "full":
      summary[f"full_{r['mode']}_views_per_s"] = r["views_per_s"]
      summary[f"full_{r['mode']}_over_step"] = r.get("ratio_to_step")
    elif r["part"] == "input" and r.get("cores_used") is None:
      summary[f"input_{r['mode']}_views_per_s"] = r["views_per_s"]
    elif r["part"] == "input":
      summary["input_host_images_per_s_per_core"] = r["images_per_s_per_core"]
    elif r["part"] == "host_jpeg" and r["num_workers"] == 0:
      summary[f"jpeg_{r['path']}_images_per_s_per_core"] = r["images_per_s_per_core"]
      for key in (k for k in r if k.startswith("over_")):
        summary[f"jpeg_{r['path']}_{key}"] = r[key]
    elif r["part"] == "matmul" and step.get("tflops") is not None:
      summary["step_fraction_of_matmul"] = round(
        step["tflops"] / jax.device_count() / r["tflops"], 4
      )
  return summary


def run_benchmark(
  config: ml_collections.ConfigDict,
  *,
  windows: int = 5,
  steps_per_window: int = 0,
  warmup_steps: int = 2,
  parts: Sequence[str] = DEFAULT_PARTS,
  modes: Sequence[str] = (),
  jpeg_workers: Sequence[int] = (),
  input_options: dict[str, float] | None = None,
  jpeg_options: dict[str, Any] | None = None,
  emit: Callable[[Row], None] = lambda row: None,
) -> list[Row]:
  """Runs the measurements named in ``parts``; ``emit`` sees each row as it is made.

  Args:
    config: a run config (``configs/*.py``).
    windows: timed windows per measurement; the median is reported.
    steps_per_window: steps per window of (a) and (b); 0: ``train.log_every_steps``.
    warmup_steps: untimed steps before (a) and (b) (at least one log interval for (b)).
    parts: any of ``PARTS``; "matmul" runs on accelerators only.
    modes: data paths for (b) and (c), "host" and/or "device"; default the config's
      (``data.device_resident``).
    jpeg_workers: grain worker counts for "host_jpeg"; default 0 and all host cores.
    input_options: ``bench_input`` keywords (warmup_s, window_s).
    jpeg_options: ``host.bench_host_jpeg`` keywords (sizes, warmup_s, window_s).
    emit: called with each row as soon as it is measured.

  Returns:
    The rows, ending with the summary.

  Raises:
    ValueError: unknown parts or modes.
  """
  steps = steps_per_window or config.train.log_every_steps
  modes = list(modes) or ["device" if config.data.device_resident else "host"]
  if bad := (set(modes) - {"host", "device"}) | (set(parts) - set(PARTS)):
    raise ValueError(f"unknown parts or modes {sorted(bad)}; parts: {PARTS}, modes: host, device")
  rows = []

  def add(row):
    rows.append(row)
    emit(row)

  trainer = Trainer(config) if {"step", "full", "input"} & set(parts) else None
  add(env_row(config, trainer and trainer.views_per_step))
  if "matmul" in parts and jax.default_backend() != "cpu":
    add(bench_matmul())
  if {"step", "full"} & set(parts):
    for row in bench_training(
      trainer,
      modes if "full" in parts else (),
      step="step" in parts,
      windows=windows,
      steps=steps,
      warmup=warmup_steps,
    ):
      add(row)
  for mode in modes if "input" in parts else ():
    for row in bench_input(trainer, mode, windows, **(input_options or {})):
      add(row)
  if "memory" in parts:
    add(memory.memory_row(config))
  # The host JPEG paths concern image configs (the rows use synthetic photos, not the data).
  if "host_jpeg" in parts and config.data.get("modality", "image") == "image":
    counts = list(jpeg_workers) or sorted({0, host.host_cores()})
    # The decode-only rows decode as the config's training would (data.jpeg_fast_dct).
    options = {"fast_dct": config.data.jpeg_fast_dct, **(jpeg_options or {})}
    for row in host.bench_host_jpeg(worker_counts=counts, windows=windows, **options):
      add(row)
  add(summary_row(rows))
  return rows
