"""What the views of an image are: one frozen description shared by every crop path.

A :class:`ViewSpec` says how each training view is cut from an image: the side of the
global views, the range of their area fraction and aspect ratio, whether they are flipped,
and multi-crop's local views. It is made once from the config
(``ViewSpec.from_config(config.data)``) and handed to the host pipeline
(``pipeline.create_pretrain_iterator``), the device-resident path
(``device.create_device_iterator``), CLIP's caption iterator, the classifier's fine-tuning
data and the benchmark, so that none of them spells the settings out again. It checks
itself when made, and gives the part of an iterator's state signature that describes the
views (``signature()``), the same dict every iterator saved before the spec existed.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any

import ml_collections

# torchvision's and SimCLR's range of a crop's width / height.
DEFAULT_ASPECT = (3 / 4, 4 / 3)


def _check_range(name: str, values: Sequence[float], low: float, high: float) -> None:
  if len(values) != 2 or not low < values[0] <= values[1] <= high:
    raise ValueError(f"{name} must be (min, max) with {low} < min <= max <= {high}, got {values}")


def _pair(name: str, value: Any) -> tuple[float, float]:
  try:
    return tuple(float(x) for x in value)
  except TypeError:
    raise ValueError(f"{name} must be a (min, max) pair, got {value!r}") from None


def _check_int(name: str, value: Any, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
    raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """How the training views of an image are cut: random resized crops (+ flips).

  Attributes:
    image_size: side S of the square global views.
    crop_area: range of the global crops' area, as a fraction of the image's.
    crop_aspect: range of every crop's width / height (sampled log-uniformly).
    flip: random horizontal flips with probability 1/2, of every view.
    num_local_crops: L, multi-crop's extra local views per example (0: none).
    local_crop_size: side s of the local views.
    local_crop_area: range of the local crops' area fraction.

  Raises:
    ValueError: on construction, when a setting is out of range.
  """

  image_size: int
  crop_area: tuple[float, float] = (0.08, 1.0)
  crop_aspect: tuple[float, float] = DEFAULT_ASPECT
  flip: bool = True
  num_local_crops: int = 0
  local_crop_size: int = 96
  local_crop_area: tuple[float, float] = (0.05, 0.4)

  def __post_init__(self):
    # Normalised, so that specs made from lists, tuples or numpy numbers compare equal.
    for name in ("crop_area", "crop_aspect", "local_crop_area"):
      object.__setattr__(self, name, _pair(name, getattr(self, name)))
    object.__setattr__(self, "flip", bool(self.flip))
    self.validate()

  @classmethod
  def from_config(cls, data_config: ml_collections.ConfigDict) -> ViewSpec:
    """The views ``config.data`` describes (``image_size`` and the ``augment`` section)."""
    aug = data_config.augment
    return cls(
      image_size=data_config.image_size,
      crop_area=(aug.crop_area_min, aug.crop_area_max),
      flip=aug.flip,
      num_local_crops=aug.num_local_crops,
      local_crop_size=aug.local_crop_size,
      local_crop_area=(aug.local_crop_area_min, aug.local_crop_area_max),
    )

  def validate(self) -> None:
    """Raises ``ValueError`` naming the first setting that is out of range."""
    _check_int("image_size", self.image_size, 1)
    _check_range("crop_area", self.crop_area, 0.0, 1.0)
    _check_range("crop_aspect", self.crop_aspect, 0.0, float("inf"))
    _check_int("num_local_crops", self.num_local_crops, 0)
    _check_int("local_crop_size", self.local_crop_size, 1)
    _check_range("local_crop_area", self.local_crop_area, 0.0, 1.0)

  def replace(self, **changes: Any) -> ViewSpec:
    """A copy with ``changes`` (checked again)."""
    return dataclasses.replace(self, **changes)

  def signature(self) -> dict[str, Any]:
    """The views' part of an iterator's state signature (JSON-ready).

    The multi-crop settings appear only with local views, so states saved without
    multi-crop (also by versions that predate it) still restore.
    """
    out = {
      "image_size": int(self.image_size),
      "crop_area": list(self.crop_area),
      "crop_aspect": list(self.crop_aspect),
      "flip": self.flip,
    }
    if self.num_local_crops:
      out |= {
        "num_local_crops": int(self.num_local_crops),
        "local_crop_size": int(self.local_crop_size),
        "local_crop_area": list(self.local_crop_area),
      }
    return out
