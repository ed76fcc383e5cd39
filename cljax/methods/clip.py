"""CLIP (Radford et al. 2021): a dual image-text encoder trained with a symmetric InfoNCE.

A batch holds N (image, caption) pairs: one augmented view per image (``view_a``) and the
caption's token ids (``tokens``, from ``cljax.data.captions``). The image tower (any
``model`` encoder, ResNet or ViT) and the text Transformer (``cljax.models.text``) are
followed by bias-free linear projections into a shared ``clip.embed_dim`` space, where
``cljax.losses.clip.clip_loss`` contrasts every image with every caption of the global
batch at a learned logit scale (``siglip_loss`` with ``clip.loss="siglip"``).

Parameters: ``encoder`` (the image tower, so image-only evaluation reads it as for every
other method), ``image_projection``, ``text`` (the text tower), ``text_projection``,
``logit_scale`` (the log of the scale, which ``CLIP.project_params`` clamps to
``[0, log clip.max_logit_scale]`` after each optimiser step, as open_clip does) and, for
SigLIP, ``logit_bias``. ``apply(variables, images, train)`` returns
``(features, image_embeddings)`` like every model here; ``method="encode_text"`` returns
``(text_features, text_embeddings)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cljax import models
from cljax.data import augment
from cljax.losses import clip as clip_losses
from cljax.methods.base import Method, StepOutput
from cljax.models import text as text_models

# The published initial scales: CLIP's temperature 0.07 (sec. 2.5), SigLIP's t=10, b=-10.
DEFAULT_INIT_LOGIT_SCALE = {"clip": 1 / 0.07, "siglip": 10.0}


def clip_config() -> ml_collections.ConfigDict:
  """The ``clip`` config section: CLIP ViT-B/16's text tower and joint space by default.

  Sizes from Radford et al. 2021, Tables 19 and 20 (see ``configs/clip_vitb16.py``); the
  tokenizer defaults to the small vocabulary shipped for the shared-image captions, which
  fits the larger embedding table.
  """
  c = ml_collections.ConfigDict()
  c.embed_dim = 512  # The shared image-text space.
  c.text_width = 512
  c.text_depth = 12
  c.text_heads = 8
  c.text_causal = True  # CLIP's causal mask; False: bidirectional, still EOT-pooled.
  c.context_length = 77  # Token ids per caption, SOT and EOT included.
  c.vocab_size = 49408  # Rows of the token embedding; >= the tokenizer's vocabulary.
  # "builtin" (shipped, trained on the shared-image captions) | a tokenizers JSON file |
  # "hf:REPO" (Hugging Face Hub, e.g. "hf:openai/clip-vit-base-patch16").
  c.tokenizer = "builtin"
  # The tokenizer's end-of-text id, where the text tower pools (checked against the
  # tokenizer when data is read): 2 in vocabularies cljax trains, 49407 in CLIP's.
  c.eot_id = 2
  c.loss = "clip"  # "clip" (softmax, symmetric) | "siglip" (pairwise sigmoid).
  c.init_logit_scale = 0.0  # 0: the loss's published value (1 / 0.07 CLIP, 10 SigLIP).
  c.max_logit_scale = 100.0  # CLIP's clamp.
  c.init_logit_bias = -10.0  # SigLIP only.
  # Caption source (cljax.data.captions): "templates" (class names of the labelled image
  # source in varied templates) | "file" (data.source="folder" + caption files).
  c.captions = "templates"
  c.caption_attributes = True  # Templates: add colour/brightness words read off the image.
  c.caption_file = ""  # "file": CSV/JSONL of image paths (relative to the split folder).
  c.eval_caption_file = ""
  c.retrieval_examples = 1000  # Eval images (random, fixed) for retrieval recall@K.
  return c


class DualEncoder(nn.Module):
  """Image tower + text tower, linear projections to a shared space, and the logit scale.

  Attributes:
    encoder: the image tower, ``encoder(x, train) -> (b, f)`` features.
    text: the text tower, ``text(tokens) -> (b, width)`` EOT features.
    embed_dim: width of the shared space.
    init_logit_scale: the initial scale (stored as its log).
    init_logit_bias: the initial SigLIP bias, or None for no bias parameter.
    dtype: compute dtype of the projections.
  """

  encoder: nn.Module
  text: nn.Module
  embed_dim: int
  init_logit_scale: float = 1 / 0.07
  init_logit_bias: float | None = None
  dtype: Any = jnp.float32

  def setup(self):
    # CLIP's projections have no bias; initialised N(0, width^-1/2) as lecun_normal does.
    self.image_projection = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype)
    self.text_projection = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype)
    init = nn.initializers.constant(math.log(self.init_logit_scale))
    self.logit_scale = self.param("logit_scale", init, (), jnp.float32)
    if self.init_logit_bias is not None:
      bias_init = nn.initializers.constant(self.init_logit_bias)
      self.logit_bias = self.param("logit_bias", bias_init, (), jnp.float32)

  def __call__(self, x: jax.Array, train: bool = True) -> tuple[jax.Array, jax.Array]:
    """(b, h, w, 3) images -> ``(features (b, f), embeddings (b, embed_dim))``."""
    features = self.encoder(x, train=train)
    return features, self.image_projection(features).astype(jnp.float32)

  def encode_text(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(b, L) token ids -> ``(EOT features (b, width), embeddings (b, embed_dim))``."""
    features = self.text(tokens)
    return features, self.text_projection(features).astype(jnp.float32)

  def init_all(self, x: jax.Array, tokens: jax.Array, train: bool = False):
    """Touches every parameter (for ``init``)."""
    return self(x, train=train), self.encode_text(tokens)


def init_logit_scale(clip: ml_collections.ConfigDict) -> float:
  if clip.loss not in DEFAULT_INIT_LOGIT_SCALE:
    raise ValueError(f"clip.loss must be 'clip' or 'siglip', got {clip.loss!r}.")
  scale = clip.init_logit_scale or DEFAULT_INIT_LOGIT_SCALE[clip.loss]
  if not 1 <= scale <= clip.max_logit_scale:
    raise ValueError(
      f"the initial logit scale {scale} must be in [1, clip.max_logit_scale="
      f"{clip.max_logit_scale}]: the range open_clip clamps it to."
    )
  return float(scale)


def clamp_log_scale(log_scale: jax.Array, max_scale: float) -> jax.Array:
  """open_clip's ``logit_scale.clamp_(0, math.log(100))``: the log-parameter in [0, log max]."""
  return jnp.clip(log_scale, 0.0, math.log(max_scale))


def logit_scale(log_scale: jax.Array, max_scale: float) -> jax.Array:
  """The scale ``exp(log_scale)`` of the log-parameter, with its value clamped to
  ``[1, max_scale]`` but its gradient never cut.

  ``project_params`` keeps the parameter in range after every step, so the clamp acts only
  on a parameter restored from beyond it (an older checkpoint, clamped in the forward pass
  alone); the gradient then is that of ``exp`` at the clamped value, so the parameter can
  move back, where ``exp(min(log_scale, log max))`` would give it zero gradient for good.
  """
  log_scale = jnp.asarray(log_scale, jnp.float32)
  clamped = clamp_log_scale(log_scale, max_scale)
  return jnp.exp(log_scale + jax.lax.stop_gradient(clamped - log_scale))


def create_model(config: ml_collections.ConfigDict, bn_axis_name: str | None = None):
  """The dual encoder of ``config.model`` (image tower) and ``config.clip`` (the rest)."""
  clip = config.clip
  dtype = models.dtype_from_name(config.model.dtype)
  text = text_models.TextTransformer(
    vocab_size=clip.vocab_size,
    context_length=clip.context_length,
    width=clip.text_width,
    depth=clip.text_depth,
    num_heads=clip.text_heads,
    eot_id=clip.eot_id,
    causal=clip.text_causal,
    dtype=dtype,
  )
  return DualEncoder(
    encoder=models.create_encoder(config.model, bn_axis_name),
    text=text,
    embed_dim=clip.embed_dim,
    init_logit_scale=init_logit_scale(clip),
    init_logit_bias=clip.init_logit_bias if clip.loss == "siglip" else None,
    dtype=dtype,
  )


class CLIP(Method):
  """Contrastive language-image pretraining on (image, caption) pairs.

  References:
    Radford et al., "Learning Transferable Visual Models From Natural Language
    Supervision", ICML 2021. https://arxiv.org/abs/2103.00020
    Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023 (``siglip``).
  """

  name = "clip"
  views_per_example = 1
  zero_shot = True

  @classmethod
  def config_sections(cls) -> dict[str, ml_collections.ConfigDict]:
    return {"clip": clip_config()}

  def create_train_iterator(
    self,
    source: Any,
    mesh: Any,
    views: Any,
    *,
    device_resident: bool,
    read_threads: int | None = None,
  ):
    """(one view, caption ``tokens``) batches from ``cljax.data.captions``, captioning
    ``source`` as ``clip.captions`` says; host only."""
    del mesh
    if device_resident:
      raise ValueError("CLIP runs read captions on the host: set data.device_resident=False.")
    if self.config.data.crop_on_device:
      raise ValueError(
        "CLIP's caption pipeline crops on the host; data.crop_on_device is for the image "
        "methods: set data.crop_on_device=False."
      )
    # Imported here, so that only CLIP runs need `tokenizers`.
    from cljax.data import captions

    return captions.create_train_iterator(
      self.config, source, views, jax.process_index(), jax.process_count(), read_threads
    )

  def create_model(self, bn_axis_name: str | None = None):
    return create_model(self.config, bn_axis_name)

  def init_variables(self, rng: jax.Array, input_shape: tuple[int, ...]) -> dict:
    model = self.create_model()
    init = jax.jit(functools.partial(model.init, train=False, method="init_all"))
    tokens = jnp.zeros((2, self.config.clip.context_length), jnp.int32)
    variables = init(rng, jnp.zeros((2, *input_shape), jnp.float32), tokens)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

  def project_params(self, params: Any) -> Any:
    """The parameters with the log logit scale clamped to ``[0, log clip.max_logit_scale]``
    after the optimiser's step, as open_clip clamps ``model.logit_scale`` after each step."""
    max_scale = self.config.clip.max_logit_scale

    def project(path, p):
      if len(path) == 1 and getattr(path[0], "key", None) == "logit_scale":
        return clamp_log_scale(p, max_scale).astype(p.dtype)
      return p

    return jax.tree_util.tree_map_with_path(project, params)

  def views(self, batch: dict, rng: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
    """``{"global": (n, h, w, 3)}``: the one normalised view of each image.

    Photometric augmentation (off in the CLIP recipes, which keep colours true to the
    captions) follows ``data.augment`` with the per-example ``aug_seed`` keys.
    """
    aug = self.config.data.augment
    return {"global": augment.network_inputs(batch["view_a"], aug, rng, step, batch["aug_seed"])}

  def loss(self, params: Any, state: Any, views: dict, batch: dict) -> tuple[jax.Array, StepOutput]:
    clip = self.config.clip
    h, image_emb, batch_stats = self.forward(
      state.apply_fn, params, state.batch_stats, views["global"]
    )
    _, text_emb = state.apply_fn({"params": params}, batch["tokens"], method="encode_text")
    scale = logit_scale(params["logit_scale"], clip.max_logit_scale)
    if clip.loss == "siglip":
      loss, metrics = clip_losses.siglip_loss(
        image_emb,
        text_emb,
        scale,
        params["logit_bias"],
        axis_name=self.axis_name,
        return_metrics=True,
      )
    else:
      loss, metrics = clip_losses.clip_loss(
        image_emb, text_emb, scale, axis_name=self.axis_name, return_metrics=True
      )
    out = StepOutput(batch_stats, metrics, image_emb, h, pairs=(image_emb, text_emb))
    return loss, out
