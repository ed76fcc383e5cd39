"""The benchmark harness: its rows, the FLOP count, and no retracing of the train step."""

import runpy

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from cljax import defaults, models, step
from cljax import run as run_lib
from cljax.bench import flops, run, timing


def _bench_config():
  c = tiny_config()
  c.data.source = "synthetic"
  c.data.num_examples = 64
  c.data.num_workers = 0
  c.data.augment.photometric = True
  c.train.log_every_steps = 2
  return c


def _dino_config():
  c = _bench_config()
  c.method = "dino"
  c.dino.out_dim, c.dino.hidden_dim, c.dino.bottleneck_dim = 32, 32, 16
  c.optim.name = "adamw"
  c.data.augment.num_local_crops, c.data.augment.local_crop_size = 2, 8
  return c


def _clip_config():
  c = _bench_config()
  c.method = "clip"
  c.data.num_classes = 4  # The template captions name the classes.
  c.clip.embed_dim = 16
  c.clip.text_width, c.clip.text_depth, c.clip.text_heads = 16, 1, 2
  c.clip.context_length, c.clip.vocab_size = 24, 512
  return c


def test_benchmark_rows_on_a_tiny_config():
  emitted = []
  rows = run.run_benchmark(
    _bench_config(),
    windows=2,
    steps_per_window=2,
    warmup_steps=1,
    modes=["host", "device"],
    jpeg_workers=[0],
    input_options=dict(warmup_s=0.1, window_s=0.2),
    jpeg_options=dict(
      num_images=8, height=36, width=48, image_size=16, canvas_size=48, batch_size=4
    ),
    emit=emitted.append,
  )
  assert emitted == rows
  by_part = {}
  for row in rows:
    by_part.setdefault(row["part"], []).append(row)
  assert set(by_part) == {
    "env",
    "step",
    "full",
    "input",
    "host_jpeg",
    "summary",
  }  # No matmul on CPU.
  assert by_part["env"][0]["num_devices"] == 8 and by_part["env"][0]["views_per_step"] == 32
  assert by_part["env"][0]["model"] == "resnet18_cifar_stages1_filters8"
  (step,) = by_part["step"]
  assert step["views_per_s"] > 0 and len(step["window_views_per_s"]) == 2
  assert step["recompiles"] == 0 and step["compile_s"] > 0
  assert step["first_step_s"] >= step["compile_s"]
  assert step["peak_memory_bytes"] is None  # CPUs report no memory statistics.
  assert step["gflop_per_view"] == pytest.approx(
    flops.train_flops_per_view(_bench_config()) / 1e9, rel=1e-3
  )
  assert step["tflops"] == pytest.approx(
    step["views_per_s"] * step["gflop_per_view"] / 1e3, rel=1e-2
  )
  assert step["peak_tflops_per_chip"] is None and step["fraction_of_peak"] is None
  assert [r["mode"] for r in by_part["full"]] == ["host", "device"]
  for full in by_part["full"]:
    assert full["recompiles"] == 0
    assert full["ratio_to_step"] == pytest.approx(
      full["views_per_s"] / step["views_per_s"], rel=1e-3
    )
    # A tiny step on 8 fake devices is dominated by per-step host work; sane, not fast.
    assert 0.01 < full["ratio_to_step"] < 3 and 0.01 < full["ratio_to_step_paired"] < 3
  inputs = by_part["input"]
  assert [(r["mode"], r.get("cores_used")) for r in inputs] == [
    ("host", None),
    ("host", 1),
    ("device", None),
  ]
  assert all(r["views_per_s"] == pytest.approx(2 * r["images_per_s"], rel=1e-3) for r in inputs)
  pil, canvas = by_part["host_jpeg"]
  assert (pil["path"], canvas["path"]) == ("pil_crops", "decode_only")
  for jpeg in (pil, canvas):
    assert jpeg["cores_used"] == 1 and jpeg["images_per_s_per_core"] == jpeg["images_per_s"] > 0
  # Two 16-pixel views (+ label and aug_seed) against a 48-pixel canvas, its size and boxes.
  assert pil["bytes_to_device_per_image"] == 2 * 16 * 16 * 3 + 4 + 4
  assert canvas["bytes_to_device_per_image"] == 48 * 48 * 3 + 4 + 4 + 2 * 4 + 2 * 4 * 4 + 2
  assert canvas["over_pil_crops"] == pytest.approx(
    canvas["images_per_s_per_core"] / pil["images_per_s_per_core"], abs=1e-3
  )
  summary = by_part["summary"][0]
  assert summary["step_views_per_s"] == step["views_per_s"]
  assert summary["full_device_over_step"] == by_part["full"][1]["ratio_to_step"]
  assert summary["jpeg_pil_crops_images_per_s_per_core"] == pil["images_per_s_per_core"]
  assert summary["jpeg_decode_only_over_pil_crops"] == canvas["over_pil_crops"]


@pytest.mark.parametrize(
  "make_config", [_bench_config, _dino_config, _clip_config], ids=["simclr", "dino", "clip"]
)
def test_the_benchmark_reads_the_training_iterator(make_config, monkeypatch):
  # The input side needs no model: skip initialising the state (seconds of compiling).
  monkeypatch.setattr(run_lib.Run, "initial_state", lambda self, **kwargs: None)
  config = make_config()
  trained = run_lib.create_run(config).iterator  # What train.train_and_evaluate reads.
  expected = next(trained)
  trainer = run.Trainer(config)
  # (b)'s host path reads trainer.iterator("host"), (c)'s iterators are these two.
  inputs = [it for _, it in run.create_input_iterators(trainer, "host")]
  for it in [trainer.iterator("host"), *inputs]:
    assert type(it) is type(trained)
    batch = next(it)
    assert it.get_state() == trained.get_state()  # The pipeline's signature, at batch 1.
    assert sorted(batch) == sorted(expected)
    chex.assert_trees_all_equal(batch, expected)
    it.close()
  trained.close()
  assert inputs[1]._threads == 1  # The one-core row reads with one thread.
  # The step's synthetic batch has training's keys, shapes and dtypes too.
  spec = lambda b: {k: (v.shape, v.dtype) for k, v in trainer.run.global_batch(b).items()}
  assert spec(trainer.synthetic_batch()) == spec(expected)


def test_model_names():
  c = defaults.base_config()
  assert run.model_name(c.model) == "resnet50"
  c.model.width_multiplier = 2
  assert run.model_name(c.model) == "resnet50x2"
  c.model.depth, c.model.width_multiplier, c.model.stem = 18, 1, "cifar"
  assert run.model_name(c.model) == "resnet18_cifar"
  c.model.name = "vit"
  assert run.model_name(c.model) == "vit_s16"
  c.model.variant = "B/32"
  assert run.model_name(c.model) == "vit_b32"
  c.model.variant = "custom:hidden=32,depth=2,heads=2,mlp=64,patch=4"
  assert run.model_name(c.model) == "vit_custom:hidden=32,depth=2,heads=2,mlp=64,patch=4"
  assert run.env_row(c)["model"] == run.model_name(c.model)
  c.model.name, c.model.variant = "vit_dinov2", "g/14"
  assert run.model_name(c.model) == "vit_dinov2_g14"


def test_a_time_series_config_is_benchmarked_without_image_figures():
  # The image FLOP count and the host JPEG rows do not describe a TS2Vec run: none are given.
  c = runpy.run_path("configs/ts2vec_ucr.py")["get_config"]("ItalyPowerDemand")
  c.model.tsencoder.depth, c.model.tsencoder.hidden_dims, c.model.tsencoder.output_dims = 1, 8, 16
  c.train.log_every_steps = 2
  rows = run.run_benchmark(
    c, windows=1, steps_per_window=2, warmup_steps=1, parts=("step", "host_jpeg")
  )
  env, step_row = rows[0], rows[1]
  assert (env["model"], env["modality"], env["image_size"]) == ("ts2vec", "series", None)
  assert step_row["part"] == "step" and step_row["views_per_s"] > 0
  assert step_row["gflop_per_view"] is None and step_row["tflops"] is None
  assert [r["part"] for r in rows] == ["env", "step", "summary"]


def test_the_summary_of_a_step_without_a_flop_count_skips_its_fraction_of_the_matmul():
  rows = [{"part": "step", "views_per_s": 10.0, "tflops": None}, {"part": "matmul", "tflops": 100}]
  summary = run.summary_row(rows)
  assert summary["step_tflops"] is None and "step_fraction_of_matmul" not in summary
  rows[0]["tflops"] = 50.0
  assert run.summary_row(rows)["step_fraction_of_matmul"] == round(50 / jax.device_count() / 100, 4)


def test_unknown_parts_and_modes_are_refused():
  with pytest.raises(ValueError, match="unknown parts or modes"):
    run.run_benchmark(_bench_config(), parts=["steps"])
  with pytest.raises(ValueError, match="unknown parts or modes"):
    run.run_benchmark(_bench_config(), modes=["gpu"])


def test_the_train_step_does_not_retrace_after_the_first_step(monkeypatch):
  # make_train_step looks train_step up when called, so the counted version is the one traced.
  monkeypatch.setattr(step, "train_step", chex.assert_max_traces(step.train_step, n=1))
  r = run_lib.create_run(_bench_config())
  state = r.state
  for _ in range(3):  # The state passed in comes back from the step from step 2 on.
    state, step_metrics = r.step_fn(state, r.global_batch(next(r.iterator)), r.step_rng)
    jax.device_get(step_metrics)
  assert r.step_fn._cache_size() == 1


def _jaxpr_macs(jaxpr) -> int:
  """Conv and dot MACs of a jaxpr, nested jaxprs included: an independent count."""
  total = 0
  for eqn in jaxpr.eqns:
    out = eqn.outvars[0].aval.shape
    if eqn.primitive.name == "conv_general_dilated":
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
      per_output = np.prod([rhs[d] for d in spec[1:]])
      total += int(np.prod(out)) * int(per_output)
    elif eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += int(np.prod(out)) * int(np.prod([lhs[d] for d in contract]))
    for param in eqn.params.values():
      for sub in param if isinstance(param, tuple | list) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += _jaxpr_macs(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += _jaxpr_macs(sub)
  return total


@pytest.mark.parametrize(
  "depth,stage_sizes,stem,size",
  [(18, (1, 1), "cifar", 16), (50, (1, 2), "imagenet", 40), (18, (), "cifar", 32)],
)
def test_hand_flop_count_matches_the_traced_model(depth, stage_sizes, stem, size):
  config = tiny_config()
  config.model.depth, config.model.stage_sizes, config.model.stem = depth, stage_sizes, stem
  config.data.image_size = size
  model = models.create_model(config)
  x = jnp.zeros((1, size, size, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables).jaxpr
  per_view = flops.forward_macs_per_view(config)
  logits = 2 * config.data.global_batch_size * config.head.output_dim  # Not in the model.
  assert per_view - logits == _jaxpr_macs(jaxpr)


def test_flop_counts_of_the_reference_models():
  # ResNet-50 at 224: 4.09 G multiply-adds (He et al. 2016 quote 3.8 G without the
  # shortcut projections); the reference script's 24.6 GFLOP per view fwd + bwd.
  r50 = tiny_config()
  r50.model.depth, r50.model.stage_sizes, r50.model.stem = 50, (), "imagenet"
  r50.model.num_filters, r50.data.image_size = 64, 224
  assert flops.encoder_macs(r50.model, 224)[0] == pytest.approx(4.09e9, rel=0.01)
  r18 = tiny_config()
  r18.model.depth, r18.model.stage_sizes, r18.model.num_filters = 18, (), 64
  r18.data.image_size, r18.head.hidden_dim, r18.head.output_dim = 32, 2048, 128
  assert flops.encoder_macs(r18.model, 32)[0] == pytest.approx(0.556e9, rel=0.01)
  assert flops.train_flops_per_view(r18) / 1e9 == pytest.approx(3.4, rel=0.03)


def test_peak_table():
  assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
  assert flops.peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert flops.peak_tflops("NVIDIA H200") == 989.4
  assert flops.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
  assert flops.peak_tflops("TPU v5 lite") == 197.0
  assert flops.peak_tflops("TPU v4") == 275.0
  assert flops.peak_tflops("cpu") is None


def test_time_windows_counts_recompiles_and_takes_the_median():
  sizes = iter(range(1, 100))
  f = jax.jit(lambda x: x * 2)

  def run(k):
    return [f(np.ones(next(sizes))) for _ in range(k)][-1]  # A new shape every call.

  result = timing.time_windows(run, windows=3, steps=2, warmup=1)
  assert result["recompiles"] == 6 and len(result["steps_per_s"]) == 3
  rates = timing.rates({"steps_per_s": [1.0, 5.0, 2.0], "recompiles": 0}, views_per_step=10)
  assert rates["views_per_s"] == 20.0 and rates["window_views_per_s"] == [10.0, 50.0, 20.0]
