"""Helpers shared by the loss modules: argument checks, normalisation, global means."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Added to logits that must not take part in the softmax (a query against
# itself). Finite so that no inf - inf can appear in the backward pass.
_MASK_VALUE = -1e9


def _check_temperature(temperature: float) -> None:
  if not isinstance(temperature, jax.Array) and not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}.")


def _check_2d(name: str, x: jax.Array) -> None:
  if x.ndim != 2:
    raise ValueError(f"{name} must have shape (batch, dim), got shape {x.shape}.")


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """Scales ``x`` to unit L2 norm along ``axis``, in float32."""
  x = x.astype(jnp.float32)
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps))


def _global_offset(n_local: int, axis_name: str | None) -> jax.Array | int:
  if axis_name is None:
    return 0
  return jax.lax.axis_index(axis_name) * n_local


def _mean_over_batch(per_example: jax.Array, axis_name: str | None) -> jax.Array:
  # Every device holds the same number of queries, so the mean of the local
  # means is the global mean.
  mean = jnp.mean(per_example)
  return mean if axis_name is None else jax.lax.pmean(mean, axis_name)
