"""MoCo v2, ResNet-50 on ImageNet 2012: the paper's 200-epoch recipe.

    python -m cljax.main --config=configs/mocov2_r50.py --workdir=runs/mocov2_r50 \
        --config.data.data_dir=/path/to/tensorflow_datasets

Hardware: one host of 8 GPUs (batch 256, as in the paper); larger batches scale the LR
linearly.

Recipe (Chen, Fan, Girshick, He 2020, "Improved Baselines with Momentum Contrastive
Learning", https://arxiv.org/abs/2003.04297): queue of 65,536 keys, key-encoder momentum
0.999 (constant), InfoNCE with T = 0.2, 2-layer MLP head to 128-d, SGD lr 0.03 x B/256,
momentum 0.9, weight decay 1e-4, cosine schedule, 200 epochs; augmentation: crop area
0.2-1, colour jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale 0.2, Gaussian blur 0.5,
flip, no solarisation. The head is MoCo v2's: Dense-ReLU-Dense with biases, no
BatchNorm. Departure: the encoder's BatchNorm is global across devices rather than
shuffled (see cljax/methods/momentum.py for why).

Expected result: 67.5% ImageNet linear-probe top-1 after 200 epochs (71.1% after 800),
Table 2 of the paper.

Runs started before 2026-11-27 used a head with BatchNorm; resume or evaluate them with
``--config.head.hidden_norm=bn --config.head.output_norm=bn``.
"""

from cljax import defaults

common = defaults.load_sibling(__file__, "common/imagenet.py")


def get_config():
  c = common.imagenet(defaults.base_config(), global_batch_size=256, checkpoint_every_steps=5000)
  c.method = "moco_v2"
  c.head.hidden_norm = "none"  # MoCo v2's MLP head has no BatchNorm.
  c.head.output_norm = "none"
  c.ema.base = 0.999
  c.ema.schedule = "constant"
  c.loss.temperature = 0.2

  c.optim.name = "sgd"
  c.optim.base_lr = 0.03
  c.optim.lr_scaling = "linear"
  c.optim.decay_mask = "all"  # torch SGD(model.parameters(), weight_decay=...).
  c.optim.weight_decay = 1e-4
  c.optim.warmup_epochs = 0.0

  c.data.augment.crop_area_min = 0.2
  c.data.augment.color_strength = 0.5  # (0.4, 0.4, 0.4, 0.1).
  c.train.num_epochs = 200
  return c
