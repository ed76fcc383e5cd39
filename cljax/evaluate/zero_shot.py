"""CLIP evaluation: zero-shot classification with prompt ensembles, and image-text retrieval.

Zero-shot (Radford et al. 2021, sec. 3.1.4): each class's weight is the normalised mean of
the normalised text embeddings of its prompts ("a photo of a {}.", ...); an image is
assigned the class of highest cosine similarity.

Retrieval: over N images and M distinct captions with a relevance matrix R (N, M), image i
is a hit at K (image-to-text R@K) if some caption relevant to it is among the K captions
most similar to it, and caption t (text-to-image) if some image relevant to it is among its
K most similar images; R@K is the fraction of hits. Relevant items never count against
each other, so with one caption per image, duplicated captions (the template caption set
has many) are merged and every image they describe counts as a match. Chance R@K, for a
query with m relevant of C candidates ranked at random, is ``1 - C(C - m, K) / C(C, K)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from cljax import sharding
from cljax.data import captions, sources
from cljax.evaluate import features

# CLIP's CIFAR-10 prompt ensemble (github.com/openai/CLIP, notebooks/Prompt_Engineering_for_
# ImageNet.ipynb, and data/prompts.md). No training template of cljax.data.captions is one.
CIFAR_PROMPTS = (
  "a photo of a {}.",
  "a blurry photo of a {}.",
  "a black and white photo of a {}.",
  "a low contrast photo of a {}.",
  "a high contrast photo of a {}.",
  "a bad photo of a {}.",
  "a good photo of a {}.",
  "a photo of a small {}.",
  "a photo of a big {}.",
  "a photo of the {}.",
  "a blurry photo of the {}.",
  "a black and white photo of the {}.",
  "a low contrast photo of the {}.",
  "a high contrast photo of the {}.",
  "a bad photo of the {}.",
  "a good photo of the {}.",
  "a photo of the small {}.",
  "a photo of the big {}.",
)
RECALL_KS = (1, 5, 10)


def _normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def zero_shot_weights(
  embed_text_fn: Callable[[Sequence[str]], np.ndarray],
  class_names: Sequence[str],
  prompts: Sequence[str] = CIFAR_PROMPTS,
) -> np.ndarray:
  """(C, d) class weights: per class, the normalised mean of its normalised prompt embeddings.

  Args:
    embed_text_fn: texts -> (n, d) text embeddings.
    class_names: the C class names (``captions.display_name`` is applied).
    prompts: templates with one ``{}``.
  """
  texts = [p.format(captions.display_name(name)) for name in class_names for p in prompts]
  emb = _normalize(embed_text_fn(texts)).reshape(len(class_names), len(prompts), -1)
  return _normalize(emb.mean(axis=1))


def zero_shot_accuracy(
  image_emb: np.ndarray, labels: np.ndarray, weights: np.ndarray, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
  """Top-K accuracy of classifying (N, d) image embeddings by cosine with (C, d) weights.

  A label counts as in the top K if fewer than K classes score strictly higher.
  """
  logits = _normalize(image_emb) @ np.asarray(weights, np.float64).T  # (N, d) @ (d, C)
  true = np.take_along_axis(logits, np.asarray(labels)[:, None], axis=1)
  higher = np.sum(logits > true, axis=1)
  return {f"top{k}": float(np.mean(higher < k)) for k in ks if k <= weights.shape[0]}


def _hits(scores: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
  """Per query (row): is a relevant candidate among the top k? Ties favour the relevant."""
  best = np.max(np.where(relevant, scores, -np.inf), axis=1, keepdims=True)
  beaten_by = np.sum((scores > best) & ~relevant, axis=1)
  return relevant.any(axis=1) & (beaten_by < k)


def chance_recall(relevant: np.ndarray, k: int) -> float:
  """Mean over rows of ``1 - C(M - m, k) / C(M, k)``, m the row's relevant count of M."""
  num = relevant.shape[1]
  miss = [math.comb(num - m, k) / math.comb(num, k) if k <= num else 0.0 for m in relevant.sum(1)]
  return float(1.0 - np.mean(miss))


def retrieval_recall(
  image_emb: np.ndarray, text_emb: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = RECALL_KS
) -> dict[str, dict[str, float]]:
  """Image-to-text and text-to-image recall@K by cosine similarity, and chance.

  Args:
    image_emb: (N, d) image embeddings.
    text_emb: (M, d) caption embeddings.
    relevant: (N, M) bool, which captions match which images.
    ks: the K of R@K.

  Returns:
    ``{"image_to_text": {"r1", ...}, "text_to_image": {...}, "chance_image_to_text": {...},
    "chance_text_to_image": {...}}``.
  """
  relevant = np.asarray(relevant, bool)
  if relevant.shape != (len(image_emb), len(text_emb)):
    raise ValueError(
      f"relevant must be (images, texts) = ({len(image_emb)}, {len(text_emb)}), got "
      f"{relevant.shape}."
    )
  scores = _normalize(image_emb) @ _normalize(text_emb).T  # (N, d) @ (d, M) -> (N, M)
  out: dict[str, dict[str, float]] = {}
  for name, s, r in (("image_to_text", scores, relevant), ("text_to_image", scores.T, relevant.T)):
    out[name] = {f"r{k}": float(np.mean(_hits(s, r, k))) for k in ks}
    out[f"chance_{name}"] = {f"r{k}": chance_recall(r, k) for k in ks}
  return out


def _padded_global(array: np.ndarray, global_batch: int, start: int) -> np.ndarray:
  """This process's rows of ``array[start : start + global_batch]``, zero-padded."""
  chunk = array[start : start + global_batch]
  if len(chunk) < global_batch:
    pad = np.zeros((global_batch - len(chunk), *array.shape[1:]), array.dtype)
    chunk = np.concatenate([chunk, pad])
  return chunk.reshape(jax.process_count(), -1, *array.shape[1:])[jax.process_index()]


def make_text_embed_fn(
  apply_fn: Callable, params: Any, tokenizer: Any, mesh: Mesh, batch_size: int = 512
) -> Callable[[Sequence[str]], np.ndarray]:
  """texts -> (n, embed_dim) text embeddings, batches sharded over ``mesh``."""
  fn = jax.jit(
    lambda p, t: apply_fn({"params": p}, t, method="encode_text")[1],
    in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
    out_shardings=sharding.batch_sharded(mesh),
  )
  global_batch = -(-batch_size // mesh.devices.size) * mesh.devices.size

  def embed(texts: Sequence[str]) -> np.ndarray:
    tokens = tokenizer.encode(list(texts))
    out = []
    for start in range(0, len(tokens), global_batch):
      local = _padded_global(tokens, global_batch, start)
      batch = sharding.host_to_global({"t": local}, mesh)["t"]
      out.append(np.asarray(multihost_utils.process_allgather(fn(params, batch), tiled=True)))
    return np.concatenate(out)[: len(tokens)]

  return embed


def retrieval_set(source: Any, indices: Sequence[int]) -> tuple[list[str], np.ndarray]:
  """The distinct captions of ``source[i]`` for ``i`` in ``indices`` and the (N, M) relevance."""
  texts: dict[str, int] = {}
  pairs = []
  for row, i in enumerate(indices):
    for text in source[int(i)]["captions"]:
      pairs.append((row, texts.setdefault(text, len(texts))))
  relevant = np.zeros((len(indices), len(texts)), bool)
  rows, cols = zip(*pairs, strict=True)
  relevant[list(rows), list(cols)] = True
  return list(texts), relevant


def evaluate_zero_shot(
  config: ml_collections.ConfigDict,
  state: Any,
  mesh: Mesh,
  *,
  prompts: Sequence[str] = CIFAR_PROMPTS,
  retrieval_examples: int | None = None,
) -> dict[str, Any]:
  """Zero-shot top-1/top-5 on the whole eval split, and retrieval R@1/5/10 on a subset of it.

  The eval split's images are centre views (as for kNN). Zero-shot needs class names and
  labels; retrieval pairs ``clip.retrieval_examples`` eval images (a fixed random subset)
  with their eval captions (``captions.create_caption_source(config, "eval")``: held-out
  templates, or ``clip.eval_caption_file``).

  Returns:
    ``{"zero_shot": {"top1", "top5", "chance", "num_classes", "num_prompts", "num_images"},
    "retrieval": {... of retrieval_recall, "num_images", "num_texts"}}``.
  """
  tok = captions.create_tokenizer(config)
  image_source = sources.create_source(config.data, "eval")
  batches = features.eval_batches(config, "eval", source=image_source)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  image_emb, labels, index = features.extract(
    features.embeddings(state.apply_fn), variables, batches, mesh
  )
  embed_text = make_text_embed_fn(state.apply_fn, state.params, tok, mesh, config.evals.batch_size)
  result: dict[str, Any] = {}
  class_names = getattr(image_source, "class_names", None)
  if class_names and labels.min() >= 0:
    weights = zero_shot_weights(embed_text, class_names, prompts)
    result["zero_shot"] = zero_shot_accuracy(image_emb, labels, weights)
    result["zero_shot"].update(
      chance=1.0 / len(class_names),
      num_classes=len(class_names),
      num_prompts=len(prompts),
      num_images=len(labels),
    )
  num = min(retrieval_examples or config.clip.retrieval_examples, len(index))
  rows = np.sort(np.random.default_rng(config.train.seed).permutation(len(index))[:num])
  caption_source = captions.create_caption_source(config, "eval", image_source)
  texts, relevant = retrieval_set(caption_source, index[rows])
  recall = retrieval_recall(image_emb[rows], embed_text(texts), relevant)
  result["retrieval"] = dict(recall, num_images=int(num), num_texts=len(texts))
  logging.info("Zero-shot and retrieval: %s", result)
  return result
