"""cljax.run: one run built once, shared by training and the benchmark; the layers of the house."""

import ast
import dataclasses
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import tiny_config

from cljax import defaults, losses, methods, train
from cljax import run as run_lib
from cljax.bench import run as bench_run

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "cljax"


def _module_imports() -> dict[str, set[str]]:
  """cljax module -> the cljax modules it imports (at any depth of its code)."""
  modules = {}
  for path in PACKAGE.rglob("*.py"):
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    modules[name.removesuffix(".__init__")] = path
  graph = {}
  for name, path in modules.items():
    is_package = path.name == "__init__.py"
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        deps.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # Relative: resolved against this module's package.
          parts = name.split(".")[: len(name.split(".")) - node.level + is_package]
          base = ".".join(parts + ([node.module] if node.module else []))
        deps.add(base)
        # `from cljax import run` imports the module cljax.run.
        deps.update(f"{base}.{a.name}" for a in node.names)
    # A package and its own modules import each other by design (`__init__` imports its
    # modules; `from cljax.evaluate import features` runs the package's `__init__`).
    related = lambda d, name=name: d.startswith(name + ".") or name.startswith(d + ".")
    graph[name] = {d for d in deps if d in modules and d != name and not related(d)}
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The import cycles of ``graph`` (one path each), by depth-first search."""
  found, state = [], {}

  def visit(node, path):
    state[node] = "open"
    for dep in sorted(graph[node]):
      if state.get(dep) == "open":
        found.append(path[path.index(dep) :] + [dep])
      elif dep not in state:
        visit(dep, path + [dep])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  return found


def test_the_package_has_no_import_cycle_and_evaluation_never_imports_training():
  graph = _module_imports()
  assert "cljax.run" in graph["cljax.train"]  # The walk sees imports at all.
  assert _cycles(graph) == []
  # The walk finds a cycle where there is one.
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
  for name, deps in graph.items():
    if name.startswith("cljax.evaluate"):
      assert "cljax.train" not in deps, name
  # Losses stay a pure library: nothing of the run above them.
  for name, deps in graph.items():
    if name.startswith("cljax.losses"):
      assert not {d for d in deps if not d.startswith("cljax.losses")}, (name, deps)


def test_nothing_outside_methods_asks_which_method_runs():
  # `config.method == "clip"`, `c.method in (...)`, or the comparison written the other way.
  asks = re.compile(
    r"""\.method\s*(==|!=|\bin\b|\bnot in\b)|["'][a-z_0-9]+["']\s*(==|!=)\s*\S*\.method\b"""
  )
  offenders = []
  for path in PACKAGE.rglob("*.py"):
    if "methods" in path.relative_to(PACKAGE).parts:
      continue
    for number, line in enumerate(path.read_text().splitlines(), 1):
      if asks.search(line):
        offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
  assert offenders == []
  assert asks.search('if config.method == "clip":')  # The pattern finds what it looks for.


def _synthetic(config, *, batch=16, steps=4):
  config.data.source = "synthetic"
  config.data.num_examples, config.data.num_classes = 64, 4
  config.data.num_workers = 0
  config.data.global_batch_size = batch
  config.train.num_steps = steps
  config.train.log_every_steps = 2
  config.evals.knn_at_end = False
  return config


def _simclr():
  return _synthetic(tiny_config())


def _dino():
  c = tiny_config()
  c.method = "dino"
  c.dino.out_dim, c.dino.hidden_dim, c.dino.bottleneck_dim = 32, 32, 16
  # Schedules that depend on the run's length: the teacher temperature's warm-up and the
  # last layer's freeze, both in epochs; and the EMA's cosine ramp over the run.
  c.dino.warmup_teacher_temperature_epochs = 1.0
  c.dino.freeze_last_layer_epochs = 1.0
  c.optim.name = "adamw"
  c.optim.weight_decay_end = 0.4
  c.data.augment.num_local_crops, c.data.augment.local_crop_size = 2, 8
  return _synthetic(c, steps=12)


def _dino_crops_on_device():
  c = _dino()
  c.data.crop_on_device, c.data.canvas_size = True, 24
  return c


def _clip():
  c = tiny_config()
  c.method = "clip"
  c.clip.embed_dim = 16
  c.clip.text_width, c.clip.text_depth, c.clip.text_heads = 16, 1, 2
  c.clip.context_length, c.clip.vocab_size = 24, 512
  return _synthetic(c)


class _Stop(Exception):
  pass


@pytest.mark.parametrize(
  "make_config",
  [_simclr, _dino, _dino_crops_on_device, _clip],
  ids=["simclr", "dino", "dino_crops_on_device", "clip"],
)
def test_the_benchmark_and_training_compile_the_same_step(make_config, tmp_path, monkeypatch):
  config = make_config()
  trainer = bench_run.Trainer(config)
  bench = trainer.run
  bench_text = bench.step_fn.lower(trainer.state, trainer.synthetic_batch(), bench.step_rng)

  # Training: what the loop's first step call lowers to; it stops there.
  seen = {}
  create_run = run_lib.create_run

  def spy(config, **kwargs):
    r = create_run(config, **kwargs)

    def first_step(state, batch, rng):
      seen["text"] = r.step_fn.lower(state, batch, rng).as_text()
      raise _Stop

    seen["run"] = r
    return dataclasses.replace(r, step_fn=first_step)

  monkeypatch.setattr(run_lib, "create_run", spy)
  with pytest.raises(_Stop):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  trained = seen["run"]
  # The schedules' inputs are the same (the benchmark used to compile a run of length 0).
  assert (bench.method.num_steps, bench.method.steps_per_epoch) == (config.train.num_steps, 4)
  assert (trained.method.num_steps, trained.method.steps_per_epoch) == (
    bench.method.num_steps,
    bench.method.steps_per_epoch,
  )
  assert bench.views_per_step == trained.views_per_step
  assert seen["text"] == bench_text.as_text()


def test_a_method_registered_from_a_test_trains(tmp_path):
  class Toy(methods.Method):
    """Pulls the two views' embeddings together, scaled by the config's toy.weight."""

    name = "toy"

    @classmethod
    def config_sections(cls):
      c = ml_collections.ConfigDict()
      c.weight = 2.0
      return {"toy": c}

    def loss(self, params, state, views, batch):
      x = views["global"]
      n = x.shape[0] // 2
      h, z, stats = self.forward(state.apply_fn, params, state.batch_stats, x)
      loss = self.config.toy.weight * losses.byol_loss(z[:n], z[n:], axis_name=self.axis_name)
      return loss, methods.StepOutput(stats, {}, z, h, pairs=(z[:n], z[n:]))

  assert "toy" not in methods.METHODS
  methods.register(Toy)
  try:
    with pytest.raises(ValueError, match="already registered"):
      methods.register(type("Toy", (Toy,), {}))
    config = _synthetic(tiny_config(), steps=2)
    assert config.toy.weight == 2.0  # The base config took the method's section.
    config.method = "toy"
    result = train.train_and_evaluate(config, str(tmp_path / "toy"))
    assert np.isfinite(result["loss"]) and result["loss"] > 0
    r = run_lib.create_run(config, with_iterator=False)
    assert isinstance(r.method, Toy) and r.method.num_steps == 2
  finally:
    del methods.METHODS["toy"]
  assert "toy" not in defaults.base_config()


def test_a_batch_larger_than_the_data_fails_before_the_model_is_built(monkeypatch):
  def no_model(*args, **kwargs):
    raise AssertionError("the model was built before the batch was checked")

  monkeypatch.setattr(methods, "create_method", no_model)
  for steps in (0, 3):  # An epoch count, and train.num_steps, which once skipped the check.
    config = _synthetic(tiny_config(), batch=128, steps=steps)
    with pytest.raises(
      ValueError,
      match=r"data.global_batch_size=128 is larger than the training split "
      r"data.train_split='train' \(64 examples\): lower data.global_batch_size to at most 64",
    ):
      run_lib.create_run(config)


def test_a_run_is_built_once_with_the_length_and_views_of_its_config():
  config = _dino()
  r = run_lib.create_run(config)
  assert (r.steps_per_epoch, r.num_steps) == (4, 12)
  assert r.method.num_steps == 12 and r.method.steps_per_epoch == 4
  assert r.views.num_local_crops == 2 and r.views.local_crop_size == 8
  assert r.views_per_step == 2 * 16
  assert r.num_classes == 4 and r.state.probe_params is not None
  assert float(r.learning_rate_fn(0)) == 0.0  # Warm-up from zero.
  batch = r.global_batch(next(r.iterator))
  assert batch["local_views"].shape == (16, 2, 8, 8, 3)
  assert set(batch) == {"view_a", "view_b", "aug_seed", "label", "local_views"}
  # The same initial state again (the random-init baseline), without the probe if asked.
  again = r.initial_state(with_probe=False)
  assert again.probe_params is None
  np.testing.assert_array_equal(
    jax.tree.leaves(again.params)[0], jax.tree.leaves(r.state.params)[0]
  )
  assert "negatives" not in r.describe() and "cljax dino" in r.describe()
  simclr = run_lib.create_run(_simclr(), with_iterator=False)
  assert simclr.iterator is None and "30 negatives per anchor" in simclr.describe()
  clip = run_lib.create_run(_clip(), with_iterator=False)
  assert clip.views_per_step == 16


def test_the_one_device_model_has_no_batchnorm_axis():
  config = _simclr()
  one = run_lib.create_run(config, mesh=run_lib.sharding.create_mesh(jax.devices()[:1]))
  eight = run_lib.create_run(config, with_iterator=False)
  assert one.state.apply_fn.__self__.encoder.bn_axis_name is None
  assert eight.state.apply_fn.__self__.encoder.bn_axis_name == "data"
  state, metrics = one.step_fn(one.state, one.global_batch(next(one.iterator)), one.step_rng)
  assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
  assert jnp.issubdtype(state.step.dtype, jnp.integer)
