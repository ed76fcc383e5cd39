"""Config checks that need no JAX: run before anything heavy is imported or built.

Each failure is one ``ValueError`` line naming the key, its value and the valid range.
``cljax.run.check_config`` calls ``check_config`` too, so library callers get the same checks.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable
from typing import Any

# The names each enumerated key accepts: the keys of the registries, or the branches, of the
# code that dispatches on them. tests/test_validate.py asserts that each list equals its
# registry, so a name added there and not here (or the reverse) fails the tests.
NAMES: dict[str, tuple[str, ...]] = {
  "method": (
    *("simclr", "moco_v2", "moco_v3", "byol", "simsiam", "dino", "dinov2", "swav"),
    *("barlow_twins", "ts2vec"),
    *("supcon", "clip", "supervised"),
  ),  # cljax.methods.METHODS
  "model.name": ("resnet", "vit", "vit_dinov2", "ts2vec"),  # cljax.models.ENCODERS
  "model.stem": ("imagenet", "cifar"),  # cljax.models.resnet.STEMS
  "model.dtype": ("float32", "bfloat16", "float16"),  # cljax.models._DTYPES
  "model.posemb": ("sincos2d", "learn"),  # cljax.models.vit.POSEMBS
  # Which of them a method offers is checked when it is built (Method.bn_views_choices).
  "model.bn_views": ("default", "per_view", "pooled"),
  "head.output_norm": ("bn", "bn_no_affine", "none", "none_no_bias"),  # heads.OUTPUT_NORMS
  "head.hidden_norm": ("bn", "none"),  # cljax.models.heads.HIDDEN_NORMS
  "predictor.output_norm": ("bn", "bn_no_affine", "none", "none_no_bias"),
  "loss.name": ("nt_xent", "debiased", "hard_negative", "decoupled"),  # methods.simclr
  "loss.implementation": ("plain", "blockwise"),  # methods.simclr.LOSS_IMPLEMENTATIONS
  "optim.name": ("lars", "sgd", "adamw"),  # cljax.optim.OPTIMIZERS
  "optim.lr_scaling": ("linear", "sqrt", "sqrt_wrt_1024", "none"),  # cljax.optim.LR_SCALINGS
  "optim.decay_mask": ("kernels", "matrices", "all", "dinov2"),  # cljax.optim.DECAY_MASKS
  "optim.lars_order": ("lr_then_momentum", "momentum_then_lr"),
  "optim.lr_schedule": (
    "warmup_cosine",
    "constant",
  ),  # cljax.run.LR_SCHEDULES  # cljax.optim.LARS_ORDERS
  "data.source": (
    *("tfds", "folder", "npz", "encoded_npz", "idx", "synthetic", "embedded", "prepared"),
    "timeseries",
  ),  # cljax.data.sources._FACTORIES
  "ema.schedule": ("cosine", "constant"),  # cljax.methods.base.EMA_SCHEDULES
  "clip.loss": ("clip", "siglip"),  # cljax.methods.clip.DEFAULT_INIT_LOGIT_SCALE
  "clip.captions": ("templates", "file"),  # cljax.data.captions.CAPTION_SOURCES
  "mesh.state_sharding": ("replicated", "fsdp"),  # cljax.sharding.STATE_SHARDINGS
  "data.modality": ("image", "series"),  # cljax.modalities.MODALITIES
  "dinov2.centering": ("centering", "sinkhorn_knopp"),  # cljax.methods.dinov2.CENTERINGS
  "dinov2.eval_features": ("cls", "cls_avgpool"),  # cljax.methods.dinov2.EVAL_FEATURES
}

# The -1.0 of some probabilities means "the same as the first view's" (defaults.py).
_PROBABILITIES = (
  "color_jitter_prob",
  "grayscale_prob",
  "blur_prob",
  "solarize_prob",
  "blur_prob_b",
  "solarize_prob_b",
  "blur_prob_local",
)
_UNSET = -1.0


def _positive(x: Any) -> bool:
  return x > 0


def _non_negative(x: Any) -> bool:
  return x >= 0


def _rate(x: Any) -> bool:
  return 0 <= x <= 1


def _below_one(x: Any) -> bool:
  return 0 <= x < 1


def _count(x: Any) -> bool:
  return x >= 1


# Numeric keys whose invalid values would crash late (inside a compiled step, after the
# model is built) or train silently wrong: (key, test, the valid range as the message says).
_RANGES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
  # Divisors of similarities: 0 is a division by zero, < 0 inverts the softmax.
  ("loss.temperature", _positive, "> 0"),
  ("dino.student_temperature", _positive, "> 0"),
  ("dino.teacher_temperature", _positive, "> 0"),
  ("dino.warmup_teacher_temperature", _positive, "> 0"),
  ("supcon.base_temperature", _positive, "> 0"),
  ("swav.epsilon", _positive, "> 0 (Sinkhorn's entropy weight)"),
  ("evals.knn_temperature", _positive, "> 0"),
  ("optim.weight_decay", _non_negative, ">= 0"),
  ("optim.warmup_epochs", _non_negative, ">= 0"),
  ("mesh.fsdp_min_elements", _non_negative, ">= 0 (0 splits every leaf that can be split)"),
  # Momenta and decays of running averages; 1 never forgets (SGD's velocity grows without
  # bound, Adam's bias correction divides by 0): excluded.
  ("optim.momentum", _below_one, "in [0, 1)"),
  ("optim.b2", _below_one, "in [0, 1)"),
  ("optim.trust_coefficient", _positive, "> 0 (LARS's trust ratio; 0 freezes every layer)"),
  ("model.bn_momentum", _rate, "in [0, 1]"),
  ("ema.base", _rate, "in [0, 1]"),
  ("ema.final", _rate, "in [0, 1]"),
  ("dino.center_momentum", _rate, "in [0, 1]"),
  ("data.augment.color_strength", _non_negative, ">= 0"),
  ("data.image_size", _count, "an integer >= 1"),
  ("data.num_workers", _non_negative, ">= 0 (0 decodes in the main process)"),
  ("data.augment.num_local_crops", _non_negative, ">= 0"),
  ("data.augment.local_crop_size", _count, "an integer >= 1"),
  ("head.num_layers", _count, "an integer >= 1"),
  ("head.hidden_dim", _count, "an integer >= 1"),
  ("head.output_dim", _count, "an integer >= 1"),
  ("predictor.num_layers", _non_negative, ">= 0 (0: no predictor)"),
  ("loss.block_size", _count, "an integer >= 1"),
  ("train.log_every_steps", _count, "an integer >= 1"),
  ("train.checkpoint_every_steps", _count, "an integer >= 1"),
  ("train.max_to_keep", _count, "an integer >= 1"),
  ("train.grad_chunks", _count, "an integer >= 1 (1: no gradient caching)"),
  ("train.max_nonfinite_streak", _non_negative, ">= 0 (0: never stop)"),
  ("train.stop_at_step", _non_negative, ">= 0 (0: train to the end)"),
  ("swav.num_prototypes", _count, "an integer >= 1"),
  ("swav.sinkhorn_iterations", _count, "an integer >= 1"),
  ("swav.queue_size", _non_negative, ">= 0 (0: no queue)"),
  ("evals.knn_k", _count, "an integer >= 1"),
  ("evals.batch_size", _count, "an integer >= 1"),
)


def method_names() -> tuple[str, ...]:
  """``NAMES["method"]`` and any method registered since (``cljax.methods.register``)."""
  registry = sys.modules.get("cljax.methods")  # Loaded by defaults.base_config, if at all.
  extra = [n for n in getattr(registry, "METHODS", ()) if n not in NAMES["method"]]
  return (*NAMES["method"], *extra)


def _one_of(key: str, value: Any, names: tuple[str, ...]) -> str:
  close = difflib.get_close_matches(str(value), names, n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  return f"{key}={value!r}: must be one of {', '.join(names)}{hint}."


def _get(config: Any, key: str) -> Any:
  node = config
  for part in key.split("."):
    if part not in node:
      return None
    node = node[part]
  return node


def check_config(config: Any, *, allow_zero_lr: bool = False) -> None:
  """Raises ``ValueError`` with one line naming the first invalid key, value and range.

  Args:
    config: the run's config.
    allow_zero_lr: accept ``optim.base_lr == 0`` (a frozen-encoder run).
  """
  for message in problems(config, allow_zero_lr=allow_zero_lr):
    raise ValueError(message)


def problems(config: Any, *, allow_zero_lr: bool = False) -> list[str]:
  """Every invalid value of ``config``, one line each."""
  out = []
  lr = _get(config, "optim.base_lr")
  if lr is not None and not (lr > 0 or (allow_zero_lr and lr == 0)):
    valid = (
      ">= 0 (0 with --allow_zero_lr)" if allow_zero_lr else "> 0 (0 only with --allow_zero_lr)"
    )
    out.append(f"optim.base_lr={lr!r}: must be {valid}.")
  batch = _get(config, "data.global_batch_size")
  if batch is not None and not batch >= 1:
    out.append(f"data.global_batch_size={batch!r}: must be an integer >= 1.")
  steps, epochs = _get(config, "train.num_steps"), _get(config, "train.num_epochs")
  if steps is not None and steps < 0:
    out.append(f"train.num_steps={steps!r}: must be >= 1 (or 0 to train for train.num_epochs).")
  if steps == 0 and epochs is not None and not epochs > 0:
    out.append(f"train.num_epochs={epochs!r}: must be > 0 when train.num_steps is 0.")
  for name in _PROBABILITIES:
    p = _get(config, f"data.augment.{name}")
    if (
      p is not None
      and not (0.0 <= p <= 1.0)
      and not (name.endswith(("_b", "_local")) and p == _UNSET)
    ):
      out.append(f"data.augment.{name}={p!r}: must be a probability in [0, 1].")
  for prefix in ("crop_area", "local_crop_area"):
    lo, hi = _get(config, f"data.augment.{prefix}_min"), _get(config, f"data.augment.{prefix}_max")
    if lo is not None and hi is not None and not 0 < lo <= hi <= 1:
      out.append(
        f"data.augment.{prefix}_min={lo!r}, data.augment.{prefix}_max={hi!r}: must satisfy "
        "0 < min <= max <= 1."
      )
  return out + _name_problems(config) + _range_problems(config)


def _name_problems(config: Any) -> list[str]:
  out = []
  for key, names in NAMES.items():
    value = _get(config, key)
    names = method_names() if key == "method" else names
    if value is not None and value not in names:
      out.append(_one_of(key, value, names))
  return out


def _range_problems(config: Any) -> list[str]:
  out = []
  for key, valid, description in _RANGES:
    value = _get(config, key)
    if value is not None and not valid(value):
      out.append(f"{key}={value!r}: must be {description}.")
  data = _get(config, "data")
  if data is not None and data.get("device_resident") and data.get("crop_on_device"):
    out.append(
      "data.device_resident=True, data.crop_on_device=True: both crop on the device (from the "
      "whole decoded data set, or from the host's decoded images); set one of them False."
    )
  canvas, size = _get(config, "data.canvas_size"), _get(config, "data.image_size")
  if _get(config, "data.crop_on_device") and canvas is not None and size and canvas < size:
    out.append(
      f"data.canvas_size={canvas!r}: must be at least data.image_size ({size}) with "
      "data.crop_on_device: images are shrunk to fit the canvas before cropping."
    )
  return out


def check_workdir_path(workdir: str) -> None:
  """Raises ``NotADirectoryError`` when ``workdir``, or a folder it would be made in, is a file.

  Without this, ``os.makedirs`` fails with "Not a directory", which reads as a permission
  problem; the check touches nothing on disk.
  """
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.exists(existing) and os.path.dirname(existing) != existing:
    existing = os.path.dirname(existing)
  if os.path.exists(existing) and not os.path.isdir(existing):
    where = "is a file" if existing == path else f"is inside {existing!r}, which is a file"
    raise NotADirectoryError(
      f"The workdir {path!r} {where}, not a folder: pass a directory as --workdir."
    )
