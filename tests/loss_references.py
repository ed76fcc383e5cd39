"""Float64 NumPy references and small helpers shared by the tests/test_losses_*.py files."""

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from cljax import sharding

DATA = sharding.DATA_AXIS

# float32 JAX against float64 NumPy.
RTOL = 1e-4


def unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def logsumexp(x, axis=-1):
  m = np.max(x, axis=axis, keepdims=True)
  return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def normal(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def fd_grad(f, x, eps=1e-6):
  """Central finite-difference gradient of the float64 scalar f at x."""
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    hi, lo = x.copy(), x.copy()
    hi[idx] += eps
    lo[idx] -= eps
    grad[idx] = (f(hi) - f(lo)) / (2 * eps)
  return grad


def np_grad(f, *xs, h=1e-5):
  """Central finite differences of scalar ``f(*xs)`` in float64, one array per argument."""
  xs = [np.array(x, np.float64) for x in xs]
  grads = []
  for x in xs:
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
      orig = x[idx]
      x[idx] = orig + h
      up = f(*xs)
      x[idx] = orig - h
      down = f(*xs)
      x[idx] = orig
      g[idx] = (up - down) / (2 * h)
    grads.append(g)
  return grads


def assert_close(got, expected, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=rtol, atol=atol)


def assert_zero(tree):
  for leaf in jax.tree.leaves(tree):
    assert not np.any(np.asarray(leaf)), leaf


def assert_grads_close(got, expected, rtol=RTOL):
  for g, e in zip(got, expected, strict=True):
    g, e = np.asarray(g, np.float64), np.asarray(e, np.float64)
    np.testing.assert_allclose(g, e, rtol=rtol, atol=rtol * np.abs(e).max() + 1e-8)


def value_and_grads(fn, *args):
  return jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args)


def data_mesh():
  mesh = sharding.create_mesh()
  assert mesh.devices.size == 8
  return mesh


def sharded(fn, mesh, in_specs, out_specs=None):
  out_specs = P() if out_specs is None else out_specs
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=True)


def sharded_pair(loss_fn, mesh):
  return jax.shard_map(
    lambda a, b: loss_fn(a, b, DATA),
    mesh=mesh,
    in_specs=(P(DATA), P(DATA)),
    out_specs=P(),
    check_vma=True,
  )
