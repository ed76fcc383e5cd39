"""ResNet sizes, stems, zero-init and heads."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import defaults, models
from cljax.models import heads, resnet


def _num_params(module, image_size=224) -> int:
  shapes = jax.eval_shape(
    lambda: module.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False)
  )
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


class _WithClassifier(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    trunk = resnet.ResNet(stage_sizes=resnet.STAGE_SIZES[50], block_cls=resnet.BottleneckBlock)
    return nn.Dense(1000)(trunk(x, train))


@pytest.mark.parametrize(
  "depth,width,expected_millions",
  [(18, 1, 11.18), (50, 1, 23.51), (50, 2, 93.9), (50, 4, 375.0), (101, 1, 42.5)],
)
def test_resnet_parameter_counts(depth, width, expected_millions):
  model = resnet.create_resnet(depth, width_multiplier=width)
  got = _num_params(model) / 1e6
  assert got == pytest.approx(expected_millions, rel=0.005)


def test_resnet50_with_classifier_has_25_6m_parameters():
  model = _WithClassifier()
  assert _num_params(model) == 25_557_032  # torchvision's and Keras's ResNet-50 count.


def test_feature_dim():
  assert resnet.feature_dim(resnet.create_resnet(50)) == 2048
  assert resnet.feature_dim(resnet.create_resnet(50, width_multiplier=4)) == 8192
  assert resnet.feature_dim(resnet.create_resnet(18)) == 512


def test_cifar_stem_keeps_resolution_and_imagenet_stem_reduces_it():
  x = jnp.zeros((1, 32, 32, 3))
  for stem, expected_hw in (("cifar", 32), ("imagenet", 8)):
    model = resnet.ResNet(stage_sizes=(1,), block_cls=resnet.BasicBlock, num_filters=4, stem=stem)
    variables = model.init(jax.random.key(0), x, train=False)
    _, state = model.apply(variables, x, train=False, capture_intermediates=True, mutable=True)
    block_out = state["intermediates"]["BasicBlock_0"]["__call__"][0]
    assert block_out.shape[1:3] == (expected_hw, expected_hw)


def test_last_batchnorm_scale_of_each_block_starts_at_zero():
  model = resnet.ResNet(stage_sizes=(1,), block_cls=resnet.BottleneckBlock, num_filters=8)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)["params"]
  block = params["BottleneckBlock_0"]
  assert np.all(block["BatchNorm_2"]["scale"] == 0)
  assert np.all(block["BatchNorm_0"]["scale"] == 1)
  assert np.all(block["norm_proj"]["scale"] == 1)


def test_bfloat16_compute_keeps_float32_params():
  model = resnet.ResNet(
    stage_sizes=(1,), block_cls=resnet.BasicBlock, num_filters=4, dtype=jnp.bfloat16
  )
  variables = model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)), train=False)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  out = model.apply(variables, jnp.ones((2, 16, 16, 3)), train=False)
  assert out.dtype == jnp.bfloat16


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_projection_head_layers_and_output(num_layers):
  head = heads.ProjectionHead(num_layers=num_layers, hidden_dim=32, output_dim=8)
  variables = head.init(jax.random.key(0), jnp.ones((4, 16)), train=False)
  dense = [k for k in variables["params"] if k.startswith("Dense")]
  norms = [k for k in variables["params"] if k.startswith("BatchNorm")]
  assert len(dense) == num_layers and len(norms) == num_layers
  # The last BatchNorm has no offset, as in SimCLR's reference head.
  assert "bias" not in variables["params"][f"BatchNorm_{num_layers - 1}"]
  out, _ = head.apply(variables, jnp.ones((4, 16)), train=True, mutable=["batch_stats"])
  assert out.shape == (4, 8) and out.dtype == jnp.float32


def test_projection_head_without_batchnorm_is_moco_v2s_mlp():
  head = heads.ProjectionHead(
    num_layers=2, hidden_dim=32, output_dim=8, hidden_norm="none", output_norm="none"
  )
  x = jax.random.normal(jax.random.key(1), (4, 16))
  variables = head.init(jax.random.key(0), x, train=False)
  params = variables["params"]
  assert sorted(params) == ["Dense_0", "Dense_1"] and "batch_stats" not in variables
  assert {"kernel", "bias"} == set(params["Dense_0"]) == set(params["Dense_1"])
  # Dense-ReLU-Dense, with biases.
  hidden = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
  expected = hidden @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
  np.testing.assert_allclose(head.apply(variables, x, train=True), expected, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"hidden_norm must be one of \('bn', 'none'\)"):
    heads.ProjectionHead(hidden_norm="ln").init(jax.random.key(0), x, train=False)


def test_projection_head_without_affine_output_norm_is_moco_v3s_last_batchnorm():
  # MoCo v3's _build_mlp (and SimSiam's projector) end in BatchNorm1d(affine=False): no
  # learned scale or bias, the output standardised per dimension over the batch.
  head = heads.ProjectionHead(num_layers=2, hidden_dim=32, output_dim=8, output_norm="bn_no_affine")
  x = jax.random.normal(jax.random.key(1), (6, 16))
  variables = head.init(jax.random.key(0), x, train=False)
  params = variables["params"]
  assert sorted(params) == ["BatchNorm_0", "Dense_0", "Dense_1"]  # No BatchNorm_1 parameters.
  assert set(params["BatchNorm_0"]) == {"scale", "bias"}  # Hidden layers stay affine.
  assert set(variables["batch_stats"]) == {"BatchNorm_0", "BatchNorm_1"}
  out, _ = head.apply(variables, x, train=True, mutable=["batch_stats"])
  # The float64 reference: Dense -> BN (affine, at its initial scale 1, bias 0) -> ReLU ->
  # Dense -> BN without affine parameters, batch statistics, biased variance, eps 1e-5.
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

  def standardise(a):
    return (a - a.mean(0)) / np.sqrt(a.var(0) + 1e-5)

  hidden = np.maximum(standardise(np.asarray(x, np.float64) @ p64["Dense_0"]["kernel"]), 0)
  expected = standardise(hidden @ p64["Dense_1"]["kernel"])
  # Float32 matmuls of width 32 and a batch standardisation: ~1e-6 relative.
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
  with pytest.raises(
    ValueError, match=r"output_norm must be one of \('bn', 'bn_no_affine', 'none', 'none_no_bias'\)"
  ):
    heads.ProjectionHead(output_norm="ln").init(jax.random.key(0), x, train=False)


@pytest.mark.parametrize("recipe", ["mocov3_cifar10", "mocov3_vits16", "simsiam_cifar10"])
def test_moco_v3_and_simsiam_recipes_end_as_the_official_heads(recipe):
  import importlib.util
  import pathlib

  path = pathlib.Path(__file__).parents[1] / "configs" / f"{recipe}.py"
  spec = importlib.util.spec_from_file_location(recipe, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert config.head.output_norm == "bn_no_affine"
  # SimSiam's predictor ends in a Linear with bias; MoCo v3's ViT predictor in
  # BatchNorm1d(affine=False), its ResNet predictor in a bias-free Linear (_build_mlp's
  # last_bn=False).
  want = {"simsiam_cifar10": "none", "mocov3_vits16": "bn_no_affine"}.get(recipe, "none_no_bias")
  assert config.predictor.output_norm == want


def test_create_model_from_config():
  config = defaults.base_config()
  config.model.depth = 18
  config.model.stem = "cifar"
  model = models.create_model(config)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), train=False)
  )
  assert "encoder" in shapes["params"] and "head" in shapes["params"]
  with pytest.raises(ValueError, match="depth"):
    resnet.create_resnet(42)
  config.model.dtype = "int8"
  with pytest.raises(ValueError, match="model.dtype"):
    models.create_model(config)
