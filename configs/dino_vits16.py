"""DINO, ViT-S/16 on ImageNet 2012: the paper's multi-crop recipe for 300 epochs.

    python -m cljax.main --config=configs/dino_vits16.py --workdir=runs/dino_vits16 \
        --config.data.data_dir=/path/to/tensorflow_datasets

Hardware: the paper's 16 GPUs (two 8-GPU hosts, batch 1024 = 64 images per GPU,
each 2 x 224 px + 10 x 96 px crops); about 3 days on 16 V100s for 300 epochs
(paper Table 8: 72.6 h). On fewer accelerators lower data.global_batch_size (the
LR follows linearly) or raise train.grad_chunks.

Data: tfds ``imagenet2012`` prepared as ArrayRecord in data_dir (see README).

Recipe (Caron et al. 2021, Sec. 4 "Implementation details", and the official
``main_dino.py``): 2 global crops of 224 px from area (0.4, 1) and 10 local
crops of 96 px from area (0.05, 0.4) (the paper's 2x224 + 10x96; the official
code defaults to 8 local crops); head 2048 -> 2048 -> 256 -> 65,536
prototypes; student temperature 0.1, teacher 0.04 -> 0.07 linearly over the
first 30 epochs, centre momentum 0.9; teacher EMA 0.996 -> 1 (cosine); last
layer frozen during the first epoch; AdamW, lr 0.0005 x B/256 (0.002 at
1024) after a 10-epoch linear warm-up, then cosine, weight decay 0.04 -> 0.4 by a
half cosine over the run; BYOL's augmentations.

Differences from the official run, all from what cljax offers:
- no gradient clipping (official 3.0) and no stochastic depth (official drop
  path 0.1 for ViT-S); the LR decays to 0 (official 1e-6);
- sin-cos 2-D position embeddings (fixed) instead of learned ones, so the same
  ViT takes 224 and 96 px crops without interpolation;
- ``norm_last_layer=True`` (the official default); the README's 300-epoch
  "boosted" run uses False, which it calls safe only for ViT-S and which is
  less stable without gradient clipping;
- colour jitter is SimCLR's at strength 0.5 (brightness, contrast and
  saturation 0.4, hue 0.1; DINO's saturation is 0.2).

Expected result: ImageNet linear 76.1% after 300 epochs with 2x224 + 10x96
crops (paper Table 8); the official README's 300-epoch run (8 local crops,
norm_last_layer False) reports 73.3% k-NN and 76.1% linear. The paper's
headline ViT-S/16 figures, k-NN 74.5% and linear 77.0% (Table 2, the released
checkpoint), come from a longer run: 800 epochs with crop areas (0.25, 1) and
(0.05, 0.25) per its released ``args.txt`` (as quoted by lightly's DINO
example); this 300-epoch recipe should not be held to them.
"""

from cljax import defaults


def get_config():
  c = defaults.base_config()
  c.method = "dino"
  c.model.name = "vit"
  c.model.variant = "S/16"
  c.model.posemb = "sincos2d"  # Global and local crops share it.
  c.model.dtype = "bfloat16"

  c.dino.out_dim = 65536
  c.dino.hidden_dim = 2048
  c.dino.bottleneck_dim = 256
  c.dino.norm_last_layer = True
  c.dino.student_temperature = 0.1
  c.dino.warmup_teacher_temperature = 0.04
  c.dino.teacher_temperature = 0.07
  c.dino.warmup_teacher_temperature_epochs = 30.0
  c.dino.center_momentum = 0.9
  c.dino.freeze_last_layer_epochs = 1.0
  c.ema.base = 0.996
  c.ema.final = 1.0
  c.ema.schedule = "cosine"

  c.optim.name = "adamw"
  c.optim.base_lr = 0.0005  # x 1024 / 256 = 0.002
  c.optim.lr_scaling = "linear"
  c.optim.weight_decay = 0.04
  c.optim.weight_decay_end = 0.4  # The official half cosine over the run.
  c.optim.warmup_epochs = 10.0

  c.data.source = "tfds"
  c.data.name = "imagenet2012"
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.image_size = 224
  c.data.global_batch_size = 1024
  c.data.num_workers = 16
  c.data.augment.crop_area_min = 0.4
  c.data.augment.crop_area_max = 1.0
  c.data.augment.num_local_crops = 10
  c.data.augment.local_crop_size = 96
  c.data.augment.local_crop_area_min = 0.05
  c.data.augment.local_crop_area_max = 0.4
  # BYOL's asymmetric pair: blur 1.0 / 0.1, solarize 0.0 / 0.2.
  c.data.augment.color_strength = 0.5
  c.data.augment.blur_prob = 1.0
  c.data.augment.blur_prob_b = 0.1
  c.data.augment.solarize_prob = 0.0
  c.data.augment.solarize_prob_b = 0.2
  c.data.augment.blur_prob_local = 0.5  # The local crops' (the official code).

  c.train.num_epochs = 300
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 2500
  # kNN over 1.28M train features is an evaluation job of its own.
  c.evals.knn_at_end = False
  return c
