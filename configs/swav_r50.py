"""SwAV, ResNet-50 on ImageNet 2012 with multi-crop: the paper's 800-epoch recipe.

    python -m cljax.main --config=configs/swav_r50.py --workdir=runs/swav_r50 \
        --config.data.data_dir=/path/to/tensorflow_datasets

Hardware: the paper trains on 64 V100s (batch 64 per GPU); here a TPU v3-32/v4-32 pod
slice or 4-8 hosts of 8 GPUs for the global batch of 4096. Each image gives 2 crops at 224
and 6 at 96 px: about 2 + 6 x (96/224)^2 = 3.1 crops' worth of compute.

Recipe (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", https://arxiv.org/abs/2006.09882, and ``scripts/swav_800ep_pretrain.sh`` of
the official code): multi-crop 2 x 224 (14-100% of the area) + 6 x 96 (5-14%), projection
head 2048-128 (BatchNorm in the hidden layer, none at the output) and 3000 prototypes,
temperature 0.1, Sinkhorn epsilon 0.05 with 3 iterations over the global batch, codes from
the two 224 crops; prototypes frozen for the first epoch (313 iterations), no queue at this
batch size; LARS (trust coefficient 1e-3) lr 4.8 (0.3 x B/256) with 10 warm-up epochs then
cosine, weight decay 1e-6, batch 4096; colour jitter strength 1.0 (p = 0.8), grayscale 0.2,
blur p = 0.5 on every crop. For batch 256 the official scripts add a 3840-row queue from
epoch 15: ``--config.swav.queue_size=3840/D`` (rows per device) with
``--config.data.global_batch_size=256``.

Departures: the cosine decays to 0 (the official to 0.0048) and the warm-up starts at 0
(official 0.3); optax's trust ratio ``eta ||w|| / ||g + wd w||`` stands for LARC's
``eta ||w|| / (||g|| + wd ||w||)`` (docs/fidelity.md).

Expected result: 75.3% ImageNet linear-probe top-1 after 800 epochs (paper Table 1; 72.1%
after 100 epochs).
"""

from cljax import defaults

common = defaults.load_sibling(__file__, "common/imagenet.py")


def get_config():
  c = common.imagenet(defaults.base_config(), global_batch_size=4096)
  c.method = "swav"
  c.head.output_norm = "none"

  c.optim.base_lr = 0.3  # x 4096 / 256 = 4.8
  c.optim.lr_scaling = "linear"
  c.optim.decay_mask = "all"  # LARC(SGD): every parameter decayed and trust-scaled.
  c.optim.lars_order = "momentum_then_lr"  # LARC scales the gradient; SGD: p -= lr buf.

  c.data.augment.crop_area_min = 0.14
  c.data.augment.num_local_crops = 6
  c.data.augment.local_crop_area_max = 0.14
  c.train.num_epochs = 800
  return c
