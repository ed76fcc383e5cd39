"""DINOv2, ViT-L/14 on ImageNet 2012: the official ImageNet-1k recipe (its default config).

    python -m cljax.main --config=configs/dinov2_vitl14.py --workdir=runs/dinov2_vitl14 \\
        --config.data.data_dir=/path/to/tensorflow_datasets

Recipe: ``dinov2/configs/ssl_default_config.yaml`` of facebookresearch/dinov2, the
configuration its README trains on ImageNet-1k ("fast setup", ``vitl16_short.yaml``), at
patch 14 (the released models' size) instead of 16:
- ViT-L (width 1024, 24 blocks, 16 heads, MLP FFN), LayerScale 1e-5, stochastic depth
  0.3 on every block, learned position embeddings for 224 px, interpolated for the local
  crops;
- 2 global crops of 224 px from area (0.32, 1) and 8 local crops of 98 px (7 x 7 patches)
  from (0.05, 0.32), DINO's photometric augmentations;
- DINO head 2048 -> 2048 -> 256 -> 65,536 prototypes shared with iBOT; iBOT masks on half
  the global crops (ratio 0.1-0.5); KoLeo 0.1; running-mean centring (momentum 0.9);
- teacher EMA 0.992 -> 1 (cosine); teacher temperature 0.04 -> 0.07 over the first 30
  official epochs; last layer at learning rate 0 for the first official epoch;
- AdamW (0.9, 0.999), base learning rate 0.004 x sqrt(B / 1024) after 10 official epochs
  of warm-up, then cosine; weight decay 0.04 -> 0.4 (cosine) on all but biases, norms and
  LayerScale; layer-wise learning-rate decay 0.9 and patch embedding x 0.2; each module's
  gradient clipped to norm 3.0.

The official "epoch" is 1,250 iterations (``OFFICIAL_EPOCH_LENGTH``) whatever the data set:
100 of them at the README's batch of 2,048 (32 GPUs x 64) are 125,000 steps, 200 ImageNet
epochs. At that batch one official epoch is two ImageNet epochs, so every schedule below is
the official one counted in ImageNet epochs (x 2).

Hardware: the README's 32 A100-80GB GPUs (4 nodes) for about a day; on fewer accelerators
lower data.global_batch_size (the learning rate follows sqrt(B / 1024)) or shard the state
(``--config.mesh.state_sharding=fsdp``). Expected result: the README reports 81.6% k-NN and
82.9% linear ImageNet top-1 for this recipe at patch 16; patch 14 sees 31% more tokens and
should do at least as well. Not run here (no accelerator was available).

Departures from the official code: docs/fidelity.md, "DINOv2".
"""

from cljax import defaults

augment = defaults.load_sibling(__file__, "common/augment.py")
common = defaults.load_sibling(__file__, "common/imagenet.py")

# ImageNet epochs per official epoch (1,250 steps) at batch 2,048: 1,250 x 2,048 / 1,281,167.
OFFICIAL_EPOCH = 2.0


def get_config():
  c = common.imagenet(defaults.base_config(), global_batch_size=2048)
  c.method = "dinov2"
  c.model.name = "vit_dinov2"
  c.model.variant = "L/14"
  c.model.img_size = 224
  c.model.drop_path_rate = 0.3
  c.model.layerscale = 1e-5
  d = c.dinov2
  d.centering = "centering"
  d.warmup_teacher_temperature_epochs = 30 * OFFICIAL_EPOCH
  d.freeze_last_layer_epochs = 1 * OFFICIAL_EPOCH
  c.ema.base = 0.992

  c.optim.name = "adamw"
  c.optim.base_lr = 0.004
  c.optim.lr_scaling = "sqrt_wrt_1024"
  c.optim.decay_mask = "dinov2"
  c.optim.weight_decay = 0.04
  c.optim.weight_decay_end = 0.4
  c.optim.warmup_epochs = 10 * OFFICIAL_EPOCH

  a = c.data.augment
  a.crop_area_min = 0.32
  a.num_local_crops = 8
  a.local_crop_size = 98  # 7 x 7 patches of 14 (the official 96 at patch 16).
  a.local_crop_area_max = 0.32
  augment.byol_views(c)
  a.blur_prob_local = 0.5
  c.train.num_epochs = int(100 * OFFICIAL_EPOCH)
  return c
