"""Barlow Twins, ResNet-50 on ImageNet 2012: the paper's 1000-epoch recipe.

    python -m cljax.main --config=configs/barlow_twins_r50.py --workdir=runs/barlow_r50 \
        --config.data.data_dir=/path/to/tensorflow_datasets

Hardware: the paper trains on 32 V100s (about 124 hours); here a TPU v3-32/v4-32 pod slice
or 4 hosts of 8 GPUs for the global batch of 2048. The 8192-d projector's cross-correlation
is summed over devices (a (8192, 8192) all-reduce per step).

Recipe (Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction", https://arxiv.org/abs/2103.03230, Sec. 4 and the official code): projector
8192-8192-8192 (Linear-BN-ReLU twice, then Linear; the loss standardises the output itself,
so ``head.output_norm="none"``), lambda = 5e-3, LARS with biases and BatchNorm parameters
excluded from weight decay and adaptation, weight decay 1.5e-6, batch 2048, 10 warm-up
epochs then cosine, 1000 epochs; BYOL's asymmetric augmentation (blur p = 1.0 / 0.1,
solarize p = 0.0 / 0.2, colour jitter p = 0.8, grayscale 0.2).

Learning rates: the paper's 0.2 x B/256 = 1.6 for weights and 0.0048 x B/256 = 0.0384 for
biases and BatchNorm parameters. cljax's LARS has one learning rate (``optim.base_lr=0.2``,
linear scaling); the method scales the gradient of the biases and BatchNorm parameters by
``barlow_twins.bias_lr_ratio`` = 0.0048 / 0.2 = 0.024, which under LARS (no trust ratio or
weight decay for them) is exactly their smaller learning rate (see
``cljax/methods/barlow_twins.py``).

Departures: the cosine decays to 0 (the paper's to 1/1000 of the peak); cljax's colour
strength 0.5 gives jitter (0.4, 0.4, 0.4, 0.1) where the paper uses (0.4, 0.4, 0.2, 0.1).

Expected result: 73.2% ImageNet linear-probe top-1 after 1000 epochs (paper Table 1).
"""

from cljax import defaults


def get_config():
  c = defaults.base_config()
  c.method = "barlow_twins"
  c.model.depth = 50
  c.model.stem = "imagenet"
  c.model.dtype = "bfloat16"
  c.head.num_layers = 3
  c.head.hidden_dim = 8192
  c.head.output_dim = 8192
  c.head.output_norm = "none"
  c.barlow_twins.lambda_ = 5e-3
  c.barlow_twins.bias_lr_ratio = 0.0048 / 0.2

  c.optim.name = "lars"
  c.optim.base_lr = 0.2  # x 2048 / 256 = 1.6 (weights; biases and BatchNorm x 0.024)
  c.optim.lr_scaling = "linear"
  c.optim.weight_decay = 1.5e-6
  c.optim.momentum = 0.9
  c.optim.trust_coefficient = 1e-3
  c.optim.warmup_epochs = 10.0

  c.data.source = "tfds"
  c.data.name = "imagenet2012"
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.image_size = 224
  c.data.global_batch_size = 2048
  c.data.num_workers = 16
  c.data.augment.crop_area_min = 0.08
  c.data.augment.color_strength = 0.5
  c.data.augment.blur_prob = 1.0
  c.data.augment.blur_prob_b = 0.1
  c.data.augment.solarize_prob = 0.0
  c.data.augment.solarize_prob_b = 0.2

  c.train.num_epochs = 1000
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 2500
  c.evals.knn_at_end = False  # kNN over 1.28M train features is an evaluation job of its own.
  return c
