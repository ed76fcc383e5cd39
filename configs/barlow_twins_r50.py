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

augment = defaults.load_sibling(__file__, "common/augment.py")
common = defaults.load_sibling(__file__, "common/imagenet.py")


def get_config():
  c = common.imagenet(defaults.base_config(), global_batch_size=2048)
  c.method = "barlow_twins"
  c.head.num_layers = 3
  c.head.hidden_dim = 8192
  c.head.output_dim = 8192
  c.head.output_norm = "none"

  c.optim.base_lr = 0.2  # x 2048 / 256 = 1.6 (weights; biases and BatchNorm x 0.024)
  c.optim.lr_scaling = "linear"
  c.optim.decay_mask = "matrices"  # Official LARS: no decay or adaptation for 1-D params.
  c.optim.lars_order = "momentum_then_lr"  # Official LARS.step: mu = m mu + dp; p -= lr mu.
  c.optim.weight_decay = 1.5e-6

  augment.byol_views(c)
  c.train.num_epochs = 1000
  return c
