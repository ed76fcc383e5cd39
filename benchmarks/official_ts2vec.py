"""The official TS2Vec code (PyTorch) on the sets, seeds and protocol of ucr_table.py.

    pip install torch scikit-learn sktime   # in any Python 3 with NumPy; JAX is not needed
    git clone https://github.com/yuezhihan/ts2vec OFFICIAL_DIR
    python benchmarks/official_ts2vec.py --official_dir=OFFICIAL_DIR --datasets=ArrowHead --seeds=10
    python benchmarks/ucr_table.py --redraw=runs/ucr_table/ucr_table.json \\
        --official=runs/official_ts2vec/official_ts2vec.json    # both in one table

The reference that tells a gap of cljax's port from a gap of the published table: the
official ``TS2Vec`` class, ``init_dl_program`` and ``fit_svm`` run unchanged, as its
``train.py`` runs a UCR/UEA set (batch 8, AdamW 0.001, 320 dimensions, ``max_train_length``
3,000, ``fit``'s own 200 or 600 iterations, the seed through ``init_dl_program``; then
``encode(encoding_window='full_series')`` and the RBF SVM). The arrays are the ones
ucr_table.py trains on: ``cljax.data.timeseries`` (NumPy only) loads the set and normalises
it as the official ``load_UCR``/``load_UEA`` do (its 1-NN Euclidean equals the archive's).
``--threads`` sets PyTorch's CPU threads (0: its default, every core).

Writes ``WORKDIR/official_ts2vec.json`` (rows of dataset, per-seed accuracy and seconds) and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE)]

from cljax.data import timeseries  # noqa: E402  (NumPy only)


def load(name: str, data_dir: str) -> tuple[np.ndarray, ...]:
  """(train, train labels, test, test labels), series (n, T, C) float64 as ``load_UCR``."""
  d = timeseries.prepare(timeseries.load_dataset(name, data_dir or None))
  series = lambda x: np.transpose(x, (0, 2, 1)).astype(np.float64)
  return series(d.x_train), d.y_train, series(d.x_test), d.y_test


def run_seed(official, data, seed: int, threads: int) -> dict:
  """Trains the official model for one seed and scores its representations."""
  import joblib
  import torch

  train, train_labels, test, test_labels = data
  t0 = time.perf_counter()
  # train.py: device = init_dl_program(args.gpu, seed=args.seed, max_threads=...).
  device = official["init_dl_program"]("cpu", seed=seed, max_threads=threads or None)
  model = official["TS2Vec"](
    input_dims=train.shape[-1],
    device=device,
    batch_size=8,
    lr=0.001,
    output_dims=320,
    max_train_length=3000,
  )
  loss_log = model.fit(train, n_epochs=None, n_iters=None, verbose=False)
  fitted = time.perf_counter()
  train_repr = model.encode(train, encoding_window="full_series")
  test_repr = model.encode(test, encoding_window="full_series")
  # fit_svm's GridSearchCV(n_jobs=5) in this process: the same result, no worker processes.
  with joblib.parallel_config(backend="sequential"):
    clf = official["fit_svm"](train_repr, train_labels)
  return {
    "seed": seed,
    "accuracy": float(clf.score(test_repr, test_labels)),
    "C": float(clf.C),
    "iterations": int(model.n_iters),
    "final_epoch_loss": float(loss_log[-1]),
    "train_s": fitted - t0,
    "seconds": time.perf_counter() - t0,
    "threads": torch.get_num_threads(),
  }


def import_official(official_dir: str) -> dict:
  """The official ``TS2Vec``, ``init_dl_program`` and ``fit_svm``, imported unchanged
  (``fit_svm`` from ``tasks/_eval_protocols.py`` alone: ``tasks/__init__`` pulls in the
  forecasting and anomaly tasks' dependencies)."""
  if not os.path.isfile(os.path.join(official_dir, "ts2vec.py")):
    raise SystemExit(f"--official_dir={official_dir!r} holds no ts2vec.py: clone "
                     "https://github.com/yuezhihan/ts2vec there.")  # fmt: skip
  sys.path[:0] = [official_dir, os.path.join(official_dir, "tasks")]
  try:
    from _eval_protocols import fit_svm
    from ts2vec import TS2Vec
    from utils import init_dl_program
  except ImportError as e:
    raise SystemExit(f"{e}: the official code needs PyTorch and scikit-learn (pip install "
                     "torch scikit-learn).") from e  # fmt: skip

  return {"TS2Vec": TS2Vec, "init_dl_program": init_dl_program, "fit_svm": fit_svm}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--official_dir", required=True, help="a clone of yuezhihan/ts2vec")
  parser.add_argument("--datasets", default="ArrowHead,OSULeaf", help="comma-separated names")
  parser.add_argument("--data_dir", default="", help="folder of the sets' files; '': bundled")
  parser.add_argument("--seeds", type=int, default=10)
  parser.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads; 0: default")
  parser.add_argument("--workdir", default="runs/official_ts2vec")
  args = parser.parse_args(argv)
  official = import_official(args.official_dir)
  os.makedirs(args.workdir, exist_ok=True)
  rows = []
  for name in [n for n in args.datasets.split(",") if n]:
    data = load(name, args.data_dir)
    row = {"dataset": name, "seeds": []}
    rows.append(row)
    for seed in range(args.seeds):
      row["seeds"].append(run_seed(official, data, seed, args.threads))
      s = row["seeds"][-1]
      print(f"{name} seed {seed}: accuracy {s['accuracy']:.3f}, {s['seconds']:.0f} s", flush=True)
      accs = [s["accuracy"] for s in row["seeds"]]
      row.update(
        accuracy_mean=float(np.mean(accs)),
        accuracy_std=float(np.std(accs)),
        seconds_per_seed=float(np.mean([s["seconds"] for s in row["seeds"]])),
      )
      with open(os.path.join(args.workdir, "official_ts2vec.json"), "w") as f:
        json.dump({"rows": rows, "date": time.strftime("%Y-%m-%d %H:%M")}, f, indent=1)
  print("| dataset | official TS2Vec here (mean ± std, seeds) | seconds / seed |")
  print("|---|---|---|")
  for r in rows:
    print(f"| {r['dataset']} | {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} "
          f"({len(r['seeds'])}) | {r['seconds_per_seed']:.0f} |")  # fmt: skip


if __name__ == "__main__":
  main()
