"""benchmarks/ucr_table.py: joining the rows of several runs of one set for the table."""

import importlib.util
import os

import numpy as np

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "ucr_table.py")
_SPEC = importlib.util.spec_from_file_location("ucr_table", _PATH)
ucr_table = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ucr_table)


def _seed(accuracy, seed=None):
  s = {"svm_top1": accuracy, "auroc": accuracy / 2, "seconds": 10 * accuracy}
  return s if seed is None else s | {"seed": seed}


def test_rows_of_one_set_are_joined_by_seed_number():
  old = {"dataset": "A", "seeds": [_seed(0.1), _seed(0.2)], "raw": {"auroc": 0.5}}  # 0, 1
  other = {"dataset": "B", "seeds": [_seed(0.9, 0)]}
  new = {"dataset": "A", "seeds": [_seed(0.4, 1), _seed(0.6, 2)]}
  rows = ucr_table.merged([old, other, new])
  assert [r["dataset"] for r in rows] == ["A", "B"]
  a = rows[0]
  # Seed 1 of the later row replaces the earlier's; seeds 0 and 2 are kept.
  assert [s["seed"] for s in a["seeds"]] == [0, 1, 2]
  assert [s["svm_top1"] for s in a["seeds"]] == [0.1, 0.4, 0.6]
  np.testing.assert_allclose(a["accuracy_mean"], np.mean([0.1, 0.4, 0.6]))
  np.testing.assert_allclose(a["accuracy_std"], np.std([0.1, 0.4, 0.6]))
  np.testing.assert_allclose(a["auroc_mean"], np.mean([0.05, 0.2, 0.3]))
  np.testing.assert_allclose(a["seconds_per_seed"], np.mean([1.0, 4.0, 6.0]))
  assert a["raw"] == {"auroc": 0.5} and rows[1]["accuracy_mean"] == 0.9


def test_the_table_gives_the_ucr_sets_a_mean_row_of_their_own():
  def row(name, accuracy, published):
    summary = {"accuracy_mean": accuracy, "accuracy_std": 0.0, "auroc_mean": 0.5}
    raw = {"nn1_euclidean": 0.5, "auroc": 0.5}
    return summary | {"dataset": name, "seeds": [{}], "published": published,
                      "published_nn1": 0.5, "raw": raw, "seconds_per_seed": 1.0}  # fmt: skip

  rows = [row("GunPoint", 0.9, 0.8), row("ArrowHead", 0.7, 0.6), row("BasicMotions", 0.2, 1.0)]
  lines = ucr_table.table(rows).splitlines()
  assert lines[-2].startswith("| mean of the 2 UCR sets | 0.800 | 0.700 |")
  assert lines[-1].startswith("| mean of 3 | 0.600 | 0.800 |")
  # Without a UEA set the two rows would be one: only the overall mean.
  assert ucr_table.table(rows[:2]).splitlines()[-1].startswith("| mean of 2 | 0.800 |")
  assert "UCR sets" not in ucr_table.table(rows[:2])
