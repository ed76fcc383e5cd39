"""BYOL, ResNet-50 on ImageNet 2012: the paper's 300-epoch recipe.

    python -m cljax.main --config=configs/byol_r50.py --workdir=runs/byol_r50 \
        --config.data.data_dir=/path/to/tensorflow_datasets

Hardware: a TPU v3-32/v4-32 pod slice or 4 hosts of 8 GPUs (global batch 4096); smaller
batches scale the LR linearly.

Recipe (Grill et al. 2020, "Bootstrap Your Own Latent", https://arxiv.org/abs/2006.07733,
Sec. 3.3 and appendix C): projector 4096-256 and predictor 4096-256 (Linear-BN-ReLU-Linear,
no BatchNorm at the output), target decay 0.996 cosine-ramped to 1, LARS lr 0.2 x B/256
with biases and BatchNorm excluded from weight decay and adaptation, weight decay 1.5e-6,
10 warm-up epochs then cosine; the asymmetric augmentation: blur p = 1.0 / 0.1 and
solarize p = 0.0 / 0.2 for the two views, colour jitter p = 0.8, grayscale 0.2. Departure:
BYOL's jitter is (0.4, 0.4, 0.2, 0.1); cljax's strength 0.5 gives (0.4, 0.4, 0.4, 0.1).

Expected result: 72.5% ImageNet linear-probe top-1 after 300 epochs (74.3% after 1000),
Table 1 / appendix of the paper.
"""

from cljax import defaults

augment = defaults.load_sibling(__file__, "common/augment.py")
common = defaults.load_sibling(__file__, "common/imagenet.py")


def get_config():
  c = common.imagenet(defaults.base_config(), global_batch_size=4096)
  c.method = "byol"
  c.head.hidden_dim = 4096
  c.head.output_dim = 256
  c.head.output_norm = "none"
  c.predictor.num_layers = 2

  c.optim.base_lr = 0.2
  c.optim.lr_scaling = "linear"
  c.optim.lars_order = "momentum_then_lr"  # BYOL's scale_by_lars, then scale(-lr).
  c.optim.weight_decay = 1.5e-6

  augment.byol_views(c)
  c.train.num_epochs = 300
  return c
