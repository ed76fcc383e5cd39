"""ViT encoder: shapes, position embeddings, frozen patch projection, sizes, masks and FLOPs."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_config

from cljax import models, optim
from cljax.bench import flops
from cljax.models import vit

TINY = dict(hidden_dim=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4)
TINY_VARIANT = "custom:hidden=32,depth=2,heads=2,mlp=64,patch=4"


def _vit_config(**model):
  config = tiny_config()
  config.model.name = "vit"
  config.model.variant = TINY_VARIANT
  for key, value in model.items():
    config.model[key] = value
  return config


def _leaves(tree) -> dict[str, jax.Array]:
  return {jax.tree_util.keystr(path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _num_params(module, image_size=224) -> int:
  x = jnp.zeros((1, image_size, image_size, 3))
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, train=False))
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"]))


@functools.cache
def _learned_params():
  """A tiny ViT's parameters (learned position embeddings), initialised once for 16x16."""
  model = vit.ViT(**TINY, posemb="learn")
  # RBG keys: XLA compiles threefry's initialisers several times slower on CPU.
  key = jax.random.key(0, impl="unsafe_rbg")
  return jax.jit(functools.partial(model.init, train=False))(key, jnp.zeros((1, 16, 16, 3)))[
    "params"
  ]


def _tiny(**kwargs):
  """A tiny ViT and its variables, derived from the one initialisation (it only renames or
  drops leaves; ``test_derived_parameters_have_the_structure_of_init`` checks that)."""
  params = dict(_learned_params())
  if kwargs.get("posemb", "sincos2d") != "learn":
    del params["pos_embedding"]
  if kwargs.get("freeze_patch_embed"):
    params["frozen_embedding"] = params.pop("embedding")
  return vit.ViT(**TINY, **kwargs), {"params": params}


@functools.cache
def _jit_apply(**kwargs):
  return jax.jit(vit.ViT(**TINY, **kwargs).apply)


@pytest.mark.parametrize(
  "kwargs", [{}, {"posemb": "learn"}, {"freeze_patch_embed": True, "dtype": jnp.bfloat16}]
)
def test_derived_parameters_have_the_structure_of_init(kwargs):
  model, variables = _tiny(**kwargs)
  x = jnp.zeros((1, 16, 16, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  assert set(shapes) == {"params"}  # No BatchNorm: no batch_stats.
  same = lambda a, b: a.shape == b.shape and a.dtype == b.dtype == jnp.float32
  assert jax.tree.all(jax.tree.map(same, shapes, variables))


def test_output_shapes_and_dtype_at_two_image_sizes():
  model, variables = _tiny()
  assert "pos_embedding" not in variables["params"]  # sin-cos is fixed, not a parameter.
  rng = np.random.default_rng(0)
  for shape in ((3, 16, 16, 3), (2, 24, 32, 3)):  # Same parameters, another (non-square) grid.
    out = _jit_apply()(variables, jnp.asarray(rng.normal(size=shape), jnp.float32))
    assert out.shape == (shape[0], 32) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
  assert vit.feature_dim(model) == 32
  with pytest.raises(ValueError, match="not divisible"):
    jax.eval_shape(model.apply, variables, jnp.zeros((1, 18, 16, 3)))


def test_learned_position_embeddings_are_a_parameter_for_the_init_size():
  model, variables = _tiny(posemb="learn")
  assert variables["params"]["pos_embedding"].shape == (1, 16, 32)
  out = _jit_apply(posemb="learn")(variables, jnp.ones((2, 16, 16, 3)))
  assert out.shape == (2, 32) and np.all(np.isfinite(out))
  with pytest.raises(ValueError, match="made for 16 patches"):
    jax.eval_shape(model.apply, variables, jnp.ones((2, 24, 24, 3)))


def _sincos_by_hand(h, w, d) -> np.ndarray:
  quarter = d // 4
  expected = np.zeros((h * w, d))
  for row in range(h):
    for col in range(w):
      i = row * w + col
      for k in range(quarter):
        freq = 10_000.0 ** (-k / (quarter - 1))
        expected[i, k] = math.sin(col * freq)
        expected[i, quarter + k] = math.cos(col * freq)
        expected[i, 2 * quarter + k] = math.sin(row * freq)
        expected[i, 3 * quarter + k] = math.cos(row * freq)
  return expected


def test_sincos_position_embeddings_match_the_formula_and_are_added_to_the_patches():
  got = vit.posemb_sincos_2d(3, 5, 16)
  assert got.shape == (15, 16) and got.dtype == np.float32
  np.testing.assert_allclose(got, _sincos_by_hand(3, 5, 16), atol=1e-6)

  # With a zero patch projection, the tokens entering the first block are the class
  # token (zero at init, no position embedding) and the position embeddings of the grid.
  model, variables = _tiny()
  params = dict(variables["params"])
  params["embedding"] = jax.tree.map(jnp.zeros_like, params["embedding"])
  x = jnp.ones((1, 12, 20, 3))  # A 3x5 grid of 4x4 patches.

  @jax.jit
  def first_block_input(params):
    captured = {}

    def capture(next_fun, args, kwargs, context):
      if context.module.name == "encoderblock_0" and context.method_name == "__call__":
        captured["tokens"] = args[0]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
      model.apply({"params": params}, x)
    return captured["tokens"]

  tokens = np.asarray(first_block_input(params))
  assert tokens.shape == (1, 1 + 15, 32)
  np.testing.assert_allclose(tokens[0, 0], 0.0)
  np.testing.assert_allclose(tokens[0, 1:], _sincos_by_hand(3, 5, 32), atol=1e-6)


@functools.cache
def _grads(freeze: bool):
  """Parameters and gradients of a tiny ViT with learned position embeddings."""
  model, variables = _tiny(posemb="learn", freeze_patch_embed=freeze)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)
  # A random projection of the features: the sum of LayerNorm outputs would be constant.
  direction = jnp.asarray(rng.normal(size=(4, model.hidden_dim)), jnp.float32)
  loss = lambda p: jnp.sum(model.apply({"params": p}, x) * direction)
  return variables["params"], jax.jit(jax.grad(loss))(variables["params"])


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_patch_projection_gets_no_gradient(freeze):
  params, grads = _grads(freeze)
  patch = "frozen_embedding" if freeze else "embedding"
  assert set(params[patch]) == {"kernel", "bias"}
  assert params[patch]["kernel"].shape == (4, 4, 3, 32)
  for name, g in _leaves(grads).items():
    if name.startswith(f"['{patch}']"):
      assert (np.abs(g).max() == 0) == freeze, name
    elif "['key']['bias']" in name:
      # Softmax ignores a key bias (it adds the same q.b to every logit of a query).
      assert np.abs(g).max() < 1e-5, name
    else:
      assert np.abs(g).max() > 0, name


def test_frozen_patch_projection_is_left_alone_by_every_optimiser():
  config = _vit_config(freeze_patch_embed=True)
  params, grads = _grads(True)
  for name in ("lars", "sgd", "adamw"):
    config.optim.name, config.optim.weight_decay = name, 0.1
    tx = optim.create_optimizer(config.optim, optax.constant_schedule(0.1))

    @jax.jit
    def two_steps(params, tx=tx):
      state, new = tx.init(params), params
      for _ in range(2):
        updates, state = tx.update(grads, state, new)
        new = optax.apply_updates(new, updates)
      return new

    new = two_steps(params)
    for key in ("kernel", "bias"):
      np.testing.assert_array_equal(new["frozen_embedding"][key], params["frozen_embedding"][key])
    assert not np.allclose(new["cls_token"], params["cls_token"]), name


def test_bfloat16_compute_keeps_float32_params_and_features():
  model, variables = _tiny(dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(3, 16, 16, 3)), jnp.float32)
  out = _jit_apply(dtype=jnp.bfloat16)(variables, x)
  assert model.dtype == jnp.bfloat16
  assert out.dtype == jnp.float32 and out.shape == (3, 32)
  ref = _jit_apply()(variables, x)
  np.testing.assert_allclose(out, ref, atol=0.1)  # bf16 rounding of LayerNorm-scale values.


def _hand_param_count(hidden, depth, mlp, patch, num_patches):
  block = 2 * 2 * hidden  # Two LayerNorms.
  block += 4 * (hidden * hidden + hidden)  # Q, K, V, out.
  block += hidden * mlp + mlp + mlp * hidden + hidden
  embed = patch * patch * 3 * hidden + hidden
  return embed + hidden + num_patches * hidden + depth * block + 2 * hidden  # cls, pos, final LN.


@pytest.mark.parametrize(
  "variant,published_millions",
  # timm's vit_*_patch16_224 and vit_huge_patch14_224 with num_classes=0 (which also have a
  # class-token position embedding, hidden_dim more parameters): 5.52, 21.67, 85.80, 303.3,
  # 630.8 M; ViT-g/14: 1,011 M (Zhai et al. 2022, Table 2).
  [
    *(("Ti/16", 5.52), ("S/16", 21.67), ("B/16", 85.80), ("L/16", 303.3)),
    *(("H/14", 630.8), ("g/14", 1011.0)),
  ],
)
def test_named_variants_have_the_published_parameter_counts(variant, published_millions):
  sizes = vit.parse_variant(variant)
  patch = sizes["patch_size"]
  patches = (224 // patch) ** 2
  learned = _num_params(vit.create_vit(variant, posemb="learn"))
  assert learned / 1e6 == pytest.approx(published_millions, rel=0.001)
  hidden, mlp = sizes["hidden_dim"], sizes["mlp_dim"]
  assert learned == _hand_param_count(hidden, sizes["depth"], mlp, patch, patches)
  # Fixed sin-cos embeddings are no parameters; the image size does not matter then.
  assert _num_params(vit.create_vit(variant), image_size=2 * patch) == learned - patches * hidden


def test_variant_strings():
  assert vit.parse_variant("B/32") == dict(
    hidden_dim=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=32
  )
  assert vit.parse_variant(TINY_VARIANT) == TINY
  for bad in ("X/16", "S", "S/x", "custom:hidden=32,depth=2", "custom:hidden=32,foo=1"):
    with pytest.raises(ValueError):
      vit.parse_variant(bad)


def test_create_model_builds_a_vit_with_a_projection_head():
  config = _vit_config()
  assert models.encoder_feature_dim(config) == 32
  model = models.create_model(config)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 16, 16, 3)), jnp.float32)
  key = jax.random.key(0, impl="unsafe_rbg")
  variables = jax.jit(functools.partial(model.init, train=False))(key, x)
  assert set(variables["batch_stats"]) == {"head"}  # The encoder has no BatchNorm.
  apply = functools.partial(model.apply, train=True, mutable=["batch_stats"])
  (h, z), updates = jax.jit(apply)(variables, x)
  assert h.shape == (4, 32) and z.shape == (4, config.head.output_dim)
  assert h.dtype == z.dtype == jnp.float32
  assert set(updates["batch_stats"]) == {"head"}

  config.model.dtype = "bfloat16"
  config.model.freeze_patch_embed = True
  config.model.posemb = "learn"
  encoder = models.create_encoder(config.model)
  assert encoder.dtype == jnp.bfloat16 and encoder.freeze_patch_embed
  assert encoder.posemb == "learn" and encoder.hidden_dim == 32

  config.model.name = "convnext"
  with pytest.raises(ValueError, match=r"available: \[.*'resnet'.*'vit'"):
    models.create_encoder(config.model)


def test_optimiser_masks_decay_vit_kernels_only():
  model = vit.ViT(**TINY, posemb="learn", freeze_patch_embed=True)
  x = jnp.zeros((1, 16, 16, 3))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
  mask = _leaves(optim.lars_mask(params))
  decayed = {name for name, m in mask.items() if m}
  assert decayed == {name for name in mask if name.endswith("['kernel']")} - {
    "['frozen_embedding']['kernel']"
  }
  for name in ("['cls_token']", "['pos_embedding']", "['frozen_embedding']['bias']"):
    assert not mask[name]
  block = "['Transformer']['encoderblock_0']"
  assert not mask[f"{block}['LayerNorm_0']['scale']"]
  assert not mask[f"{block}['MultiHeadDotProductAttention_0']['query']['bias']"]
  assert mask[f"{block}['MultiHeadDotProductAttention_0']['query']['kernel']"]
  assert mask[f"{block}['MlpBlock_0']['Dense_0']['kernel']"]
  assert not mask["['Transformer']['encoder_norm']['bias']"]
  unfrozen = jax.eval_shape(lambda: vit.ViT(**TINY).init(jax.random.key(0), x))["params"]
  assert optim.lars_mask(unfrozen)["embedding"] == {"kernel": True, "bias": False}


def _jaxpr_macs(jaxpr) -> int:
  """Multiply-accumulates of the convolutions and dot products in a jaxpr, nested included."""
  total = 0
  for eqn in jaxpr.eqns:
    out = eqn.outvars[0].aval.shape
    if eqn.primitive.name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
      total += int(np.prod(out)) * int(np.prod([rhs[d] for d in spec[1:]]))
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


@pytest.mark.parametrize("size", [16, 24])
def test_hand_flop_count_matches_the_traced_vit(size):
  config = _vit_config()
  config.data.image_size = size
  model = models.create_model(config)
  x = jnp.zeros((1, size, size, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables).jaxpr
  per_view = flops.forward_macs_per_view(config)
  logits = 2 * config.data.global_batch_size * config.head.output_dim  # Not in the model.
  assert per_view - logits == _jaxpr_macs(jaxpr)
  assert flops.encoder_macs(config.model, size)[1] == 32


def test_vit_flop_counts_match_the_published_figures():
  # DeiT (Touvron et al. 2021), Table 1: 1.3, 4.6 and 17.6 G multiply-adds at 224 px
  # (fvcore's counts, 1.26 G for Ti).
  config = _vit_config()
  for variant, gmacs in (("Ti/16", 1.26), ("S/16", 4.6), ("B/16", 17.6)):
    config.model.variant = variant
    assert flops.encoder_macs(config.model, 224)[0] / 1e9 == pytest.approx(gmacs, rel=0.01)


def _stacked(params):
  """Unrolled ViT parameters with the blocks stacked as ``scan_blocks`` holds them."""
  trunk = dict(params["Transformer"])
  blocks = [trunk.pop(f"encoderblock_{i}") for i in range(TINY["depth"])]
  trunk["scan_encoderblocks"] = {"block": jax.tree.map(lambda *b: jnp.stack(b), *blocks)}
  return dict(params, Transformer=trunk)


def test_scanned_and_rematerialised_blocks_compute_what_the_unrolled_blocks_do():
  """``scan_blocks`` (one compiled block, stacked parameters) and ``remat`` (recomputed
  activations) give the unrolled ViT's features and gradients; the optimiser's masks and
  LARS's per-layer trust ratios treat the stacked parameters as the unrolled ones."""
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  plain = vit.ViT(**TINY)
  params = plain.init(jax.random.key(0), x)["params"]
  loss = lambda model, p: jnp.sum(jnp.sin(model.apply({"params": p}, x)))
  value, grads = jax.value_and_grad(functools.partial(loss, plain))(params)
  scanned = vit.ViT(**TINY, scan_blocks=True, remat=True)
  assert jax.tree.structure(scanned.init(jax.random.key(0), x)["params"]) == jax.tree.structure(
    _stacked(params)
  )
  value_s, grads_s = jax.value_and_grad(functools.partial(loss, scanned))(_stacked(params))
  np.testing.assert_allclose(value_s, value, rtol=1e-5)
  chex_close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6)
  jax.tree.map(chex_close, grads_s, _stacked(grads))
  remat = vit.ViT(**TINY, remat=True)
  jax.tree.map(chex_close, jax.grad(functools.partial(loss, remat))(params), grads)
  # One LARS step with DINO's "matrices" mask: the same update, layer by layer.
  config = tiny_config().optim
  config.name, config.decay_mask, config.weight_decay = "lars", "matrices", 0.1
  tx = optim.create_optimizer(config, optax.constant_schedule(0.5))
  step = lambda p, g: tx.update(g, tx.init(p), p)[0]
  jax.tree.map(chex_close, step(_stacked(params), _stacked(grads)), _stacked(step(params, grads)))
