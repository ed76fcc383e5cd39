"""Evaluation of pretrained encoders: features, kNN, linear probes, fine-tuning, plots.

Evaluation sits on top of the run (``cljax.run``) and never imports the training loop
(``cljax.train``); the loop calls ``knn.final_knn`` when a run ends. Heavier modules
(``classifier``, ``runner``, ``zero_shot``) are imported where they are needed.
"""

from cljax.evaluate import features, knn, linear

__all__ = ["features", "knn", "linear"]
