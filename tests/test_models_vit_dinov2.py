"""DINOv2 ViT: tokens, registers, position-embedding interpolation, mask token, LayerScale,
stochastic depth, SwiGLU, the official models' parameter counts, custom variants and scanned
blocks (stacked parameters, per-layer drop masks, per-layer gathers under FSDP)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import sharding
from cljax.models import vit, vit_dinov2

TINY = dict(embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=16, num_register_tokens=3)
KEY = jax.random.key(0, impl="unsafe_rbg")  # RBG keys compile faster on CPU.
# One compiled program per call instead of op-by-op dispatch of the resampling.
_interpolate = jax.jit(vit_dinov2.interpolate_pos_embed, static_argnums=(1, 2, 3))


@functools.cache
def _tiny_params():
  model = vit_dinov2.DinoV2ViT(**TINY)
  return jax.jit(functools.partial(model.init, train=False))(KEY, jnp.zeros((1, 16, 16, 3)))[
    "params"
  ]


@functools.cache
def _jit_apply(**kwargs):
  model = vit_dinov2.DinoV2ViT(**{**TINY, **kwargs})
  return jax.jit(lambda p, x, masks=None: model.apply({"params": p}, x, masks, train=False))


def _images(n, h, w, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, h, w, 3)), jnp.float32)


@pytest.mark.parametrize("size", [(16, 16), (24, 20)])
def test_tokens_with_registers_at_two_resolutions(size):
  params = _tiny_params()
  assert params["pos_embed"].shape == (1, 1 + 16, 32)  # The 4x4 grid of img_size 16.
  assert params["register_tokens"].shape == (1, 3, 32)
  out = _jit_apply()(params, _images(2, *size))
  patches = (size[0] // 4) * (size[1] // 4)
  assert {k: v.shape for k, v in out.items()} == {
    "cls": (2, 32),
    "registers": (2, 3, 32),
    "patches": (2, patches, 32),
  }
  assert all(np.isfinite(v).all() for v in out.values())
  # After the final LayerNorm (scale 1, bias 0 at init): zero mean per token.
  np.testing.assert_allclose(out["patches"].mean(-1), 0.0, atol=1e-5)


def test_position_embeddings_interpolate_only_off_the_stored_grid():
  pos = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8)), jnp.float32)
  assert vit_dinov2.interpolate_pos_embed(pos, (4, 4)) is pos
  # With the 0.1 offset, resampling to the same grid would move it: the official skips it.
  moved = jax.image.scale_and_translate(
    pos.reshape(4, 4, 8), (4, 4, 8), (0, 1), jnp.full(2, 4.1 / 4), jnp.zeros(2), "cubic-pytorch"
  )
  assert np.abs(moved.reshape(16, 8) - pos).max() > 1e-3
  assert vit_dinov2.interpolate_pos_embed(pos, (6, 5)).shape == (30, 8)
  with pytest.raises(ValueError, match="square"):
    vit_dinov2.interpolate_pos_embed(pos[:15], (4, 4))


def _cubic(x, a=-0.75):
  x = abs(x)
  if x <= 1:
    return ((a + 2) * x - (a + 3)) * x * x + 1
  return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a if x < 2 else 0.0


def _torch_bicubic_1d(v, out_size, scale):
  """F.interpolate(mode="bicubic", align_corners=False, antialias=False) along axis 0 in
  float64 loops: source (i + 0.5) / scale - 0.5, four taps, indices clamped."""
  n = v.shape[0]
  out = np.zeros((out_size, *v.shape[1:]))
  for i in range(out_size):
    src = (i + 0.5) / scale - 0.5
    lo = math.floor(src)
    t = src - lo
    for k in range(-1, 3):
      out[i] += _cubic(t - k) * v[min(max(lo + k, 0), n - 1)]
  return out


@pytest.mark.parametrize("m,grid", [(5, (3, 7)), (4, (2, 9))])  # Up and down, both axes.
def test_interpolation_matches_a_float64_reference_of_torch_bicubic(m, grid):
  rng = np.random.default_rng(1)
  pos = rng.normal(size=(m, m, 5))
  ref = _torch_bicubic_1d(pos, grid[0], (grid[0] + 0.1) / m)
  ref = _torch_bicubic_1d(ref.transpose(1, 0, 2), grid[1], (grid[1] + 0.1) / m).transpose(1, 0, 2)
  got = _interpolate(jnp.asarray(pos.reshape(m * m, 5), jnp.float32), grid)
  np.testing.assert_allclose(got, ref.reshape(-1, 5), atol=2e-5)
  for antialias in (False, True):
    const = _interpolate(jnp.full((m * m, 3), 0.7), grid, 0.1, antialias)
    np.testing.assert_allclose(const, 0.7, rtol=1e-6)


def test_a_linear_ramp_stays_approximately_linear_away_from_the_border():
  m, g = 8, 12
  ramp = np.broadcast_to(np.arange(m, dtype=np.float64)[:, None, None], (m, m, 1))
  ramp = jnp.asarray(ramp.reshape(-1, 1), jnp.float32)
  src = (np.arange(g) + 0.5) * m / (g + 0.1) - 0.5  # The sampled source rows.
  inner = (src >= 1) & (src <= m - 2)  # All four taps inside the grid.
  for antialias, atol in ((False, 0.06), (True, 1e-5)):
    got = np.asarray(_interpolate(ramp, (g, g), 0.1, antialias))
    got = got.reshape(g, g)
    assert np.ptp(got, axis=1).max() < 1e-5  # Constant along the other axis.
    assert (np.diff(got[:, 0]) > 0).all()
    # torch's A = -0.75 kernel reproduces constants, not slopes: it bends a ramp by up to
    # ~5% of a step; the Keys kernel (A = -0.5) of the antialiased path reproduces it.
    np.testing.assert_allclose(got[inner, 0], src[inner], atol=atol)
    if not antialias:
      assert np.abs(got[inner, 0] - src[inner]).max() > 1e-3


def test_mask_token_replaces_exactly_the_masked_patches():
  params = dict(_tiny_params())
  params["mask_token"] = jnp.full((1, 32), 0.5)  # Zero at init; any value must work.
  for i in range(2):  # LayerScale's 1e-5 would leave the class token nearly blind.
    params[f"blocks_{i}"] = dict(params[f"blocks_{i}"], ls1={"gamma": jnp.ones(32)})
  apply = _jit_apply()
  x = _images(2, 16, 16)
  masks = np.zeros((2, 16), bool)
  masks[0, [0, 5]] = masks[1, 15] = True
  masks = jnp.asarray(masks)
  base = apply(params, x, masks)
  # Patch 5 of image 0 is masked (rows 4:8, columns 4:8); patch 6 is not.
  changed = apply(params, x.at[0, 4:8, 4:8].add(3.0), masks)
  for key in base:
    np.testing.assert_array_equal(changed[key], base[key])
  changed = apply(params, x.at[0, 4:8, 8:12].add(3.0), masks)
  assert np.abs(changed["cls"][0] - base["cls"][0]).max() > 1e-3
  np.testing.assert_array_equal(changed["cls"][1], base["cls"][1])
  unmasked = apply(params, x)
  assert np.abs(unmasked["cls"] - base["cls"]).max(axis=1).min() > 1e-3
  with pytest.raises(ValueError, match="boolean"):
    vit_dinov2.DinoV2ViT(**TINY).apply({"params": params}, x, masks.astype(jnp.int32))


def test_layer_scale_starts_at_init_values():
  params = _tiny_params()
  for i in range(2):
    for name in ("ls1", "ls2"):
      gamma = params[f"blocks_{i}"][name]["gamma"]
      np.testing.assert_array_equal(gamma, np.full(32, np.float32(1e-5)))
  model = vit_dinov2.DinoV2ViT(**{**TINY, "init_values": None})
  shapes = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 16, 16, 3))))["params"]
  assert "ls1" not in shapes["blocks_0"] and "ls2" not in shapes["blocks_0"]


def test_drop_path_rate_zero_and_eval_mode_are_the_identity():
  params, x = _tiny_params(), _images(3, 16, 16)
  ref = _jit_apply()(params, x)
  # No 'dropout' stream is given: none may be needed at rate 0, nor in evaluation.
  train = vit_dinov2.DinoV2ViT(**TINY).apply({"params": params}, x, train=True)
  evaluation = _jit_apply(drop_path_rate=0.5)(params, x)
  for key in ref:
    np.testing.assert_array_equal(train[key], ref[key])
    np.testing.assert_array_equal(evaluation[key], ref[key])
  assert vit_dinov2.drop_path_rates(0.4, 5, uniform=True) == [0.4] * 5
  np.testing.assert_allclose(vit_dinov2.drop_path_rates(0.4, 5, False), np.linspace(0, 0.4, 5))
  with pytest.raises(ValueError, match="1.5"):
    vit_dinov2.drop_path_rates(1.5, 5, True)


def test_drop_path_drops_examples_with_probability_rate_and_rescales_the_rest():
  rate, n = 0.3, 20_000
  y = vit_dinov2.drop_path(jnp.ones((n, 2, 3)), rate, jax.random.key(3))
  per_example = np.asarray(y).reshape(n, -1)
  assert (np.ptp(per_example, axis=1) == 0).all()  # One draw per example.
  dropped = per_example[:, 0] == 0
  assert abs(dropped.mean() - rate) < 4 * math.sqrt(rate * (1 - rate) / n)
  np.testing.assert_allclose(per_example[~dropped], 1 / (1 - rate), rtol=1e-6)


def test_a_block_drops_each_residual_branch_independently_per_example():
  rate, n = 0.3, 4000
  block = vit_dinov2.Block(num_heads=2, init_values=0.5, drop_path_rate=rate, deterministic=False)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(n, 3, 8)), jnp.float32)
  params = block.init(KEY, x[:1])["params"]
  out = block.apply({"params": params}, x, rngs={"dropout": jax.random.key(4)})
  both_dropped = np.all(np.asarray(out) == np.asarray(x), axis=(1, 2))
  p = rate**2
  assert abs(both_dropped.mean() - p) < 4 * math.sqrt(p * (1 - p) / n)
  # Where both branches were kept, the block is the evaluation block with gammas / (1 - r).
  scaled = dict(params)
  for name in ("ls1", "ls2"):
    scaled[name] = {"gamma": params[name]["gamma"] / (1 - rate)}
  full = block.clone(deterministic=True).apply({"params": scaled}, x)
  kept = np.all(np.abs(np.asarray(out - full)) < 1e-5, axis=(1, 2))
  p = (1 - rate) ** 2
  assert abs(kept.mean() - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_swiglu_hidden_width_follows_swiglu_ffn_fused():
  for dim, ratio in ((1536, 4), (384, 4), (32, 4), (100, 3.5), (40, 1)):
    hidden = int(dim * ratio)
    expected = math.ceil(int(hidden * 2 / 3) / 8) * 8  # Rounded up to a multiple of 8.
    assert vit_dinov2.swiglu_hidden_dim(dim, ratio) == expected
  assert vit_dinov2.swiglu_hidden_dim(1536, 4) == 4096  # ViT-g/14.
  model = vit_dinov2.DinoV2ViT(**{**TINY, "ffn_layer": "swiglufused"})
  shapes = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 16, 16, 3))))["params"]
  mlp = shapes["blocks_0"]["mlp"]
  assert mlp["w12"]["kernel"].shape == (32, 176) and mlp["w3"]["kernel"].shape == (88, 32)


def _hand_param_count(dim, depth, ffn_layer, patch=14, grid=37, registers=0):
  """The official DinoVisionTransformer's parameters (init_values > 0, so LayerScale)."""
  if ffn_layer == "mlp":
    hidden = 4 * dim
    ffn = dim * hidden + hidden + hidden * dim + dim  # fc1, fc2.
  else:
    hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8
    ffn = dim * 2 * hidden + 2 * hidden + hidden * dim + dim  # w12, w3.
  attn = dim * 3 * dim + 3 * dim + dim * dim + dim  # qkv, proj.
  block = 2 * 2 * dim + attn + ffn + 2 * dim  # norm1, norm2, ..., ls1, ls2.
  embed = patch * patch * 3 * dim + dim
  tokens = dim + registers * dim + (1 + grid * grid) * dim + dim  # cls, registers, pos, mask.
  return embed + tokens + depth * block + 2 * dim  # Final norm.


@pytest.mark.parametrize(
  "variant,timm_millions,readme_millions",
  # timm's model cards of vit_{small,base,large,giant}_patch14_dinov2.lvd142m (the released
  # weights at 518 px, no mask token: dim fewer): 22.1, 86.6, 304.4, 1136.5 M. The DINOv2
  # README's rounded figures: 21, 86, 300, 1,100 M (ViT-S is 22.06 M: its "21 M" is 5% low).
  [("S", 22.1, 21), ("B", 86.6, 86), ("L", 304.4, 300), ("g", 1136.5, 1100)],
)
def test_official_variants_have_the_published_parameter_counts(
  variant, timm_millions, readme_millions
):
  model = vit_dinov2.create_dinov2_vit(variant, img_size=518, num_register_tokens=4)
  x = jnp.zeros((1, 28, 28, 3))  # Parameter shapes do not depend on the input size.
  shapes = jax.eval_shape(lambda: model.init(KEY, x, train=False))["params"]
  count = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
  dim, depth, _, ffn = vit_dinov2.VARIANTS[variant]
  assert count == _hand_param_count(dim, depth, ffn, registers=4)
  without_registers = count - 4 * dim
  assert without_registers / 1e6 == pytest.approx(timm_millions, rel=0.01)
  assert without_registers / 1e6 == pytest.approx(readme_millions, rel=0.06)


def test_variant_names():
  assert vit_dinov2.parse_variant("g/14") == dict(
    embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglufused", patch_size=14
  )
  assert vit_dinov2.parse_variant("B")["patch_size"] == 14
  assert vit_dinov2.create_dinov2_vit("S/16", ffn_layer="swiglu").patch_size == 16
  for bad in ("H/14", "S/x", "S/0", "s"):
    with pytest.raises(ValueError, match="variant"):
      vit_dinov2.parse_variant(bad)
  with pytest.raises(ValueError, match="identity"):
    vit_dinov2.DinoV2ViT(**{**TINY, "ffn_layer": "identity"}).init(KEY, jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match="18x16"):
    _jit_apply()(_tiny_params(), jnp.zeros((1, 18, 16, 3)))


def test_rematerialised_blocks_give_the_same_features_and_gradients():
  params, x = _tiny_params(), _images(2, 16, 16)
  rngs = {"dropout": jax.random.key(5)}

  def loss(remat, p):
    model = vit_dinov2.DinoV2ViT(**TINY, drop_path_rate=0.2, remat=remat)
    return jnp.sum(jnp.sin(model.apply({"params": p}, x, train=True, rngs=rngs)["cls"]))

  value, grads = jax.jit(jax.value_and_grad(functools.partial(loss, False)))(params)
  value_r, grads_r = jax.jit(jax.value_and_grad(functools.partial(loss, True)))(params)
  np.testing.assert_allclose(value_r, value, rtol=1e-5)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-7)
  jax.tree.map(close, grads_r, grads)


def test_custom_variants_set_the_sizes_and_build_a_model():
  assert vit_dinov2.parse_variant("custom:dim=64,depth=4,heads=4,patch=4") == dict(
    embed_dim=64, depth=4, num_heads=4, ffn_layer="mlp", patch_size=4
  )
  spaced = vit_dinov2.parse_variant("custom: patch=2, ffn=swiglufused,heads=1,depth=1,dim=8,")
  assert spaced == dict(embed_dim=8, depth=1, num_heads=1, ffn_layer="swiglufused", patch_size=2)
  model = vit_dinov2.create_dinov2_vit(
    "custom:dim=32,depth=1,heads=2,patch=8,ffn=swiglufused", img_size=16, init_values=None
  )
  assert (model.embed_dim, model.depth, model.num_heads, model.patch_size) == (32, 1, 2, 8)
  x = _images(2, 16, 24)
  out, params = jax.jit(lambda x: model.init_with_output(KEY, x, train=False))(x)
  assert params["params"]["blocks_0"]["mlp"]["w12"]["kernel"].shape == (32, 176)
  assert "blocks_1" not in params["params"]
  assert out["patches"].shape == (2, 2 * 3, 32) and out["registers"].shape == (2, 0, 32)
  assert all(np.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize(
  "variant,match",
  [
    ("custom:dim=64,depth=4,heads=4", r"lacks \['patch'\]"),
    ("custom:", r"lacks \['depth', 'dim', 'heads', 'patch'\]"),
    ("custom:dim=64,depth=4,heads=4,patch=4,mlp=256", "Bad item 'mlp=256'"),
    ("custom:dim=64,depth=4,heads=4,patch", "Bad item 'patch'"),
    ("custom:dim=64,depth=4,heads=4,patch=4,dim=32", "'dim' twice"),
    ("custom:dim=64,depth=0,heads=4,patch=4", "depth must be a positive integer.*'0'"),
    ("custom:dim=64,depth=4,heads=-4,patch=4", "heads must be a positive integer.*'-4'"),
    ("custom:dim=6.5,depth=4,heads=4,patch=4", "dim must be a positive integer"),
    ("custom:dim=64,depth=4,heads=4,patch=²", "patch must be a positive integer"),
    ("custom:dim=64,depth=4,heads=4,patch=4,ffn=geglu", "ffn must be one of"),
    ("custom:dim=64,depth=4,heads=6,patch=4", "dim=64 is not divisible by heads=6"),
  ],
)
def test_custom_variants_refuse_bad_keys_and_sizes(variant, match):
  with pytest.raises(ValueError, match=match):
    vit_dinov2.parse_variant(variant)


def _layer_scaled(params, gammas):
  """``params`` with block i's LayerScale gammas ``gammas[i] = (ls1, ls2)``."""
  params = dict(params)
  for i, (g1, g2) in enumerate(gammas):
    params[f"blocks_{i}"] = dict(params[f"blocks_{i}"], ls1={"gamma": g1}, ls2={"gamma": g2})
  return params


def _strong_params(seed=0):
  """The tiny model's parameters with LayerScale gammas near 1 (1e-5 at init would leave
  the blocks nearly the identity) and a nonzero mask token, so that every part counts."""
  rng = np.random.default_rng(seed)
  gamma = lambda: jnp.asarray(rng.uniform(0.5, 1.5, 32), jnp.float32)
  params = _layer_scaled(_tiny_params(), [(gamma(), gamma()) for _ in range(TINY["depth"])])
  params["mask_token"] = jnp.asarray(rng.normal(size=(1, 32)), jnp.float32)
  return params


def test_scanned_blocks_compute_what_the_unrolled_blocks_do():
  """``scan_blocks`` (stacked parameters, one compiled block) with and without ``remat``
  gives the unrolled model's tokens and gradients; ``stack_blocks`` converts the layout."""
  params, x = _strong_params(), _images(2, 16, 16)
  masks = jnp.asarray(np.arange(32).reshape(2, 16) % 5 == 1)
  scanned = vit_dinov2.DinoV2ViT(**TINY, scan_blocks=True)
  shapes = jax.eval_shape(lambda: scanned.init(KEY, x, train=False))["params"]
  stacked = vit_dinov2.stack_blocks(params, TINY["depth"])
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(jnp.shape, stacked)
  assert shapes["scan_blocks"]["block"]["ls1"]["gamma"].shape == (2, 32)
  count = lambda tree: sum(math.prod(s.shape) for s in jax.tree.leaves(tree))
  assert count(shapes) == count(params)
  with pytest.raises(ValueError, match="blocks_0 to blocks_2"):
    vit_dinov2.stack_blocks(params, 3)

  ref = _jit_apply()(params, x, masks)
  out = _jit_apply(scan_blocks=True)(stacked, x, masks)
  assert np.abs(ref["cls"] - _jit_apply()(_tiny_params(), x, masks)["cls"]).max() > 1e-2
  for key in ref:
    np.testing.assert_allclose(out[key], ref[key], atol=1e-5, rtol=1e-5)

  def loss(p, **kwargs):
    model = vit_dinov2.DinoV2ViT(**TINY, **kwargs)
    return jnp.sum(jnp.sin(model.apply({"params": p}, x, masks, train=False)["cls"]))

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  value_s, grads_s = jax.jit(
    jax.value_and_grad(functools.partial(loss, scan_blocks=True, remat=True))
  )(stacked)
  np.testing.assert_allclose(value_s, value, rtol=1e-5)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6)
  jax.tree.map(close, grads_s, vit_dinov2.stack_blocks(grads, TINY["depth"]))


def test_scanned_blocks_draw_their_own_drop_path_masks_per_layer():
  """Each of the scan's layers draws its own stochastic-depth masks from the 'dropout'
  stream: every example's training output is the evaluation output of one choice of kept
  and dropped branches (gamma / (1 - rate) or 0), and the layers' choices differ."""
  rate, n = 0.5, 16
  params, x = _strong_params(1), _images(n, 16, 16, seed=2)
  scanned = vit_dinov2.DinoV2ViT(**TINY, drop_path_rate=rate, scan_blocks=True)
  stacked = vit_dinov2.stack_blocks(params, TINY["depth"])
  train = jax.jit(
    lambda p, x, rng: scanned.apply({"params": p}, x, train=True, rngs={"dropout": rng})
  )
  tokens = lambda out: np.concatenate([out["cls"][:, None], out["patches"]], axis=1)
  got = tokens(train(stacked, x, jax.random.key(7)))
  np.testing.assert_array_equal(tokens(train(stacked, x, jax.random.key(7))), got)
  assert np.abs(tokens(train(stacked, x, jax.random.key(8))) - got).max() > 1e-2

  gammas = [
    (params[f"blocks_{i}"]["ls1"]["gamma"], params[f"blocks_{i}"]["ls2"]["gamma"]) for i in range(2)
  ]
  choices = list(np.ndindex(2, 2, 2, 2))  # Kept (1) or dropped (0): block 0 ls1, ls2, block 1.
  errors = []
  for keep in choices:
    scaled = [
      (g1 * keep[2 * i] / (1 - rate), g2 * keep[2 * i + 1] / (1 - rate))
      for i, (g1, g2) in enumerate(gammas)
    ]
    ref = tokens(_jit_apply()(_layer_scaled(params, scaled), x))
    errors.append(np.abs(ref - got).max(axis=(1, 2)))
  errors = np.stack(errors, axis=1)  # (n, choices)
  assert (np.sort(errors, axis=1)[:, 1] > 1e-2).all()  # The choices are told apart.
  assert (errors.min(axis=1) < 1e-4).all()  # Each example matches one of them.
  drawn = np.asarray(choices)[errors.argmin(axis=1)]  # (n, 4)
  assert 0 < drawn.mean() < 1
  # Masks shared between layers would make block 0's choices block 1's for every example.
  assert (drawn[:, :2] != drawn[:, 2:]).any(axis=1).sum() >= n // 4


def test_scan_blocks_needs_one_drop_path_rate_for_all_blocks():
  x = jnp.zeros((1, 16, 16, 3))
  init = lambda **kwargs: jax.eval_shape(
    lambda: vit_dinov2.DinoV2ViT(**{**TINY, "scan_blocks": True, **kwargs}).init(KEY, x)
  )
  with pytest.raises(ValueError, match="same drop path rate"):
    init(drop_path_rate=0.2, drop_path_uniform=False)
  for kwargs in (
    dict(drop_path_rate=0.2, drop_path_uniform=True),
    dict(drop_path_rate=0.0, drop_path_uniform=False),
    dict(drop_path_rate=0.2, drop_path_uniform=False, depth=1),
  ):
    init(**kwargs)  # Uniform rates: no error.


def test_scanned_blocks_gather_each_layer_split_by_fsdp():
  """Inside ``shard_map`` with the stacked blocks split over 'data' along one dimension of a
  layer (as FSDP leaves them, ``step.left_to_the_model``), each iteration gathers its layer
  whole: the tokens are those of the whole parameters."""
  params, x = _strong_params(2), _images(4, 16, 16)
  stacked = vit_dinov2.stack_blocks(params, TINY["depth"])
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), (sharding.DATA_AXIS,))
  P = jax.sharding.PartitionSpec

  def spec(path, leaf):
    if not any(getattr(k, "key", "").startswith(vit.STACKED_PREFIX) for k in path):
      return P()
    return P(None, *sharding.fsdp_spec(leaf.shape[1:], 2, 0))  # Never the layer axis.

  specs = jax.tree_util.tree_map_with_path(spec, stacked)
  assert all(sharding.split_dim(s) for s in jax.tree.leaves(specs["scan_blocks"]))
  scanned = vit_dinov2.DinoV2ViT(**TINY, scan_blocks=True)
  apply = lambda p, x: scanned.apply({"params": p}, x, train=False)
  split = jax.jit(
    jax.shard_map(
      apply,
      mesh=mesh,
      in_specs=(specs, P(sharding.DATA_AXIS)),
      out_specs=P(sharding.DATA_AXIS),
      check_vma=False,
    )
  )
  out = split(stacked, x)
  ref = _jit_apply()(params, x)
  for key in ref:
    np.testing.assert_allclose(out[key], ref[key], atol=1e-5, rtol=1e-5)
