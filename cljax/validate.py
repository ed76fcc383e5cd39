"""Config checks that need no JAX: run before anything heavy is imported or built.

Each failure is one ``ValueError`` line naming the key, its value and the valid range.
``cljax.run.check_config`` calls ``check_config`` too, so library callers get the same checks.
"""

from __future__ import annotations

from typing import Any

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
  return out
