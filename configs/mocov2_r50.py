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


def get_config():
  c = defaults.base_config()
  c.method = "moco_v2"
  c.model.depth = 50
  c.model.stem = "imagenet"
  c.model.dtype = "bfloat16"
  c.head.num_layers = 2
  c.head.hidden_dim = 2048
  c.head.output_dim = 128
  c.head.hidden_norm = "none"  # MoCo v2's MLP head has no BatchNorm.
  c.head.output_norm = "none"
  c.moco.queue_size = 65536
  c.ema.base = 0.999
  c.ema.schedule = "constant"
  c.loss.temperature = 0.2

  c.optim.name = "sgd"
  c.optim.base_lr = 0.03
  c.optim.lr_scaling = "linear"
  c.optim.weight_decay = 1e-4
  c.optim.momentum = 0.9
  c.optim.warmup_epochs = 0.0

  c.data.source = "tfds"
  c.data.name = "imagenet2012"
  c.data.image_size = 224
  c.data.global_batch_size = 256
  c.data.num_workers = 16
  c.data.augment.crop_area_min = 0.2
  c.data.augment.color_strength = 0.5  # (0.4, 0.4, 0.4, 0.1).
  c.data.augment.blur_prob = 0.5
  c.data.augment.solarize_prob = 0.0

  c.train.num_epochs = 200
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 5000
  c.evals.knn_at_end = False
  return c
