"""cljax.xla_options: CPU programs compile without YNNPACK convolutions; nothing else changes."""

import os
import types

import jax
import numpy as np
import optax
import pytest
from helpers import state_and_step, tiny_config

from cljax import sharding, xla_options

_YNN = "__ynn_fusion"  # The fusion kind of XLA:CPU's YNNPACK calls in compiled HLO.


@pytest.fixture(autouse=True)
def _fresh_probe(monkeypatch):
  monkeypatch.delenv("CLJAX_XLA_CPU_DEFAULTS", raising=False)
  xla_options._supported_cpu_options.cache_clear()
  yield
  xla_options._supported_cpu_options.cache_clear()


def _weight_gradient_hlo(options):
  # Flax's layout (NHWC images, HWIO kernels), as in cljax's models.
  dims = ("NHWC", "HWIO", "NHWC")
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims)
  grad = jax.grad(lambda x, w: conv(x, w).sum(), 1)
  x, w = np.ones((64, 16, 16, 16), np.float32), np.ones((3, 3, 16, 16), np.float32)
  return jax.jit(grad, compiler_options=options).lower(x, w).compile().as_text()


def _options_or_skip():
  options = xla_options.for_devices(jax.devices())
  if not options:  # Another jaxlib without the flag (the probe drops it), or XLA_FLAGS sets it.
    pytest.skip("this jaxlib does not take the YNNPACK option, or $XLA_FLAGS sets it")
  return options


def test_cpu_options_take_the_convolution_off_ynnpack():
  options = _options_or_skip()
  assert options == {"xla_cpu_experimental_ynn_fusion_type": ""}
  if _YNN not in _weight_gradient_hlo({}):
    pytest.skip("XLA does not use YNNPACK for this convolution on this CPU")
  # The option is what changes the program: XLA's default puts the weight gradient on
  # YNNPACK (the slow path; XLA does so from about this size up, not for tiny ones); with the
  # options it does not.
  assert _YNN not in _weight_gradient_hlo(options)


def _train_step_hlo():
  config = tiny_config()
  config.model.num_filters, config.data.global_batch_size = 16, 64  # Large enough for YNNPACK.
  mesh = sharding.create_mesh(jax.devices()[:1])
  state, step_fn = state_and_step(config, mesh, optax.constant_schedule(0.1))
  rng, n = np.random.default_rng(0), config.data.global_batch_size
  batch = {
    "view_a": rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
    "view_b": rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
    "aug_seed": np.arange(n, dtype=np.int32),
    "label": np.zeros(n, np.int32),
  }
  batch = jax.device_put(batch, sharding.batch_sharded(mesh))
  return step_fn.lower(state, batch, jax.random.key(0)).compile().as_text()


def test_the_train_step_is_compiled_with_them(monkeypatch):
  _options_or_skip()
  hlo = _train_step_hlo()
  assert "convolution" in hlo and _YNN not in hlo
  monkeypatch.setenv("CLJAX_XLA_CPU_DEFAULTS", "1")  # The opt-out: XLA's defaults.
  if _YNN not in _train_step_hlo():
    pytest.skip("XLA does not use YNNPACK for this model on this CPU")


def test_an_option_this_jaxlib_does_not_know_is_dropped(monkeypatch):
  monkeypatch.setattr(xla_options, "_CPU_OPTIONS", {"xla_cpu_no_such_option_in_any_jax": ""})
  assert xla_options.for_devices(jax.devices()) == {}


def test_the_users_xla_flags_and_the_opt_out_win(monkeypatch):
  flags = os.environ.get("XLA_FLAGS", "")  # Kept: the device count of the suite's backend.
  monkeypatch.setenv("XLA_FLAGS", flags + " --xla_cpu_experimental_ynn_fusion_type=dot")
  assert xla_options.for_devices(jax.devices()) == {}
  xla_options._supported_cpu_options.cache_clear()
  monkeypatch.setenv("XLA_FLAGS", flags)
  monkeypatch.setenv("CLJAX_XLA_CPU_DEFAULTS", "1")
  assert xla_options.for_devices(jax.devices()) == {}


def test_no_options_off_cpu():
  gpus = [types.SimpleNamespace(platform="gpu")] * 2
  assert xla_options.for_devices(np.array(gpus)) == {}
  mixed = [types.SimpleNamespace(platform="cpu"), types.SimpleNamespace(platform="tpu")]
  assert xla_options.for_devices(mixed) == {}
