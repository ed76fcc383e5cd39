"""Pure self-supervised losses on embeddings: contrastive, distillation and regularisers.

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
from cljax.losses.barlow import barlow_twins_loss
from cljax.losses.blockwise import info_nce_blockwise, nt_xent_blockwise
from cljax.losses.clip import clip_logit_scale, clip_loss, siglip_loss
from cljax.losses.contrastive import (
  contrastive_logits,
  info_nce,
  nt_xent,
  nt_xent_logits,
  positive_accuracy,
  softmax_cross_entropy,
)
from cljax.losses.debiased import debiased_nt_xent, decoupled_nt_xent, hard_negative_nt_xent
from cljax.losses.dino import dino_center_update, dino_loss, teacher_temperature_schedule
from cljax.losses.dinov2 import (
  dinov2_loss,
  ibot_masked_patch_loss,
  ibot_patch_loss,
  koleo_loss,
  sinkhorn_knopp_teacher,
)
from cljax.losses.moco import moco_v2_loss, moco_v3_loss
from cljax.losses.regression import byol_loss, simsiam_loss
from cljax.losses.schedules import cosine_ramp, ema_update
from cljax.losses.supcon import supcon_loss
from cljax.losses.swav import sinkhorn, swav_loss
from cljax.losses.ts2vec import (
  hierarchical_contrastive_loss,
  instance_contrastive_loss,
  temporal_contrastive_loss,
)

__all__ = [
  "barlow_twins_loss",
  "byol_loss",
  "clip_logit_scale",
  "clip_loss",
  "contrastive_logits",
  "cosine_ramp",
  "debiased_nt_xent",
  "decoupled_nt_xent",
  "dino_center_update",
  "dino_loss",
  "dinov2_loss",
  "ema_update",
  "hard_negative_nt_xent",
  "hierarchical_contrastive_loss",
  "ibot_masked_patch_loss",
  "ibot_patch_loss",
  "info_nce",
  "info_nce_blockwise",
  "instance_contrastive_loss",
  "koleo_loss",
  "l2_normalize",
  "moco_v2_loss",
  "moco_v3_loss",
  "nt_xent",
  "nt_xent_blockwise",
  "nt_xent_logits",
  "positive_accuracy",
  "siglip_loss",
  "simsiam_loss",
  "sinkhorn",
  "sinkhorn_knopp_teacher",
  "softmax_cross_entropy",
  "supcon_loss",
  "swav_loss",
  "teacher_temperature_schedule",
  "temporal_contrastive_loss",
]
