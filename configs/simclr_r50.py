"""SimCLR v1, ResNet-50 (1x) on ImageNet 2012: the paper's 100-epoch recipe.

    python -m cljax.main --config=configs/simclr_r50.py --workdir=runs/simclr_r50 \
        --config.data.data_dir=/path/to/tensorflow_datasets

Hardware: a TPU v3-32/v4-32 pod slice or 4-8 hosts of 8 GPUs (global batch
4096 = 8192 views; 8190 negatives per anchor). On one host with fewer
accelerators lower data.global_batch_size (the LR follows by sqrt scaling).

Data: tfds ``imagenet2012`` prepared as ArrayRecord in data_dir (see README).

Expected result (Chen et al. 2020, Table B.1 / Fig. 9): about 64-65% linear-
probe top-1 after 100 epochs at batch 4096 (69.3% after 1000 epochs).
"""

from cljax import defaults


def get_config():
  c = defaults.base_config()
  c.model.depth = 50
  c.model.width_multiplier = 1
  c.model.stem = "imagenet"
  c.model.dtype = "bfloat16"
  c.head.num_layers = 2
  c.head.hidden_dim = 2048
  c.head.output_dim = 128

  c.loss.temperature = 0.1
  # 8,192 views: the blockwise loss never holds the (local x 8192) logits.
  c.loss.implementation = "blockwise"
  c.loss.block_size = 1024
  c.optim.name = "lars"
  c.optim.base_lr = 0.075  # x sqrt(4096) = 4.8
  c.optim.lr_scaling = "sqrt"
  c.optim.weight_decay = 1e-6
  c.optim.momentum = 0.9
  c.optim.warmup_epochs = 10.0

  c.data.source = "tfds"
  c.data.name = "imagenet2012"
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.image_size = 224
  c.data.global_batch_size = 4096
  c.data.num_workers = 16
  c.data.augment.crop_area_min = 0.08
  c.data.augment.color_strength = 1.0
  c.data.augment.blur_prob = 0.5

  c.train.num_epochs = 100
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 2500
  # kNN over 1.28M train features is an evaluation job of its own.
  c.evals.knn_at_end = False
  return c
