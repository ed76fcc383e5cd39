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

  ``probe_params``/``probe_opt_state`` hold the online linear probe (a
  classifier on the stop-gradient encoder features, trained alongside) when
  the data has labels, and are None otherwise. ``method_state`` is what the
  method keeps besides the online network (a momentum target network, a MoCo
  queue, DINO's centre), None for SimCLR. ``apply_fn``, ``tx`` and
  ``probe_tx`` are static: part of the treedef, not leaves, so checkpoints
  hold arrays only and ``jit`` never traces them.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  probe_params: Any
  probe_opt_state: Any
  method_state: Any
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  probe_tx: optax.GradientTransformation | None = flax.struct.field(pytree_node=False, default=None)

  @classmethod
  def create(
    cls, *, apply_fn, params, batch_stats, tx, probe_params=None, probe_tx=None, method_state=None
  ) -> TrainState:
    return cls(
      step=jax.numpy.zeros((), jax.numpy.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      probe_params=probe_params,
      probe_opt_state=None if probe_params is None else probe_tx.init(probe_params),
      method_state=method_state,
      apply_fn=apply_fn,
      tx=tx,
      probe_tx=probe_tx,
    )
