"""Evaluation of frozen features: weighted kNN classification."""

from cljax.evaluate import knn

__all__ = ["knn"]
