"""Self-supervised methods, one module each, selected by ``config.method``.

Each is a :class:`cljax.methods.base.Method`: its config defaults, how a batch
becomes views, a loss and the method's own state (target networks, queues,
centres). The train step, data pipeline, checkpoints, evaluation and sharding
are shared. Adding a method is one module and one line in ``METHODS`` below
(or ``register(cls)`` from outside the package, before the config is built).
"""

from __future__ import annotations

import ml_collections

from cljax.methods.barlow_twins import BarlowTwins
from cljax.methods.base import Method, StepOutput
from cljax.methods.clip import CLIP
from cljax.methods.dino import DINO
from cljax.methods.dinov2 import DINOv2
from cljax.methods.momentum import BYOL, MoCoV2, MoCoV3
from cljax.methods.simclr import SimCLR
from cljax.methods.simsiam import SimSiam
from cljax.methods.supcon import SupCon
from cljax.methods.supervised import Supervised
from cljax.methods.swav import SwAV
from cljax.methods.ts2vec import TS2Vec

METHODS: dict[str, type[Method]] = {
  m.name: m
  for m in (
    SimCLR,
    MoCoV2,
    MoCoV3,
    BYOL,
    SimSiam,
    DINO,
    DINOv2,
    CLIP,
    SwAV,
    BarlowTwins,
    SupCon,
    Supervised,
    TS2Vec,
  )
}


def register(method_class: type[Method]) -> type[Method]:
  """Adds ``method_class`` to the registry under its ``name`` (usable as a class decorator).

  Register before building the config: ``defaults.base_config`` adds the sections of every
  registered method (``Method.config_sections``).

  Raises:
    ValueError: another class is registered under that name.
  """
  name = method_class.name
  if METHODS.get(name, method_class) is not method_class:
    raise ValueError(f"method {name!r} is already registered as {METHODS[name].__name__}.")
  METHODS[name] = method_class
  return method_class


def config_sections() -> dict[str, ml_collections.ConfigDict]:
  """Every registered method's config sections, each once (methods may share one: ``ema``).

  Raises:
    ValueError: two methods give one section different defaults.
  """
  sections: dict[str, ml_collections.ConfigDict] = {}
  for method_class in METHODS.values():
    for key, section in method_class.config_sections().items():
      if key in sections and sections[key].to_dict() != section.to_dict():
        raise ValueError(f"methods give the config section {key!r} different defaults.")
      sections.setdefault(key, section)
  return sections


def create_method(
  config: ml_collections.ConfigDict, num_steps: int = 0, steps_per_epoch: int = 0
) -> Method:
  """The method ``config.method`` names, bound to the config and the run's length."""
  if config.method not in METHODS:
    raise ValueError(f"Unknown method {config.method!r}; available: {sorted(METHODS)}.")
  return METHODS[config.method](config, num_steps, steps_per_epoch)


__all__ = ["METHODS", "Method", "StepOutput", "config_sections", "create_method", "register"]
