"""SimSiam, ResNet-50 on ImageNet 2012: the paper's 100-epoch recipe.

    python -m cljax.main --config=configs/simsiam_r50.py --workdir=runs/simsiam_r50 \
        --config.data.data_dir=/path/to/tensorflow_datasets

Hardware: one host of 8 GPUs (batch 512, as in the paper).

Recipe (Chen & He 2021, "Exploring Simple Siamese Representation Learning",
https://arxiv.org/abs/2011.10566, Sec. 4): 3-layer projector 2048-2048-2048 ending in
BatchNorm without scale or bias (the official ``BatchNorm1d(dim, affine=False)``), predictor
2048-512-2048 (bottleneck, no BatchNorm at its output), symmetric negative cosine with
stop-gradient, SGD lr 0.05 x B/256, momentum 0.9, weight decay 1e-4 on every parameter,
cosine schedule, no warm-up; MoCo v2's augmentation. Departure: the predictor's learning
rate decays with the rest (the paper keeps it fixed).

Expected result: 68.1% ImageNet linear-probe top-1 after 100 epochs (71.3% after 800),
Table 4 of the paper.
"""

from cljax import defaults

common = defaults.load_sibling(__file__, "common/imagenet.py")


def get_config():
  c = common.imagenet(defaults.base_config(), global_batch_size=512, checkpoint_every_steps=5000)
  c.method = "simsiam"
  c.head.num_layers = 3
  c.head.output_dim = 2048
  c.head.output_norm = "bn_no_affine"  # The official projector ends in BatchNorm1d(affine=False).
  c.predictor.num_layers = 2
  c.predictor.hidden_dim = 512

  c.optim.name = "sgd"
  c.optim.base_lr = 0.05
  c.optim.lr_scaling = "linear"
  c.optim.decay_mask = "all"  # torch SGD over every parameter, as the official code.
  c.optim.weight_decay = 1e-4
  c.optim.warmup_epochs = 0.0

  c.data.augment.crop_area_min = 0.2
  c.data.augment.color_strength = 0.5
  return c
