"""Shared augmentation presets of the recipes.

Recipes load this file by path, as ``configs/common/cifar10.py``:

    augment = defaults.load_sibling(__file__, "common/augment.py")
    augment.byol_views(c)
"""


def byol_views(c, blur=True):
  """BYOL's asymmetric pair of views (Grill et al. 2020, https://arxiv.org/abs/2006.07733).

  Gaussian blur with p = 1.0 / 0.1 and solarisation with p = 0.0 / 0.2 for the two views;
  colour jitter p = 0.8 and grayscale p = 0.2 are cljax's defaults. Colour strength 0.5 gives
  jitter (0.4, 0.4, 0.4, 0.1) where BYOL's is (0.4, 0.4, 0.2, 0.1). ``blur=False`` (32 px
  images): no blur on either view, the solarisation pair alone.
  """
  a = c.data.augment
  a.color_strength = 0.5
  a.blur_prob, a.blur_prob_b = (1.0, 0.1) if blur else (0.0, 0.0)
  a.solarize_prob = 0.0
  a.solarize_prob_b = 0.2
  return c
