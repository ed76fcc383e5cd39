"""Time series through the shared run: the modality's batches and views, the TS2Vec step
(8 devices == 1, the averaged weights), and the evaluation protocols (SVM, anomaly AUROC)."""

import runpy

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from method_steps import _assert_8_devices_equal_1, _run, float64_model
from sklearn import metrics

from cljax import methods, modalities, sharding
from cljax.data import sources
from cljax.evaluate import anomaly, features, svm
from cljax.modalities import series as series_lib

N = 16


def _config(method="ts2vec"):
  c = runpy.run_path("configs/ts2vec_ucr.py")["get_config"]("GunPoint")
  c.method = method
  c.data.global_batch_size = N
  # A small encoder: the step's wiring, not its size, is under test.
  c.model.tsencoder.depth, c.model.tsencoder.hidden_dims, c.model.tsencoder.output_dims = 1, 8, 16
  c.model.tsencoder.dropout = 0.0
  c.evals.online_probe = False
  if method != "ts2vec":
    c.head.hidden_dim, c.head.output_dim = 16, 8
  return c


def _batches(config, num_steps, devices):
  source = sources.create_source(config.data, "train")
  mesh = sharding.create_mesh(devices)
  it = series_lib.create_series_iterator(source, mesh, seed=0, global_batch_size=N)
  return [jax.device_get(next(it)) for _ in range(num_steps)], it


def test_batches_are_whole_epochs_whatever_the_devices_and_resume_exactly():
  config = _config()
  eight, it = _batches(config, 6, jax.devices())
  one, _ = _batches(config, 6, jax.devices()[:1])
  for a, b in zip(eight, one, strict=True):
    for key in ("series", "label", "aug_seed"):
      np.testing.assert_array_equal(a[key], b[key])
  assert eight[0]["series"].shape == (N, 150, 1)  # GunPoint: 150 timestamps, 1 channel.
  # 50 series, batches of 16: an epoch is three batches of 48 distinct series, the last 2 of
  # its order left out (drop_last), so no batch spans two epochs and holds a series twice
  # (a stream running on into the next epoch would repeat series in steps 3 to 5).
  for epoch in (eight[:3], eight[3:]):
    seen = np.concatenate([b["series"][:, :, 0] for b in epoch])
    assert len(np.unique(seen, axis=0)) == 48
  state = it.get_state()
  later = jax.device_get(next(it))
  it.set_state(state)
  np.testing.assert_array_equal(jax.device_get(next(it))["series"], later["series"])


def test_instance_views_are_the_ts_tcc_pair_and_do_not_depend_on_the_split():
  config = _config("simclr")
  batch = jax.tree.map(jnp.asarray, _batches(config, 1, jax.devices()[:1])[0][0])
  modality = modalities.get(config)
  views = modality.views(config, batch, jax.random.key(0), jnp.zeros((), jnp.int32))["global"]
  assert views.shape == (2 * N, 150, 1)
  half = jax.tree.map(lambda x: x[: N // 2], batch)
  part = modality.views(config, half, jax.random.key(0), jnp.zeros((), jnp.int32))["global"]
  np.testing.assert_allclose(part[: N // 2], views[: N // 2], rtol=1e-6)
  np.testing.assert_allclose(part[N // 2 :], views[N : N + N // 2], rtol=1e-6)
  # Weak: a per-channel scaling of the series; strong: a different series (permuted, noisy).
  ratio = np.asarray(views[:N, :, 0] / batch["series"][:, :, 0])
  np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones_like(ratio), rtol=1e-4)
  assert not np.allclose(views[N:], batch["series"], atol=0.1)


@pytest.fixture(scope="module")
def ts2vec_runs():
  config = _config()
  # Two static lengths (75, 150): the instance loss's all-gather runs inside the
  # lax.switch that picks one.
  config.ts2vec.length_buckets = 2
  batches, _ = _batches(config, 2, jax.devices()[:1])
  states, history = _assert_8_devices_equal_1(config, batches, lr=1e-3)
  return config, batches, states, history


def test_ts2vec_step_on_8_devices_equals_1_device_in_float64(ts2vec_runs):
  _, _, states, history = ts2vec_runs
  assert all(np.isfinite(m["loss"]) and m["loss"] > 0 for m in history)
  assert all(2 <= m["overlap_length"] <= 150 for m in history)
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), states[2].params, states[0].params)
  assert max(jax.tree.leaves(moved)) > 0


def test_ts2vec_steps_do_not_depend_on_the_static_lengths(ts2vec_runs):
  """The loss on overlaps padded to the shorter of two static lengths (the fixture) and
  to the series length gives the same steps: the padding changes no output."""
  config, batches, states, history = ts2vec_runs
  # A step of the fixture ran below the full length: the switch chose a shorter branch.
  assert min(m["overlap_length"] for m in history) <= 75
  config = config.copy_and_resolve_references()
  config.ts2vec.length_buckets = 1
  with float64_model(config):
    whole, whole_history = _run(config, jax.devices()[:1], batches, lr=1e-3, init=states[0])
  chex.assert_trees_all_close(whole_history, history, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(whole[-1].params, states[-1].params, rtol=1e-6, atol=1e-6)


def test_ts2vec_refuses_bad_settings_and_chooses_its_static_lengths():
  config = _config()
  method = methods.create_method(config)
  # Automatic: one length below 512 timestamps, else one per 128 up to 8.
  assert method.lengths(150) == (150,)
  assert method.lengths(600) == (150, 300, 450, 600)
  assert len(method.lengths(1460)) == 8 and method.lengths(1460)[-1] == 1460
  config.ts2vec.length_buckets = 2
  assert methods.create_method(config).lengths(150) == (75, 150)
  config.ts2vec.length_buckets = -1
  with pytest.raises(ValueError, match="length_buckets must be >= 0"):
    methods.create_method(config)
  config = _config()
  config.model.name = "resnet"
  with pytest.raises(ValueError, match="needs model.name='ts2vec'"):
    methods.create_method(config)


def test_evaluation_uses_the_mean_of_the_initial_weights_and_those_after_each_step(ts2vec_runs):
  # AveragedModel is updated once before training: the initial weights count as one model.
  config, _, states, _ = ts2vec_runs
  average = states[-1].method_state["average_params"]
  expected = jax.tree.map(lambda *p: sum(p) / len(p), *(s.params for s in states))
  for a, b in zip(jax.tree.leaves(average), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  method = methods.create_method(config)
  assert method.eval_variables(states[-1])["params"] is average


def test_a_series_simclr_step_runs_with_the_ts2vec_encoder():
  config = _config("simclr")
  config.optim.name, config.model.dtype = "adamw", "float32"
  batches, _ = _batches(config, 1, jax.devices()[:1])
  states, history = _run(config, jax.devices()[:1], batches, lr=1e-3)
  assert np.isfinite(history[0]["loss"])


def test_series_features_of_a_split_are_max_pooled_representations(ts2vec_runs):
  config, _, states, _ = ts2vec_runs
  method = methods.create_method(config)
  state = jax.tree.map(jnp.asarray, states[-1])
  state = state.replace(apply_fn=method.create_model().apply)
  x, y = features.split_features(config, method, state, "eval", sharding.create_mesh())
  assert x.shape == (150, 16) and len(y) == 150 and set(np.unique(y)) == {0, 1}
  assert np.all(np.isfinite(x))


# ---------------------------------------------------------------------------
# The evaluation protocols.


def test_svm_fits_directly_on_small_sets_and_cross_validates_c_otherwise():
  rng = np.random.default_rng(0)
  small = (rng.normal(size=(20, 4)), np.arange(20) % 4)  # 5 a class but 20 < 50 in all.
  assert svm.fit_svm(*small).C == np.inf
  x = np.concatenate([rng.normal(-2, 1, (40, 3)), rng.normal(2, 1, (40, 3))])
  y = np.repeat([0, 1], 40)
  model = svm.fit_svm(x, y)
  assert model.C in svm.C_GRID and model.kernel == "rbf"
  assert svm.svm_accuracy((x, y), (x, y))["top1"] > 0.95


def test_one_class_auroc_scores_by_the_distance_to_the_nearest_normal_example():
  rng = np.random.default_rng(0)
  x_train, y_train = rng.normal(size=(30, 5)), np.arange(30) % 3
  x_test, y_test = rng.normal(size=(25, 5)), np.arange(25) % 3
  out = anomaly.one_class_auroc((x_train, y_train), (x_test, y_test), normalize=False)
  for c in range(3):
    normal = x_train[y_train == c]
    scores = np.linalg.norm(x_test[:, None] - normal[None], axis=-1).min(1)
    np.testing.assert_allclose(out["per_class"][c], metrics.roc_auc_score(y_test != c, scores))
  assert out["mean"] == pytest.approx(np.mean(list(out["per_class"].values())))
  # Well separated classes: every anomaly is farther than every normal test example.
  x_train = np.repeat(np.eye(3) * 10, 5, axis=0) + rng.normal(0, 0.1, (15, 3))
  x_test = np.repeat(np.eye(3) * 10, 4, axis=0) + rng.normal(0, 0.1, (12, 3))
  sep = anomaly.one_class_auroc(
    (x_train, np.repeat([0, 1, 2], 5)), (x_test, np.repeat([0, 1, 2], 4))
  )
  assert sep["mean"] == 1.0


def test_training_draws_centred_series_and_evaluation_reads_them_as_loaded():
  """TS2Vec's fit() centres varying-length training series; its evaluation encodes them as
  loaded. JapaneseVowels' series (7 to 29 timestamps) are NaN-padded at the end."""
  from cljax.data import timeseries

  config = _config()
  config.data.name = "JapaneseVowels"
  source = sources.create_source(config.data, "train")
  loaded = timeseries.prepare(timeseries.load_dataset("JapaneseVowels"))
  np.testing.assert_array_equal(source.series, np.transpose(loaded.x_train, (0, 2, 1)))
  centred = timeseries.centerize_vary_length_series(loaded.x_train)
  np.testing.assert_array_equal(source.train_series, np.transpose(centred, (0, 2, 1)))
  assert np.isnan(source.series[:, -1]).any() and not np.isnan(source.series[:, 0]).any()
  assert np.isnan(source.train_series[:, 0]).any()  # Padding moved to both ends.
