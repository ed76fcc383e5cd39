"""CLIP: losses against float64 NumPy, sharding, the tokenizer, captions, metrics, training."""

import itertools
import json
import math
import pickle

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_config
from jax.sharding import PartitionSpec as P
from PIL import Image

from cljax import methods, sharding, step, train
from cljax.data import captions, sources
from cljax.data import tokenizer as tokenizer_lib
from cljax.data.views import ViewSpec
from cljax.evaluate import runner, zero_shot
from cljax.losses import clip as clip_losses
from cljax.methods import clip as clip_method
from cljax.models import text as text_models

# ---- Independent float64 references (analytic gradients, no autodiff).


def _unit(x):
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  return x / norm, norm


def _through_normalisation(grad_u, u, norm):
  # d(x / |x|)/dx = (I - u u^T) / |x|, applied row by row.
  return (grad_u - u * np.sum(grad_u * u, axis=1, keepdims=True)) / norm


def _log_softmax(a, axis):
  a = a - a.max(axis=axis, keepdims=True)
  return a - np.log(np.exp(a).sum(axis=axis, keepdims=True))


def np_clip_loss(x, y, s):
  """CLIP's loss and its gradients w.r.t. x, y and s, in float64."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  (u, nu), (v, nv) = _unit(x), _unit(y)
  n = len(x)
  cos = u @ v.T
  logits = s * cos
  rows, cols = _log_softmax(logits, 1), _log_softmax(logits, 0)
  loss = -(np.trace(rows) + np.trace(cols)) / (2 * n)
  grad_logits = (np.exp(rows) - np.eye(n) + np.exp(cols) - np.eye(n)) / (2 * n)
  grad_u, grad_v = s * grad_logits @ v, s * grad_logits.T @ u
  grad_s = np.sum(grad_logits * cos)
  return loss, _through_normalisation(grad_u, u, nu), _through_normalisation(grad_v, v, nv), grad_s


def np_siglip_loss(x, y, t, b):
  """SigLIP's loss and its gradients w.r.t. x, y, t and b, in float64."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  (u, nu), (v, nv) = _unit(x), _unit(y)
  n = len(x)
  cos = u @ v.T
  z = 2 * np.eye(n) - 1
  m = z * (t * cos + b)
  loss = np.sum(np.logaddexp(0.0, -m)) / n  # -log sigmoid(m) = log(1 + e^-m)
  grad_logits = -z / (1 + np.exp(m)) / n
  grad_u, grad_v = t * grad_logits @ v, t * grad_logits.T @ u
  return (
    loss,
    _through_normalisation(grad_u, u, nu),
    _through_normalisation(grad_v, v, nv),
    np.sum(grad_logits * cos),
    np.sum(grad_logits),
  )


def _pairs(n=16, d=8, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  # Captions correlated with their images, so the loss is neither trivial nor uniform.
  y = (0.7 * x + rng.normal(size=(n, d))).astype(np.float32)
  return x, y


def test_clip_loss_and_gradients_match_float64_numpy_logit_scale_included():
  x, y = _pairs()
  for s in (1.0, 1 / 0.07, 100.0):
    loss, grads = jax.value_and_grad(clip_losses.clip_loss, argnums=(0, 1, 2))(x, y, jnp.float32(s))
    ref_loss, *ref_grads = np_clip_loss(x, y, s)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-5)
    for g, r in zip(grads, ref_grads, strict=True):
      np.testing.assert_allclose(np.asarray(g), r, rtol=2e-4, atol=2e-6)


def test_siglip_loss_and_gradients_match_float64_numpy():
  x, y = _pairs(seed=1)
  args = (x, y, jnp.float32(10.0), jnp.float32(-10.0))
  loss, grads = jax.value_and_grad(clip_losses.siglip_loss, argnums=(0, 1, 2, 3))(*args)
  ref_loss, *ref_grads = np_siglip_loss(x, y, 10.0, -10.0)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-5)
  for g, r in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(np.asarray(g), r, rtol=2e-4, atol=2e-6)


def _sharded(loss_fn, num_scalars):
  mesh = sharding.create_mesh()
  return jax.shard_map(
    lambda *a: loss_fn(*a, axis_name=sharding.DATA_AXIS),
    mesh=mesh,
    in_specs=(P(sharding.DATA_AXIS), P(sharding.DATA_AXIS)) + (P(),) * num_scalars,
    out_specs=P(),
  )


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_sharded_loss_and_gradients_equal_single_device(name):
  x, y = _pairs(seed=2)
  if name == "clip":
    fn, scalars = clip_losses.clip_loss, (jnp.float32(1 / 0.07),)
  else:
    fn, scalars = clip_losses.siglip_loss, (jnp.float32(10.0), jnp.float32(-2.0))
  argnums = tuple(range(2 + len(scalars)))
  single = jax.value_and_grad(fn, argnums=argnums)(x, y, *scalars)
  sharded = jax.jit(jax.value_and_grad(_sharded(fn, len(scalars)), argnums=argnums))(x, y, *scalars)
  chex.assert_trees_all_close(sharded, single, rtol=1e-5, atol=1e-7)
  # Without the gather every device would see only its 2 captions: a different loss.
  local = np.mean([float(fn(x[i : i + 2], y[i : i + 2], *scalars)) for i in range(0, 16, 2)])
  assert abs(local - float(single[0])) > 0.1


def test_logit_scale_is_clamped_at_100_with_zero_gradient():
  scale_of = jax.value_and_grad(lambda p: clip_losses.clip_logit_scale(p))
  value, grad = scale_of(jnp.float32(math.log(1e4)))
  assert float(value) == pytest.approx(100.0, rel=1e-6) and float(grad) == 0.0
  value, grad = scale_of(jnp.float32(math.log(1 / 0.07)))
  assert float(value) == pytest.approx(1 / 0.07, rel=1e-6)
  assert float(grad) == pytest.approx(1 / 0.07, rel=1e-6)
  # Through the loss: a clamped parameter gets no gradient, an unclamped one does.
  x, y = _pairs(seed=3)
  loss_of = jax.grad(lambda p: clip_losses.clip_loss(x, y, clip_losses.clip_logit_scale(p)))
  assert float(loss_of(jnp.float32(math.log(150.0)))) == 0.0
  assert float(loss_of(jnp.float32(math.log(50.0)))) != 0.0
  np.testing.assert_allclose(
    float(clip_losses.clip_loss(x, y, clip_losses.clip_logit_scale(jnp.float32(9.0)))),
    np_clip_loss(x, y, 100.0)[0],
    rtol=2e-5,
  )


def test_losses_name_bad_arguments():
  x, y = _pairs()
  with pytest.raises(ValueError, match=r"same shape.*\(16, 8\) and \(15, 8\)"):
    clip_losses.clip_loss(x, y[:15], 10.0)
  with pytest.raises(ValueError, match=r"image_emb must have shape \(batch, dim\)"):
    clip_losses.clip_loss(x[0], y[0], 10.0)
  with pytest.raises(ValueError, match="logit_scale must be > 0"):
    clip_losses.clip_loss(x, y, 0.0)
  with pytest.raises(ValueError, match="logit_bias must be a scalar"):
    clip_losses.siglip_loss(x, y, 10.0, np.zeros(2))
  with pytest.raises(ValueError, match="max_scale must be > 0"):
    clip_losses.clip_logit_scale(0.0, max_scale=0.0)


# ---- Tokenizer.


def test_tokenizer_round_trips_and_frames_with_sot_eot_and_padding():
  tok = tokenizer_lib.CaptionTokenizer.builtin(context_length=40)
  # Words outside the caption corpus fall back to byte pieces and still round-trip.
  for text in ("a picture of a dark brown horse.", "an unseen zebra, 🦓 über alles!"):
    ids = tok.encode(text)
    assert ids.shape == (1, 40) and ids.dtype == np.int32
    assert tok.decode(ids[0]) == text
    body = tok.tokenize(text)
    n = len(body)
    assert n <= 38  # It fits: SOT, the tokens, EOT, then padding.
    assert ids[0, 0] == tok.sot_id and ids[0, n + 1] == tok.eot_id
    np.testing.assert_array_equal(ids[0, 1 : n + 1], body)
    assert np.all(ids[0, n + 2 :] == tok.pad_id)
  assert tok.decode(tok.encode("A Picture Of A Cat.")[0]) == "a picture of a cat."  # CLIP's lower()


def test_tokenizer_truncates_long_captions_keeping_eot():
  tok = tokenizer_lib.CaptionTokenizer.builtin(context_length=8)
  text = "a close-up image of a dark brown horse in the middle of the image."
  body = tok.tokenize(text)
  assert len(body) > 6
  ids = tok.encode([text, "cat."])
  assert ids.shape == (2, 8)
  np.testing.assert_array_equal(ids[0], [tok.sot_id, *body[:6], tok.eot_id])
  assert tok.decode(ids[0]) == tok._tok.decode(body[:6])
  # One EOT per row, where the text tower pools.
  np.testing.assert_array_equal((ids == tok.eot_id).sum(1), [1, 1])
  expected = [7, len(tok.tokenize("cat.")) + 1]
  np.testing.assert_array_equal(text_models.eot_positions(jnp.asarray(ids), tok.eot_id), expected)


def test_shipped_vocabulary_is_the_one_trained_on_the_caption_corpus(tmp_path):
  captions.train_builtin_vocab(str(tmp_path / "vocab.json"))
  retrained = tokenizer_lib.CaptionTokenizer.from_file(tmp_path / "vocab.json", 32)
  shipped = pickle.loads(pickle.dumps(tokenizer_lib.CaptionTokenizer.builtin(32)))
  corpus = captions.caption_corpus()
  assert shipped.vocab_size == retrained.vocab_size <= captions.BUILTIN_VOCAB_SIZE
  np.testing.assert_array_equal(shipped.encode(corpus[::97]), retrained.encode(corpus[::97]))
  assert (shipped.sot_id, shipped.eot_id, shipped.pad_id) == (1, 2, 0)
  with pytest.raises(FileNotFoundError, match="neither 'builtin'"):
    tokenizer_lib.create_tokenizer(str(tmp_path / "missing.json"), 16)


# ---- Text tower.


def test_text_tower_pools_at_the_first_eot_and_ignores_what_follows():
  model = text_models.TextTransformer(
    vocab_size=50, context_length=8, width=16, depth=2, num_heads=2, eot_id=2
  )
  tokens = jnp.asarray([[1, 7, 8, 9, 2, 0, 0, 0], [1, 5, 2, 0, 0, 0, 0, 0]], jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), tokens)
  apply = jax.jit(jax.vmap(model.apply, in_axes=(None, 0)))  # Three token sets at once.
  after = tokens.at[:, 6].set(33).at[1, 3].set(2)  # Padding changed, a second EOT added.
  before = tokens.at[:, 1].set(33)
  out, out_after, out_before = apply(params, jnp.stack([tokens, after, before]))
  assert out.shape == (2, 16)
  np.testing.assert_allclose(out_after, out, rtol=1e-6, atol=1e-6)
  assert not np.allclose(out_before, out, atol=1e-4)
  # Bidirectional attention sees past the EOT: the same change now moves the feature.
  bidir = jax.jit(jax.vmap(model.clone(causal=False).apply, in_axes=(None, 0)))
  out, out_after = bidir(params, jnp.stack([tokens, after]))
  assert not np.allclose(out_after, out, atol=1e-4)
  np.testing.assert_array_equal(
    text_models.eot_positions(jnp.asarray([[1, 3, 4], [2, 2, 0]]), 2), [2, 0]
  )


# ---- Captions and their pipeline.


def test_template_captions_attributes_and_held_out_split():
  filled = captions.fill("a picture of {a}.", "airplane", ("orange",))
  assert filled == "a picture of an orange airplane."
  assert captions.fill("look at this {x}!", "T-shirt/top") == "look at this t-shirt!"
  red = np.full((8, 8, 3), 60, np.uint8)
  red[..., 0] = 255
  assert captions.image_attributes(red) == ("red",)
  assert captions.image_attributes(np.full((8, 8, 3), 20, np.uint8)) == ("black",)
  blue = np.zeros((8, 8, 3), np.uint8)
  blue[..., 2] = 90
  assert captions.image_attributes(blue) == ("dark", "blue")
  assert not set(captions.TRAIN_TEMPLATES) & set(captions.HELD_OUT_TEMPLATES)
  # The zero-shot prompts are no training caption.
  classes = captions.CORPUS_CLASSES[0]
  prompts = {p.format(c) for p in zero_shot.CIFAR_PROMPTS for c in classes}
  assert not prompts & set(captions.caption_corpus())

  images = sources.SyntheticSource(8, 8, num_classes=3)
  train_src = captions.TemplateCaptionSource(images)
  example = train_src[0]
  name = captions.display_name(images.class_names[int(example["label"])])
  assert len(example["captions"]) == 2 * len(captions.TRAIN_TEMPLATES)
  assert all(name in c for c in example["captions"])
  eval_src = captions.TemplateCaptionSource(images, captions.HELD_OUT_TEMPLATES, fixed_seed=0)
  assert eval_src[3]["captions"] == eval_src[3]["captions"] and len(eval_src[3]["captions"]) == 1
  with pytest.raises(ValueError, match="needs class names"):
    captions.TemplateCaptionSource(sources.ArraySource(np.zeros((2, 4, 4, 3), np.uint8)))


def test_caption_files_csv_and_jsonl(tmp_path):
  root = tmp_path / "train"
  root.mkdir()
  for i in range(3):
    Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)).save(root / f"im{i}.png")
  (tmp_path / "c.csv").write_text('image,caption\nim0.png,"a dog, running"\nim1.png,a cat\n')
  rows = [{"image": "im1.png", "captions": ["one", "two"]}, {"image": "im2.png", "caption": "x"}]
  (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  images = sources.ImageFolderSource(root)
  with pytest.raises(ValueError, match="1 of 3 images have no caption"):
    captions.CaptionFileSource(images, str(tmp_path / "c.csv"))
  table = captions.read_caption_file(str(tmp_path / "c.csv"))
  table.update(captions.read_caption_file(str(tmp_path / "c.jsonl")))
  assert table == {"im0.png": ["a dog, running"], "im1.png": ["one", "two"], "im2.png": ["x"]}
  (tmp_path / "all.jsonl").write_text(
    "\n".join(json.dumps({"image": k, "captions": v}) for k, v in table.items())
  )
  src = captions.CaptionFileSource(images, str(tmp_path / "all.jsonl"))
  assert src[1]["captions"] == ("one", "two") and src[1]["image"].shape == (6, 6, 3)


def test_caption_iterator_is_seeded_per_record_and_resumes():
  source = captions.TemplateCaptionSource(sources.SyntheticSource(40, 12, num_classes=4))
  tok = tokenizer_lib.CaptionTokenizer.builtin(24)
  views = ViewSpec(8, crop_area=(0.9, 1.0), flip=True)
  make = lambda: captions.create_caption_iterator(source, tok, views, seed=3, global_batch_size=8)
  it = make()
  batches = [next(it) for _ in range(3)]
  b = batches[0]
  assert b["view_a"].shape == (8, 8, 8, 3) and b["tokens"].shape == (8, 24)
  assert set(b) == {"view_a", "tokens", "label", "aug_seed"}
  for row, label in zip(b["tokens"], b["label"], strict=True):
    text = tok.decode(row)
    assert captions.display_name(source.class_names[label]) in text
  state = it.get_state()
  next_batch = next(it)
  resumed = make()
  resumed.set_state(json.loads(json.dumps(state)))
  chex.assert_trees_all_equal(next(resumed), next_batch)
  chex.assert_trees_all_equal(next(make()), batches[0])  # Same seed, same stream.
  # Two processes each read half of every global batch, with the same per-record draws.
  halves = [
    next(
      captions.create_caption_iterator(
        source, tok, views, seed=3, global_batch_size=8, process_index=p, process_count=2
      )
    )
    for p in range(2)
  ]  # fmt: skip
  both = np.sort(np.concatenate([h["aug_seed"] for h in halves]))
  np.testing.assert_array_equal(both, np.sort(batches[0]["aug_seed"]))
  with pytest.raises(ValueError, match="different pipeline"):
    other = captions.create_caption_iterator(source, tok, views, seed=4, global_batch_size=8)
    other.set_state(state)


# ---- Evaluation metrics against brute force.


def _reference_hits(scores, relevant, k):
  hits = []
  for s, r in zip(scores, relevant, strict=True):
    # Descending score; among equal scores relevant items first (ties favour a match).
    order = sorted(range(len(s)), key=lambda j: (-s[j], not r[j]))
    hits.append(any(r[j] for j in order[:k]))
  return float(np.mean(hits))


def _reference_chance(relevant, k):
  out = []
  for r in relevant:
    perms = list(itertools.permutations(range(len(r))))
    out.append(np.mean([any(r[j] for j in p[:k]) for p in perms]))
  return float(np.mean(out))


def test_retrieval_recall_and_zero_shot_match_numpy_references():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(6, 4))
  texts = rng.normal(size=(5, 4))
  texts[4] = texts[3] * 2.0  # A tie in cosine.
  relevant = np.zeros((6, 5), bool)
  relevant[[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 0]] = True
  relevant[5, 2] = True
  got = zero_shot.retrieval_recall(images, texts, relevant, ks=(1, 2, 3))
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  scores = unit(images) @ unit(texts).T
  for name, s, r in (("image_to_text", scores, relevant), ("text_to_image", scores.T, relevant.T)):
    for k in (1, 2, 3):
      assert got[name][f"r{k}"] == pytest.approx(_reference_hits(s, r, k))
      assert got[f"chance_{name}"][f"r{k}"] == pytest.approx(_reference_chance(r, k))

  labels = np.asarray([0, 1, 2, 1, 0, 2])
  fake_text = {}

  def embed(texts_):
    return np.stack([fake_text.setdefault(t, rng.normal(size=4)) for t in texts_])

  prompts = ("a {}.", "the {}!")
  weights = zero_shot.zero_shot_weights(embed, ["Cat", "dog", "Ankle boot"], prompts)
  ref = np.stack(
    [
      np.mean([unit(embed([p.format(c)]))[0] for p in prompts], axis=0)
      for c in ("cat", "dog", "ankle boot")
    ]
  )
  np.testing.assert_allclose(weights, unit(ref), rtol=1e-12)
  acc = zero_shot.zero_shot_accuracy(images, labels, weights, ks=(1, 2))
  logits = unit(images) @ weights.T
  assert acc["top1"] == pytest.approx(np.mean(np.argmax(logits, 1) == labels))
  top2 = np.argsort(-logits, axis=1)[:, :2]
  assert acc["top2"] == pytest.approx(np.mean([labels[i] in top2[i] for i in range(6)]))


# ---- The method in the sharded train step, and end to end.


def _clip_config(**overrides):
  c = tiny_config()
  c.method = "clip"
  if "clip" not in c:
    c.clip = clip_method.clip_config()
  c.clip.embed_dim = 16
  c.clip.text_width, c.clip.text_depth, c.clip.text_heads = 16, 1, 2
  c.clip.context_length = 24
  c.clip.vocab_size = 512
  c.optim.name = "sgd"
  for key, value in overrides.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


def _clip_batch(seed=0, n=16):
  rng = np.random.default_rng(seed)
  tok = tokenizer_lib.CaptionTokenizer.builtin(24)
  names = ["cat", "dog", "ship", "frog"]
  labels = np.arange(n) % 4
  return {
    "view_a": rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
    "tokens": tok.encode([f"a picture of a {names[i]}." for i in labels]),
    "aug_seed": rng.integers(0, 2**31 - 1, n).astype(np.int32),
    "label": labels.astype(np.int32),
  }


def _run(config, devices, batches, host_state, lr_fn):
  mesh = sharding.create_mesh(devices)
  method = methods.create_method(config, num_steps=10)
  state = step.place_state(host_state, mesh, method)  # Copies: the step donates its state.
  step_fn = step.make_train_step(method, mesh, lr_fn)
  history = []
  for batch in batches:
    state, step_metrics = step_fn(
      state, jax.device_put(batch, sharding.batch_sharded(mesh)), jax.random.key(1)
    )
    history.append(jax.device_get(step_metrics))
  return jax.device_get(state), history


def test_clip_step_on_8_devices_equals_1_device():
  config = _clip_config()
  batches = [_clip_batch(0), _clip_batch(1)]
  lr_fn = optax.constant_schedule(0.5)
  # Initialised once (compiling the initialisation costs as much as the step), on the host.
  method = methods.create_method(config)
  init = step.create_train_state(method, jax.random.key(0), lr_fn, (16, 16, 3), num_classes=4)
  init = jax.device_get(init)
  state8, hist8 = _run(config, jax.devices(), batches, init, lr_fn)
  state1, hist1 = _run(config, jax.devices()[:1], batches, init, lr_fn)
  for m8, m1 in zip(hist8, hist1, strict=True):
    chex.assert_trees_all_close(m8, m1, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(state8.params, state1.params, rtol=1e-4, atol=3e-5)
  params = state8.params
  assert set(params) == {"encoder", "text", "image_projection", "text_projection", "logit_scale"}
  assert hist8[0]["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)
  assert float(params["logit_scale"]) != pytest.approx(math.log(1 / 0.07), abs=1e-6)  # Learns.
  assert np.isfinite(hist8[-1]["loss"]) and "probe_top1" in hist8[-1]


def test_the_logit_scale_gradient_is_never_cut_by_the_clamp():
  # open_clip clamps the parameter after each step and uses exp(logit_scale) as it is; a
  # parameter beyond the clamp (restored from a run that clamped only in the forward pass)
  # is used at the clamp, and gets the gradient it would get there, not zero.
  x, y = _pairs(seed=3)
  loss_of = jax.value_and_grad(
    lambda p: clip_losses.clip_loss(x, y, clip_method.logit_scale(p, 100.0))
  )
  beyond, at = loss_of(jnp.float32(math.log(150.0))), loss_of(jnp.float32(math.log(100.0)))
  assert float(beyond[1]) != 0.0
  chex.assert_trees_all_close(beyond, at, rtol=1e-6)
  np.testing.assert_allclose(float(beyond[0]), np_clip_loss(x, y, 100.0)[0], rtol=2e-5)
  # Below the clamp it is exp, value and gradient (d exp(p) / dp = exp(p)).
  value, grad = jax.value_and_grad(lambda p: clip_method.logit_scale(p, 100.0))(jnp.float32(2.0))
  assert float(value) == pytest.approx(math.exp(2.0), rel=1e-6)
  assert float(grad) == pytest.approx(math.exp(2.0), rel=1e-6)


def test_project_params_clamps_the_log_scale_to_open_clips_range_only():
  method = methods.create_method(_clip_config())
  for p, want in [(5.3, math.log(100.0)), (-0.2, 0.0), (2.5, 2.5)]:
    params = {"logit_scale": jnp.float32(p), "text": {"logit_scale": jnp.float32(9.0)}}
    out = method.project_params(params)
    assert float(out["logit_scale"]) == pytest.approx(want, abs=1e-7)
    assert float(out["text"]["logit_scale"]) == 9.0  # Only the top-level parameter.
  with pytest.raises(ValueError, match=r"initial logit scale 0.5 must be in \[1, "):
    clip_method.init_logit_scale(_clip_config(clip__init_logit_scale=0.5).clip)


def test_a_logit_scale_beyond_the_clamp_recovers_in_training():
  # The parameter starts beyond log 100 (as an older checkpoint could hold it). The first
  # step leaves it at most log 100; with a gradient through the clamp it then moves back
  # below, where a clamp in the forward pass alone would hold it at log 150 for good.
  config = _clip_config()
  lr_fn = optax.constant_schedule(0.05)
  method = methods.create_method(config)
  init = step.create_train_state(method, jax.random.key(0), lr_fn, (16, 16, 3))
  init = jax.device_get(init)
  params = dict(init.params, logit_scale=np.float32(math.log(150.0)))
  init = init.replace(params=params)
  batches = [_clip_batch(s) for s in range(3)]
  state1, hist = _run(config, jax.devices()[:1], batches[:1], init, lr_fn)
  # At most log 100 rounded to float32 (the parameter's dtype), 6e-8 above the real number.
  assert float(state1.params["logit_scale"]) <= np.float32(math.log(100.0))
  assert hist[0]["logit_scale"] == pytest.approx(100.0, rel=1e-5)  # Used at the clamp.
  state3, _ = _run(config, jax.devices()[:1], batches, init, lr_fn)
  assert 0.0 <= float(state3.params["logit_scale"]) < math.log(100.0) - 1e-3


def test_siglip_trains_end_to_end_and_evaluates_zero_shot_and_retrieval(tmp_path):
  config = _clip_config(
    clip__loss="siglip",
    data__source="synthetic",
    data__num_examples=64,
    data__num_classes=4,
    data__num_workers=0,
    data__global_batch_size=16,
    train__num_steps=4,
    train__log_every_steps=1,
    train__checkpoint_every_steps=2,
    evals__batch_size=16,
    evals__knn_at_end=False,
    clip__retrieval_examples=24,
  )
  config.optim.name = "adamw"
  config.optim.base_lr = 1e-3
  config.optim.warmup_epochs = 0.0
  assert methods.create_method(config).name == "clip"
  workdir = str(tmp_path / "run")
  final = train.train_and_evaluate(config, workdir)
  lines = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
  losses_ = [r["loss"] for r in lines if "loss" in r]
  assert len(losses_) == 4 and all(np.isfinite(losses_)) and final["epoch"] == 1.0
  assert lines[0]["logit_scale"] == pytest.approx(10.0) and lines[0]["logit_bias"] == -10.0

  mesh = sharding.create_mesh()
  state, step_ = runner.restore_checkpoint(methods.create_method(config), workdir, mesh=mesh)
  assert step_ == 4 and float(state.params["logit_bias"]) != -10.0  # The bias learns.
  result = zero_shot.evaluate_zero_shot(config, state, mesh)
  zs, ret = result["zero_shot"], result["retrieval"]
  assert zs["num_classes"] == 4 and zs["num_images"] == 64 and zs["chance"] == 0.25
  assert 0.0 <= zs["top1"] <= 1.0 and "top5" not in zs  # 4 classes: no top-5.
  assert ret["num_images"] == 24 and 1 <= ret["num_texts"] <= 24
  for name in ("image_to_text", "text_to_image"):
    r = ret[name]
    assert 0.0 <= r["r1"] <= r["r5"] <= r["r10"] <= 1.0
    assert ret[f"chance_{name}"]["r10"] > ret[f"chance_{name}"]["r1"] > 0
