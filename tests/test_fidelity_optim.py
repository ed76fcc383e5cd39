"""Each recipe's optimiser against its paper's official code: decay/trust masks, the logged lr."""

import importlib.util
import inspect
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import state_and_step, tiny_config
from test_step import _batch

from cljax import methods, optim, sharding

REPO = pathlib.Path(__file__).resolve().parents[1]

# What the official code of each recipe does, by (method, optimiser): does weight decay apply
# to normalisation parameters (BatchNorm/LayerNorm scale and offset), to biases, to a ViT's
# class token and learned position embeddings, and (LARS) is the trust ratio applied to
# normalisation parameters and biases? Kernels are always decayed (and trust-scaled by LARS).
# None: that code has no such parameter (a ResNet recipe has no tokens) or no trust ratio.
OFFICIAL = {
  # google-research/simclr lars_optimizer.py: exclude_from_weight_decay=["batch_normalization",
  # "bias"], and exclude_from_layer_adaptation defaults to the same list.
  ("simclr", "lars"): {"norm": False, "bias": False, "tokens": None, "trust_norm_bias": False},
  # deepmind-research byol/utils/optimizers.py: weight_decay_filter and lars_adaptation_filter
  # are both exclude_bias_and_norm (path[-1] == "b" or "norm" in the module name).
  ("byol", "lars"): {"norm": False, "bias": False, "tokens": None, "trust_norm_bias": False},
  # facebookresearch/barlowtwins main.py: LARS(weight_decay_filter=True,
  # lars_adaptation_filter=True) with exclude_bias_and_norm = p.ndim == 1.
  ("barlow_twins", "lars"): {
    "norm": False,
    "bias": False,
    "tokens": None,
    "trust_norm_bias": False,
  },
  # facebookresearch/moco main_moco.py: torch.optim.SGD(model.parameters(), weight_decay=...).
  ("moco_v2", "sgd"): {"norm": True, "bias": True, "tokens": None, "trust_norm_bias": None},
  # facebookresearch/simsiam main_simsiam.py: torch.optim.SGD(optim_params, weight_decay=...),
  # every parameter in one of the two groups, both decayed.
  ("simsiam", "sgd"): {"norm": True, "bias": True, "tokens": None, "trust_norm_bias": None},
  # HobbitLong/SupContrast util.set_optimizer: optim.SGD(model.parameters(), weight_decay=...),
  # for SupCon (main_supcon.py) and its cross-entropy baseline (main_ce.py) alike.
  ("supcon", "sgd"): {"norm": True, "bias": True, "tokens": None, "trust_norm_bias": None},
  ("supervised", "sgd"): {"norm": True, "bias": True, "tokens": None, "trust_norm_bias": None},
  # facebookresearch/moco-v3 main_moco.py: ResNets use moco/optimizer.py's LARS ("no rate
  # scaling or weight decay for parameters <= 1D"); ViTs torch.optim.AdamW(model.parameters(),
  # weight_decay=...), every parameter (the sin-cos position embedding is not a parameter).
  ("moco_v3", "lars"): {"norm": False, "bias": False, "tokens": None, "trust_norm_bias": False},
  ("moco_v3", "adamw"): {"norm": True, "bias": True, "tokens": True, "trust_norm_bias": None},
  # facebookresearch/swav main_swav.py: LARC(SGD(model.parameters(), weight_decay=args.wd),
  # trust_coefficient=0.001, clip=False): every parameter decayed and trust-scaled.
  ("swav", "lars"): {"norm": True, "bias": True, "tokens": None, "trust_norm_bias": True},
  # facebookresearch/dino utils.get_params_groups: name.endswith(".bias") or 1-D -> no decay;
  # cls_token (1, 1, D) and pos_embed (1, N, D) are decayed.
  ("dino", "adamw"): {"norm": False, "bias": False, "tokens": True, "trust_norm_bias": None},
  # mlfoundations/open_clip main.py: exclude p.ndim < 2, "bn", "ln", "bias", "logit_scale";
  # the (2-D) positional and token embeddings are decayed.
  ("clip", "adamw"): {"norm": False, "bias": False, "tokens": True, "trust_norm_bias": None},
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
  ("cls_token",): ("tokens", (1, 1, 3)),
  ("pos_embedding",): ("tokens", (1, 4, 3)),
}


def _tree(leaf_fn):
  tree = {}
  for path, (kind, shape) in _KINDS.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf_fn(path, kind, shape)
  return tree


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
  params = _tree(lambda path, kind, shape: jnp.asarray(rng.normal(size=shape) + 1, jnp.float32))
  # Gradients of the size of the decay term, so that both show in float32.
  grads = _tree(lambda path, kind, shape: jnp.asarray(wd * rng.normal(size=shape), jnp.float32))
  updates, _ = tx.update(grads, tx.init(params), params)
  for path, (kind, _) in _KINDS.items():
    decayed = True if kind == "kernel" else official[kind]
    if decayed is None:
      continue  # The official code has no such parameter.
    trusted = name == "lars" and (kind == "kernel" or official["trust_norm_bias"])
    g, p, got = _get(grads, path), _get(params, path), _get(updates, path)
    expected = _expected_update(name, g, p, lr, wd, decayed, trusted, config)
    # One step of a few float32 operations (and norms of <= 36 elements): relative error
    # ~1e-6; the absolute floor is far below every update here (>= lr * wd^2 ~ 1e-12 LARS).
    # AdamW's has a systematic part too: optax's bias correction divides (1 - b2) g^2 by
    # 1 - float32(b2), 1.3e-5 below 1 - b2 for b2 = 0.999, so the normalised gradient comes
    # out 6.4e-6 small, and up to 1.7x that relative to an update whose decay term has the
    # opposite sign (wd |p| <= 0.4 here): measured 9.6e-6. Either choice below moves > 1e-3.
    rtol = 5e-5 if name == "adamw" else 1e-5
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=1e-14, err_msg=f"{recipe} {path}")
    # The other choice would be told apart: decay on or off, trust ratio on or off.
    other = _expected_update(name, g, p, lr, wd, not decayed, trusted, config)
    assert not np.allclose(got, other, rtol=1e-3, atol=0), f"{recipe} {path}: decay undetected"
    if name == "lars" and kind != "kernel":
      other = _expected_update(name, g, p, lr, wd, decayed, not trusted, config)
      assert not np.allclose(got, other, rtol=1e-3, atol=0), f"{recipe} {path}: trust undetected"


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
