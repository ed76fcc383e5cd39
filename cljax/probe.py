"""Online linear probe: a classifier on stop-gradient encoder features, trained during pretraining.

As in SimCLR and BYOL, a linear classifier sits on the encoder output and learns from the
labels of the pretraining batches, so label accuracy is visible while the encoder trains.
Its input is under ``stop_gradient``: the probe never changes the representation, and the
SSL loss plus the probe loss has the same encoder gradient as the SSL loss alone.

Inside the sharded train step (``shard_map`` over ``'data'``)::

    from cljax import probe
    params, opt_state, metrics = probe.probe_update(
        state.probe_params, state.probe_opt_state, features[:n], batch["label"],
        tx=probe_tx, num_classes=10, axis_name="data")

Rows with a label < 0 (unlabelled data, padding) are masked out; a batch with no labels
gives zero loss and gradient.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

ProbeParams = dict[str, jax.Array]


def init_probe_params(rng: jax.Array, feature_dim: int, num_classes: int) -> ProbeParams:
  """A linear classifier ``{"kernel": (d, c), "bias": (c,)}``, float32.

  The kernel starts small and random (std 0.01 / sqrt(d)), the bias at zero: near-uniform
  predictions at step 0, so the first loss is about ``log(num_classes)``.
  """
  if feature_dim < 1 or num_classes < 2:
    raise ValueError(
      f"need feature_dim >= 1 and num_classes >= 2, got {feature_dim}, {num_classes}."
    )
  kernel = jax.random.normal(rng, (feature_dim, num_classes), jnp.float32)
  return {
    "kernel": kernel * (0.01 / jnp.sqrt(feature_dim)),
    "bias": jnp.zeros((num_classes,), jnp.float32),
  }


def create_probe_optimizer(learning_rate: float = 1e-3) -> optax.GradientTransformation:
  """Adam for the probe: insensitive to the feature scale, which changes as the encoder trains."""
  return optax.adam(learning_rate)


def _sum(x: jax.Array, axis_name: str | None) -> jax.Array:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def probe_loss_and_metrics(
  probe_params: ProbeParams,
  features: jax.Array,
  labels: jax.Array,
  num_classes: int,
  axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy of the probe on the labelled rows of the (global) batch.

  Args:
    probe_params: from ``init_probe_params``.
    features: (n, d) encoder features (this device's rows); gradients do not flow into them.
    labels: (n,) integer labels; rows with a label < 0 are ignored.
    num_classes: number of classes; labels >= num_classes raise nothing but are ignored too.
    axis_name: mapped axis of the batch, or None. With it, the loss is the mean over the
      labelled rows of all devices (the same value on each device), so its gradient with
      respect to replicated probe parameters is the global-batch gradient.

  Returns:
    ``(loss, metrics)`` with metrics ``probe_loss``, ``probe_top1`` (accuracy on the batch,
    before this step's update) and ``probe_labelled`` (the global count of labelled rows).

  Raises:
    ValueError: on inconsistent shapes.
  """
  if features.ndim != 2 or labels.shape != features.shape[:1]:
    raise ValueError(
      f"need features (n, d) and labels (n,), got {features.shape} and {labels.shape}."
    )
  if probe_params["kernel"].shape != (features.shape[1], num_classes):
    raise ValueError(
      f"probe kernel has shape {probe_params['kernel'].shape}, expected "
      f"({features.shape[1]}, {num_classes}) for these features and classes."
    )
  x = jax.lax.stop_gradient(features).astype(jnp.float32)
  # Full float32 products, as in the offline linear probe (not bf16 / TF32 on TPU / GPU).
  logits = jnp.matmul(x, probe_params["kernel"], precision=jax.lax.Precision.HIGHEST)
  logits = logits + probe_params["bias"]  # (n, d) @ (d, c) + (c,) -> (n, c)
  valid = (labels >= 0) & (labels < num_classes)
  safe_labels = jnp.where(valid, labels, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
  mask = valid.astype(jnp.float32)
  count = _sum(jnp.sum(mask), axis_name)
  denominator = jnp.maximum(count, 1.0)  # No labelled rows: loss 0, gradient 0.
  loss = _sum(jnp.sum(mask * ce), axis_name) / denominator
  correct = (jnp.argmax(logits, axis=-1) == labels) & valid
  top1 = _sum(jnp.sum(correct.astype(jnp.float32)), axis_name) / denominator
  return loss, {"probe_loss": loss, "probe_top1": top1, "probe_labelled": count}


def probe_update(
  probe_params: ProbeParams,
  opt_state: optax.OptState,
  features: jax.Array,
  labels: jax.Array,
  *,
  tx: optax.GradientTransformation,
  num_classes: int,
  axis_name: str | None = None,
) -> tuple[ProbeParams, Any, dict[str, jax.Array]]:
  """One optimiser step of the probe; pure, for use inside the train step.

  Args:
    probe_params: the probe's parameters (replicated).
    opt_state: ``tx``'s state for them.
    features: (n, d) encoder features of this device's rows.
    labels: (n,) labels, < 0 for unlabelled rows.
    tx: the probe's optimiser, e.g. ``create_probe_optimizer()``.
    num_classes: number of classes.
    axis_name: mapped axis of the batch, or None.

  Returns:
    ``(new_params, new_opt_state, metrics)`` as in ``probe_loss_and_metrics``.
  """
  grad_fn = jax.grad(probe_loss_and_metrics, has_aux=True)
  grads, metrics = grad_fn(probe_params, features, labels, num_classes, axis_name)
  updates, opt_state = tx.update(grads, opt_state, probe_params)
  return optax.apply_updates(probe_params, updates), opt_state, metrics
