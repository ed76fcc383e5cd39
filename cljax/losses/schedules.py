"""Jit-friendly schedules and the exponential moving average of target networks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def cosine_ramp(
  step: jax.Array | int,
  total_steps: jax.Array | int,
  start: jax.Array | float,
  end: jax.Array | float = 1.0,
) -> jax.Array:
  r"""A half-cosine ramp from ``start`` at step 0 to ``end`` at ``total_steps``.

  .. math::
     v(t) = e - (e - s) \cdot \frac{\cos(\pi \, t / T) + 1}{2},
     \qquad t = \mathrm{clip}(\mathrm{step}, 0, T),

  constant ``end`` after ``total_steps``. This is BYOL's target decay
  :math:`\tau = 1 - (1 - \tau_{base})(\cos(\pi k / K) + 1) / 2` (Grill et al.
  2020, Sec. 3.2, https://arxiv.org/abs/2006.07733) and MoCo v3's momentum
  schedule from 0.99 to 1 (Chen, Xie, He 2021, https://arxiv.org/abs/2104.02057).

  Args:
    step: the current step, a Python int or a (traced) scalar array.
    total_steps: :math:`T` > 0, the step at which ``end`` is reached.
    start: value at step 0.
    end: value at and after ``total_steps``.

  Returns:
    A float32 scalar (or the broadcast shape of the arguments).

  Raises:
    ValueError: if ``total_steps`` is a Python number <= 0.
  """
  if not isinstance(total_steps, jax.Array) and not total_steps > 0:
    raise ValueError(f"total_steps must be > 0, got {total_steps!r}.")
  total = jnp.asarray(total_steps, jnp.float32)
  t = jnp.clip(jnp.asarray(step, jnp.float32), 0.0, total)
  start = jnp.asarray(start, jnp.float32)
  end = jnp.asarray(end, jnp.float32)
  return end - (end - start) * (jnp.cos(jnp.pi * t / total) + 1.0) / 2.0


def ema_update(target: Any, online: Any, decay: jax.Array | float) -> Any:
  r"""The exponential moving average of a target pytree towards an online one.

  .. math::
     \xi \leftarrow \tau \, \xi + (1 - \tau) \, \mathrm{stop\_gradient}(\theta)

  leaf by leaf, as for BYOL's target network, MoCo's momentum encoder and
  DINO's teacher. Each leaf is computed in float32 and cast back to the
  target leaf's dtype.

  Args:
    target: pytree of arrays :math:`\xi` (e.g. the target network's params).
    online: pytree of the same structure and shapes, :math:`\theta`.
    decay: :math:`\tau` in [0, 1] (e.g. from :func:`cosine_ramp`); 1 keeps
      the target, 0 copies the online values.

  Returns:
    The updated target pytree.

  Raises:
    ValueError: if ``decay`` is a Python number outside [0, 1], or the trees
      differ in structure or leaf shapes.
  """
  if not isinstance(decay, jax.Array) and not 0.0 <= decay <= 1.0:
    raise ValueError(f"decay must be in [0, 1], got {decay!r}.")
  decay = jnp.asarray(decay, jnp.float32)

  def update(t: jax.Array, o: jax.Array) -> jax.Array:
    if jnp.shape(t) != jnp.shape(o):
      raise ValueError(
        f"target and online leaves differ in shape: {jnp.shape(t)} vs {jnp.shape(o)}."
      )
    o = jax.lax.stop_gradient(jnp.asarray(o, jnp.float32))
    new = decay * jnp.asarray(t, jnp.float32) + (1.0 - decay) * o
    return new.astype(jnp.result_type(t))

  return jax.tree.map(update, target, online)
