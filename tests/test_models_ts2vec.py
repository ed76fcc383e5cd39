"""cljax.models.ts2vec: TS2Vec's encoder against a float64 NumPy port of the official PyTorch
layers, its receptive field, NaN timestamps, training masks and parameter count."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from cljax.models import ts2vec

TINY = dict(hidden_dims=8, output_dims=12, depth=2)


def _init(model, x):
  return model.init(jax.random.key(0), jnp.asarray(x), train=False)


def _series(seed, batch, steps, dims):
  return np.random.default_rng(seed).normal(size=(batch, steps, dims)).astype(np.float32)


# -- A float64 NumPy port of the official TSEncoder (eval mode), on the Flax parameters. --


def _np_gelu(x):
  return 0.5 * x * (1.0 + special.erf(x / np.sqrt(2.0)))


def _np_same_pad_conv(x, kernel, bias, dilation):
  """The official SamePadConv on (B, T, C): Conv1d(padding=r // 2), minus the last output
  step when the receptive field r is even. ``kernel`` is (k, in, out)."""
  k = kernel.shape[0]
  field = (k - 1) * dilation + 1
  pad = field // 2
  steps = x.shape[1]
  xp = np.pad(x, ((0, 0), (pad, pad), (0, 0)))
  out_len = steps + 2 * pad - (field - 1)
  out = np.zeros((x.shape[0], out_len, kernel.shape[2])) + bias
  for j in range(k):
    out += xp[:, j * dilation : j * dilation + out_len] @ kernel[j]
  if field % 2 == 0:
    out = out[:, :-1]
  return out


def np_ts_encoder(params, x, depth, keep=None):
  x = np.asarray(x, np.float64)
  present = ~np.isnan(x).any(axis=-1)
  x = np.where(present[..., None], x, 0.0)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  x = x @ p["input_fc"]["kernel"] + p["input_fc"]["bias"]
  keep = present if keep is None else keep & present
  x = np.where(keep[..., None], x, 0.0)
  for i in range(depth + 1):
    block = p[f"block{i}"]
    residual = x
    if "projector" in block:
      residual = x @ block["projector"]["kernel"][0] + block["projector"]["bias"]
    for conv in ("conv1", "conv2"):
      x = _np_same_pad_conv(_np_gelu(x), block[conv]["kernel"], block[conv]["bias"], 2**i)
    x = x + residual
  return x


@pytest.mark.parametrize("kernel_size", [3, 2])
def test_encoder_matches_numpy_port_of_official_layers(kernel_size):
  model = ts2vec.TSEncoder(kernel_size=kernel_size, **TINY)
  x = _series(1, 2, 13, 3)
  params = _init(model, x)
  got = model.apply(params, x, train=False)
  assert got.shape == (2, 13, 12)
  np.testing.assert_allclose(got, np_ts_encoder(params, x, depth=2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 7, 40])
def test_output_shape_for_several_lengths(steps):
  model = ts2vec.TSEncoder(**TINY)
  x = _series(2, 3, steps, 2)
  params = _init(model, x)
  out = model.apply(
    params,
    x,
    train=True,
    rngs={"mask": jax.random.key(1), "dropout": jax.random.key(2)},
  )
  assert out.shape == (3, steps, 12)
  assert model.apply(params, x, train=False).shape == (3, steps, 12)


def test_default_encoder_output_shape():
  model = ts2vec.TSEncoder()
  x = _series(3, 2, 9, 1)
  out = model.apply(_init(model, x), x, train=False)
  assert out.shape == (2, 9, 320) and out.dtype == jnp.float32


# -- Receptive field. --


def _official_reach(depth, kernel_size):
  """From SamePadConv: output t reads inputs t - p ... t - p + (k - 1) d, p = r // 2."""
  left = right = 0
  for i in range(depth + 1):
    field = (kernel_size - 1) * 2**i + 1
    pad = field // 2
    left += 2 * pad
    right += 2 * (field - 1 - pad)
  return left, right


def test_receptive_field_of_the_official_encoder():
  assert _official_reach(10, 3) == (4094, 4094)
  assert ts2vec.receptive_field() == (4094, 4094)
  assert ts2vec.receptive_field(2, 2) == _official_reach(2, 2) == (8, 6)


@pytest.mark.parametrize("kernel_size", [3, 2])
def test_an_impulse_changes_outputs_exactly_within_the_receptive_field(kernel_size):
  model = ts2vec.TSEncoder(kernel_size=kernel_size, **TINY)
  steps, t0 = 48, 21
  x = _series(4, 1, steps, 1)
  params = _init(model, x)
  apply = jax.jit(lambda v: model.apply(params, v, train=False))
  kicked = x.copy()
  kicked[0, t0, 0] += 1.0
  changed = np.abs(np.asarray(apply(kicked) - apply(x)))[0].max(axis=-1)
  # Output t reads inputs t - left ... t + right, so input t0 reaches outputs
  # t0 - right ... t0 + left (asymmetric for an even kernel).
  left, right = _official_reach(2, kernel_size)
  inside = np.zeros(steps, bool)
  inside[t0 - right : t0 + left + 1] = True
  assert np.all(changed[~inside] == 0.0)
  assert np.all(changed[inside] > 0.0), changed[inside]


# -- Missing values and the valid window. --


def test_nan_timestamps_are_zeroed_after_the_input_projection():
  model = ts2vec.TSEncoder(**TINY)
  x = _series(5, 2, 16, 3)
  params = _init(model, x)
  with_nan = x.copy()
  with_nan[0, 5, 1] = np.nan  # One channel makes the whole timestamp missing.
  with_nan[1, 2:4, :] = np.nan
  out = model.apply(params, with_nan, train=False)
  assert np.all(np.isfinite(out))
  # The same as keeping the observed values there but masking those timestamps, whatever
  # those values were: the official `x[~mask] = 0` after `input_fc`.
  keep = ~np.isnan(with_nan).any(axis=-1)
  for fill in (x, 100.0 + x):
    masked = model.apply(params, np.where(keep[..., None], x, fill), train=False, mask=keep)
    np.testing.assert_allclose(out, masked, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out, np_ts_encoder(params, with_nan, depth=2), rtol=1e-4, atol=1e-5)


def test_valid_window_equals_the_official_encoder_on_the_crop_alone():
  model = ts2vec.TSEncoder(**TINY)
  x = _series(6, 2, 32, 2)
  params = _init(model, x)
  start, length = 9, 13
  valid = np.zeros((2, 32), bool)
  valid[:, start : start + length] = True
  window = np.where(valid[..., None], x, np.nan)
  out = model.apply(params, window, train=False, valid=valid)
  alone = model.apply(params, x[:, start : start + length], train=False)
  np.testing.assert_allclose(out[:, start : start + length], alone, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(out)[~valid] == 0.0)
  # Without `valid`, the padding is only missing values, not the end of the series.
  loose = model.apply(params, window, train=False)
  assert not np.allclose(loose[:, start : start + length], alone, atol=1e-3)


# -- Training masks and dropout. --


def _train_apply(model, params, x, mask_seed, dropout_seed=0):
  rngs = {"mask": jax.random.key(mask_seed), "dropout": jax.random.key(dropout_seed)}
  return model.apply(params, x, train=True, rngs=rngs)


def test_binomial_mask_zeroes_random_timestamps_in_training_only():
  model = ts2vec.TSEncoder(dropout_rate=0.0, **TINY)
  x = _series(7, 4, 32, 1)
  params = _init(model, x)
  evaluated = model.apply(params, x, train=False)
  np.testing.assert_array_equal(evaluated, model.apply(params, x, train=False))
  trained = [_train_apply(model, params, x, seed) for seed in (1, 2)]
  assert not np.allclose(trained[0], evaluated, atol=1e-3)
  assert not np.allclose(trained[0], trained[1], atol=1e-3)
  # Same key, same mask.
  np.testing.assert_array_equal(trained[0], _train_apply(model, params, x, 1))
  # The training output is the evaluation output with the drawn (B, T) keep mask, about
  # half of it True.
  rngs = {"mask": jax.random.key(1), "dropout": jax.random.key(0)}
  out, state = model.apply(params, x, train=True, rngs=rngs, mutable=["intermediates"])
  (keep,) = state["intermediates"]["keep"]
  assert keep.shape == (4, 32) and 0.3 < float(jnp.mean(keep)) < 0.7
  np.testing.assert_array_equal(out, trained[0])
  np.testing.assert_allclose(out, model.apply(params, x, train=False, mask=keep), rtol=1e-6)
  changed = np.abs(np.asarray(out - evaluated)).max(axis=-1) > 0
  assert np.all(changed[~np.asarray(keep)])
  counts = ts2vec.binomial_mask(jax.random.key(3), (400, 50)).mean()
  assert abs(float(counts) - 0.5) < 0.01
  # Timestamps dropped by an explicit mask change the output there.
  keep = np.ones((4, 32), bool)
  keep[:, 10] = False
  dropped = model.apply(params, x, train=False, mask=keep)
  assert np.all(np.abs(dropped[:, 10] - evaluated[:, 10]).max(axis=-1) > 0)


def test_repr_dropout_in_training():
  model = ts2vec.TSEncoder(**TINY)
  no_dropout = ts2vec.TSEncoder(dropout_rate=0.0, **TINY)
  x = _series(8, 8, 32, 1)
  params = _init(model, x)
  out = np.asarray(_train_apply(model, params, x, mask_seed=1, dropout_seed=5))
  reference = np.asarray(_train_apply(no_dropout, params, x, mask_seed=1))
  dropped = out == 0.0
  assert 0.07 < dropped.mean() < 0.13
  np.testing.assert_allclose(out[~dropped], reference[~dropped] / 0.9, rtol=1e-5, atol=1e-6)


def test_other_official_mask_modes():
  model = ts2vec.TSEncoder(dropout_rate=0.0, **TINY)
  x = _series(9, 2, 20, 1)
  params = _init(model, x)
  last = np.ones((2, 20), bool)
  last[:, -1] = False
  np.testing.assert_array_equal(
    model.apply(params, x, train=False, mask="mask_last"),
    model.apply(params, x, train=False, mask=last),
  )
  np.testing.assert_array_equal(
    model.apply(params, x, train=False, mask="all_false"),
    model.apply(params, x, train=False, mask=np.zeros((2, 20), bool)),
  )
  # generate_continuous_mask(B, T=20): 5 spans of int(0.1 * 20) = 2 steps masked per series.
  spans = np.asarray(ts2vec.continuous_mask(jax.random.key(0), (500, 20)))
  masked = (~spans).sum(axis=1)
  assert masked.min() >= 2 and masked.max() <= 10 and masked.max() == 10
  with pytest.raises(ValueError, match="mask mode must be one of"):
    model.apply(params, x, train=False, mask="random")


def test_timestamp_mask_of_each_mode():
  # The function the encoder and TS2Vec's global-batch masks share.
  shape = (4, 10)
  last = np.asarray(ts2vec.timestamp_mask("mask_last", None, shape))
  assert last[:, :-1].all() and not last[:, -1].any()
  assert np.asarray(ts2vec.timestamp_mask("all_true", None, shape)).all()
  assert not np.asarray(ts2vec.timestamp_mask("all_false", None, shape)).any()
  kept = np.asarray(ts2vec.timestamp_mask("binomial", jax.random.key(0), (200, 100)))
  assert abs(kept.mean() - 0.5) < 0.01
  spans = np.asarray(ts2vec.timestamp_mask("continuous", jax.random.key(0), (200, 100)))
  assert 0 < (~spans).mean() < 0.5
  with pytest.raises(ValueError, match="mask mode must be one of"):
    ts2vec.timestamp_mask("random", None, shape)


# -- Parameters. --


def test_parameter_count_equals_the_official_encoder():
  # The official TSEncoder(input_dims=1): input_fc Linear(1, 64); 10 ConvBlocks 64 -> 64
  # (two Conv1d(64, 64, 3), no projector); the final block 64 -> 320 (Conv1d(64, 320, 3),
  # Conv1d(320, 320, 3), projector Conv1d(64, 320, 1)). Weights + biases.
  def conv(cin, cout, k):
    return cin * cout * k + cout

  expected = (1 * 64 + 64) + 10 * 2 * conv(64, 64, 3)
  expected += conv(64, 320, 3) + conv(320, 320, 3) + conv(64, 320, 1)
  assert expected == 637_248
  model = ts2vec.TSEncoder()
  shapes = jax.eval_shape(lambda: _init(model, np.zeros((1, 8, 1), np.float32)))
  count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
  assert count == expected
  blocks = shapes["params"]
  assert [("projector" in blocks[f"block{i}"]) for i in range(11)] == [False] * 10 + [True]


def test_initialisation_follows_pytorch_defaults():
  model = ts2vec.TSEncoder()
  params = _init(model, np.zeros((1, 8, 1), np.float32))["params"]
  conv = np.asarray(params["block10"]["conv2"]["kernel"])  # Conv1d(320, 320, 3): fan_in 960.
  bound = 1 / math.sqrt(960)
  assert np.abs(conv).max() <= bound and np.abs(conv).max() > 0.95 * bound
  bias = np.asarray(params["input_fc"]["bias"])  # Linear(1, 64): fan_in 1.
  assert np.abs(bias).max() <= 1.0 and np.abs(bias).max() > 0.8
