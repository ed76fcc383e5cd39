"""Command line: ``python -m cljax.main --config=configs/X.py --workdir=DIR``."""

from __future__ import annotations

import json
import logging as py_logging

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from cljax import train

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "A config file from configs/; override fields with --config.a.b=v.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Folder for checkpoints, metrics and TensorBoard events; resumed if present."
)
_FORCE_RESUME = flags.DEFINE_bool(
  "force_resume", False, "Resume a workdir even though its saved config differs."
)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(py_logging.Filter):
  """Drops INFO lines from orbax and grain (dozens per checkpoint); keeps warnings."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    noisy = "/orbax/" in record.pathname or "/grain/" in record.pathname
    return record.levelno >= py_logging.WARNING or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, force_resume=_FORCE_RESUME.value)
  if jax.process_index() == 0:
    if "knn_top1" in result:
      line = f"kNN top-1 of the learned encoder on the eval split: {result['knn_top1']:.1%}"
      if "knn_top1_random_init" in result:
        line += f" (randomly initialised encoder: {result['knn_top1_random_init']:.1%})"
      print(line)
    print(json.dumps({"final": result}, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
