"""The sharded train step: 8 devices == 1 device, and it learns."""

import math

import chex
import jax
import numpy as np
import optax
from helpers import float64_model, initial_state, state_and_step, tiny_config, to_float64

from cljax import optim, sharding


def _batch(n=16, size=16, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  # The second view: the same images, shifted and with noise, so the views differ.
  noise = rng.integers(-20, 20, images.shape)
  view_b = np.clip(np.roll(images, 2, axis=2).astype(int) + noise, 0, 255).astype(np.uint8)
  aug_seed = rng.integers(0, 2**31 - 1, n).astype(np.int32)
  label = (np.arange(n) % 4).astype(np.int32)
  return {"view_a": images, "view_b": view_b, "aug_seed": aug_seed, "label": label}


def _run_steps(config, devices, batch, num_steps, lr_fn, num_classes=0, prepare=lambda s: s):
  mesh = sharding.create_mesh(devices)
  state, step_fn = state_and_step(config, mesh, lr_fn, num_classes=num_classes)
  state = prepare(state)
  rng = jax.random.key(1)
  history = []
  for _ in range(num_steps):
    state, metrics = step_fn(state, jax.device_put(batch, sharding.batch_sharded(mesh)), rng)
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


def test_train_step_on_8_devices_equals_1_device():
  config = tiny_config()
  config.data.augment.photometric = True  # Per-example keys must not depend on the split.
  config.evals.collapse_metrics = True  # Sharded diagnostics must match too.
  lr_fn = optax.constant_schedule(0.5)
  batch = _batch()
  # In float64, as the methods' 8-vs-1 checks (tests/method_steps.py): in float32 the two
  # steps differ by summation order alone, but LARS's trust ratios and BatchNorm amplify it
  # past any bound from float32's eps (a metric 1.07e-6 apart against 1.2e-6 allowed on an
  # AVX-512 CPU). Left: the rounding of the views, which augmentation makes in float32.
  config64 = config.copy_and_resolve_references()
  with float64_model(config64):
    # With the online probe: its update must be sharded correctly too.
    state8, hist8 = _run_steps(config64, jax.devices(), batch, 2, lr_fn, 4, to_float64)
    state1, hist1 = _run_steps(config64, jax.devices()[:1], batch, 2, lr_fn, 4, to_float64)
  assert jax.tree.leaves(state8.params)[0].dtype == np.float64
  assert "probe_top1" in hist8[0] and "effective_rank" in hist8[0]
  # Measured: 2.5e-8 (a BatchNorm bias: the views' float32 rounding, amplified by two steps
  # at lr 0.5), metrics 3 float32 ulps (the collapse metrics are float32). Allowed: 40x
  # that, and 1e4 below a real asymmetry (per-device statistics or probe), O(1e-2).
  for m8, m1 in zip(hist8, hist1, strict=True):
    chex.assert_trees_all_close(m8, m1, rtol=1e-5, atol=1e-5)
  for name in ("params", "batch_stats", "probe_params"):
    chex.assert_trees_all_close(getattr(state8, name), getattr(state1, name), rtol=1e-6, atol=1e-6)
  # And the step did change the parameters and statistics.
  init = initial_state(config, lr_fn)
  assert not np.allclose(
    init.params["encoder"]["conv_init"]["kernel"], state8.params["encoder"]["conv_init"]["kernel"]
  )
  assert not np.allclose(
    init.batch_stats["encoder"]["bn_init"]["mean"], state8.batch_stats["encoder"]["bn_init"]["mean"]
  )


def test_blockwise_loss_step_equals_plain_step():
  config = tiny_config()
  lr_fn = optax.constant_schedule(0.5)
  _, plain = _run_steps(config, jax.devices(), _batch(), 1, lr_fn)
  config.loss.implementation = "blockwise"
  config.loss.block_size = 5  # Does not divide the 32 gathered views.
  _, blockwise = _run_steps(config, jax.devices(), _batch(), 1, lr_fn)
  chex.assert_trees_all_close(blockwise[0], plain[0], rtol=1e-5, atol=1e-6)


def test_batchnorm_statistics_are_global():
  # With per-device statistics the 8-device running mean would differ from
  # the 1-device one; equality above needs cross-device BatchNorm. Check the
  # value directly: after one step from zero, mean = (1 - momentum) * batch mean.
  config = tiny_config()
  lr_fn = optax.constant_schedule(0.0)
  batch = _batch()
  state8, _ = _run_steps(config, jax.devices(), batch, 1, lr_fn)
  x = np.concatenate([batch["view_a"], batch["view_b"]]).astype(np.float32) / 255
  x = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  init = initial_state(config, lr_fn)
  kernel = np.asarray(init.params["encoder"]["conv_init"]["kernel"], np.float64)
  conv = jax.lax.conv_general_dilated(
    x[None].reshape(-1, 16, 16, 3),
    kernel,
    (1, 1),
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  expected = 0.1 * np.asarray(conv).mean(axis=(0, 1, 2))
  np.testing.assert_allclose(
    state8.batch_stats["encoder"]["bn_init"]["mean"], expected, rtol=1e-4, atol=1e-6
  )


def _compiled_step_text(config, devices, lr_fn):
  mesh = sharding.create_mesh(devices)
  state, step_fn = state_and_step(config, mesh, lr_fn)
  batch = jax.device_put(_batch(), sharding.batch_sharded(mesh))
  return step_fn.lower(state, batch, jax.random.key(1)).compile().as_text(), step_fn, state, batch


def test_one_device_step_has_no_batchnorm_all_reduce_and_keeps_the_state_pytree():
  # On one device the model is built without BatchNorm's axis, so no
  # one-participant all-reduce per BatchNorm layer is left in the compiled step
  # (the 8-device equality above shows the results are the same); on 8 devices
  # every BatchNorm layer of the tiny ResNet (5 in the encoder, 1 in the head)
  # must sum its statistics across devices.
  config = tiny_config()
  lr_fn = optax.constant_schedule(0.1)
  text1, step_fn, state, batch = _compiled_step_text(config, jax.devices()[:1], lr_fn)
  text8, *_ = _compiled_step_text(config, jax.devices(), lr_fn)
  bn_reduces = lambda text: sum(
    "all-reduce(" in line and "BatchNorm" in line for line in text.splitlines()
  )
  assert "BatchNorm" in text1  # The ops' metadata names their modules.
  assert bn_reduces(text1) == 0
  assert bn_reduces(text8) >= 5
  # The returned state keeps its pytree: the next call hits the compile cache.
  treedef = jax.tree.structure(state)
  new_state, _ = step_fn(state, batch, jax.random.key(1))
  assert jax.tree.structure(new_state) == treedef
  step_fn(new_state, batch, jax.random.key(1))
  assert step_fn._cache_size() == 1


def test_thirty_steps_on_a_fixed_batch_drive_the_loss_far_below_chance():
  config = tiny_config()
  # At temperature 0.5 the loss cannot fall below about log(1 + 30 e^-2) = 1.6
  # even for perfect embeddings; at 0.1 its floor is near 0.
  config.loss.temperature = 0.1
  lr_fn = optim.create_learning_rate_fn(peak_lr=5.0, warmup_steps=3, total_steps=30)
  _, history = _run_steps(config, jax.devices(), _batch(), 30, lr_fn)
  chance = math.log(2 * 16 - 1)
  losses = [float(h["loss"]) for h in history]
  assert losses[-1] < 0.1 * chance, losses
  assert losses[-1] < 0.2 * losses[0], losses
  assert history[-1]["accuracy"] > 0.9
