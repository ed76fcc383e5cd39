"""DINOv2 in the shared train step: 8 devices == 1, the teacher, centring, masks, the optimiser."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_config
from method_steps import _assert_8_devices_equal_1
from test_methods_dino import _batch

from cljax import losses, methods, models, optim
from cljax.evaluate import features as features_lib
from cljax.evaluate import knn
from cljax.methods import dinov2

N, SIZE, LOCAL, NUM_LOCAL = 16, 16, 8, 2
STEPS_PER_EPOCH, NUM_STEPS = 2, 3
DEPTH, DIM = 2, 16
TINY = f"custom:dim={DIM},depth={DEPTH},heads=2,patch=4"


def _config(centering="sinkhorn_knopp", separate_head=False):
  c = tiny_config()
  c.method = "dinov2"
  c.model.name = "vit_dinov2"
  c.model.variant = TINY
  c.model.img_size = SIZE
  c.model.num_register_tokens = 2
  cfg = c.dinov2
  cfg.centering = centering
  cfg.ibot_separate_head = separate_head
  for head, out_dim in ((cfg.head, 32), (cfg.ibot_head, 24)):
    head.out_dim, head.hidden_dim, head.bottleneck_dim = out_dim, 32, 16
  cfg.warmup_teacher_temperature_epochs = 1.0
  cfg.freeze_last_layer_epochs = 1.0  # The first two of three steps.
  c.ema.base = 0.9  # A visible EMA step.
  c.optim.name = "adamw"
  c.optim.weight_decay = 0.04
  c.optim.weight_decay_end = 0.4
  c.data.augment.num_local_crops = NUM_LOCAL
  c.data.augment.local_crop_size = LOCAL
  return c


@pytest.fixture(scope="module")
def float64_runs():
  """Three float64 steps on 8 devices, checked equal to 1 device (Sinkhorn-Knopp, shared
  head). KoLeo is off: the official computes it per GPU, so it is per device here and the
  steps could not agree (``losses.koleo_loss``'s tests cover it)."""
  config = _config()
  config.dinov2.koleo_loss_weight = 0.0
  batches = [_batch(seed=k) for k in range(NUM_STEPS)]
  states, history = _assert_8_devices_equal_1(
    config, batches, steps_per_epoch=STEPS_PER_EPOCH, lr=1e-3
  )
  return {"config": config, "states": states, "history": history}


def test_step_on_8_devices_equals_1_device_in_float64(float64_runs):
  history = float64_runs["history"]
  assert all(np.isfinite(m["loss"]) and m["nonfinite"] == 0 for m in history)
  # Every term of the loss was active: iBOT saw masked patches.
  assert all(m["ibot_loss"] > 0 and m["masked_patches"] > 0 for m in history)
  loss = [m["dino_loss"] + m["ibot_loss"] for m in history]
  np.testing.assert_allclose([m["loss"] for m in history], loss, rtol=1e-6)


def test_teacher_is_the_ema_of_the_new_student_and_temperature_warms_up(float64_runs):
  config, states, history = (float64_runs[k] for k in ("config", "states", "history"))
  method = methods.create_method(config, NUM_STEPS, STEPS_PER_EPOCH)
  for k in range(NUM_STEPS):
    decay = float(method.decay(jnp.asarray(k)))
    expected = jax.tree.map(
      lambda t, s, d=decay: d * t + (1 - d) * s,
      states[k].method_state["teacher_params"],
      states[k + 1].params,
    )
    # losses.ema_update computes in float32: 6e-8 relative.
    chex.assert_trees_all_close(
      states[k + 1].method_state["teacher_params"], expected, rtol=1e-6, atol=1e-9
    )
  # 0.04 -> 0.07 linearly over one epoch of two steps, then constant.
  np.testing.assert_allclose([m["teacher_temperature"] for m in history], [0.04, 0.055, 0.07])


def test_last_layers_have_learning_rate_zero_during_the_freeze(float64_runs):
  states, history = float64_runs["states"], float64_runs["history"]
  last = lambda s: s.params["dino_head"]["last_layer"]
  assert [m["last_layer_frozen"] for m in history] == [1.0, 1.0, 0.0]
  chex.assert_trees_all_equal(last(states[0]), last(states[2]))
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), last(states[3]), last(states[2]))
  assert min(jax.tree.leaves(moved)) > 0
  # Unlike DINO's freeze (no gradient), the moments saw the frozen steps' gradients.
  mu = optax.tree_utils.tree_get(states[2].opt_state, "mu")
  assert np.abs(mu["dino_head"]["last_layer"]["kernel"]).max() > 0
  # The rest of the network trained from the first step.
  assert (
    np.abs(
      states[1].params["encoder"]["backbone"]["cls_token"]
      - states[0].params["encoder"]["backbone"]["cls_token"]
    ).max()
    > 0
  )


def test_sinkhorn_centring_keeps_the_centres_and_masks_follow_the_step(float64_runs):
  states = float64_runs["states"]
  # The running centres are the running-mean centring's state only.
  for s in states:
    assert not np.any(s.method_state["center"]) and not np.any(s.method_state["ibot_center"])
  method = methods.create_method(float64_runs["config"])
  batch = jax.tree.map(jnp.asarray, _batch(0))
  masks = [method.views(batch, jax.random.key(1), jnp.asarray(k))["masks"] for k in (0, 0, 1)]
  np.testing.assert_array_equal(masks[0], masks[1])  # A resumed step draws the same masks.
  assert np.any(masks[0] != masks[2])
  # Half of the 2N global crops are masked, with the official collate's ratio range.
  assert masks[0].shape == (2 * N, (SIZE // 4) ** 2)
  assert int(np.sum(np.any(masks[0], axis=1))) <= N


def _one_device_run(config, num_steps=2):
  """``num_steps`` float32 steps on one device; the states before and after each step."""
  from method_steps import _run

  return _run(
    config,
    jax.devices()[:1],
    [_batch(seed=k) for k in range(num_steps)],
    steps_per_epoch=STEPS_PER_EPOCH,
    lr=1e-3,
  )


@pytest.fixture(scope="module")
def centering_run():
  """Running-mean centring, separate heads, KoLeo and stochastic depth, on one device."""
  config = _config(centering="centering", separate_head=True)
  config.model.drop_path_rate = 0.2
  states, history = _one_device_run(config)
  return {"config": config, "states": states, "history": history}


def _teacher_outputs(config, state, k):
  """Step k's teacher class-token logits (2, N, K) and masked-patch logits (valid rows)."""
  method = methods.create_method(config, NUM_STEPS, STEPS_PER_EPOCH)
  model = method.create_model()
  views = method.views(jax.tree.map(jnp.asarray, _batch(seed=k)), jax.random.key(1), jnp.asarray(k))
  variables = {"params": state.method_state["teacher_params"]}
  tokens = model.apply(variables, views["global"], None, False, method="tokens")
  _, cls = model.apply(variables, tokens["cls"], method="dino_head_outputs")
  patches = np.asarray(tokens["patches"]).reshape(-1, DIM)[np.asarray(views["masks"]).reshape(-1)]
  _, patch = model.apply(variables, jnp.asarray(patches), method="ibot_head_outputs")
  return np.asarray(cls).reshape(2, N, -1), np.asarray(patch)


def test_running_centres_are_emas_of_the_teachers_class_and_masked_patch_logits(centering_run):
  config, states, history = (centering_run[k] for k in ("config", "states", "history"))
  assert all(np.isfinite(m["loss"]) and m["koleo_loss"] != 0 for m in history)
  m = config.dinov2.center_momentum
  for k in range(2):
    cls, patch = _teacher_outputs(config, states[k], k)
    before, after = states[k].method_state, states[k + 1].method_state
    np.testing.assert_allclose(
      after["center"], m * before["center"] + (1 - m) * cls.reshape(-1, cls.shape[-1]).mean(0),
      rtol=1e-4, atol=1e-6,
    )  # fmt: skip
    np.testing.assert_allclose(
      after["ibot_center"], m * before["ibot_center"] + (1 - m) * patch.mean(0),
      rtol=1e-4, atol=1e-6,
    )  # fmt: skip
  assert states[-1].method_state["ibot_center"].shape == (24,)


def test_separate_ibot_head_trains_and_the_loss_adds_its_terms(centering_run):
  config, states, history = (centering_run[k] for k in ("config", "states", "history"))
  params = states[-1].params
  assert set(params) == {"encoder", "dino_head", "ibot_head"}
  assert params["ibot_head"]["last_layer"]["kernel"].shape == (16, 24)
  moved = np.abs(
    params["ibot_head"]["mlp_0"]["kernel"] - states[0].params["ibot_head"]["mlp_0"]["kernel"]
  )
  assert moved.max() > 0
  cfg = config.dinov2
  for m in history:
    expected = m["dino_loss"] + cfg.koleo_loss_weight * m["koleo_loss"] + m["ibot_loss"]
    np.testing.assert_allclose(m["loss"], expected, rtol=1e-5)


# ---------------------------------------------------------------------------
# The optimiser's parts, against the official rules.


def _official_lr_multiplier(name, decay, depth, patch_embed_mult):
  """``get_vit_lr_decay_rate`` and the patch-embedding factor of the official
  ``get_params_groups_with_decay``, on a dotted parameter name of the student's backbone."""
  layer_id = depth + 1
  if name.startswith("backbone"):
    if any(k in name for k in (".pos_embed", ".patch_embed", ".mask_token", ".cls_token")):
      layer_id = 0
    elif ".blocks." in name:
      layer_id = int(name[name.find(".blocks.") :].split(".")[2]) + 1
  rate = decay ** (depth + 1 - layer_id)
  return rate * patch_embed_mult if "patch_embed" in name else rate


def _official_name(path):
  names = [str(getattr(e, "key", "")) for e in path]
  # Flax's encoder/backbone/blocks_3 is PyTorch's backbone.blocks.3.
  names = names[1:] if names[0] == "encoder" else names
  return ".".join(n.replace("blocks_", "blocks.") for n in names)


def test_layerwise_learning_rates_follow_the_official_param_groups():
  config = _config()
  config.model.variant = "custom:dim=16,depth=3,heads=2,patch=4"
  method = methods.create_method(config)
  params = method.init_variables(jax.random.key(0), (SIZE, SIZE, 3))["params"]
  got = dinov2.layerwise_multipliers(params, 0.9, 0.2, 3)
  seen = set()
  for path, value in jax.tree_util.tree_leaves_with_path(got):
    name = _official_name(path)
    head = not name.startswith("backbone")
    want = 1.0 if head else _official_lr_multiplier(name, 0.9, 3, 0.2)
    np.testing.assert_allclose(value, want, rtol=1e-6, err_msg=name)
    seen.add(round(float(value), 6))
  # Patch embedding 0.9^4 * 0.2, tokens 0.9^4, blocks 0.9^3..0.9, the final norm and heads 1.
  assert {round(0.9**4 * 0.2, 6), round(0.9**4, 6), 0.729, 0.81, 0.9, 1.0} <= seen


def test_weight_decay_skips_biases_norms_and_layerscale_only():
  method = methods.create_method(_config())
  params = method.init_variables(jax.random.key(0), (SIZE, SIZE, 3))["params"]
  mask = optim.dinov2_mask(params)
  for path, decayed in jax.tree_util.tree_leaves_with_path(mask):
    name = _official_name(path)
    # The official: name.endswith(".bias") or "norm" in name or "gamma" in name.
    official = not (name.endswith(".bias") or "norm" in name or "gamma" in name)
    assert decayed == official, name
  vit = mask["encoder"]["backbone"]
  assert vit["cls_token"] and vit["register_tokens"]
  assert mask["dino_head"]["last_layer"]["scale"]  # The official weight_g is decayed too.


def test_each_module_is_clipped_by_its_own_norm():
  grads = {
    "backbone": {"a": jnp.full((4,), 3.0), "b": jnp.full((2, 2), 4.0)},  # norm 10
    "dino_head": {"c": jnp.asarray([0.6, 0.8])},  # norm 1: under the limit
  }
  tx = optim.clip_by_global_norm_per_module(3.0, axis_name=None)
  out, _ = tx.update(grads, tx.init(grads))
  coef = 3.0 / (10.0 + 1e-6)  # PyTorch's clip_grad_norm_.
  np.testing.assert_allclose(out["backbone"]["a"], 3.0 * coef, rtol=1e-6)
  np.testing.assert_allclose(out["backbone"]["b"], 4.0 * coef, rtol=1e-6)
  np.testing.assert_allclose(out["dino_head"]["c"], [0.6, 0.8])
  # One global clip of the whole tree would scale the head too.
  whole = optax.clip_by_global_norm(3.0).update(grads, optax.EmptyState())[0]
  assert not np.allclose(whole["dino_head"]["c"], out["dino_head"]["c"])


def test_multipliers_scale_updates_and_zero_the_frozen_leaves_for_their_steps():
  updates = {"w": jnp.ones(3), "last_layer": jnp.ones(2)}
  mask = lambda tree: {"w": False, "last_layer": True}
  tx = optim.scale_by_multipliers(lambda tree: {"w": 0.5, "last_layer": 2.0}, mask, 2)
  state = tx.init(updates)
  seen = []
  for _ in range(3):
    out, state = tx.update(updates, state)
    seen.append((float(out["w"][0]), float(out["last_layer"][0])))
  assert seen == [(0.5, 0.0), (0.5, 0.0), (0.5, 2.0)]


def test_the_method_refuses_another_encoder_or_optimiser():
  config = _config()
  config.model.name = "vit"
  with pytest.raises(ValueError, match="vit_dinov2"):
    methods.create_method(config)
  config = _config()
  config.optim.name = "lars"
  with pytest.raises(ValueError, match="adamw"):
    methods.create_method(config).create_optimizer(optax.constant_schedule(0.1))


# ---------------------------------------------------------------------------
# Evaluation: the teacher; linear on class + pooled patches, kNN on the class token.


def test_evaluation_features_are_the_teachers_class_token_and_pooled_patches():
  config = _config()
  method = methods.create_method(config)
  model = method.create_model()
  params = method.init_variables(jax.random.key(0), (SIZE, SIZE, 3))["params"]
  teacher = jax.tree.map(lambda p: p + 0.01, params)
  state = type("S", (), {"params": params, "method_state": {"teacher_params": teacher}})()
  assert method.eval_variables(state)["params"] is teacher
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3)), jnp.uint8)
  x = features_lib.encoder_features(model.apply)({"params": teacher}, images)
  tokens = model.apply(
    {"params": teacher}, features_lib.augment.network_inputs(images), None, False, method="tokens"
  )
  np.testing.assert_allclose(x[:, :DIM], tokens["cls"], rtol=1e-6)
  np.testing.assert_allclose(x[:, DIM:], tokens["patches"].mean(1), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(method.knn_features(np.asarray(x)), np.asarray(x)[:, :DIM])
  config.dinov2.eval_features = "cls"
  cls_only = methods.create_method(config).create_model()
  np.testing.assert_allclose(
    features_lib.encoder_features(cls_only.apply)({"params": teacher}, images), tokens["cls"]
  )


def test_knn_evaluation_compares_the_class_token_only(monkeypatch):
  config = _config()
  method = methods.create_method(config)
  train = (np.random.default_rng(0).normal(size=(8, 2 * DIM)), np.arange(8) % 2)
  test = (np.random.default_rng(1).normal(size=(4, 2 * DIM)), np.arange(4) % 2)
  monkeypatch.setattr(
    features_lib,
    "split_features",
    lambda c, m, s, split, mesh, **kw: train if split == "train" else test,
  )
  seen = []
  monkeypatch.setattr(knn, "knn_accuracy", lambda a, ya, b, yb, **kw: seen.append((a, b)) or 0.5)
  assert knn.knn_eval(config, method, None, None) == {"knn_top1": 0.5}
  np.testing.assert_array_equal(seen[0][0], train[0][:, :DIM])
  np.testing.assert_array_equal(seen[0][1], test[0][:, :DIM])


def test_masked_patch_loss_on_gathered_tokens_equals_the_dense_loss():
  rng = np.random.default_rng(0)
  n, p, k = 6, 9, 5
  masks = jnp.asarray(rng.random((n, p)) < 0.3).at[0].set(False)
  student = jnp.asarray(rng.normal(size=(n, p, k)), jnp.float32)
  teacher = jax.nn.softmax(jnp.asarray(rng.normal(size=(n, p, k)), jnp.float32))
  dense = losses.ibot_patch_loss(student, teacher, masks, 0.1)
  from cljax.data import masking

  capacity = int(masks.sum()) + 3  # Padding rows add nothing.
  idx, w = masking.masked_tokens(masks, capacity)
  flat = lambda a: a.reshape(n * p, k)[idx]
  gathered = losses.ibot_masked_patch_loss(flat(student), flat(teacher), w, n, 0.1)
  np.testing.assert_allclose(gathered, dense, rtol=1e-6)


def test_fine_tuning_finds_the_teachers_vit_as_the_encoder():
  """The classifier of ``cljax.evaluate`` (SGD probe, fine-tuning) builds the encoder from
  ``model`` and takes ``params["encoder"]``: the teacher's ViT, its class token."""
  from cljax.evaluate import classifier

  config = _config()
  config.model.drop_path_rate = 0.3  # No 'dropout' stream in the classifier: deterministic.
  method = methods.create_method(config)
  params = method.init_variables(jax.random.key(0), (SIZE, SIZE, 3))["params"]
  state = type("S", (), {"params": params, "method_state": {"teacher_params": params}})()
  model = classifier.Classifier(models.create_encoder(config.model), 3, False)
  trainable, fixed, stats = classifier._initial_variables(
    model, method.eval_variables(state), config, frozen=False
  )
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)), jnp.float32)
  logits = model.apply({"params": {**trainable, **fixed}, "batch_stats": stats}, x, train=True)
  assert logits.shape == (2, 3) and np.all(np.isfinite(logits))
