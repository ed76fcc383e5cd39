"""DINO in the shared train step: sharding, the EMA teacher, the centre, multi-crop, freezing."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_config
from jax.sharding import PartitionSpec as P
from test_step import _batch as _two_view_batch

from cljax import losses, methods, models, optim, sharding, step
from cljax.evaluate import classifier, knn
from cljax.evaluate import features as features_lib
from cljax.methods import base, dino

N, SIZE, LOCAL, NUM_LOCAL, OUT_DIM = 16, 16, 8, 2, 32
# Two steps per epoch: the teacher temperature warms up over steps 0-2 and the
# last layer is frozen for steps 0 and 1 (one epoch each).
STEPS_PER_EPOCH, NUM_STEPS = 2, 3
TINY_VIT = "custom:hidden=16,depth=1,heads=2,mlp=32,patch=4"


def _config(model="vit"):
  c = tiny_config()
  c.method = "dino"
  if model == "vit":
    c.model.name = "vit"
    c.model.variant = TINY_VIT
  c.dino.out_dim = OUT_DIM
  c.dino.hidden_dim = 32
  c.dino.bottleneck_dim = 16
  c.dino.warmup_teacher_temperature = 0.04
  c.dino.teacher_temperature = 0.07
  c.dino.warmup_teacher_temperature_epochs = 1.0
  c.dino.freeze_last_layer_epochs = 1.0
  c.ema.base = 0.9  # A visible EMA step.
  # SGD without weight decay: a zero gradient leaves a parameter exactly as it was, and
  # LARS's trust ratios would amplify float32 summation-order differences (test_methods_momentum).
  c.optim.name = "sgd"
  c.optim.weight_decay = 0.0
  c.data.augment.num_local_crops = NUM_LOCAL
  c.data.augment.local_crop_size = LOCAL
  return c


def _batch(seed=0):
  batch = _two_view_batch(n=N, size=SIZE, seed=seed)
  rng = np.random.default_rng(seed + 100)
  batch["local_views"] = rng.integers(0, 256, (N, NUM_LOCAL, LOCAL, LOCAL, 3), dtype=np.uint8)
  return batch


def _run(config, devices, num_steps=NUM_STEPS):
  """The states before and after each step (on the host) and each step's metrics."""
  mesh = sharding.create_mesh(devices)
  lr_fn = optax.constant_schedule(0.1)
  method = methods.create_method(config, NUM_STEPS, STEPS_PER_EPOCH)
  state = step.create_train_state(
    method, jax.random.key(0), lr_fn, (SIZE, SIZE, 3), mesh=mesh, num_classes=4
  )
  states = [jax.device_get(state)]
  state = step.place_state(state, mesh, method)
  step_fn = step.make_train_step(method, mesh, lr_fn)
  history = []
  for k in range(num_steps):
    batch = jax.device_put(_batch(seed=k), sharding.batch_sharded(mesh))
    state, step_metrics = step_fn(state, batch, jax.random.key(1))
    states.append(jax.device_get(state))
    history.append(jax.device_get(step_metrics))
  return states, history


@pytest.fixture(scope="module")
def vit_runs():
  config = _config("vit")
  return {"config": config, 8: _run(config, jax.devices()), 1: _run(config, jax.devices()[:1])}


def _views(config, k):
  """Step k's views of the whole global batch, on one device."""
  method = methods.create_method(config)
  return method.views(jax.tree.map(jnp.asarray, _batch(seed=k)), jax.random.key(1), jnp.asarray(k))


def test_vit_step_on_8_devices_equals_1_device(vit_runs):
  (states8, hist8), (states1, hist1) = vit_runs[8], vit_runs[1]
  for m8, m1 in zip(hist8, hist1, strict=True):
    chex.assert_trees_all_close(m8, m1, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(states8[-1].params, states1[-1].params, rtol=1e-4, atol=3e-5)
  chex.assert_trees_all_close(
    states8[-1].method_state, states1[-1].method_state, rtol=1e-4, atol=3e-5
  )
  assert np.all(np.isfinite([m["loss"] for m in hist8]))
  # The online probe reads the student's global-crop features.
  assert "probe_top1" in hist8[0] and hist8[0]["embedding_std"] > 0


def test_resnet_batchnorm_is_global_and_updates_in_sequence():
  # 8 devices == 1 device is checked on the ViT above; here the ResNet's statistics after
  # a step on 8 devices equal those of the whole batch recomputed on one device.
  config = _config("resnet")
  states8, hist8 = _run(config, jax.devices(), num_steps=1)
  assert np.isfinite(hist8[0]["loss"])
  # The student's statistics: the global forward's update, then the local one's on top;
  # the teacher's: its own forward on the global crops. One device sees the global batch.
  init, after = states8[0], states8[1]
  model = methods.create_method(config).create_model(bn_axis_name=None)
  views = _views(config, 0)

  def stats_after(params, stats, x):
    _, new = model.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
    return new["batch_stats"]

  only_global = stats_after(init.params, init.batch_stats, views["global"])
  student = stats_after(init.params, only_global, views["local"])
  chex.assert_trees_all_close(after.batch_stats, student, rtol=1e-5, atol=1e-6)
  ms = init.method_state
  teacher = stats_after(ms["teacher_params"], ms["teacher_batch_stats"], views["global"])
  chex.assert_trees_all_close(after.method_state["teacher_batch_stats"], teacher, rtol=1e-5)
  # Not the global forward's statistics alone: the local crops moved them.
  bn_mean = lambda stats: stats["encoder"]["bn_init"]["mean"]
  assert not np.allclose(bn_mean(after.batch_stats), bn_mean(only_global))


def test_teacher_is_the_ema_of_the_new_student_parameters(vit_runs):
  config, (states, history) = vit_runs["config"], vit_runs[8]
  for k in range(NUM_STEPS):
    decay = float(base.ema_decay(config, jnp.asarray(k), NUM_STEPS))
    assert history[k]["ema_decay"] == pytest.approx(decay, rel=1e-6)
    expected = jax.tree.map(
      lambda t, s, d=decay: d * t + (1 - d) * s,
      states[k].method_state["teacher_params"],
      states[k + 1].params,
    )
    chex.assert_trees_all_close(
      states[k + 1].method_state["teacher_params"], expected, rtol=1e-6, atol=1e-7
    )
  # The cosine ramp: 0.9 at step 0, halfway at 1.5 of 3 steps.
  assert history[0]["ema_decay"] == pytest.approx(0.9)
  # The teacher started as a copy of the student and then lagged behind it.
  first = states[0]
  chex.assert_trees_all_equal(first.method_state["teacher_params"], first.params)
  embedding = lambda params: params["encoder"]["embedding"]["kernel"]
  student_moved = np.abs(embedding(states[-1].params) - embedding(first.params)).max()
  teacher = states[-1].method_state["teacher_params"]
  teacher_moved = np.abs(embedding(teacher) - embedding(first.params)).max()
  assert 0 < teacher_moved < student_moved


def test_center_is_the_ema_of_the_teachers_global_crop_logits(vit_runs):
  config, (states, _) = vit_runs["config"], vit_runs[8]
  model = methods.create_method(config).create_model(bn_axis_name=None)
  apply = jax.jit(lambda params, x: model.apply({"params": params}, x, train=True))
  assert np.all(states[0].method_state["center"] == 0)
  for k in range(NUM_STEPS):
    ms = states[k].method_state
    # The teacher before step k on the global crops of the whole batch, on one device.
    _, logits = apply(ms["teacher_params"], _views(config, k)["global"])
    assert logits.shape == (2 * N, OUT_DIM)
    expected = 0.9 * np.asarray(ms["center"]) + 0.1 * np.asarray(logits).mean(0)
    np.testing.assert_allclose(states[k + 1].method_state["center"], expected, rtol=1e-5, atol=1e-7)


def test_teacher_temperature_warms_up_and_the_last_layer_is_frozen_for_one_epoch(vit_runs):
  states, history = vit_runs[8]
  np.testing.assert_allclose(
    [m["teacher_temperature"] for m in history], [0.04, 0.055, 0.07], rtol=1e-6
  )
  assert [m["last_layer_frozen"] for m in history] == [1.0, 1.0, 0.0]
  last = [s.params["head"]["last_layer"]["kernel"] for s in states]
  # Frozen during steps 0 and 1 (the optimiser drops its gradient), trained at 2.
  np.testing.assert_array_equal(last[1], last[0])
  np.testing.assert_array_equal(last[2], last[0])
  assert np.abs(last[3] - last[2]).max() > 1e-6
  # Its optimiser state (SGD's momentum) is untouched while frozen, then runs.
  group = [_frozen_group_state(s.opt_state) for s in states]
  chex.assert_trees_all_equal(group[1], group[0])
  chex.assert_trees_all_equal(group[2], group[0])
  momentum = lambda g: jax.tree.leaves(g)[-1]  # The last layer's kernel trace.
  assert np.abs(momentum(group[3])).max() > 0
  # Everything else trained from the first step.
  mlp = [s.params["head"]["mlp_0"]["kernel"] for s in states]
  assert np.abs(mlp[1] - mlp[0]).max() > 1e-6


def test_teacher_gets_no_gradient_and_sees_only_the_global_crops(monkeypatch):
  config = _config("vit")
  mesh = sharding.create_mesh()
  seen = {"teacher_inputs": [], "loss_inputs": []}

  class Recording(dino.DINO):
    def teacher_forward(self, state, x):
      seen["teacher_inputs"].append(x.shape)
      return super().teacher_forward(state, x)

  dino_loss = losses.dino_loss

  def recording_loss(student, teacher, center, **kwargs):
    seen["loss_inputs"].append((student.shape, teacher.shape, center.shape))
    return dino_loss(student, teacher, center, **kwargs)

  monkeypatch.setattr(losses, "dino_loss", recording_loss)
  method = Recording(config, NUM_STEPS, STEPS_PER_EPOCH)
  lr_fn = optax.constant_schedule(0.1)
  state = step.place_state(
    step.create_train_state(method, jax.random.key(0), lr_fn, (SIZE, SIZE, 3)), mesh, method
  )
  batch = jax.device_put(_batch(), sharding.batch_sharded(mesh))

  def teacher_grad(method_state, batch):
    s = state.replace(method_state=method_state)
    views = method.views(batch, jax.random.key(1), s.step)

    def loss_of_teacher(teacher_params):
      s2 = s.replace(method_state=dict(method_state, teacher_params=teacher_params))
      return method.loss(s.params, s2, views, batch)[0]

    return jax.grad(loss_of_teacher)(method_state["teacher_params"])

  grads = jax.jit(
    jax.shard_map(
      teacher_grad,
      mesh=mesh,
      in_specs=(method.state_specs(), P("data")),
      out_specs=P(),
      check_vma=False,
    )
  )(state.method_state, batch)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))
  n = N // 8  # Images per device.
  assert seen["teacher_inputs"] == [(2 * n, SIZE, SIZE, 3)]
  # The student: 2 global then 2 local crops of each image; the teacher: the 2 global ones.
  assert seen["loss_inputs"] == [((2 + NUM_LOCAL, n, OUT_DIM), (2, n, OUT_DIM), (OUT_DIM,))]


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_is_mlp_l2_norm_and_weight_normalised_prototypes(norm_last_layer):
  head = dino.DINOHead(out_dim=12, hidden_dim=8, bottleneck_dim=4, norm_last_layer=norm_last_layer)
  x = jax.random.normal(jax.random.key(0), (5, 6))
  params = head.init(jax.random.key(1), x)["params"]
  assert sorted(params) == ["last_layer", "mlp_0", "mlp_1", "mlp_2"]
  last = params["last_layer"]
  assert sorted(last) == (["kernel"] if norm_last_layer else ["kernel", "scale"])
  if not norm_last_layer:
    np.testing.assert_array_equal(last["scale"], 1.0)  # DINO's g starts at 1.
    last["scale"] = jnp.linspace(0.5, 1.5, 12)  # A trained gain.
  z, logits = head.apply({"params": params}, x)
  # Independently: the GELU MLP, l2-normalisation, unit-norm prototype columns.
  y = np.asarray(x, np.float64)
  for i in range(2):
    y = y @ params[f"mlp_{i}"]["kernel"] + params[f"mlp_{i}"]["bias"]
    y = np.asarray(jax.nn.gelu(y, approximate=False))
  y = y @ params["mlp_2"]["kernel"] + params["mlp_2"]["bias"]
  y = y / np.linalg.norm(y, axis=1, keepdims=True)
  w = np.asarray(last["kernel"], np.float64)
  w = w / np.linalg.norm(w, axis=0, keepdims=True)
  if not norm_last_layer:
    w = w * np.asarray(last["scale"])
  np.testing.assert_allclose(z, y, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, y @ w, rtol=1e-5, atol=1e-6)
  if norm_last_layer:
    assert np.abs(logits).max() <= 1 + 1e-6  # Cosines.
  # The freeze (in the optimiser) selects the last layer's kernel and gain, nothing else.
  mask = dino.last_layer_mask({"head": params})["head"]
  assert all(jax.tree.leaves(mask["last_layer"]))
  assert not any(jax.tree.leaves({k: v for k, v in mask.items() if k != "last_layer"}))


def test_model_returns_encoder_features_and_logits_for_evaluation(vit_runs):
  config = vit_runs["config"]
  method = methods.create_method(config)
  variables = {"params": vit_runs[1][0][0].params, "batch_stats": {}}  # A ViT has no BN.
  apply = jax.jit(lambda x: method.create_model().apply(variables, x, train=False))
  features, logits = apply(jnp.zeros((3, SIZE, SIZE, 3)))
  assert features.shape == (3, models.encoder_feature_dim(config))
  assert logits.shape == (3, OUT_DIM)
  # The local resolution goes through the same parameters (sin-cos position embeddings).
  _, local = apply(jnp.zeros((3, LOCAL, LOCAL, 3)))
  assert local.shape == (3, OUT_DIM)
  state = method.init_state(jax.random.key(0), variables)
  assert sorted(state) == ["center", "teacher_batch_stats", "teacher_params"]
  assert state["center"].shape == (OUT_DIM,)


def test_schedules_without_steps_per_epoch():
  config = _config("vit")
  method = methods.create_method(config)  # steps_per_epoch unknown
  assert method.freeze_steps == 0 and method.last_layer_frozen(jnp.asarray(0)) is False
  assert float(method.teacher_temperature(jnp.asarray(100))) == pytest.approx(0.04)
  method = methods.create_method(config, num_steps=100, steps_per_epoch=10)
  config.dino.freeze_last_layer_epochs = 0.25  # 2.5 steps: frozen at steps 0, 1 and 2.
  assert method.freeze_steps == 3
  assert float(method.teacher_temperature(jnp.asarray(5))) == pytest.approx(0.055)


def test_evaluation_embeds_with_the_teacher(vit_runs):
  config = vit_runs["config"]
  final = vit_runs[1][0][-1]  # The state after the last step: teacher != student.
  variables = methods.create_method(config).eval_variables(final)
  chex.assert_trees_all_equal(variables["params"], final.method_state["teacher_params"])
  # Every other method embeds with its online network.
  simclr = methods.create_method(tiny_config()).eval_variables(final)
  chex.assert_trees_all_equal(simclr["params"], final.params)
  diff = jax.tree.map(lambda a, b: np.abs(a - b).max(), final.params, variables["params"])
  assert max(jax.tree.leaves(diff)) > 1e-4


def test_knn_evaluation_of_a_run_uses_the_teacher(vit_runs, monkeypatch):
  config = vit_runs["config"]
  final = vit_runs[1][0][-1]
  seen = []

  def fake_extract(fn, variables, it, mesh, **kwargs):
    seen.append(variables)
    return np.zeros((8, 4), np.float32), np.arange(8) % 2, np.arange(8)

  monkeypatch.setattr(features_lib, "extract", fake_extract)
  config = config.copy_and_resolve_references()
  config.data.source, config.data.num_classes = "synthetic", 2
  mesh = sharding.create_mesh(jax.devices()[:1])
  knn.knn_eval(config, methods.create_method(config), final, mesh)
  assert len(seen) == 2  # The train and the eval split.
  for variables in seen:
    chex.assert_trees_all_equal(variables["params"], final.method_state["teacher_params"])


def test_cached_student_features_are_not_reused_for_the_teacher(vit_runs, monkeypatch, tmp_path):
  config = vit_runs["config"].copy_and_resolve_references()
  config.data.source, config.data.num_classes = "synthetic", 2
  final = vit_runs[1][0][-1]
  cache = str(tmp_path / "features_step3_train.npz")
  # A cache written before the network was recorded: the online network's features.
  features_lib.save_features(cache, np.ones((8, 4), np.float32), np.zeros(8, np.int64), step=3)
  calls = []

  def fake_extract(fn, variables, it, mesh, **kwargs):
    calls.append(variables)
    return np.zeros((8, 4), np.float32), np.arange(8) % 2, np.arange(8)

  monkeypatch.setattr(features_lib, "extract", fake_extract)
  mesh = sharding.create_mesh(jax.devices()[:1])
  method = methods.create_method(config)
  x, _ = features_lib.split_features(config, method, final, "train", mesh, cache_path=cache)
  assert len(calls) == 1 and not x.any()  # Recomputed with the teacher, not the old cache.
  assert features_lib.load_features(cache)[2]["network"] == "teacher"
  features_lib.split_features(config, method, final, "train", mesh, cache_path=cache)
  assert len(calls) == 1  # Now the cache is the teacher's: reused.
  # Fine-tuning and the SGD linear protocol start from the teacher too, also from a plain
  # orbax restore (a dict).
  as_dict = {"params": final.params, "batch_stats": {}, "method_state": final.method_state}
  chex.assert_trees_all_equal(
    classifier._variables(as_dict, method)["params"], final.method_state["teacher_params"]
  )


def _frozen_group_state(opt_state):
  """The optimiser state of the frozen group (``optim.freeze_for_steps``): the inner
  optimiser's state behind ``conditionally_mask``."""
  return opt_state.inner_states["frozen"].inner_state.inner_state


def _adamw_reference(params, grads_seq, lrs, wds, b1=0.9, b2=0.999, eps=1e-8):
  """PyTorch's AdamW in float64 from a fresh state: step t = 1, 2, ... with ``lrs[t-1]`` and
  ``wds[t-1]``; p <- p - lr (wd p + m_hat / (sqrt(v_hat) + eps)). Returns the updates."""
  p = np.asarray(params, np.float64)
  m, v, updates = np.zeros_like(p), np.zeros_like(p), []
  for t, (g, lr, wd) in enumerate(zip(grads_seq, lrs, wds, strict=True), start=1):
    g = np.asarray(g, np.float64)
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    step = m / (1 - b1**t) / (np.sqrt(v / (1 - b2**t)) + eps)
    updates.append(-lr * (step + wd * p))
    p = p + updates[-1]
  return updates


def test_last_layer_after_the_freeze_updates_like_a_fresh_adamw_and_not_before():
  # DINO's recipe: AdamW on a warm-up + cosine rate and a 0.04 -> 0.4 weight decay, the
  # last layer frozen for the first epoch (3 steps here), as the official code does it:
  # while frozen nothing touches the layer or its Adam state; afterwards its Adam starts
  # at step 1 with the run's learning rate and weight decay of that step.
  config = _config("vit")
  config.optim.name, config.optim.weight_decay, config.optim.weight_decay_end = "adamw", 0.04, 0.4
  freeze, num_steps = 3, 10
  method = methods.create_method(config, num_steps=num_steps, steps_per_epoch=freeze)
  assert method.freeze_steps == freeze
  lr_fn = optax.warmup_cosine_decay_schedule(0.002, 0.01, 2, num_steps)
  wd_fn = optim.weight_decay_schedule(config.optim, num_steps)
  tx = method.create_optimizer(lr_fn)
  head = dino.DINOHead(out_dim=6, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
  params = {"head": head.init(jax.random.key(0), jnp.zeros((2, 5)))["params"]}
  rng = np.random.default_rng(0)
  grads_seq = [
    jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    for _ in range(freeze + 2)
  ]
  update = jax.jit(tx.update)
  states, history = [tx.init(params)], [params]
  for grads in grads_seq:
    updates, state = update(grads, states[-1], history[-1])
    states.append(state)
    history.append(optax.apply_updates(history[-1], updates))
  assert update._cache_size() == 1  # One compiled update on both sides of the freeze.
  for k in range(1, freeze + 1):
    # Frozen: the layer (no decay either) and its optimiser state are as they were...
    chex.assert_trees_all_equal(history[k]["head"]["last_layer"], params["head"]["last_layer"])
    chex.assert_trees_all_equal(_frozen_group_state(states[k]), _frozen_group_state(states[0]))
    # ...while the rest trains.
    assert (
      np.abs(history[k]["head"]["mlp_0"]["kernel"] - params["head"]["mlp_0"]["kernel"]).max() > 0
    )

  last = lambda tree: tree["head"]["last_layer"]["kernel"]
  after = range(freeze, freeze + 2)
  expected = _adamw_reference(
    last(params),
    [last(grads_seq[k]) for k in after],
    [float(lr_fn(k)) for k in after],
    [float(wd_fn(k)) for k in after],
  )
  for expected_update, k in zip(expected, after, strict=True):
    got = np.asarray(last(history[k + 1]) - last(history[k]))
    # A handful of float32 roundings per element (moments, bias corrections, sqrt, the
    # division): relative error ~1e-6, plus optax's systematic one: its bias correction
    # divides (1 - b2) g^2 by 1 - float32(b2), 1.3e-5 below 1 - b2, so the normalised
    # gradient comes out 6.4e-6 small, more relative to an update whose decay term has the
    # opposite sign (1.1e-5 measured). The stored parameter p + u is rounded to float32, so
    # the update read back is off by up to half an ulp of the parameter: the absolute floor
    # is 2 ulps of the largest. The old freeze's first update is 0.58x (below).
    atol = 2 * np.finfo(np.float32).eps * float(np.abs(last(history[k + 1])).max())
    np.testing.assert_allclose(got, expected_update, rtol=5e-5, atol=atol)

  # The old freeze (stop_gradient: zero gradients, one optimiser whose count runs on, the
  # kernel decaying) fails the same comparison: its first update is 0.58x a fresh Adam's.
  old_tx = optim.create_optimizer(config.optim, lr_fn, num_steps)
  old_state, old_params = old_tx.init(params), params
  for k, grads in enumerate(grads_seq[: freeze + 1]):
    if k < freeze:
      grads = {
        "head": dict(
          grads["head"], last_layer=jax.tree.map(jnp.zeros_like, grads["head"]["last_layer"])
        )
      }
    updates, old_state = old_tx.update(grads, old_state, old_params)
    old_params = optax.apply_updates(old_params, updates)
  ratio = np.asarray(last(updates)) / expected[0]
  assert np.all((ratio > 0.5) & (ratio < 0.7))
