"""Evaluation of pretrained encoders: kNN, linear probes, fine-tuning, collapse metrics, plots."""

# Light modules only: `classifier` and `runner` import `cljax.train`, which imports this
# package, so they are imported explicitly where needed.
from cljax.evaluate import collapse, knn, linear, online

__all__ = ["collapse", "knn", "linear", "online"]
