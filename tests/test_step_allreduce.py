"""The compiled step all-reduces the parameter gradients once, whatever the forwards.

Under ``shard_map`` a replicated parameter used in a device-varying computation is cast to
varying at each use, and autodiff all-reduces the cotangent of each cast. Left to that, a
chunked forward (``train.grad_chunks > 1``, a ``lax.scan``) all-reduces the gradients inside
the backward loop, once per chunk, and SwAV and DINO with local crops (two forwards)
all-reduce every gradient twice. ``step.train_step`` casts the parameters once and sums the
gradients once; these tests count the all-reduces in the compiled HLO on 8 CPU devices.

Which all-reduces carry gradients. XLA's combiner merges all-reduces into tuples and fuses
the gradients with BatchNorm's statistics and the losses' sums, and their op names are
whatever the combination left, so the count goes by shape: an all-reduce operand shaped as a
parameter kernel (two or more dimensions of size > 1: convolutions and dense layers) is that
kernel's gradient. Nothing else in these steps has those shapes; vectors (biases, scales)
are left out because BatchNorm's per-channel sums have their shapes. An operand counts as
in a loop when its computation is reachable from a while loop's body or condition.
"""

import collections
import re

import jax
import numpy as np
import optax
import pytest
from helpers import state_and_step, tiny_config
from test_step import _batch

from cljax import sharding

LOCAL_CROPS, LOCAL_SIZE = 2, 8

# A computation's header: "%name (params) -> type {" or "ENTRY %name (...) -> ... {".
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
# Computations an instruction runs: loops, calls, fusions, conditionals (a reduction's
# to_apply runs per element and holds no collectives).
_CALLED = re.compile(
  r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_ALL_REDUCE = re.compile(r"=\s*(.*?)\s+all-reduce(?:-start)?\(")
_REDUCE_SCATTER = re.compile(r"=\s*(.*?)\s+reduce-scatter(?:-start)?\(")
_SHAPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


def _computations(hlo: str) -> dict[str, list[str]]:
  """The HLO module's computations: name -> instruction lines."""
  comps, name = {}, None
  for line in hlo.splitlines():
    if name is None:
      match = _HEADER.match(line)
      if match:
        name = match.group(1)
        comps[name] = []
    elif line.strip() == "}":
      name = None
    else:
      comps[name].append(line)
  return comps


def _in_loops(comps: dict[str, list[str]]) -> set[str]:
  """The computations that run inside a while loop (its body, condition and their callees)."""
  calls = collections.defaultdict(set)
  roots = set()
  for name, lines in comps.items():
    for line in lines:
      for kind, callee in _CALLED.findall(line):
        calls[name].add(callee)
        if kind in ("body", "condition"):
          roots.add(callee)
      for branches in _BRANCHES.findall(line):
        calls[name].update(b.strip().lstrip("%") for b in branches.split(","))
  seen, todo = set(), list(roots)
  while todo:
    name = todo.pop()
    if name not in seen:
      seen.add(name)
      todo.extend(calls[name])
  return seen


def _squeezed(dims: str) -> tuple[int, ...]:
  return tuple(int(d) for d in dims.split(",") if d and int(d) != 1)


def all_reduce_operands(hlo: str, op=_ALL_REDUCE) -> list[tuple[tuple[int, ...], bool]]:
  """Every all-reduce operand (or result of ``op``) of the compiled module: (shape without
  1s, in a loop)."""
  comps = _computations(hlo)
  loops = _in_loops(comps)
  operands = []
  for name, lines in comps.items():
    for line in lines:
      match = op.search(line)
      if match:
        # The result type: one array, or a tuple of one per operand.
        operands += [(_squeezed(d), name in loops) for d in _SHAPE.findall(match.group(1))]
  return operands


def gradient_all_reduces(hlo: str, params) -> dict[str, int]:
  """Kernel-shaped all-reduce operands, at the top level and in loops, in units of the
  parameters' kernels: 1 top-level and 0 in loops is one all-reduce of each gradient."""
  kernels = collections.Counter(
    s
    for s in (_squeezed(",".join(map(str, x.shape))) for x in jax.tree.leaves(params))
    if len(s) >= 2
  )
  assert kernels, "no kernel parameters to count"
  top, loop = collections.Counter(), collections.Counter()
  for shape, in_loop in all_reduce_operands(hlo):
    if shape in kernels:
      (loop if in_loop else top)[shape] += 1
  per_kernel = lambda counts: {counts[s] / n for s, n in kernels.items()}
  # Every kernel the same number of times, or the count is not one of whole sets.
  (top_sets,), (loop_sets,) = per_kernel(top), per_kernel(loop)
  return {"top_level": top_sets, "in_loops": loop_sets}


def _config(name, fsdp=False):
  c = tiny_config()
  c.optim.name = "sgd"
  if fsdp:
    c.mesh.state_sharding, c.mesh.fsdp_min_elements = "fsdp", 64
    # No kernel part of the shape of the embeddings' gradient, (2n / 8, output_dim), which
    # the InfoNCE all-gather's transpose reduce-scatters too.
    c.head.hidden_dim = 48
  if name.startswith("simclr"):
    c.train.grad_chunks = int(name.removeprefix("simclr_chunks_"))
    return c
  c.method = name
  if name == "swav":
    c.swav.num_prototypes = 24
    c.head.output_norm = "none"
  if name == "dino":
    c.dino.out_dim, c.dino.hidden_dim, c.dino.bottleneck_dim = 32, 32, 16
  c.data.augment.num_local_crops = LOCAL_CROPS
  c.data.augment.local_crop_size = LOCAL_SIZE
  return c


def _compiled(config, devices):
  """The step's compiled HLO text on ``devices`` and the state's parameters."""
  mesh = sharding.create_mesh(devices)
  lr_fn = optax.constant_schedule(0.1)
  state, step_fn = state_and_step(config, mesh, lr_fn, num_steps=10, steps_per_epoch=5)
  batch = _batch()
  if config.data.augment.num_local_crops:
    shape = (16, LOCAL_CROPS, LOCAL_SIZE, LOCAL_SIZE, 3)
    batch["local_views"] = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
  batch = jax.device_put(batch, sharding.batch_sharded(mesh))
  lowered = step_fn.lower(state, batch, jax.random.key(1))
  return lowered.compile().as_text(), state.params


@pytest.mark.parametrize("name", ["simclr_chunks_1", "simclr_chunks_4", "swav", "dino"])
def test_gradients_are_all_reduced_once_per_step(name):
  # Before the step cast the parameters once: {top_level, in_loops} was {1, 0} for
  # grad_chunks=1, {0, 1} for grad_chunks=4 (once per chunk, 4 chunks), {2, 0} for SwAV and
  # DINO with local crops.
  hlo, params = _compiled(_config(name), jax.devices())
  assert gradient_all_reduces(hlo, params) == {"top_level": 1, "in_loops": 0}


@pytest.mark.parametrize("name", ["simclr_chunks_1", "simclr_chunks_4", "dino"])
def test_fsdp_reduce_scatters_each_split_gradient_once_per_step(name):
  """Under FSDP each kernel that the state splits is summed by one reduce-scatter (its part
  of the sum to each device), outside any loop, and never all-reduced; the kernels kept
  whole are all-reduced once, as in data parallelism."""
  config = _config(name, fsdp=True)
  hlo, params = _compiled(config, jax.devices())
  specs = jax.tree.map(
    lambda x: sharding.fsdp_spec(x.shape, 8, config.mesh.fsdp_min_elements), params
  )
  part = lambda x, spec: tuple(
    n // 8 if d == sharding.split_dim(spec) else n for d, n in enumerate(x.shape)
  )
  split, whole = collections.Counter(), collections.Counter()
  for x, spec in zip(jax.tree.leaves(params), jax.tree.leaves(specs), strict=True):
    if len(_squeezed(",".join(map(str, x.shape)))) >= 2:
      if sharding.split_dim(spec) is None:
        whole[_squeezed(",".join(map(str, x.shape)))] += 1
      else:
        split[_squeezed(",".join(map(str, part(x, spec))))] += 1
  assert split, "no split kernels to count"
  scattered = collections.Counter(all_reduce_operands(hlo, _REDUCE_SCATTER))
  reduced = collections.Counter(all_reduce_operands(hlo))
  for shape, n in split.items():
    assert scattered[(shape, False)] == n and scattered[(shape, True)] == 0, shape
  for shape, n in whole.items():
    assert reduced[(shape, False)] == n and reduced[(shape, True)] == 0, shape
  kernels = {_squeezed(",".join(map(str, x.shape))) for x in jax.tree.leaves(params)}
  split_whole = {s for s in kernels if len(s) >= 2} - set(whole)
  assert not any(shape in split_whole for shape, _ in reduced)  # No split kernel all-reduced.


def test_one_device_step_all_reduces_no_gradients():
  # One device: no cast, no sum (make_train_step turns check_vma off there).
  hlo, params = _compiled(_config("simclr_chunks_4"), jax.devices()[:1])
  assert gradient_all_reduces(hlo, params) == {"top_level": 0, "in_loops": 0}


def test_a_loss_with_a_per_device_term_is_refused(monkeypatch):
  # A term of the parameters alone, not reduced over the devices, would reach the summed
  # gradient once per device; the step refuses such a loss when it is traced.
  from cljax.methods.simclr import SimCLR

  loss = SimCLR.loss

  def with_penalty(self, params, state, views, batch):
    value, out = loss(self, params, state, views, batch)
    return value + 1e-4 * sum(jax.numpy.sum(p**2) for p in jax.tree.leaves(params)), out

  monkeypatch.setattr(SimCLR, "loss", with_penalty)
  with pytest.raises(ValueError, match="must be a global value"):
    _compiled(_config("simclr_chunks_1"), jax.devices())
  # On one device there is nothing to sum: the same loss is fine.
  _compiled(_config("simclr_chunks_1"), jax.devices()[:1])
