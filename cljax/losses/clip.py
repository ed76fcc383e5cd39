"""CLIP's symmetric image-text InfoNCE and SigLIP's pairwise sigmoid loss, across devices."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cljax.losses._common import _check_2d, _global_offset, _mean_over_batch, l2_normalize
from cljax.losses.contrastive import positive_accuracy, softmax_cross_entropy

# CLIP clips its learned temperature so that logits are scaled by at most 100
# (Radford et al. 2021, sec. 2.5): beyond that training became unstable.
MAX_LOGIT_SCALE = 100.0


def _check_pair(image_emb: jax.Array, text_emb: jax.Array) -> None:
  _check_2d("image_emb", image_emb)
  _check_2d("text_emb", text_emb)
  if image_emb.shape != text_emb.shape:
    raise ValueError(
      "image_emb and text_emb must have the same shape (one caption per image), got "
      f"{image_emb.shape} and {text_emb.shape}."
    )


def _check_scalar(name: str, value, positive: bool = False) -> None:
  if jnp.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}.")
  if positive and not isinstance(value, jax.Array) and not value > 0:
    raise ValueError(f"{name} must be > 0, got {value!r}.")


def clip_logit_scale(log_scale: jax.Array, max_scale: float = MAX_LOGIT_SCALE) -> jax.Array:
  """The logit scale ``exp(min(log_scale, log max_scale))`` of a learnable log-parameter.

  CLIP learns ``t = log(1 / tau)``, initialised to ``log(1 / 0.07)``, and clamps it at
  ``log 100`` (Radford et al. 2021, sec. 2.5). Clamping in the forward pass gives the same
  logits as clamping the parameter after each step, and a zero gradient while clamped.

  Args:
    log_scale: scalar log-parameter.
    max_scale: the largest scale, > 0.

  Returns:
    The float32 scalar scale, in ``(0, max_scale]``.
  """
  if not max_scale > 0:
    raise ValueError(f"max_scale must be > 0, got {max_scale!r}.")
  _check_scalar("log_scale", log_scale)
  log_scale = jnp.asarray(log_scale, jnp.float32)
  return jnp.exp(jnp.minimum(log_scale, math.log(max_scale)))


def _cross_logits(image_emb, text_emb, logit_scale, axis_name):
  """Scaled cosine logits of local images vs global texts and local texts vs global images."""
  img, txt = l2_normalize(image_emb), l2_normalize(text_emb)
  all_img, all_txt = img, txt
  if axis_name is not None:
    all_img = jax.lax.all_gather(img, axis_name, tiled=True)
    all_txt = jax.lax.all_gather(txt, axis_name, tiled=True)
  scale = jnp.asarray(logit_scale, jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  # (n, d) @ (d, N) -> (n, N), both directions.
  image_logits = scale * jnp.einsum("nd,kd->nk", img, all_txt, precision=hi)
  text_logits = scale * jnp.einsum("nd,kd->nk", txt, all_img, precision=hi)
  labels = (jnp.arange(img.shape[0]) + _global_offset(img.shape[0], axis_name)).astype(jnp.int32)
  return image_logits, text_logits, labels


def clip_loss(
  image_emb: jax.Array,
  text_emb: jax.Array,
  logit_scale: jax.Array | float,
  axis_name: str | None = None,
  *,
  return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
  r"""CLIP's symmetric InfoNCE over the N x N image-text similarities of the global batch.

  ``image_emb[i]`` and ``text_emb[i]`` embed the i-th (image, caption) pair. With
  :math:`u_i, v_j` the L2-normalised embeddings and :math:`s` the logit scale,
  :math:`S_{ij} = s\, u_i^\top v_j` and

  .. math::
     L = \frac{1}{2N} \sum_i \Big[-\log \frac{e^{S_{ii}}}{\sum_j e^{S_{ij}}}
                                   -\log \frac{e^{S_{ii}}}{\sum_j e^{S_{ji}}}\Big],

  the image-to-text (rows) and text-to-image (columns) cross entropies averaged. With
  ``axis_name`` every device holds n = N / devices pairs; both sets of embeddings are
  gathered, so each image sees every caption of the global batch and vice versa.

  Args:
    image_emb: (n, d) image embeddings (not necessarily normalised).
    text_emb: (n, d) text embeddings of the same pairs.
    logit_scale: scalar :math:`s > 0` (``clip_logit_scale`` of the learned parameter);
      gradients flow into it.
    axis_name: mapped axis to gather the global batch over, or None.
    return_metrics: also return ``{"image_to_text_accuracy", "text_to_image_accuracy",
      "positive_cosine", "logit_scale"}``.

  Returns:
    The float32 scalar mean loss over the global batch, and the metrics when asked.

  Raises:
    ValueError: if the embeddings are not 2-D of the same shape, or the scale is not a
      positive scalar.

  References:
    Radford et al., "Learning Transferable Visual Models From Natural Language
    Supervision", ICML 2021. https://arxiv.org/abs/2103.00020
  """
  _check_pair(image_emb, text_emb)
  _check_scalar("logit_scale", logit_scale, positive=True)
  image_logits, text_logits, labels = _cross_logits(image_emb, text_emb, logit_scale, axis_name)
  loss = 0.5 * (
    softmax_cross_entropy(image_logits, labels, axis_name)
    + softmax_cross_entropy(text_logits, labels, axis_name)
  )
  if not return_metrics:
    return loss
  image_logits = jax.lax.stop_gradient(image_logits)
  scale = jax.lax.stop_gradient(jnp.asarray(logit_scale, jnp.float32))
  positive = jnp.take_along_axis(image_logits, labels[:, None], axis=-1)[:, 0] / scale
  metrics = {
    "image_to_text_accuracy": positive_accuracy(image_logits, labels, axis_name),
    "text_to_image_accuracy": positive_accuracy(text_logits, labels, axis_name),
    "positive_cosine": _mean_over_batch(positive, axis_name),
    "logit_scale": scale,
  }
  return loss, metrics


def siglip_loss(
  image_emb: jax.Array,
  text_emb: jax.Array,
  logit_scale: jax.Array | float,
  logit_bias: jax.Array | float,
  axis_name: str | None = None,
  *,
  return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
  r"""SigLIP's pairwise sigmoid loss: every image-text pair is its own binary problem.

  With :math:`u_i, v_j` the L2-normalised embeddings, :math:`t` the scale, :math:`b` the
  bias and :math:`z_{ij} = 1` for matching pairs (:math:`i = j`), :math:`-1` otherwise:

  .. math::
     L = -\frac{1}{N} \sum_{i=1}^N \sum_{j=1}^N \log \sigma\big(z_{ij} (t\, u_i^\top v_j + b)\big).

  The paper initialises :math:`t = 10` (log-parameter :math:`\log 10`) and :math:`b = -10`
  so that the many negatives do not dominate the first steps. With ``axis_name`` the text
  embeddings of all devices are gathered (the paper's chunked ring exchange computes the
  same sum without holding them all); the result is the same global value.

  Args:
    image_emb: (n, d) image embeddings.
    text_emb: (n, d) text embeddings of the same pairs.
    logit_scale: scalar :math:`t > 0`.
    logit_bias: scalar :math:`b`.
    axis_name: mapped axis to gather the global batch over, or None.
    return_metrics: also return ``{"image_to_text_accuracy", "positive_cosine",
      "logit_scale", "logit_bias"}``.

  Returns:
    The float32 scalar loss, and the metrics when asked.

  Raises:
    ValueError: on mismatched or non-2-D embeddings, or non-scalar scale or bias.

  References:
    Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023.
    https://arxiv.org/abs/2303.15343
  """
  _check_pair(image_emb, text_emb)
  _check_scalar("logit_scale", logit_scale, positive=True)
  _check_scalar("logit_bias", logit_bias)
  img, txt = l2_normalize(image_emb), l2_normalize(text_emb)
  all_txt = txt if axis_name is None else jax.lax.all_gather(txt, axis_name, tiled=True)
  scale = jnp.asarray(logit_scale, jnp.float32)
  bias = jnp.asarray(logit_bias, jnp.float32)
  # (n, d) @ (d, N) -> (n, N)
  cos = jnp.einsum("nd,kd->nk", img, all_txt, precision=jax.lax.Precision.HIGHEST)
  logits = scale * cos + bias
  labels = (jnp.arange(img.shape[0]) + _global_offset(img.shape[0], axis_name)).astype(jnp.int32)
  signs = jnp.where(jnp.arange(cos.shape[1])[None, :] == labels[:, None], 1.0, -1.0)
  per_image = -jnp.sum(jax.nn.log_sigmoid(signs * logits), axis=-1)
  loss = _mean_over_batch(per_image, axis_name)
  if not return_metrics:
    return loss
  cos = jax.lax.stop_gradient(cos)
  positive = jnp.take_along_axis(cos, labels[:, None], axis=-1)[:, 0]
  metrics = {
    "image_to_text_accuracy": positive_accuracy(cos, labels, axis_name),
    "positive_cosine": _mean_over_batch(positive, axis_name),
    "logit_scale": jax.lax.stop_gradient(scale),
    "logit_bias": jax.lax.stop_gradient(bias),
  }
  return loss, metrics
