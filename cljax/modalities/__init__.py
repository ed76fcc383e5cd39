"""Modalities: what differs between images and time series, behind one interface.

``data.modality`` names one of :data:`MODALITIES`; :func:`get` returns it. See
``cljax.modalities.base`` for what a modality supplies.
"""

from __future__ import annotations

import ml_collections

from cljax.modalities.base import Modality
from cljax.modalities.image import IMAGE
from cljax.modalities.series import SERIES

MODALITIES: dict[str, Modality] = {IMAGE.name: IMAGE, SERIES.name: SERIES}


def register(modality: Modality) -> Modality:
  """Adds ``modality`` under its ``name`` (from outside the package, before the config is
  built)."""
  if MODALITIES.get(modality.name, modality) is not modality:
    raise ValueError(f"modality {modality.name!r} is already registered.")
  MODALITIES[modality.name] = modality
  return modality


def get(config: ml_collections.ConfigDict) -> Modality:
  """The modality ``config.data.modality`` names ("image" where the key is absent)."""
  name = config.data.get("modality", "image")
  if name not in MODALITIES:
    raise ValueError(f"Unknown data.modality {name!r}; available: {sorted(MODALITIES)}.")
  return MODALITIES[name]


__all__ = ["IMAGE", "MODALITIES", "SERIES", "Modality", "get", "register"]
