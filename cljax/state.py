"""The TrainState pytree: everything that changes from one step to the next."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import optax


@flax.struct.dataclass
class TrainState:
  """Parameters, BatchNorm statistics, optimiser state and the step counter.

  ``apply_fn`` and ``tx`` are static: they are part of the treedef, not
  leaves, so checkpoints hold arrays only and ``jit`` never traces them.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, apply_fn, params, batch_stats, tx) -> TrainState:
    return cls(
      step=jax.numpy.zeros((), jax.numpy.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      apply_fn=apply_fn,
      tx=tx,
    )
