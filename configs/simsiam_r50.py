"""SimSiam, ResNet-50 on ImageNet 2012: the paper's 100-epoch recipe.

    python -m cljax.main --config=configs/simsiam_r50.py --workdir=runs/simsiam_r50 \
        --config.data.data_dir=/path/to/tensorflow_datasets

Hardware: one host of 8 GPUs (batch 512, as in the paper).

Recipe (Chen & He 2021, "Exploring Simple Siamese Representation Learning",
https://arxiv.org/abs/2011.10566, Sec. 4): 3-layer projector 2048-2048-2048 ending in
BatchNorm, predictor 2048-512-2048 (bottleneck, no BatchNorm at its output), symmetric
negative cosine with stop-gradient, SGD lr 0.05 x B/256, momentum 0.9, weight decay 1e-4,
cosine schedule, no warm-up; MoCo v2's augmentation. Departures: the predictor's learning
rate decays with the rest (the paper keeps it fixed), and the projector's last BatchNorm
keeps its scale.

Expected result: 68.1% ImageNet linear-probe top-1 after 100 epochs (71.3% after 800),
Table 4 of the paper.
"""

from cljax import defaults


def get_config():
  c = defaults.base_config()
  c.method = "simsiam"
  c.model.depth = 50
  c.model.stem = "imagenet"
  c.model.dtype = "bfloat16"
  c.head.num_layers = 3
  c.head.hidden_dim = 2048
  c.head.output_dim = 2048
  c.head.output_norm = "bn"
  c.predictor.num_layers = 2
  c.predictor.hidden_dim = 512
  c.predictor.output_norm = "none"

  c.optim.name = "sgd"
  c.optim.base_lr = 0.05
  c.optim.lr_scaling = "linear"
  c.optim.weight_decay = 1e-4
  c.optim.momentum = 0.9
  c.optim.warmup_epochs = 0.0

  c.data.source = "tfds"
  c.data.name = "imagenet2012"
  c.data.image_size = 224
  c.data.global_batch_size = 512
  c.data.num_workers = 16
  c.data.augment.crop_area_min = 0.2
  c.data.augment.color_strength = 0.5
  c.data.augment.blur_prob = 0.5

  c.train.num_epochs = 100
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 5000
  c.evals.knn_at_end = False
  return c
