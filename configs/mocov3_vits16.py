"""MoCo v3, ViT-S/16 on ImageNet 2012: the paper's 300-epoch recipe.

    python -m cljax.main --config=configs/mocov3_vits16.py --workdir=runs/mocov3_vits16 \
        --config.data.data_dir=/path/to/tensorflow_datasets

Hardware: a TPU v3-64/v4-64 pod slice or 8 hosts of 8 GPUs (global batch 4096); smaller
batches scale the LR linearly.

Recipe (Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers", https://arxiv.org/abs/2104.02057, Sec. 4 and appendix): ViT-S/16 with fixed
2-D sin-cos position embeddings and a frozen random patch projection (Sec. 5), 3-layer
projector 4096-4096-256 and 2-layer predictor 4096-256, both with BatchNorm (the outputs'
BatchNorm included), symmetric InfoNCE over the in-batch keys of the whole global batch
with T = 0.2 (no queue), key-encoder momentum 0.99 cosine-ramped to 1, AdamW lr 1.5e-4 x
B/256, weight decay 0.1, 40 warm-up epochs then cosine, 300 epochs; BYOL's asymmetric
augmentation (blur 1.0 / 0.1, solarize 0.0 / 0.2).

Expected result: 73.2% ImageNet linear-probe top-1 for ViT-S/16 after 300 epochs (76.7%
for ViT-B/16 with --config.model.variant=B/16), Table 1 of the paper.
"""

from cljax import defaults

augment = defaults.load_sibling(__file__, "common/augment.py")
common = defaults.load_sibling(__file__, "common/imagenet.py")


def get_config():
  c = common.imagenet(defaults.base_config(), global_batch_size=4096)
  c.method = "moco_v3"
  c.model.name = "vit"
  c.model.freeze_patch_embed = True
  c.head.num_layers = 3
  c.head.hidden_dim = 4096
  c.head.output_dim = 256
  c.predictor.num_layers = 2
  # The official _build_mlp ends projector and predictor in BatchNorm1d(affine=False).
  c.head.output_norm = "bn_no_affine"
  c.predictor.output_norm = "bn_no_affine"
  c.ema.base = 0.99
  c.loss.temperature = 0.2

  c.optim.name = "adamw"
  c.optim.base_lr = 1.5e-4
  c.optim.lr_scaling = "linear"
  c.optim.decay_mask = "all"  # MoCo v3: AdamW(model.parameters(), weight_decay=...).
  c.optim.weight_decay = 0.1
  c.optim.warmup_epochs = 40.0

  augment.byol_views(c)
  c.train.num_epochs = 300
  return c
