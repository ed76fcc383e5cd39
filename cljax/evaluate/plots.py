"""PNG plots of a run: training curves, a t-SNE map of features, positive/negative similarities."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Curves drawn by default when present in metrics.jsonl, in this order.
DEFAULT_CURVES = (
  "loss",
  "accuracy",
  "positive_cosine",
  "negative_cosine",
  "probe_top1",
  "knn_top1",
  "embedding_std",
  "effective_rank",
  "uniformity",
  "alignment",
  "learning_rate",
)


def _pyplot():
  # Agg renders to files without a display; imported here so that `cljax.evaluate` does
  # not need matplotlib until a plot is drawn.
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _save(fig: Any, path: str | os.PathLike) -> str:
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  _pyplot().close(fig)
  return path


# Suffixes of metrics that are a baseline of another (``knn_top1_random_init`` of ``knn_top1``):
# drawn as horizontal lines in that metric's panel, with these labels, not as panels.
BASELINE_SUFFIXES = {"_random_init": "random-init encoder", "_pixels": "raw pixels"}


def curve_panels(
  records: Sequence[Mapping[str, Any]],
  keys: Sequence[str] | None = None,
  baselines: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, dict[str, Any]]:
  """What ``plot_curves`` draws: per metric, its ``(step, value)`` points and baselines.

  A resumed run may log a step twice; the last record of a step wins. The latest value of
  ``<metric>_random_init`` and ``<metric>_pixels`` (as the final kNN logs them) becomes a
  baseline of ``<metric>``; ``baselines`` adds more (``{"knn_top1": {"raw pixels": 0.7}}``).

  Returns:
    ``{metric: {"points": [(step, value), ...], "baselines": {label: value}}}`` in the
    order drawn.

  Raises:
    ValueError: if no record holds any of the metrics.
  """
  by_step: dict[int, dict[str, Any]] = {}
  for record in records:
    by_step.setdefault(int(record["step"]), {}).update(record)
  present = {k for r in by_step.values() for k in r}
  keys = [k for k in (keys or DEFAULT_CURVES) if k in present]
  if not keys:
    raise ValueError(f"no metric to plot: records hold {sorted(present)}.")
  panels = {}
  for key in keys:
    points = sorted((s, float(r[key])) for s, r in by_step.items() if key in r)
    lines = {}
    for suffix, label in BASELINE_SUFFIXES.items():
      logged = [(s, r[key + suffix]) for s, r in sorted(by_step.items()) if key + suffix in r]
      if logged:
        lines[label] = float(logged[-1][1])
    lines.update((baselines or {}).get(key, {}))
    panels[key] = {"points": points, "baselines": lines}
  return panels


def plot_curves(
  records: Sequence[Mapping[str, Any]],
  path: str | os.PathLike,
  keys: Sequence[str] | None = None,
  *,
  baselines: Mapping[str, Mapping[str, float]] | None = None,
  title: str | None = None,
) -> str:
  """One panel per metric against the step, from ``metrics.read_jsonl`` records.

  Baselines (``curve_panels``) are dashed horizontal lines in their metric's panel, so the
  final kNN accuracy is drawn against the random-init encoder and raw pixels.

  Args:
    records: dicts with a ``"step"`` key and scalar metrics.
    path: the PNG to write.
    keys: metrics to draw; default: those of ``DEFAULT_CURVES`` present in ``records``.
    baselines: more horizontal lines, ``{metric: {label: value}}``.
    title: the figure's title (e.g. the run and the evaluated step).

  Returns:
    ``path``.

  Raises:
    ValueError: if no record holds any of the metrics.
  """
  panels = curve_panels(records, keys, baselines)
  plt = _pyplot()
  cols = min(3, len(panels))
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
  for ax, (key, panel) in zip(axes.flat, panels.items(), strict=False):
    steps, values = zip(*panel["points"], strict=True)
    few = len(steps) < 30
    ax.plot(
      steps, values, marker="o" if few else None, label="learned" if panel["baselines"] else None
    )
    for i, (label, value) in enumerate(panel["baselines"].items()):
      ax.axhline(value, color=f"C{i + 1}", linestyle="--", label=f"{label} {value:.3g}")
    if panel["baselines"]:
      ax.legend(fontsize=7, loc="best")
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(panels) :]:
    ax.axis("off")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return _save(fig, path)


def tsne_embedding(
  features: np.ndarray, *, max_points: int = 2000, seed: int = 0, perplexity: float = 30.0
) -> tuple[np.ndarray, np.ndarray]:
  """2-D t-SNE (scikit-learn) of at most ``max_points`` rows, drawn at random from ``seed``.

  Returns:
    ``(points, rows)``: (m, 2) coordinates and the (m,) indices of the rows they map.
  """
  from sklearn.manifold import TSNE  # Optional dependency, needed only for this map.

  features = np.asarray(features, np.float32)
  rng = np.random.default_rng(seed)
  rows = np.sort(rng.permutation(len(features))[:max_points])
  x = features[rows]
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # Cosine geometry.
  perplexity = min(perplexity, max(1.0, (len(x) - 1) / 3))
  # Exact gradients below ~1000 points: faster there than Barnes-Hut, and deterministic.
  method = "exact" if len(x) <= 1000 else "barnes_hut"
  tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=seed, method=method)
  return tsne.fit_transform(x), rows


def plot_tsne(
  features: np.ndarray,
  labels: np.ndarray,
  path: str | os.PathLike,
  *,
  class_names: Sequence[str] | None = None,
  max_points: int = 2000,
  seed: int = 0,
  title: str = "t-SNE of encoder features",
) -> str:
  """A 2-D t-SNE map of ``features`` (n, d) coloured by ``labels`` (n,), written to ``path``."""
  labels = np.asarray(labels)
  points, rows = tsne_embedding(features, max_points=max_points, seed=seed)
  labels = labels[rows]
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 6))
  classes = np.unique(labels)
  cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
  for i, c in enumerate(classes):
    name = class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)
    sel = labels == c
    ax.scatter(points[sel, 0], points[sel, 1], s=5, color=cmap(i % cmap.N), label=name)
  if len(classes) <= 20:
    ax.legend(markerscale=3, fontsize=7, loc="best")
  ax.set_title(f"{title} ({len(points)} points)")
  ax.set_xticks([])
  ax.set_yticks([])
  return _save(fig, path)


def plot_similarity_histogram(
  positive: np.ndarray,
  negative: np.ndarray,
  path: str | os.PathLike,
  *,
  title: str = "cosine similarity of embedding pairs",
) -> str:
  """Overlaid density histograms of positive-pair and negative-pair cosine similarities.

  Args:
    positive: (p,) similarities of two views of the same image.
    negative: (q,) similarities of views of different images.
    path: the PNG to write.
    title: the plot's title.

  Returns:
    ``path``.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  bins = np.linspace(-1.0, 1.0, 81)
  for values, name, color in (
    (negative, "negative", "tab:red"),
    (positive, "positive", "tab:blue"),
  ):
    values = np.asarray(values, np.float64)
    label = f"{name} pairs (n={len(values)}, mean {values.mean():.2f})"
    ax.hist(values, bins=bins, density=True, alpha=0.55, color=color, label=label)
  ax.set_xlabel("cosine similarity")
  ax.set_ylabel("density")
  ax.set_title(title)
  ax.legend(fontsize=8)
  return _save(fig, path)
