"""cljax.data.views: the one description of the training views, and its state signature."""

import numpy as np
import pytest
from helpers import tiny_config

from cljax.data import pipeline, sources
from cljax.data.views import ViewSpec


def test_from_config_reads_the_augment_section_and_the_image_size():
  config = tiny_config()
  aug = config.data.augment
  aug.crop_area_min, aug.crop_area_max, aug.flip = 0.2, 0.9, False
  aug.num_local_crops, aug.local_crop_size = 3, 8
  aug.local_crop_area_min, aug.local_crop_area_max = 0.1, 0.3
  spec = ViewSpec.from_config(config.data)
  assert spec == ViewSpec(
    16,
    crop_area=(0.2, 0.9),
    flip=False,
    num_local_crops=3,
    local_crop_size=8,
    local_crop_area=(0.1, 0.3),
  )
  assert spec.crop_aspect == (3 / 4, 4 / 3)
  # Frozen and hashable: one value to pass around, never a changed copy.
  with pytest.raises(AttributeError):
    spec.flip = True
  assert hash(spec) == hash(ViewSpec.from_config(config.data))
  assert spec.replace(num_local_crops=0).num_local_crops == 0


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"image_size": 0}, "image_size must be an integer >= 1"),
    ({"crop_area": (0.0, 1.0)}, "crop_area must be"),
    ({"crop_area": (0.9, 0.5)}, "crop_area must be"),
    ({"crop_aspect": (2.0, 1.0)}, "crop_aspect must be"),
    ({"num_local_crops": -1}, "num_local_crops must be an integer >= 0"),
    ({"local_crop_area": 0.4}, "local_crop_area must be a \\(min, max\\) pair"),
  ],
)
def test_bad_settings_are_refused_when_the_spec_is_made(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ViewSpec(**({"image_size": 8} | kwargs))


def test_the_signature_is_the_one_iterator_states_were_saved_with():
  """States saved before the spec existed hold these exact fields: they must still restore."""
  source = sources.ArraySource(np.zeros((8, 12, 12, 3), np.uint8), np.arange(8))
  it = pipeline.create_pretrain_iterator(source, ViewSpec(8), seed=0, global_batch_size=4)
  saved = {
    "pipeline": {
      "kind": "pretrain",
      "source": "ArraySource[8]",
      "seed": 0,
      "global_batch_size": 4,
      "image_size": 8,
      "process_index": 0,
      "process_count": 1,
      "crop_area": [0.08, 1.0],
      "crop_aspect": [0.75, 4 / 3],
      "flip": True,
      "num_epochs": None,
    },
    "next_batch": 1,
  }
  # Since issue 27 the signature also says how global batches are dealt to processes; a state
  # saved before, on one process, dealt them the same way and restores as it is.
  assert it.get_state()["pipeline"] == {**saved["pipeline"], "dealing": "blocks"}
  it.set_state(saved)
  # Multi-crop adds its fields, and only then.
  local = ViewSpec(8, num_local_crops=2, local_crop_size=4).signature()
  assert local["num_local_crops"] == 2 and local["local_crop_area"] == [0.05, 0.4]
  assert "num_local_crops" not in ViewSpec(8).signature()
