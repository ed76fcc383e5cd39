"""Time to accuracy: kNN (and linear-probe) accuracy against epochs and training seconds.

    python benchmarks/time_to_accuracy.py --config=configs/simclr_cifar10_shared.py:cpu \\
        --epochs=2 --eval_every_epochs=0.5 --workdir=runs/tta_simclr
    python benchmarks/time_to_accuracy.py --workdir=runs/tta_cpu --epochs=1 \\
        --eval_every_epochs=0.5 --recipes=configs/simclr_cifar10_shared.py:cpu,\\
    configs/byol_cifar10.py:cpu,configs/mocov3_cifar10.py:cpu
    python benchmarks/time_to_accuracy.py --workdir=runs/tta_gpu --epochs=100 \\
        --eval_every_epochs=10 --config=configs/simclr_cifar10_shared.py   # one GPU
    python benchmarks/time_to_accuracy.py --redraw=runs/tta_cpu/simclr_cifar10_shared-cpu.json,\\
    runs/tta_cpu/byol_cifar10-cpu.json --figure=docs/tta.png

Each recipe (a config file, ``path:preset`` as for ``python -m cljax.main``; overrides with
``--config.a.b=v`` for ``--config``, or ``--set=a.b=v`` for every recipe) is trained for
``--epochs`` epochs (the learning-rate schedule sized to that length), with the run object and
compiled train step of ``cljax.run.create_run``. Before the first step, every
``--eval_every_epochs`` and at the end, training stops, waits for the device, and the encoder's
features of the train and eval splits give kNN top-1 (and with ``--linear_probe`` the L-BFGS
linear probe), as ``cljax.evaluate`` computes them. The training clock runs only over the
steps: compilation (ahead of time, before the first step) and evaluation are off it, and
compilation is reported separately.

Writes ``WORKDIR/<recipe>.json`` per recipe (machine, JAX version, commit, config, and per
evaluation: epoch, step, training seconds, kNN top-1, probe) and ``WORKDIR/time_to_accuracy.png``
(accuracy against epochs and against training seconds, one curve per recipe). The JSON is
rewritten after every evaluation (``"complete": false`` until the run ends), so a run cut
short keeps its points; runs are not checkpointed: a rerun starts over.
"""

from __future__ import annotations

import ast
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

# This checkout's cljax (not an installed one) and the sibling benchmark module `budget`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]
import budget  # noqa: E402

from cljax import metrics, run  # noqa: E402
from cljax.data import sources  # noqa: E402
from cljax.evaluate import features, runner  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "One recipe; override fields with --config.a.b=v.", lock_config=True
)
_RECIPES = flags.DEFINE_list(
  "recipes", [], "Config files (path[:preset]) trained one after another, side by side."
)
_SET = flags.DEFINE_multi_string(
  "set", [], "key=value override for every recipe, e.g. --set=data.data_dir=DIR."
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/time_to_accuracy", "Output folder.")
_EPOCHS = flags.DEFINE_float("epochs", 0.0, "Epochs to train; <= 0: the recipe's own.")
_EVAL_EVERY = flags.DEFINE_float("eval_every_epochs", 1.0, "Epochs between evaluations.")
_EVAL_AT_START = flags.DEFINE_bool("eval_at_start", True, "Evaluate the initial encoder.")
_LINEAR_PROBE = flags.DEFINE_bool("linear_probe", False, "Also the L-BFGS linear probe.")
_LINEAR_MAX_STEPS = flags.DEFINE_integer("linear_max_steps", 300, "L-BFGS iterations per fit.")
_REDRAW = flags.DEFINE_list("redraw", [], "Only draw --figure from these saved JSON files.")
_FIGURE = flags.DEFINE_string("figure", None, "PNG path; default WORKDIR/time_to_accuracy.png.")


def load_recipe(spec: str) -> ml_collections.ConfigDict:
  """The config of ``path[:preset]``: ``get_config(preset)``, or ``get_config()``."""
  path, _, preset = spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"Config file {path!r} not found (from --recipes entry {spec!r}).")
  module_spec = importlib.util.spec_from_file_location("recipe", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
  """Sets ``a.b=value`` fields (Python literals, else strings); unknown keys raise."""
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"--set expects key=value, got {item!r}.")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    if leaf not in node:
      raise ValueError(f"--set {item!r}: the config has no field {key!r}.")
    node[leaf] = value


def recipe_name(spec: str) -> str:
  """``configs/byol_cifar10.py:cpu`` -> ``byol_cifar10-cpu`` (file names and legends)."""
  path, _, preset = spec.partition(":")
  stem = os.path.splitext(os.path.basename(path))[0]
  return f"{stem}-{preset}" if preset else stem


def _commit() -> str | None:
  """The repository's commit, ``+dirty`` when tracked files differ; None outside git."""
  try:
    sha = subprocess.run(["git", "-C", _HERE, "rev-parse", "HEAD"], capture_output=True,
                         text=True, check=True).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "-C", _HERE, "status", "--porcelain", "-uno"],
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
  except (OSError, subprocess.CalledProcessError):
    return None
  return sha + ("+dirty" if dirty else "")


def eval_steps(steps_per_epoch: int, num_steps: int, every_epochs: float, at_start: bool):
  """Steps after which to evaluate: every ``every_epochs`` (rounded), and the last."""
  if not every_epochs > 0:
    raise ValueError(f"--eval_every_epochs must be > 0, got {every_epochs}.")
  every = every_epochs * steps_per_epoch
  steps = {int(round(i * every)) for i in range(1, int(num_steps / every) + 1)}
  steps = {s for s in steps if 0 < s <= num_steps} | {num_steps}
  return sorted(steps | ({0} if at_start else set()))


def evaluate(r: run.Run, state: Any, *, linear_probe: bool, linear_max_steps: int) -> dict:
  """kNN (and the linear probe) of ``state``'s encoder, as ``cljax.evaluate`` computes them."""
  t0 = time.perf_counter()
  train, test = (
    features.split_features(r.config, r.method, state, split, r.mesh) for split in ("train", "eval")
  )
  result = runner.frozen_feature_evals(
    r.config,
    train,
    test,
    linear_probe=linear_probe,
    max_steps=linear_max_steps,
    knn_features=r.method.knn_features,
  )
  if not result:
    raise ValueError("time_to_accuracy needs labelled train and eval splits for kNN.")
  out = {"knn_top1": float(result["knn"]["top1"])}
  if linear_probe:
    out["linear_top1"] = float(result["linear_probe"]["top1"])
  out["eval_seconds"] = time.perf_counter() - t0
  return out


def _mean_metrics(pending: list) -> dict[str, float]:
  """Scalar metrics (loss, ...) averaged over the finite steps since the last evaluation."""
  host = jax.device_get(pending)
  good = [m for m in host if not m["nonfinite"]]
  keys = [k for k in (good[0] if good else ()) if k != "nonfinite" and np.ndim(good[0][k]) == 0]
  out = {f"train_{k}": float(np.mean([m[k] for m in good])) for k in keys}
  out["nonfinite_steps"] = len(host) - len(good)
  return out


def train_with_evals(config: ml_collections.ConfigDict, *, epochs: float, every_epochs: float,
                     at_start: bool = True, linear_probe: bool = False,
                     linear_max_steps: int = 300, on_evaluation=None) -> dict:  # fmt: skip
  """Trains ``config`` for ``epochs`` (the recipe's own if <= 0), evaluating off the clock.

  Returns:
    ``{"steps_per_epoch", "num_steps", "setup_seconds", "compile_seconds",
    "train_seconds", "eval_seconds", "evaluations": [...]}``; each evaluation has
    ``epoch``, ``step``, ``train_seconds`` (steps only, to this evaluation), ``knn_top1``,
    ``eval_seconds``, the mean training loss since the previous one, and ``linear_top1``
    with ``linear_probe``.
  """
  config = config.copy_and_resolve_references()
  if epochs > 0:  # As steps: train.num_epochs may be typed int.
    num_examples = len(sources.create_source(config.data, "train"))
    config.train.num_steps = max(1, round(epochs * (num_examples // config.data.global_batch_size)))
  t0 = time.perf_counter()
  r = run.create_run(config)
  logging.info(r.describe())
  state, step_rng = r.state, r.step_rng
  batch = r.global_batch(next(r.iterator))
  setup_seconds = time.perf_counter() - t0
  t0 = time.perf_counter()
  step_fn = r.step_fn.lower(state, batch, step_rng).compile()
  compile_seconds = time.perf_counter() - t0
  out = dict(steps_per_epoch=r.steps_per_epoch, num_steps=r.num_steps,
             setup_seconds=setup_seconds, compile_seconds=compile_seconds)  # fmt: skip
  evaluations, pending, clock, step = [], [], 0.0, 0
  for target in eval_steps(r.steps_per_epoch, r.num_steps, every_epochs, at_start):
    t0, first = time.perf_counter(), step
    while step < target:
      if batch is None:
        batch = r.global_batch(next(r.iterator))
      state, step_metrics = step_fn(state, batch, step_rng)
      pending.append(step_metrics)
      batch, step = None, step + 1
    if step > first:
      jax.block_until_ready(state)
      clock += time.perf_counter() - t0
    record = dict(epoch=step / max(r.steps_per_epoch, 1), step=step, train_seconds=clock)
    record.update(_mean_metrics(pending) if pending else {})
    record.update(evaluate(r, state, linear_probe=linear_probe, linear_max_steps=linear_max_steps))
    logging.info("time_to_accuracy: %s", record)
    evaluations.append(record)
    pending = []
    if on_evaluation is not None:  # The results so far, e.g. saved in case the run is cut.
      on_evaluation(dict(out, train_seconds=clock, evaluations=evaluations))
  out.update(train_seconds=clock, eval_seconds=sum(e["eval_seconds"] for e in evaluations))
  out["evaluations"] = evaluations
  return out


def run_recipe(spec: str, config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains one recipe with the flags' schedule; writes and returns its JSON record."""
  t0, commit = time.perf_counter(), _commit()  # The code that runs, not that at the end.
  path = os.path.join(workdir, f"{recipe_name(spec)}.json")

  def save(result: dict, complete: bool = False) -> dict:
    record = {
      "recipe": spec,
      "name": recipe_name(spec),
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "machine": budget.machine(),
      "commit": commit,
      "overrides": list(_SET.value),
      "complete": complete,
      "wall_seconds": time.perf_counter() - t0,
      **result,
      "config": config.to_dict(),
    }
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      with open(path, "w") as f:
        json.dump(runner._json_ready(record), f, indent=2, sort_keys=True, default=str)
    return record

  result = train_with_evals(
    config,
    epochs=_EPOCHS.value,
    every_epochs=_EVAL_EVERY.value,
    at_start=_EVAL_AT_START.value,
    linear_probe=_LINEAR_PROBE.value,
    linear_max_steps=_LINEAR_MAX_STEPS.value,
    on_evaluation=save,
  )
  return save(result, complete=True)


def plot(records: list[dict], path: str) -> str:
  """Accuracy against epochs (left) and against training seconds (right), one curve each."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for i, record in enumerate(records):
    color, evals = f"C{i}", record["evaluations"]
    for key, style, suffix in (("knn_top1", "-o", "kNN"), ("linear_top1", "--s", "linear")):
      if key not in evals[0]:
        continue
      acc = [100 * e[key] for e in evals]
      label = f"{record['name']} {suffix}"
      axes[0].plot([e["epoch"] for e in evals], acc, style, color=color, label=label, ms=4)
      axes[1].plot([e["train_seconds"] for e in evals], acc, style, color=color, ms=4)
  machine = records[0]["machine"]
  axes[0].set(xlabel="epochs", ylabel="top-1 on the eval split (%)")
  axes[1].set(xlabel="training seconds (compilation and evaluation excluded)")
  axes[0].legend(fontsize=8)
  fig.suptitle(f"Time to accuracy on {machine['device']} x{machine['devices']} "
               f"(JAX {machine['jax']})", fontsize=10)  # fmt: skip
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def _table(records: list[dict]) -> list[str]:
  lines = ["| recipe | epoch | step | training s | kNN top-1 | linear top-1 |", "|---" * 6 + "|"]
  for record in records:
    for e in record["evaluations"]:
      probe = f"{e['linear_top1']:.2%}" if "linear_top1" in e else ""
      lines.append(f"| {record['name']} | {e['epoch']:.2f} | {e['step']} | "
                   f"{e['train_seconds']:.1f} | {e['knn_top1']:.2%} | {probe} |")  # fmt: skip
  return lines


def _recipes() -> list[tuple[str, ml_collections.ConfigDict]]:
  recipes = []
  if _CONFIG.value is not None:
    recipes.append((flags.FLAGS["config"].config_filename, _CONFIG.value))
  recipes += [(spec, load_recipe(spec)) for spec in _RECIPES.value]
  if not recipes:
    raise app.UsageError("Give --config, --recipes or --redraw.")
  for _, config in recipes:
    with config.unlocked():
      apply_overrides(config, _SET.value)
  return recipes


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  metrics.setup_logging()
  figure = _FIGURE.value or os.path.join(_WORKDIR.value, "time_to_accuracy.png")
  if _REDRAW.value:
    records = []
    for path in _REDRAW.value:
      with open(path) as f:
        records.append(json.load(f))
  else:
    records = [run_recipe(spec, config, _WORKDIR.value) for spec, config in _recipes()]
  if jax.process_index() == 0:
    print("\n".join(_table(records)))
    for r in records:
      if r.get("complete"):
        print(f"{r['name']}: compile {r['compile_seconds']:.1f} s, training "
              f"{r['train_seconds']:.1f} s, evaluation {r['eval_seconds']:.1f} s")  # fmt: skip
    print(f"Figure: {plot(records, figure)}")


if __name__ == "__main__":
  app.run(main)
