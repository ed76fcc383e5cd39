"""TS2Vec on UCR/UEA sets against its published table, 1-NN Euclidean, and anomaly AUROC.

    python benchmarks/ucr_table.py --workdir=runs/ucr_table            # the 7 bundled sets
    python benchmarks/ucr_table.py --datasets=GunPoint,ArrowHead --seeds=3
    python benchmarks/ucr_table.py --datasets=MySet --data_dir=/path/to/folder
    python benchmarks/ucr_table.py --datasets=ACSF1 --seeds=1 --first_seed=2  # one more seed
    python benchmarks/ucr_table.py --redraw=runs/a/ucr_table.json,runs/b/ucr_table.json
    python benchmarks/ucr_table.py --redraw=runs/a/ucr_table.json \\
        --official=runs/official_ts2vec/official_ts2vec.json   # + the official code's column

For each set (bundled with sktime's wheel, or ``NAME_TRAIN/TEST.ts|.tsv`` in ``--data_dir``)
and each seed, ``configs/ts2vec_ucr.py`` trains with ``cljax.run.create_run`` (the run
object, sharded step and iterator of ``python -m cljax.main``) for the official number of
steps (200, or 600 above 100,000 training values), then evaluation as the paper's:
- accuracy: the RBF SVM of ``cljax.evaluate.svm`` (C by 5-fold CV) on the representations
  (the running average of the weights, each series max-pooled over time) of the train split,
  scored on the test split; mean and std over the seeds;
- 1-NN Euclidean on the raw (normalised) series: the archive's baseline;
- anomaly detection (``cljax.evaluate.anomaly``): each class in turn normal, test series
  scored by the distance to their nearest normal training representation; the mean AUROC
  over classes, for the representations (mean over seeds) and the raw series.
The published TS2Vec accuracies and 1-NN Euclidean figures are printed beside them.
"Seconds" is one seed's setup, compile, training and evaluation on this machine.

Writes ``WORKDIR/ucr_table.json`` and ``WORKDIR/ucr_table.png``, and prints a Markdown table.
``--redraw`` draws from earlier JSON files instead, joining a set's rows from several runs
by seed number.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE)]

import jax  # noqa: E402

from cljax import run, sharding  # noqa: E402
from cljax.data import sources  # noqa: E402
from cljax.evaluate import anomaly, features, runner, svm  # noqa: E402

REPO = os.path.dirname(_HERE)
# Yue et al., AAAI 2022: Table 9 (UCR, 128 sets) and Table 10 (UEA, 30 sets), TS2Vec's
# accuracy; 1-NN Euclidean from the UCR archive's DataSummary (Dau et al. 2019) and the UEA
# archive paper (Bagnall et al. 2018).
PUBLISHED = {
  "GunPoint": (0.980, 0.913),
  "ItalyPowerDemand": (0.925, 0.955),
  "ArrowHead": (0.857, 0.800),
  "OSULeaf": (0.851, 0.521),
  "ACSF1": (0.910, 0.540),
  "BasicMotions": (0.975, 0.676),
  "JapaneseVowels": (0.984, 0.924),
}
BUNDLED = tuple(PUBLISHED)
# The sets above from the UEA (multivariate) archive; the others are UCR sets. The issue's
# bar is the mean over the UCR sets, so the table gives it a row of its own.
UEA = ("BasicMotions", "JapaneseVowels")


def recipe(name: str, data_dir: str, seed: int, steps: int):
  """``configs/ts2vec_ucr.py`` for set ``name``, with the official number of steps."""
  config = runpy.run_path(os.path.join(REPO, "configs", "ts2vec_ucr.py"))["get_config"](name)
  config.data.data_dir = data_dir
  config.train.seed = seed
  config.evals.knn_at_end = False
  if steps <= 0:
    train = sources.create_source(config.data, "train")
    steps = 200 if train.series.size <= 100_000 else 600  # TS2Vec.fit's n_iters.
  config.train.num_steps = steps
  return config


def train_and_encode(config) -> tuple[tuple, tuple, dict]:
  """Trains ``config`` and returns the train and test representations and the timings."""
  t0 = time.perf_counter()
  r = run.create_run(config)
  state = r.state
  for _ in range(r.num_steps):
    state, metrics = r.step_fn(state, r.global_batch(next(r.iterator)), r.step_rng)
  jax.block_until_ready(state)
  trained = time.perf_counter()
  train, test = (
    features.split_features(config, r.method, state, split, r.mesh) for split in ("train", "eval")
  )
  return train, test, {"train_s": trained - t0, "loss": float(metrics["loss"])}


def raw_baselines(config) -> dict:
  """1-NN Euclidean accuracy and one-class AUROC on the raw series."""
  data = runner.pixel_features(config, sharding.create_mesh())
  (x_train, y_train), (x_test, y_test) = data["train"], data["eval"]
  nearest = np.argmin(
    (x_test**2).sum(1)[:, None] - 2 * x_test @ x_train.T + (x_train**2).sum(1)[None, :], axis=1
  )
  auroc = anomaly.one_class_auroc(data["train"], data["eval"], normalize=False)
  return {"nn1_euclidean": float(np.mean(y_train[nearest] == y_test)), "auroc": auroc["mean"]}


def evaluate_set(name: str, data_dir: str, seeds: int, steps: int, first_seed: int = 0) -> dict:
  row = {"dataset": name, "seeds": []}
  for seed in range(first_seed, first_seed + seeds):
    t0 = time.perf_counter()
    config = recipe(name, data_dir, seed, steps)
    train, test, info = train_and_encode(config)
    accuracy = svm.svm_accuracy(train, test)
    auroc = anomaly.one_class_auroc(train, test)
    info.update(
      svm_top1=accuracy["top1"],
      svm_C=accuracy["C"],
      auroc=auroc["mean"],
      steps=config.train.num_steps,
      seconds=time.perf_counter() - t0,
    )
    row["seeds"].append(info | {"seed": seed})
    print(f"{name} seed {seed}: accuracy {accuracy['top1']:.3f}, AUROC {auroc['mean']:.3f}, "
          f"{info['seconds']:.0f} s", flush=True)  # fmt: skip
  row.update(
    published=PUBLISHED.get(name, (None, None))[0],
    published_nn1=PUBLISHED.get(name, (None, None))[1],
    raw=raw_baselines(recipe(name, data_dir, 0, 1)),
  )
  return summarised(row)


def summarised(row: dict) -> dict:
  """``row`` with the mean and std of its seeds' accuracies, their mean AUROC and seconds."""
  accs = [s["svm_top1"] for s in row["seeds"]]
  return row | dict(
    accuracy_mean=float(np.mean(accs)),
    accuracy_std=float(np.std(accs)),
    auroc_mean=float(np.mean([s["auroc"] for s in row["seeds"]])),
    seconds_per_seed=float(np.mean([s["seconds"] for s in row["seeds"]])),
  )


def merged(rows: list[dict]) -> list[dict]:
  """The rows of each dataset joined into one, in the order first seen: their seeds by seed
  number (a later row's seed replaces an earlier row's of the same number; rows written
  before seeds were numbered held seeds 0, 1, ...), the summary recomputed."""
  by_name: dict[str, dict] = {}
  for row in rows:
    seeds = {s.get("seed", i): s for i, s in enumerate(row["seeds"])}
    if row["dataset"] in by_name:
      by_name[row["dataset"]]["seeds"].update(seeds)
    else:
      by_name[row["dataset"]] = row | {"seeds": seeds}
  return [
    summarised(row | {"seeds": [s | {"seed": k} for k, s in sorted(row["seeds"].items())]})
    for row in by_name.values()
  ]


def table(rows: list[dict], official: dict | None = None) -> str:
  """The Markdown table; ``official``: rows of benchmarks/official_ts2vec.py by dataset,
  shown as a column beside ours."""
  official = official or {}
  fmt = lambda v: "" if v is None else f"{v:.3f}"
  seeds = lambda r: f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} ({len(r['seeds'])})"
  extra = " official code here (mean ± std, seeds) |" if official else ""
  lines = [
    f"| dataset | TS2Vec here (mean ± std, seeds) |{extra} TS2Vec published | 1-NN ED here | "
    "1-NN ED published | AUROC here | AUROC raw | seconds / seed |",
    "|---|---|" + "---|" * (7 if official else 6),
  ]
  for r in rows:
    cell = ""
    if official:
      cell = f" {seeds(official[r['dataset']])} |" if r["dataset"] in official else " |"
    lines.append(
      f"| {r['dataset']} | {seeds(r)} |{cell} "
      f"{fmt(r['published'])} | {r['raw']['nn1_euclidean']:.3f} | {fmt(r['published_nn1'])} | "
      f"{r['auroc_mean']:.3f} | {r['raw']['auroc']:.3f} | {r['seconds_per_seed']:.0f} |"
    )
  published = [r for r in rows if r["published"] is not None]
  ucr = [r for r in published if r["dataset"] not in UEA]
  if 0 < len(ucr) < len(published):
    lines.append(_mean_row(ucr, f"mean of the {len(ucr)} UCR sets", official))
  if published:
    lines.append(_mean_row(published, f"mean of {len(published)}", official))
  return "\n".join(lines)


def _mean_row(rows: list[dict], label: str, official: dict) -> str:
  """The table's row of means over ``rows`` (sets with a published figure)."""
  mean = lambda get: np.mean([get(r) for r in rows])
  cell = ""
  if official:
    both = all(r["dataset"] in official for r in rows)
    cell = f" {mean(lambda r: official[r['dataset']]['accuracy_mean']):.3f} |" if both else " |"
  return (
    f"| {label} | {mean(lambda r: r['accuracy_mean']):.3f} |{cell} "
    f"{mean(lambda r: r['published']):.3f} | {mean(lambda r: r['raw']['nn1_euclidean']):.3f} | "
    f"{mean(lambda r: r['published_nn1']):.3f} | {mean(lambda r: r['auroc_mean']):.3f} | "
    f"{mean(lambda r: r['raw']['auroc']):.3f} | |"
  )


def figure(rows: list[dict], path: str, official: dict | None = None) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  official = official or {}
  names = [r["dataset"] for r in rows]
  x = np.arange(len(rows))
  bars = [
    ("TS2Vec, cljax (mean ± std over seeds)", [r["accuracy_mean"] for r in rows],
     [r["accuracy_std"] for r in rows]),
  ]  # fmt: skip
  if official:
    get = lambda r, k: official[r["dataset"]][k] if r["dataset"] in official else 0
    bars.append(("TS2Vec, official code here", [get(r, "accuracy_mean") for r in rows],
                 [get(r, "accuracy_std") for r in rows]))  # fmt: skip
  bars.append(("TS2Vec, published", [r["published"] or 0 for r in rows], None))
  bars.append(("1-NN Euclidean", [r["raw"]["nn1_euclidean"] for r in rows], None))
  width = 0.8 / len(bars)
  fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4.8))
  for i, (label, heights, err) in enumerate(bars):
    ax.bar(x + (i - (len(bars) - 1) / 2) * width, heights, width, yerr=err, label=label)
  ax.set_xticks(x, names, rotation=30, ha="right")
  lowest = min(h for _, heights, _ in bars for h in heights if h > 0)
  floor = min(0.5, np.floor(lowest * 10) / 10 - 0.1)
  ax.set_ylabel(f"test accuracy (axis from {floor:.1f})")
  ax.set_ylim(floor, 1.02)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, fontsize=8)
  ax.set_title("TS2Vec representations + RBF SVM (Yue et al. protocol)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _rows(path: str) -> list[dict]:
  with open(path) as f:
    return json.load(f)["rows"]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--datasets", default=",".join(BUNDLED), help="comma-separated names")
  parser.add_argument("--data_dir", default="", help="folder of the sets' files; '': bundled")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--first_seed", type=int, default=0, help="seeds first_seed, +1, ...")
  parser.add_argument("--steps", type=int, default=0, help="<= 0: the official 200 or 600")
  parser.add_argument("--workdir", default="runs/ucr_table")
  parser.add_argument(
    "--redraw",
    default="",
    help="comma-separated ucr_table.json files: only print and draw (a set's rows joined)",
  )
  parser.add_argument(
    "--official",
    default="",
    help="comma-separated official_ts2vec.json files (benchmarks/official_ts2vec.py): a column",
  )
  args = parser.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  official = {
    row["dataset"]: row for path in args.official.split(",") if path for row in _rows(path)
  }
  if args.redraw:
    rows = merged([row for path in args.redraw.split(",") for row in _rows(path)])
    figure(rows, os.path.join(args.workdir, "ucr_table.png"), official)
    print(table(rows, official))
    return
  rows = []
  for name in [n for n in args.datasets.split(",") if n]:
    rows.append(evaluate_set(name, args.data_dir, args.seeds, args.steps, args.first_seed))
    out = {"rows": rows, "jax": jax.__version__, "devices": jax.device_count(),
           "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    with open(os.path.join(args.workdir, "ucr_table.json"), "w") as f:
      json.dump(out, f, indent=1)
  figure(rows, os.path.join(args.workdir, "ucr_table.png"), official)
  print(table(rows, official))


if __name__ == "__main__":
  main()
