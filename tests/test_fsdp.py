"""Fully sharded state (``mesh.state_sharding="fsdp"``): the same steps as data parallelism.

Each method's FSDP step on 8 CPU devices equals its replicated step in float64, over steps
that exercise what sharding could break: LARS's per-leaf trust ratios, AdamW's moments, a
momentum target network, DINO's frozen last layer and CLIP's two towers.
"""

import json
import math
import re
import shutil
import subprocess

import chex
import jax
import ml_collections
import numpy as np
import optax
import pytest
import test_multiprocess as mp
import test_step_allreduce as allreduce
from helpers import float64_model, state_and_step, tiny_config, to_float64
from jax.sharding import PartitionSpec as P
from method_steps import _initial_state, _run
from test_clip import _clip_batch, _clip_config
from test_step import _batch

from cljax import methods, metrics, optim, sharding, step
from cljax.bench import memory
from cljax.evaluate import runner

TINY_VIT = "custom:hidden=16,depth=1,heads=2,mlp=32,patch=8"


def _vit(config):
  config.model.name = "vit"
  config.model.variant = TINY_VIT
  return config


def _configs():
  simclr = tiny_config()
  simclr.optim.name = "lars"
  moco = _vit(tiny_config())
  moco.method, moco.optim.name = "moco_v3", "adamw"
  moco.predictor.num_layers, moco.predictor.hidden_dim = 2, 32
  dino = _vit(tiny_config())
  dino.method, dino.optim.name = "dino", "adamw"
  dino.dino.out_dim, dino.dino.hidden_dim, dino.dino.bottleneck_dim = 32, 32, 16
  dino.dino.freeze_last_layer_epochs = 1.0  # Frozen in step 1, trained in step 2.
  clip = _clip_config()
  clip.optim.name = "adamw"
  # Scanned, rematerialised blocks: the model gathers each layer itself (ZeRO-3 per layer).
  scanned = moco.copy_and_resolve_references()
  scanned.model.variant = "custom:hidden=16,depth=2,heads=2,mlp=32,patch=8"
  scanned.model.scan_blocks, scanned.model.remat = True, True
  return {
    "simclr_lars_resnet": simclr,
    "moco_v3_vit": moco,
    "moco_v3_vit_scanned": scanned,
    "dino_vit": dino,
    "clip": clip,
  }


def _batches(name):
  if name == "clip":
    return [_clip_batch(0), _clip_batch(1)]
  return [_batch(seed=0), _batch(seed=1)]


def _runs(config, name, layouts):
  """The float64 run of ``config`` from one initial state under each layout."""
  config = config.copy_and_resolve_references()
  config.mesh.fsdp_min_elements = 64  # Tiny models: most kernels split over 8 devices.
  batches = _batches(name)
  out = {}
  with float64_model(config):
    init = to_float64(_initial_state(config, 0.1, len(batches), steps_per_epoch=1))
    for layout in layouts:
      config.mesh.state_sharding = layout
      out[layout] = _run(config, jax.devices(), batches, init=init, steps_per_epoch=1)
  return out


def _assert_same(a, b, rtol=1e-6, atol=1e-8):
  """Float64 models, but the losses compute their logits in float32 (``cljax.losses``): the
  reduction orders of the two layouts round those apart by float32's eps (DINO's centre:
  1.7e-7 relative); the parameters of SimCLR and MoCo v3 agree to 1e-9."""
  (states_a, hist_a), (states_b, hist_b) = a, b
  for m_a, m_b in zip(hist_a, hist_b, strict=True):
    chex.assert_trees_all_close(m_a, m_b, rtol=rtol, atol=atol)
  for s_a, s_b in zip(states_a, states_b, strict=True):
    for part in ("params", "opt_state", "method_state", "batch_stats"):
      chex.assert_trees_all_close(getattr(s_a, part), getattr(s_b, part), rtol=rtol, atol=atol)


@pytest.mark.parametrize(
  "name", ["simclr_lars_resnet", "moco_v3_vit", "moco_v3_vit_scanned", "dino_vit", "clip"]
)
def test_fsdp_steps_equal_data_parallel_steps(name):
  config = _configs()[name]
  runs = _runs(config, name, ("replicated", "fsdp"))
  _assert_same(runs["replicated"], runs["fsdp"])
  states, history = runs["fsdp"]
  assert all(np.isfinite(m["loss"]) for m in history)
  # The steps moved the parameters: equal because both did the same, not because neither did.
  moved = [
    np.abs(a - b).max()
    for a, b in zip(*map(jax.tree.leaves, (states[0].params, states[-1].params)), strict=True)
  ]
  assert max(moved) > 1e-4


def test_per_shard_lars_norms_would_differ(monkeypatch):
  """optax's trust ratio takes the norm of the part of a leaf a device holds: under FSDP
  each shard would get its own ratio. cljax's (``optim.scale_by_trust_ratio``) sums the
  squares over the devices; with optax's the FSDP step is another optimiser."""
  name = "simclr_lars_resnet"
  monkeypatch.setattr(
    optim, "scale_by_trust_ratio", lambda c: optax.scale_by_trust_ratio(trust_coefficient=c)
  )
  runs = _runs(_configs()[name], name, ("replicated", "fsdp"))
  # Replicated, optax's transform is cljax's: the same step as before.
  with pytest.raises(AssertionError):
    _assert_same(runs["replicated"], runs["fsdp"], rtol=1e-4, atol=1e-6)


def test_fsdp_splits_large_leaves_and_keeps_small_ones_whole():
  config = _vit(tiny_config())
  config.method, config.optim.name = "moco_v3", "adamw"
  config.predictor.num_layers, config.predictor.hidden_dim = 2, 32
  config.mesh.state_sharding, config.mesh.fsdp_min_elements = "fsdp", 64
  mesh = sharding.create_mesh()
  method = methods.create_method(config)
  state = step.place_state(_initial_state(config, 0.1), mesh, method)
  specs = step.state_specs(state, method, mesh.devices.size)
  kernel = state.params["encoder"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"][
    "kernel"
  ]
  assert kernel.shape == (16, 32)
  assert kernel.sharding.spec == P(None, "data")  # The larger dimension.
  assert kernel.addressable_shards[0].data.shape == (16, 4)
  # The AdamW moments and the target network like their parameter; small leaves whole.
  target = state.method_state["target_params"]["encoder"]["Transformer"]["encoderblock_0"]
  assert target["MlpBlock_0"]["Dense_0"]["kernel"].sharding.spec == P(None, "data")
  mu = optax.tree_utils.tree_get(state.opt_state, "mu")
  mu_kernel = mu["encoder"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert mu_kernel.sharding.spec == P(None, "data")
  bias = state.params["encoder"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["bias"]
  assert bias.sharding.spec == P() and specs.step == P()
  split = [s for s in jax.tree.leaves(specs.params) if sharding.split_dim(s) is not None]
  assert split and len(split) < len(jax.tree.leaves(specs.params))


def test_fsdp_spec_picks_the_largest_dimension_that_splits():
  assert sharding.fsdp_spec((3, 3, 64, 128), 8, 0) == P(None, None, None, "data")
  assert sharding.fsdp_spec((768, 768), 8, 0) == P("data", None)  # The first of equals.
  assert sharding.fsdp_spec((1000, 12), 8, 0) == P("data", None)
  assert sharding.fsdp_spec((7, 9), 8, 0) == P()  # Nothing splits evenly.
  assert sharding.fsdp_spec((768,), 8, 1024) == P()  # Small.
  assert sharding.fsdp_spec((4096,), 1, 0) == P()  # One device.


def test_a_nonfinite_value_in_one_shard_skips_the_step_on_every_device():
  """The guard sees every device's part: a NaN in one device's part of a split momentum
  trace would leave that part as it was and let the others update."""
  config = tiny_config()
  config.optim.name = "sgd"
  config.mesh.state_sharding, config.mesh.fsdp_min_elements = "fsdp", 64
  mesh = sharding.create_mesh()
  lr_fn = optax.constant_schedule(0.1)
  state, step_fn = state_and_step(config, mesh, lr_fn)
  state, _ = step_fn(
    state, jax.device_put(_batch(), sharding.batch_sharded(mesh)), jax.random.key(1)
  )
  host = jax.tree.map(np.array, jax.device_get(state))  # Writable copies.
  trace = optax.tree_utils.tree_get(host.opt_state, "trace")
  kernel = trace["head"]["Dense_1"]["kernel"]  # (32, 16), split over its 32 rows.
  kernel[30, 0] = np.nan  # Rows 28-31: the last device's part.
  method = methods.create_method(config)
  before = jax.device_get(host.params)
  state = step.place_state(host, mesh, method)
  assert state.params["head"]["Dense_1"]["kernel"].sharding.spec == P("data", None)
  state, metrics = step_fn(
    state, jax.device_put(_batch(seed=1), sharding.batch_sharded(mesh)), jax.random.key(1)
  )
  assert float(metrics["nonfinite"]) == 1.0
  chex.assert_trees_all_equal(jax.device_get(state.params), before)


def _main(workdir, devices, *extra):
  out = subprocess.run(
    [*mp._command(workdir, *extra)],
    cwd=mp.REPO,
    env=mp._env(devices),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stderr


def _restore_on_one_device(workdir, step_):
  """The README's plain-orbax snippet: the saved state on this process's first device."""
  return mp._restore(workdir, step_)


def test_an_fsdp_checkpoint_resumes_on_4_and_1_devices_and_restores_anywhere(tmp_path):
  """A run under FSDP on 8 devices, preempted after step 3 (its step-4 checkpoint deleted),
  resumes from step 2 on 4 devices and on 1 (where the state is whole) and ends as the
  uninterrupted run did, having seen the same batches: the same losses (1e-5 relative) and
  final state. Tolerances: float32, and the device count changes the order of sums. On 4
  devices the states agree to 1.1e-6 (as data parallelism's 8 and 4 devices do). On one
  device BatchNorm has no axis and its fast variance rounds otherwise: a BatchNorm bias
  and its momentum end 2.5e-4 apart, exactly as a data-parallel checkpoint resumed on one
  device does (measured: 2.500e-4 both), so 5e-4 there."""
  fsdp = ("--config.mesh.state_sharding=fsdp", "--config.mesh.fsdp_min_elements=64")
  straight = tmp_path / "straight"
  _main(straight, 8, *fsdp)
  reference = [r["loss"] for r in metrics.read_jsonl(straight / "metrics.jsonl")]
  final = _restore_on_one_device(straight, 4)
  for devices, atol in ((4, 5e-6), (1, 5e-4)):
    resumed = tmp_path / f"on_{devices}"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    err = _main(resumed, devices, *fsdp)
    assert "at step 2." in err and not (resumed / "checkpoints_unreadable").exists()
    rows = metrics.read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in rows[4:]], reference[2:], rtol=1e-5)
    chex.assert_trees_all_close(_restore_on_one_device(resumed, 4), final, rtol=0, atol=atol)
  # Evaluation restores the FSDP checkpoint whole on a mesh of its own (2 devices here).
  config = mp_config(straight)
  method = methods.create_method(config)
  state, at = runner.restore_checkpoint(
    method, str(straight), mesh=sharding.create_mesh(jax.devices()[:2])
  )
  assert at == 4 and state.params["head"]["Dense_1"]["kernel"].sharding.is_fully_replicated
  chex.assert_trees_all_equal(jax.device_get(state.params), final["params"])


def mp_config(workdir):
  """The config the run in ``workdir`` saved (config.json), as a ConfigDict."""
  return ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))


def test_a_vit_b_state_under_fsdp_takes_an_eighth_per_device_in_the_compiled_step():
  """XLA's memory analysis of the compiled ViT-B step (MoCo v3, AdamW, a target network)
  on 8 devices: its arguments (the state and a small batch) are at most 1/8 of the whole
  state plus the leaves kept whole, where replicated they would be all of it."""
  config = _vit(tiny_config())
  config.method, config.optim.name = "moco_v3", "adamw"
  config.predictor.num_layers = 2
  config.model.variant, config.model.scan_blocks = "B/16", True  # One block to compile.
  config.data.image_size, config.data.global_batch_size = 32, 8
  config.mesh.state_sharding = "fsdp"
  mesh = sharding.create_mesh()
  method = methods.create_method(config)
  state = memory.abstract_state(method, mesh)
  specs = step.state_specs(state, method, 8)
  nbytes = lambda x: math.prod(x.shape) * np.dtype(x.dtype).itemsize
  pairs = list(zip(jax.tree.leaves(state), jax.tree.leaves(specs), strict=True))
  whole = sum(nbytes(x) for x, _ in pairs)
  kept_whole = sum(nbytes(x) for x, s in pairs if sharding.split_dim(s) is None)
  assert whole > 1e9  # ViT-B: 86M parameters, AdamW's moments and the target network.
  batch = memory.abstract_batch(config, mesh, 8)
  compiled = memory.compiled_memory(
    step.make_train_step(method, mesh, optax.constant_schedule(0.1)), state, batch
  )
  batch_bytes = sum(nbytes(x) for x in jax.tree.leaves(batch)) // 8
  state_bytes = compiled["argument_bytes"] - batch_bytes
  assert state_bytes <= (whole - kept_whole) / 8 + kept_whole + 1024  # + the step's key.
  assert state_bytes == pytest.approx(memory.state_bytes_per_device(state), abs=1024)
  assert kept_whole < 0.01 * whole


def test_scanned_blocks_gather_and_reduce_scatter_one_layer_at_a_time():
  """Under FSDP a scanned tower's split parameters are all-gathered inside the loop over the
  layers (one layer's worth each) and their gradients reduce-scattered inside the backward
  loop; no stacked parameter is ever gathered whole."""
  config = _configs()["moco_v3_vit_scanned"]
  config.mesh.state_sharding, config.mesh.fsdp_min_elements = "fsdp", 64
  mesh = sharding.create_mesh()
  lr_fn = optax.constant_schedule(0.1)
  state, step_fn = state_and_step(config, mesh, lr_fn)
  batch = jax.device_put(_batch(), sharding.batch_sharded(mesh))
  hlo = step_fn.lower(state, batch, jax.random.key(1)).compile().as_text()
  comps = allreduce._computations(hlo)
  loops = allreduce._in_loops(comps)
  gather = re.compile(r"=\s*(.*?)\s+all-gather(?:-start)?\(")
  ops = {"gather": gather, "scatter": allreduce._REDUCE_SCATTER}
  found = {(k, inside): [] for k in ops for inside in (True, False)}
  for name, lines in comps.items():
    for line in lines:
      for kind, op in ops.items():
        match = op.search(line)
        if match:
          shapes = allreduce._SHAPE.findall(match.group(1))
          found[(kind, name in loops)] += [allreduce._squeezed(d) for d in shapes]
  blocks = state.params["encoder"]["Transformer"]["scan_encoderblocks"]["block"]
  stacked = {allreduce._squeezed(",".join(map(str, x.shape))) for x in jax.tree.leaves(blocks)}
  one_layer = {s[1:] for s in stacked}
  kernel = blocks["MlpBlock_0"]["Dense_0"]["kernel"]  # (2, 16, 32), split on its 32.
  assert kernel.sharding.spec == P(None, None, "data")
  assert (16, 32) in found[("gather", True)]  # One layer, gathered in the loop.
  assert (16, 4) in found[("scatter", True)]  # Its gradient's part, in the backward loop.
  assert not stacked & set(found[("gather", False)] + found[("gather", True)])
  assert one_layer & set(found[("gather", True)])
