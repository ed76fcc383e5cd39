"""Each recipe's optimiser against its paper's official code: decay/trust masks, the logged lr."""

import importlib.util
import inspect
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import test_optim
from helpers import state_and_step, tiny_config
from test_step import _batch

from cljax import methods, optim, sharding

REPO = pathlib.Path(__file__).resolve().parents[1]

# What the official code of each recipe does, by (method, optimiser): does weight decay apply
# to normalisation parameters (BatchNorm/LayerNorm scale and offset), to biases, to a ViT's
# class token, to learned position embeddings (a ViT's, CLIP's text tower's), and (LARS) is
# the trust ratio applied to normalisation parameters and biases, and is the learning rate
# applied before the momentum sum (SimCLR's TF LARS, optax.lars) or after it (PyTorch's SGD
# rule)? Kernels are always decayed (and trust-scaled by LARS). None: that code has no such
# parameter (a ResNet recipe has no tokens) or no trust ratio.
_NO_TOKENS = {"cls_token": None, "pos_embedding": None}
_AFTER = {"lars_order": "momentum_then_lr"}
_PYTORCH_SGD = {"norm": True, "bias": True, **_NO_TOKENS, "trust_norm_bias": None}
OFFICIAL = {
  # google-research/simclr lars_optimizer.py: exclude_from_weight_decay=["batch_normalization",
  # "bias"], and exclude_from_layer_adaptation defaults to the same list; next_v = momentum * v
  # + scaled_lr * grad: the learning rate inside the momentum sum.
  ("simclr", "lars"): {
    "norm": False,
    "bias": False,
    **_NO_TOKENS,
    "trust_norm_bias": False,
    "lars_order": "lr_then_momentum",
  },
  # deepmind-research byol/utils/optimizers.py: weight_decay_filter and lars_adaptation_filter
  # are both exclude_bias_and_norm (path[-1] == "b" or "norm" in the module name); lars() is
  # chain(add_weight_decay, scale_by_lars (its momentum), scale(-learning_rate)).
  ("byol", "lars"): {
    "norm": False,
    "bias": False,
    **_NO_TOKENS,
    "trust_norm_bias": False,
    **_AFTER,
  },
  # facebookresearch/barlowtwins main.py: LARS(weight_decay_filter=True,
  # lars_adaptation_filter=True) with exclude_bias_and_norm = p.ndim == 1; LARS.step:
  # mu.mul_(momentum).add_(dp); p.add_(mu, alpha=-lr).
  ("barlow_twins", "lars"): {
    "norm": False,
    "bias": False,
    **_NO_TOKENS,
    "trust_norm_bias": False,
    **_AFTER,
  },
  # facebookresearch/moco main_moco.py: torch.optim.SGD(model.parameters(), weight_decay=...).
  ("moco_v2", "sgd"): _PYTORCH_SGD,
  # facebookresearch/simsiam main_simsiam.py: torch.optim.SGD(optim_params, weight_decay=...),
  # every parameter in one of the two groups, both decayed.
  ("simsiam", "sgd"): _PYTORCH_SGD,
  # HobbitLong/SupContrast util.set_optimizer: optim.SGD(model.parameters(), weight_decay=...),
  # for SupCon (main_supcon.py) and its cross-entropy baseline (main_ce.py) alike.
  ("supcon", "sgd"): _PYTORCH_SGD,
  ("supervised", "sgd"): _PYTORCH_SGD,
  # facebookresearch/moco-v3 main_moco.py: ResNets use moco/optimizer.py's LARS ("no rate
  # scaling or weight decay for parameters <= 1D"; its step: mu.mul_(momentum).add_(dp),
  # p.add_(mu, alpha=-lr)); ViTs torch.optim.AdamW(model.parameters(), weight_decay=...),
  # every parameter (the sin-cos position embedding is not a parameter; a learned one would
  # be decayed as every other).
  ("moco_v3", "lars"): {
    "norm": False,
    "bias": False,
    **_NO_TOKENS,
    "trust_norm_bias": False,
    **_AFTER,
  },
  ("moco_v3", "adamw"): {
    "norm": True,
    "bias": True,
    "cls_token": True,
    "pos_embedding": True,
    "trust_norm_bias": None,
  },
  # facebookresearch/swav main_swav.py: LARC(SGD(model.parameters(), weight_decay=args.wd),
  # trust_coefficient=0.001, clip=False): every parameter decayed and trust-scaled; LARC
  # scales the gradient and SGD's step applies the rate to its momentum buffer.
  ("swav", "lars"): {"norm": True, "bias": True, **_NO_TOKENS, "trust_norm_bias": True, **_AFTER},
  # facebookresearch/dino utils.get_params_groups: name.endswith(".bias") or 1-D -> no decay;
  # cls_token (1, 1, D) and pos_embed (1, N, D) are decayed.
  ("dino", "adamw"): {
    "norm": False,
    "bias": False,
    "cls_token": True,
    "pos_embedding": True,
    "trust_norm_bias": None,
  },
  # facebookresearch/dinov2 utils/param_groups.py get_params_groups_with_decay: wd_multiplier
  # 0 for name.endswith(".bias"), "norm" in name, "gamma" in name; tokens and position
  # embeddings are decayed (the layer-wise rates and clipping leave a first step of this
  # size alone: no "backbone" path here, gradients under the clip).
  ("dinov2", "adamw"): {
    "norm": False,
    "bias": False,
    "cls_token": True,
    "pos_embedding": True,
    "trust_norm_bias": None,
  },
  # yuezhihan/ts2vec ts2vec.py: torch.optim.AdamW(self._net.parameters(), lr=self.lr), its
  # default weight decay 0.01 on every parameter.
  ("ts2vec", "adamw"): {
    "norm": True,
    "bias": True,
    "cls_token": True,
    "pos_embedding": True,
    "trust_norm_bias": None,
  },
  # mlfoundations/open_clip open_clip_train/optim.py make_wd_exclude: no decay for ndim <= 1
  # (biases, norm gains, logit_scale, the (D,) class_embedding) and the models'
  # no_weight_decay(): positional_embedding, visual.positional_embedding and
  # visual.class_embedding. (Releases before it, main.py's p.ndim < 2 / "bn" / "ln" / "bias" /
  # "logit_scale" rule, decayed the 2-D position embeddings.) The token embedding decays.
  ("clip", "adamw"): {
    "norm": False,
    "bias": False,
    "cls_token": False,
    "pos_embedding": False,
    "trust_norm_bias": None,
  },
}

# One parameter of each kind, named as cljax's models name them.
_KINDS = {
  ("conv", "kernel"): ("kernel", (3, 3, 2, 4)),
  ("dense", "kernel"): ("kernel", (4, 3)),
  ("attention", "kernel"): ("kernel", (3, 2, 2)),
  ("bn", "scale"): ("norm", (4,)),
  ("bn", "bias"): ("norm", (4,)),
  ("LayerNorm_0", "scale"): ("norm", (3,)),
  ("dense", "bias"): ("bias", (3,)),
  ("attention", "bias"): ("bias", (2, 2)),  # Flax's (heads, head_dim): PyTorch's 1-D bias.
  ("cls_token",): ("cls_token", (1, 1, 3)),
  ("pos_embedding",): ("pos_embedding", (1, 4, 3)),
  ("text", "pos_embedding"): ("pos_embedding", (4, 3)),  # CLIP's text tower's: 2-D.
}


def _tree(leaf_fn):
  tree = {}
  for path, (kind, shape) in _KINDS.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf_fn(path, kind, shape)
  return tree


def _random_tree(rng, scale=1.0, offset=0.0):
  draw = lambda path, kind, shape: scale * rng.normal(size=shape) + offset
  return _tree(lambda *args: jnp.asarray(draw(*args), jnp.float32))


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return np.asarray(tree, np.float64)


def _recipe_configs():
  """``(name, config)`` of every recipe in configs/ and each of its presets."""
  for path in sorted((REPO / "configs").glob("*.py")):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    presets = [()]
    if "preset" in inspect.signature(module.get_config).parameters:
      presets.append(("cpu",))
    for preset in presets:
      yield ":".join((path.name, *preset)), module.get_config(*preset)


def _expected_update(name, g, p, lr, wd, decayed, trusted, config):
  """The first update of one parameter under PyTorch's rule, in float64."""
  d = g + wd * p if decayed and name != "adamw" else g
  if name == "adamw":
    # First step: m_hat = g, v_hat = g^2; decoupled decay lr * wd * p.
    return -lr * (g / (np.abs(g) + config.optim.eps) + (wd * p if decayed else 0.0))
  if name == "lars" and trusted:
    d = d * config.optim.trust_coefficient * np.linalg.norm(p) / np.linalg.norm(d)
  return -lr * d  # SGD's and LARS's first momentum step is the (scaled) gradient.


@pytest.mark.parametrize("recipe,config", list(_recipe_configs()))
def test_each_recipe_decays_and_trust_scales_what_its_official_code_does(recipe, config):
  name = config.optim.name
  key = (config.method, name)
  assert key in OFFICIAL, f"{recipe}: add {key} to OFFICIAL, from the paper's official code."
  official = OFFICIAL[key]
  wd, lr = config.optim.weight_decay, 0.5
  assert wd > 0, recipe
  tx = methods.create_method(config, num_steps=100).create_optimizer(optax.constant_schedule(lr))
  rng = np.random.default_rng(0)
  params = _random_tree(rng, offset=1.0)
  grads = _random_tree(rng, scale=wd)  # The size of the decay term: both show in float32.
  updates, _ = tx.update(grads, tx.init(params), params)
  for path, (kind, _) in _KINDS.items():
    decayed = True if kind == "kernel" else official[kind]
    if decayed is None:
      continue  # The official code has no such parameter.
    trusted = name == "lars" and (kind == "kernel" or official["trust_norm_bias"])
    g, p, got = _get(grads, path), _get(params, path), _get(updates, path)
    expected = _expected_update(name, g, p, lr, wd, decayed, trusted, config)
    # One step of a few float32 operations (and norms of <= 36 elements): relative error
    # ~1e-6; where g and wd p nearly cancel, an element's error is relative to those terms,
    # so the absolute floor is 1e-6 of the parameter's largest update.
    # AdamW's has a systematic part too: optax's bias correction divides (1 - b2) g^2 by
    # 1 - float32(b2), 1.3e-5 below 1 - b2 for b2 = 0.999, so the normalised gradient comes
    # out 6.4e-6 small, and up to 1.7x that relative to an update whose decay term has the
    # opposite sign (wd |p| <= 0.4 here): measured 9.6e-6. Either choice below moves > 1e-3.
    rtol = 5e-5 if name == "adamw" else 1e-5
    atol = 1e-6 * np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol, err_msg=f"{recipe} {path}")
    # The other choice would be told apart: decay on or off, trust ratio on or off.
    other = _expected_update(name, g, p, lr, wd, not decayed, trusted, config)
    assert not np.allclose(got, other, rtol=1e-3, atol=0), f"{recipe} {path}: decay undetected"
    if name == "lars" and kind != "kernel":
      other = _expected_update(name, g, p, lr, wd, decayed, not trusted, config)
      assert not np.allclose(got, other, rtol=1e-3, atol=0), f"{recipe} {path}: trust undetected"


@pytest.mark.parametrize(
  "recipe,config", [(r, c) for r, c in _recipe_configs() if c.optim.name == "lars"]
)
def test_each_lars_recipe_applies_the_learning_rate_where_its_official_code_does(recipe, config):
  official = OFFICIAL[(config.method, "lars")]
  assert config.optim.lars_order == official["lars_order"], recipe
  # Warm-up then cosine: a rate that changes at every step, where the two orders differ.
  lr_fn = optim.create_learning_rate_fn(peak_lr=0.5, warmup_steps=2, total_steps=6)
  lrs = [float(lr_fn(t)) for t in range(4)]
  tx = methods.create_method(config, num_steps=100).create_optimizer(lr_fn)
  rng = np.random.default_rng(0)
  params = _random_tree(rng, offset=1.0)
  grads = [_random_tree(rng, scale=0.1) for _ in lrs]
  updates, _ = test_optim.run_optimizer(tx, params, grads)
  o = config.optim
  hyper = dict(weight_decay=o.weight_decay, eta=o.trust_coefficient, momentum=o.momentum)
  for path, (kind, _) in _KINDS.items():
    decayed = True if kind == "kernel" else official[kind]
    if decayed is None:
      continue  # The official code has no such parameter.
    trusted = kind == "kernel" or official["trust_norm_bias"]
    got = [_get(u, path) for u in updates]
    g = [_get(x, path) for x in grads]
    label = f"{recipe} {path}"
    flags = dict(decayed=decayed, trusted=trusted)
    test_optim.assert_lars_order(
      got, official["lars_order"], _get(params, path), g, lrs, label, **hyper, **flags
    )


def _recipes_of(method):
  return [(recipe, config) for recipe, config in _recipe_configs() if config.method == method]


@pytest.mark.parametrize("recipe,config", _recipes_of("clip"))
def test_clip_decays_what_open_clip_decays_on_its_own_towers(recipe, config):
  # A tiny ViT with learned position embeddings (clip_vitb16's) and text tower, with the
  # recipe's optimiser section: open_clip decays exactly the weight matrices (Linear, conv,
  # attention and projection weights) and the token embedding; 1-D parameters (its class
  # embedding is (D,)) and the position embeddings of both towers are not decayed.
  tiny = tiny_config()
  tiny.method = "clip"
  tiny.model.name, tiny.model.posemb = "vit", "learn"
  tiny.model.variant = "custom:hidden=16,depth=1,heads=2,mlp=32,patch=4"
  tiny.clip.embed_dim, tiny.clip.text_width, tiny.clip.text_depth = 16, 16, 1
  tiny.clip.text_heads, tiny.clip.context_length, tiny.clip.vocab_size = 2, 8, 32
  params = methods.create_method(tiny).init_variables(jax.random.key(0), (16, 16, 3))["params"]
  decayed = optim.decay_mask(config.optim)(params)
  names = {}
  for path, value in jax.tree_util.tree_leaves_with_path(decayed):
    name = str(path[-1].key)
    assert value == (name in ("kernel", "embedding")), f"{recipe}: {jax.tree_util.keystr(path)}"
    names[name] = names.get(name, 0) + 1
  assert names["cls_token"] == 1 and names["pos_embedding"] == 2, names  # Both towers'.


@pytest.mark.parametrize("recipe,config", _recipes_of("barlow_twins"))
def test_barlow_twins_scales_the_gradient_of_what_its_lars_neither_decays_nor_adapts(
  recipe, config
):
  # The official rule, exclude_bias_and_norm = p.ndim == 1 in PyTorch, picks the parameters
  # with the biases' learning rate, no weight decay and no adaptation at once: biases and
  # norm parameters, not kernels or a ViT's class token and position embeddings (3-D there).
  method = methods.create_method(config)
  params = _random_tree(np.random.default_rng(0))
  total = lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(method.scale_unadapted_gradients(p)))
  grads = jax.grad(total)(params)
  adapted = optim.decay_mask(config.optim)(params)  # What the optimiser decays and adapts.
  for path, (kind, _) in _KINDS.items():
    scale = method.bias_lr_ratio if kind in ("norm", "bias") else 1.0
    np.testing.assert_allclose(_get(grads, path), scale, rtol=1e-6, err_msg=f"{recipe} {path}")
    assert _get(adapted, path) == (scale == 1.0), f"{recipe} {path}"
  assert method.bias_lr_ratio <= 0.1  # The recipes' ratio is far from 1: told apart.


def test_an_unknown_decay_mask_is_refused():
  config = tiny_config()
  config.optim.decay_mask = "biases"
  with pytest.raises(ValueError, match="optim.decay_mask must be one of"):
    optim.create_optimizer(config.optim, optax.constant_schedule(0.1))


def test_logged_learning_rate_is_the_schedule_at_the_count_the_optimiser_applied(monkeypatch):
  # Step 1's inputs are NaN: the step is skipped and the optimiser's count stays behind
  # state.step from then on; the logged rate must follow the optimiser's count.
  original = methods.Method.views

  def poisoned(self, batch, rng, step):
    views = original(self, batch, rng, step)
    return {k: jnp.where(step == 1, jnp.nan, v) for k, v in views.items()}

  monkeypatch.setattr(methods.Method, "views", poisoned)
  lr_fn = lambda count: 0.01 * (count + 1.0)  # A different rate at every count.
  mesh = sharding.create_mesh(jax.devices()[:1])
  config = tiny_config()
  state, step_fn = state_and_step(config, mesh, lr_fn)
  batch = jax.device_put(_batch(), sharding.batch_sharded(mesh))
  logged, skipped = [], []
  for _ in range(4):
    state, metrics = step_fn(state, batch, jax.random.key(1))
    logged.append(float(metrics["learning_rate"]))
    skipped.append(float(metrics["nonfinite"]))
  assert skipped == [0.0, 1.0, 0.0, 0.0]
  assert int(state.step) == 4 and int(optim.applied_count(state.opt_state)) == 3
  # Counts 0, 1 (attempted, skipped), 1 again (applied), 2; state.step would say 2 and 3.
  np.testing.assert_allclose(logged, [lr_fn(c) for c in (0, 1, 1, 2)], rtol=1e-6)
