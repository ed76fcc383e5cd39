"""Tests that the evaluation plots are written as non-empty PNGs."""

import numpy as np
import pytest

from cljax.evaluate import plots

pytest.importorskip("matplotlib")

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == _PNG_MAGIC
  assert len(data) > 5000  # Axes, labels and data, not a blank canvas.


def test_curves(tmp_path):
  records = [{"step": s, "loss": 5.0 / s, "accuracy": s / 10, "time": 0.0} for s in range(1, 11)]
  records.append({"step": 10, "knn_top1": 0.4})  # A second record of a step is merged.
  path = plots.plot_curves(records, tmp_path / "curves.png")
  _assert_png(path)
  with pytest.raises(ValueError, match="no metric"):
    plots.plot_curves([{"step": 1, "time": 0.0}], tmp_path / "none.png")


def test_curves_draw_the_knn_against_its_baselines(tmp_path):
  records = [{"step": s, "loss": 5.0 / s} for s in range(1, 11)]
  # As the final kNN logs it: the learned encoder's and its random-init baseline.
  records.append({"step": 10, "knn_top1": 0.8, "knn_top1_random_init": 0.5})
  records.append({"step": 10, "knn_top1_pixels": 0.7})
  panels = plots.curve_panels(records, baselines={"knn_top1": {"learned, step 10": 0.81}})
  assert list(panels) == ["loss", "knn_top1"]  # Baselines are lines, not panels.
  assert panels["knn_top1"]["points"] == [(10, 0.8)]
  assert panels["knn_top1"]["baselines"] == {
    "random-init encoder": 0.5,
    "raw pixels": 0.7,
    "learned, step 10": 0.81,
  }
  assert panels["loss"]["baselines"] == {}
  path = plots.plot_curves(records, tmp_path / "curves_step10.png", title="run, step 10")
  _assert_png(path)


def test_tsne(tmp_path):
  pytest.importorskip("sklearn")
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), 40)
  features = rng.normal(size=(3, 16))[labels] + 0.1 * rng.normal(size=(120, 16))
  path = plots.plot_tsne(features, labels, tmp_path / "tsne.png", class_names=["a", "b", "c"])
  _assert_png(path)
  points, rows = plots.tsne_embedding(features, max_points=50)
  assert points.shape == (50, 2) and len(np.unique(rows)) == 50


def test_similarity_histogram(tmp_path):
  rng = np.random.default_rng(1)
  path = plots.plot_similarity_histogram(
    np.clip(rng.normal(0.8, 0.1, 100), -1, 1),
    np.clip(rng.normal(0.0, 0.2, 9900), -1, 1),
    tmp_path / "sub" / "similarity.png",
  )
  _assert_png(path)
