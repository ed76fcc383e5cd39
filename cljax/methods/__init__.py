"""Self-supervised methods, one module each, selected by ``config.method``.

Each is a :class:`cljax.methods.base.Method`: how a batch becomes views, a
loss and the method's own state (target networks, queues, centres). The
train step, data pipeline, checkpoints, evaluation and sharding are shared.
"""

from __future__ import annotations

import ml_collections

from cljax.methods.barlow_twins import BarlowTwins
from cljax.methods.base import Method, StepOutput
from cljax.methods.clip import CLIP
from cljax.methods.dino import DINO
from cljax.methods.momentum import BYOL, MoCoV2, MoCoV3
from cljax.methods.simclr import SimCLR
from cljax.methods.simsiam import SimSiam
from cljax.methods.supcon import SupCon
from cljax.methods.supervised import Supervised
from cljax.methods.swav import SwAV

METHODS: dict[str, type[Method]] = {
  m.name: m
  for m in (
    SimCLR,
    MoCoV2,
    MoCoV3,
    BYOL,
    SimSiam,
    DINO,
    CLIP,
    SwAV,
    BarlowTwins,
    SupCon,
    Supervised,
  )
}


def create_method(
  config: ml_collections.ConfigDict, num_steps: int = 0, steps_per_epoch: int = 0
) -> Method:
  """The method ``config.method`` names, bound to the config and the run's length."""
  if config.method not in METHODS:
    raise ValueError(f"Unknown method {config.method!r}; available: {sorted(METHODS)}.")
  return METHODS[config.method](config, num_steps, steps_per_epoch)


__all__ = ["METHODS", "Method", "StepOutput", "create_method"]
