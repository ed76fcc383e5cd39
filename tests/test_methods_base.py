"""cljax.methods.base.forward: gradient caching (chunked, rematerialised) equals the direct step."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from helpers import initial_state, tiny_config
from jax.sharding import PartitionSpec as P

from cljax import losses, models, sharding
from cljax.methods import base


def _chunked_without_remat(apply_fn, params, stats, views, num_chunks):
  """The reference: the same chunked forward (ghost BatchNorm), activations all kept."""
  hs, zs = [], []
  for x in jnp.split(views, num_chunks):
    (h, z), new = apply_fn(
      {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
    )
    stats = new["batch_stats"]
    hs.append(h)
    zs.append(z)
  return jnp.concatenate(hs), jnp.concatenate(zs), stats


def _grads(forward_fn, config, params, stats, views, mesh):
  apply_fn = models.create_model(config, bn_axis_name=sharding.DATA_AXIS).apply

  def per_device(params, stats, views):
    def loss_fn(p):
      _, z, new_stats = forward_fn(apply_fn, p, stats, views)
      n = z.shape[0] // 2
      return losses.nt_xent(z[:n], z[n:], 0.5, axis_name=sharding.DATA_AXIS), new_stats

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, grads, new_stats

  f = jax.shard_map(
    per_device, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=(P(), P(), P())
  )
  return jax.jit(f)(params, stats, views)


def _setup():
  config = tiny_config()
  state = initial_state(config, optax.constant_schedule(0.1))
  rng = np.random.default_rng(0)
  # Views laid out per device as [view_a; view_b] of 2 images each: 8 devices x 4 views.
  views = jnp.asarray(rng.normal(size=(32, 16, 16, 3)), jnp.float32)
  return config, state, views


def test_gradient_caching_equals_the_direct_chunked_step():
  config, state, views = _setup()
  mesh = sharding.create_mesh()
  cached = _grads(
    lambda a, p, s, v: base.forward(a, p, s, v, num_chunks=2),
    config, state.params, state.batch_stats, views, mesh,
  )  # fmt: skip
  direct = _grads(
    lambda a, p, s, v: _chunked_without_remat(a, p, s, v, 2),
    config, state.params, state.batch_stats, views, mesh,
  )  # fmt: skip
  # Rematerialisation changes only how XLA fuses and orders the float32 sums, so an element
  # may differ by a few ulps of its leaf's largest gradient (float32 eps: 1.2e-7), never by a
  # fraction of it as a wrong recomputation would (other statistics, a chunk left out).
  # Scaled per leaf: a fixed atol holds on one machine's kernels and fails on another's.
  for a, b in zip(jax.tree.leaves(cached), jax.tree.leaves(direct), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(b).max()))
  # (Leaves without gradient, biases before a BatchNorm, must then be exactly zero in both.)


def test_one_chunk_is_the_plain_forward_and_chunks_change_batchnorm_only():
  config, state, views = _setup()
  mesh = sharding.create_mesh()
  plain = _grads(
    lambda a, p, s, v: base.forward(a, p, s, v, num_chunks=1),
    config, state.params, state.batch_stats, views, mesh,
  )  # fmt: skip
  direct = _grads(
    lambda a, p, s, v: _chunked_without_remat(a, p, s, v, 1),
    config, state.params, state.batch_stats, views, mesh,
  )  # fmt: skip
  chex.assert_trees_all_close(plain, direct, rtol=1e-6, atol=1e-8)
  # Ghost BatchNorm over 2 chunks is a different function: the test above has teeth.
  cached = _grads(
    lambda a, p, s, v: base.forward(a, p, s, v, num_chunks=2),
    config, state.params, state.batch_stats, views, mesh,
  )  # fmt: skip
  assert not np.isclose(float(plain[0]), float(cached[0]), rtol=1e-6)


def test_gradient_caching_lowers_compiled_memory():
  config, state, _ = _setup()
  config.data.global_batch_size = 128
  mesh = sharding.create_mesh()
  apply_fn = models.create_model(config, bn_axis_name=sharding.DATA_AXIS).apply
  views = jnp.zeros((512, 16, 16, 3), jnp.float32)  # 64 views per device.

  def temp_bytes(num_chunks):
    def per_device(params, stats, v):
      def loss_fn(p):
        _, z, _ = base.forward(apply_fn, p, stats, v, num_chunks)
        n = z.shape[0] // 2
        return losses.nt_xent(z[:n], z[n:], 0.5, axis_name=sharding.DATA_AXIS)

      return jax.grad(loss_fn)(params)

    f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=P()))
    compiled = f.lower(state.params, state.batch_stats, views).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert temp_bytes(8) < 0.5 * temp_bytes(1)


def test_grad_chunks_must_divide_the_views():
  config, state, views = _setup()
  apply_fn = functools.partial(models.create_model(config).apply)
  try:
    base.forward(apply_fn, state.params, state.batch_stats, views[:6], num_chunks=4)
  except ValueError as e:
    assert "grad_chunks=4" in str(e)
  else:
    raise AssertionError("expected a ValueError")
