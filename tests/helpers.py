"""Shared test fixtures: a tiny config that runs the real code path."""

import ml_collections

from cljax import defaults


def tiny_config() -> ml_collections.ConfigDict:
  """A one-stage ResNet on 16x16 images with a small head, float32, no photometric aug."""
  c = defaults.base_config()
  c.model.depth = 18
  c.model.stage_sizes = (1,)
  c.model.num_filters = 8
  c.model.stem = "cifar"
  c.model.dtype = "float32"
  c.head.hidden_dim = 32
  c.head.output_dim = 16
  c.loss.temperature = 0.5
  c.optim.base_lr = 0.3
  c.optim.lr_scaling = "none"
  c.optim.weight_decay = 1e-4
  c.data.image_size = 16
  c.data.global_batch_size = 16
  c.data.augment.photometric = False
  return c
