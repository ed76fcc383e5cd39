"""A tiny synthetic recipe for tests/test_time_to_accuracy.py's command-line test."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import helpers  # noqa: E402


def get_config():
  c = helpers.tiny_config()
  c.data.source = "synthetic"
  c.data.num_examples = 64
  c.data.num_classes = 4
  c.data.num_workers = 0
  c.evals.batch_size = 32
  return c
