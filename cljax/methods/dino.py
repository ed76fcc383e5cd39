"""DINO (Caron et al. 2021): self-distillation of a momentum teacher into a multi-crop student.

The student is the online network: an encoder and the DINO head (a 3-layer
GELU MLP to a bottleneck, l2-normalisation, and a weight-normalised linear
layer to ``dino.out_dim`` prototypes). The teacher has the same architecture;
its parameters (the full tree, head included) are an exponential moving
average of the student's, kept in the method state with the centre of its
outputs. The teacher sees the two global crops of each image, the student
those and the low-resolution local crops; the loss is the cross-entropy
between the centred, sharpened teacher distribution of one global crop and
the student's distribution of every other crop (``losses.dino_loss``).

One step, as the train step runs it inside ``shard_map`` over ``'data'``:

1. student forward on the 2n global crops, then (multi-crop) a second forward
   on the L n local crops: the shapes differ, so the encoder runs once per
   resolution like the official ``MultiCropWrapper``. With a ResNet encoder the
   BatchNorm running statistics are updated by the global forward, then by the
   local one; each forward normalises with the global batch's statistics of
   its own crops.
2. teacher forward on the 2n global crops only (no gradient).
3. ``dino_loss`` with the student temperature, the teacher temperature of the
   step (linear warm-up, ``losses.teacher_temperature_schedule``) and the
   centre before the step.
4. after the optimiser step: teacher <- decay * teacher + (1 - decay) * student
   (the new student parameters; ``ema.base`` cosine-ramped to ``ema.final``),
   the teacher's BatchNorm statistics from step 2, and
   centre <- m * centre + (1 - m) * mean of the teacher's global-crop logits
   over the global batch.

The last layer (the prototypes) is frozen for the first
``dino.freeze_last_layer_epochs``. The official code sets its ``grad`` to None
(``cancel_gradients_last_layer``), so PyTorch's AdamW skips it: no update, no
weight decay, and its Adam state starts at step 1 when the freeze ends. Here
the optimiser does the same (:meth:`DINO.create_optimizer`,
``optim.freeze_for_steps``): the last layer has an AdamW state of its own,
left untouched while frozen. A zero gradient instead (``stop_gradient``) would
leave its moments at zero while the shared step count runs on, and its first
updates after the freeze would be several times a fresh Adam's.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import PartitionSpec

from cljax import losses, models, optim
from cljax.methods.base import Method, StepOutput, copy_tree, ema_config, ema_decay


def last_layer_mask(params: Any) -> Any:
  """True for the parameters of the DINO head's last layer (the official ``"last_layer" in
  name``), False elsewhere."""
  in_last = lambda path, _: any(getattr(e, "key", None) == "last_layer" for e in path)
  return jax.tree_util.tree_map_with_path(in_last, params)


class WeightNormDense(nn.Module):
  """A bias-free linear layer with weight normalisation: ``y = x (g * v / ||v||)``.

  The norm is over each output unit's column of the ``(in, out)`` kernel ``v``
  (PyTorch's ``weight_norm(nn.Linear(...), dim=0)``). With ``fixed_norm`` the
  gain ``g`` is 1 and not a parameter (DINO's ``norm_last_layer``: every
  prototype is a unit vector); otherwise ``g`` is the parameter ``scale``,
  initialised to 1 as in DINO (the name keeps it out of weight decay).
  """

  features: int
  fixed_norm: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # PyTorch's default nn.Linear init, uniform in +-1/sqrt(fan_in); only the
    # direction matters after the normalisation.
    init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    kernel = self.param("kernel", init, (x.shape[-1], self.features), jnp.float32)
    scale = None if self.fixed_norm else self.param("scale", nn.initializers.ones, (self.features,))
    w = losses.l2_normalize(kernel, axis=0)
    if scale is not None:
      w = w * scale[None, :]
    return jnp.dot(x.astype(jnp.float32), w)


class DINOHead(nn.Module):
  """DINO's projection head: MLP -> l2-normalise -> weight-normalised prototypes.

  ``num_layers - 1`` Dense -> GELU (exact) layers of width ``hidden_dim``, a
  Dense to ``bottleneck_dim``, l2-normalisation, and a bias-free
  :class:`WeightNormDense` to ``out_dim`` whose columns are unit vectors when
  ``norm_last_layer``. No BatchNorm (the official ``use_bn=False``). MLP
  weights are truncated-normal with std 0.02, biases zero, as in the official
  ``DINOHead``. The MLP computes in ``dtype``; the normalisation and the last
  layer in float32.

  Returns:
    ``(z, logits)``: the (m, bottleneck_dim) float32 unit embeddings and the
    (m, out_dim) float32 prototype scores.
  """

  out_dim: int = 65536
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3
  norm_last_layer: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    if self.num_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {self.num_layers}.")
    dense = functools.partial(
      nn.Dense,
      dtype=self.dtype,
      kernel_init=nn.initializers.truncated_normal(0.02),
      bias_init=nn.initializers.zeros,
    )
    for i in range(self.num_layers - 1):
      x = nn.gelu(dense(self.hidden_dim, name=f"mlp_{i}")(x), approximate=False)
    x = dense(self.bottleneck_dim, name=f"mlp_{self.num_layers - 1}")(x)
    z = losses.l2_normalize(x)
    last = WeightNormDense(self.out_dim, fixed_norm=self.norm_last_layer, name="last_layer")
    return z, last(z)


class DINOModel(nn.Module):
  """An encoder and the DINO head; ``apply`` returns ``(features, logits)``.

  With ``return_embeddings=True`` it returns ``(features, z, logits)``, ``z``
  the head's l2-normalised bottleneck embeddings.
  """

  encoder: nn.Module
  head: DINOHead

  def __call__(
    self,
    x: jax.Array,
    train: bool = True,
    return_embeddings: bool = False,
  ):
    features = self.encoder(x, train=train)
    z, logits = self.head(features)
    if return_embeddings:
      return features, z, logits
    return features, logits


class DINO(Method):
  """Self-distillation with no labels: a multi-crop student matches an EMA teacher.

  Method state ``{"teacher_params", "teacher_batch_stats", "center"}``, all
  replicated: the teacher is the full student tree (encoder and head), its
  BatchNorm statistics (empty for a ViT) and the (out_dim,) centre, zero at
  the start as in the official code.

  Schedules in epochs need ``steps_per_epoch``: the teacher temperature rises
  linearly from ``dino.warmup_teacher_temperature`` to
  ``dino.teacher_temperature`` over ``warmup_teacher_temperature_epochs *
  steps_per_epoch`` steps (per step; the official schedule changes per
  epoch), and the last layer is frozen for the first ``ceil(
  freeze_last_layer_epochs * steps_per_epoch)`` optimiser updates. With ``steps_per_epoch=0``
  (unknown) the temperature stays at its warm-up start and nothing is frozen
  (a freeze of unknown length could only last forever).

  ``StepOutput.features`` are the student's encoder features of the 2 global
  crops (for the online probe); ``embeddings`` and ``pairs`` the student's
  l2-normalised bottleneck embeddings (``dino.bottleneck_dim``) of the two
  global crops, for ``embedding_std`` and the collapse metrics (the logits
  have ``out_dim`` = 65,536 columns, too many for a covariance).

  Metrics: ``teacher_temperature``, ``ema_decay``, ``last_layer_frozen`` (1
  while the optimiser holds the last layer), and from the loss
  ``teacher_entropy``, ``student_entropy`` and ``kl`` (loss minus teacher
  entropy): the paper's Sec. 5.3 diagnostics,
  a teacher entropy near 0 with a KL near 0 is collapse to one prototype,
  near log(out_dim) to the uniform distribution.

  References:
    Caron et al., "Emerging Properties in Self-Supervised Vision
    Transformers", ICCV 2021. https://arxiv.org/abs/2104.14294
  """

  name = "dino"

  @classmethod
  def config_sections(cls) -> dict[str, ml_collections.ConfigDict]:
    """``ema`` (the teacher) and ``dino``: the official ViT-S/16 defaults (Caron et al. 2021)."""
    c = ml_collections.ConfigDict()
    c.out_dim = 65536  # Prototypes of the DINO head.
    c.hidden_dim = 2048
    c.bottleneck_dim = 256
    c.norm_last_layer = True  # Weight-normalised last layer with its norm fixed at 1.
    c.student_temperature = 0.1
    c.teacher_temperature = 0.04  # Final teacher temperature.
    c.warmup_teacher_temperature = 0.04
    c.warmup_teacher_temperature_epochs = 0.0
    c.center_momentum = 0.9
    c.freeze_last_layer_epochs = 1.0  # The last layer's gradient is zeroed this long.
    return {"ema": ema_config(), "dino": c}

  # ---- The model and the method's state.

  eval_network = "teacher"
  mirrors_params = ("teacher_params",)

  def eval_variables(self, state: Any) -> dict:
    """The teacher's: DINO's paper evaluates it (kNN and linear), as it is the better network
    through training (Caron et al. 2021, section 5.1). Before the first step the two are the
    same."""
    ms = state.method_state
    return {"params": ms["teacher_params"], "batch_stats": ms["teacher_batch_stats"]}

  def create_model(self, bn_axis_name: str | None = None) -> DINOModel:
    config = self.config
    head = DINOHead(
      out_dim=config.dino.out_dim,
      hidden_dim=config.dino.hidden_dim,
      bottleneck_dim=config.dino.bottleneck_dim,
      norm_last_layer=bool(config.dino.norm_last_layer),
      dtype=models.dtype_from_name(config.model.dtype),
    )
    return DINOModel(encoder=models.create_encoder(config.model, bn_axis_name), head=head)

  def init_variables(self, rng: jax.Array, input_shape: tuple[int, ...]) -> dict:
    model = self.create_model()
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(rng, jnp.zeros((2, *input_shape), jnp.float32))
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

  def init_state(self, rng: jax.Array, variables: dict) -> Any:
    del rng
    return {
      "teacher_params": copy_tree(variables["params"]),
      "teacher_batch_stats": copy_tree(variables["batch_stats"]),
      "center": jnp.zeros((self.config.dino.out_dim,), jnp.float32),
    }

  def state_specs(self) -> Any:
    return PartitionSpec()

  # ---- Schedules.

  def decay(self, step: jax.Array) -> jax.Array:
    """The teacher's EMA decay at ``step`` (``ema`` section; DINO: 0.996 cosine to 1)."""
    return ema_decay(self.config, step, self.num_steps)

  def teacher_temperature(self, step: jax.Array) -> jax.Array:
    """The teacher temperature at ``step``: the linear warm-up, then constant."""
    cfg = self.config.dino
    if cfg.warmup_teacher_temperature_epochs > 0 and self.steps_per_epoch <= 0:
      return jnp.asarray(cfg.warmup_teacher_temperature, jnp.float32)
    warmup_steps = int(round(cfg.warmup_teacher_temperature_epochs * self.steps_per_epoch))
    return losses.teacher_temperature_schedule(
      step,
      warmup_start=cfg.warmup_teacher_temperature,
      final=cfg.teacher_temperature,
      warmup_steps=warmup_steps,
    )

  @property
  def freeze_steps(self) -> int:
    """How many first steps the last layer is frozen for (0 without ``steps_per_epoch``)."""
    epochs = self.config.dino.freeze_last_layer_epochs
    return max(math.ceil(epochs * self.steps_per_epoch), 0)

  def last_layer_frozen(self, step: jax.Array) -> bool | jax.Array:
    """Whether the optimiser holds the last layer at ``step`` (its count of applied updates)."""
    return step < self.freeze_steps if self.freeze_steps > 0 else False

  def create_optimizer(self, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
    """The config's optimiser, with the head's last layer frozen for ``freeze_steps`` updates
    as if it had no gradient (the official ``cancel_gradients_last_layer``)."""
    frozen = self.config.dino.freeze_last_layer_epochs > 0
    return optim.create_optimizer(
      self.config.optim,
      learning_rate_fn,
      self.num_steps,
      freeze_mask=last_layer_mask if frozen else None,
      freeze_steps=self.freeze_steps,
    )

  # ---- One step.

  def teacher_forward(self, state: Any, x: jax.Array) -> tuple[jax.Array, Any]:
    """The teacher's logits of ``x`` (no gradient) and its new BatchNorm statistics."""
    ms = state.method_state
    _, logits, stats = self.forward(
      state.apply_fn, ms["teacher_params"], ms["teacher_batch_stats"], x
    )
    return jax.lax.stop_gradient(logits), stats

  def loss(self, params: Any, state: Any, views: dict, batch: dict) -> tuple[jax.Array, StepOutput]:
    cfg = self.config.dino
    x = views["global"]
    n = x.shape[0] // 2
    # The optimiser's clock: with skipped non-finite steps it lags state.step.
    frozen = self.last_layer_frozen(optim.applied_count(state.opt_state))
    student = functools.partial(self.forward, state.apply_fn, params, return_embeddings=True)
    h, z, logits, stats = student(state.batch_stats, x)
    student_logits = [logits.reshape(2, n, -1)]
    if "local" in views:
      # A second forward at the local resolution; BatchNorm statistics continue from the first.
      _, _, local_logits, stats = student(stats, views["local"])
      student_logits.append(local_logits.reshape(-1, n, local_logits.shape[-1]))
    teacher_logits, teacher_stats = self.teacher_forward(state, x)
    teacher_logits = teacher_logits.reshape(2, n, -1)
    temperature = self.teacher_temperature(state.step)
    loss, metrics = losses.dino_loss(
      jnp.concatenate(student_logits),
      teacher_logits,
      state.method_state["center"],
      student_temperature=cfg.student_temperature,
      teacher_temperature=temperature,
      axis_name=self.axis_name,
      return_metrics=True,
    )
    metrics.update(
      teacher_temperature=temperature,
      ema_decay=self.decay(state.step),
      last_layer_frozen=jnp.asarray(frozen, jnp.float32),
    )
    extra = {"teacher_batch_stats": teacher_stats, "teacher_logits": teacher_logits}
    return loss, StepOutput(stats, metrics, z, h, pairs=(z[:n], z[n:]), extra=extra)

  def update_state(self, state: Any, params: Any, out: StepOutput) -> Any:
    ms = state.method_state
    return {
      "teacher_params": losses.ema_update(ms["teacher_params"], params, self.decay(state.step)),
      "teacher_batch_stats": out.extra["teacher_batch_stats"],
      "center": losses.dino_center_update(
        ms["center"],
        out.extra["teacher_logits"],
        self.config.dino.center_momentum,
        axis_name=self.axis_name,
      ),
    }
