"""Pure contrastive losses on embeddings: InfoNCE and SimCLR's NT-Xent.

Every function takes arrays and returns arrays; nothing here imports Flax,
grain, tensorflow-datasets or orbax, so other JAX projects can use it as is:

    from cljax import losses
    loss = losses.nt_xent(z_a, z_b, temperature=0.1)

With ``axis_name=None`` a function computes over the arrays it is given. With
``axis_name`` set it is meant to run inside ``jax.shard_map`` (or ``pmap``)
over that axis: the local key set is all-gathered so every query sees the
negatives of the whole global batch, positive indices are offset by the
device's position, the returned loss is the mean over the global batch, and
gradients flow back through the gather (its transpose is a reduce-scatter).
The ``*_blockwise`` variants give the same values and gradients while never
holding the (local x global) logits; see docs/loss_memory.md.
"""

from cljax.losses._common import l2_normalize
from cljax.losses.blockwise import info_nce_blockwise, nt_xent_blockwise
from cljax.losses.contrastive import (
  contrastive_logits,
  info_nce,
  nt_xent,
  nt_xent_logits,
  positive_accuracy,
  softmax_cross_entropy,
)
from cljax.losses.dino import dino_center_update, dino_loss, teacher_temperature_schedule
from cljax.losses.moco import moco_v2_loss, moco_v3_loss
from cljax.losses.regression import byol_loss, simsiam_loss
from cljax.losses.schedules import cosine_ramp, ema_update

__all__ = [
  "byol_loss",
  "cosine_ramp",
  "dino_center_update",
  "dino_loss",
  "ema_update",
  "moco_v2_loss",
  "moco_v3_loss",
  "simsiam_loss",
  "teacher_temperature_schedule",
  "contrastive_logits",
  "info_nce",
  "info_nce_blockwise",
  "l2_normalize",
  "nt_xent",
  "nt_xent_blockwise",
  "nt_xent_logits",
  "positive_accuracy",
  "softmax_cross_entropy",
]
