"""Shared test fixtures: a tiny config that runs the real code path."""

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cljax import defaults, models


def tiny_config() -> ml_collections.ConfigDict:
  """A one-stage ResNet on 16x16 images with a small head, float32, no photometric aug."""
  c = defaults.base_config()
  c.model.depth = 18
  c.model.stage_sizes = (1,)
  c.model.num_filters = 8
  c.model.stem = "cifar"
  c.model.dtype = "float32"
  c.head.hidden_dim = 32
  c.head.output_dim = 16
  c.loss.temperature = 0.5
  c.optim.base_lr = 0.3
  c.optim.lr_scaling = "none"
  c.optim.weight_decay = 1e-4
  c.data.image_size = 16
  c.data.global_batch_size = 16
  c.data.augment.photometric = False
  return c


def xla_flags(device_count: int) -> str:
  """The suite's ``$XLA_FLAGS`` (set by conftest.py: its faster compiling included) for a
  subprocess that sees ``device_count`` CPU devices instead of 8."""
  kept = os.environ.get("XLA_FLAGS", "").split()
  kept = [f for f in kept if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join([*kept, f"--xla_force_host_platform_device_count={device_count}"])


@contextlib.contextmanager
def float64_model(config: ml_collections.ConfigDict):
  """Inside: JAX with float64 enabled and ``config.model.dtype = "float64"`` accepted (cljax
  itself offers float32 and narrower). For step-equality checks where float32 summation-order
  noise, amplified by BatchNorm or LARS, would pass no bound derived from float32's eps."""
  saved = dict(models._DTYPES)
  models._DTYPES["float64"] = jnp.float64
  config.model.dtype = "float64"
  try:
    with jax.enable_x64(True):
      yield
  finally:
    models._DTYPES.clear()
    models._DTYPES.update(saved)


def to_float64(tree):
  """``tree`` with its float32 leaves cast to float64 (inside ``float64_model``)."""
  return jax.tree.map(lambda a: a.astype(np.float64) if a.dtype == np.float32 else a, tree)


def state_and_step(
  config, mesh, lr_fn, *, num_classes=0, num_steps=0, steps_per_epoch=0, image_size=None, rng=0
):
  """``(state, step_fn)`` of ``config``'s method on ``mesh``: a placed initial state and the
  compiled step, built as ``cljax.run.create_run`` builds them (for batches made by hand)."""
  import jax

  from cljax import methods, step

  method = methods.create_method(config, num_steps, steps_per_epoch)
  size = image_size or config.data.image_size
  state = step.create_train_state(
    method, jax.random.key(rng), lr_fn, (size, size, 3), mesh=mesh, num_classes=num_classes
  )
  return step.place_state(state, mesh, method), step.make_train_step(method, mesh, lr_fn)


def initial_state(config, lr_fn, *, image_size=None, rng=0, num_steps=0, steps_per_epoch=0):
  """The initial state of ``config``'s method on the default device (no probe), for a run
  of ``num_steps`` steps of which ``steps_per_epoch`` make an epoch (a freeze counted in
  epochs gives the optimiser state a frozen group)."""
  import jax

  from cljax import methods, step

  method = methods.create_method(config, num_steps, steps_per_epoch)
  shape = (image_size, image_size, 3) if image_size else method.modality.input_shape(config)
  return step.create_train_state(method, jax.random.key(rng), lr_fn, shape)


VIEW_FIELDS = (
  "image_size",
  "crop_area",
  "crop_aspect",
  "flip",
  "num_local_crops",
  "local_crop_size",
  "local_crop_area",
)


def with_views(kwargs):
  """``(ViewSpec, other kwargs)``: the view settings of ``kwargs`` as one value object."""
  from cljax.data import views

  rest = dict(kwargs)
  spec = views.ViewSpec(**{k: rest.pop(k) for k in VIEW_FIELDS if k in rest})
  return spec, rest


@functools.cache
def sample_photos() -> tuple[np.ndarray, ...]:
  """Real photographs: scikit-learn's two sample images (427x640, shipped with it)."""
  from sklearn.datasets import load_sample_images

  return tuple(load_sample_images().images)


def photo_crops(sizes, seed=0):
  """Crops of ``sample_photos`` of the given (height, width) sizes, alternating photos."""
  photos = sample_photos()
  rng = np.random.default_rng(seed)
  out = []
  for i, (h, w) in enumerate(sizes):
    src = photos[i % len(photos)]
    top, left = rng.integers(0, src.shape[0] - h + 1), rng.integers(0, src.shape[1] - w + 1)
    out.append(np.ascontiguousarray(src[top : top + h, left : left + w]))
  return out


def assert_resumes_exactly(config, tmp_path, stop_at: int = 3) -> None:
  """Trains ``config`` straight through and, in another folder, stopped after ``stop_at``
  steps and resumed; the logged losses and the final states must be bitwise equal."""
  import os

  import chex
  import orbax.checkpoint as ocp

  from cljax import metrics, train

  def losses(workdir):  # A resumed run may log a step twice; the last record wins.
    return {r["step"]: r["loss"] for r in metrics.read_jsonl(workdir / "metrics.jsonl")}

  def state(workdir):
    path = os.path.join(workdir, "checkpoints", str(config.train.num_steps), "state")
    return ocp.StandardCheckpointer().restore(path)

  straight, split = tmp_path / "straight", tmp_path / "split"
  train.train_and_evaluate(config, str(straight))
  config.train.stop_at_step = stop_at
  train.train_and_evaluate(config, str(split))
  config.train.stop_at_step = 0
  train.train_and_evaluate(config, str(split))
  assert sorted(losses(split)) == list(range(1, config.train.num_steps + 1))
  assert losses(split) == losses(straight)
  chex.assert_trees_all_equal(state(straight), state(split))
