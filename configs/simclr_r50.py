"""SimCLR v1, ResNet-50 (1x) on ImageNet 2012: the paper's 100-epoch recipe.

    python -m cljax.main --config=configs/simclr_r50.py --workdir=runs/simclr_r50 \
        --config.data.data_dir=/path/to/tensorflow_datasets

Hardware: a TPU v3-32/v4-32 pod slice or 4-8 hosts of 8 GPUs (global batch
4096 = 8192 views; 8190 negatives per anchor). On one host with fewer
accelerators lower data.global_batch_size (the LR follows by sqrt scaling).

Data: tfds ``imagenet2012`` prepared as ArrayRecord in data_dir (see README).

Recipe (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations"): cljax's defaults (``cljax/defaults.py``), which are this recipe:
projection head 2048-128, NT-Xent with T = 0.1, LARS lr 0.075 x sqrt(B) = 4.8 with
10 warm-up epochs then cosine, weight decay 1e-6, batch 4096, 100 epochs; colour jitter
strength 1.0, blur p = 0.5.

Expected result (Chen et al. 2020, Table B.1 / Fig. 9): about 64-65% linear-
probe top-1 after 100 epochs at batch 4096 (69.3% after 1000 epochs).
"""

from cljax import defaults

common = defaults.load_sibling(__file__, "common/imagenet.py")


def get_config():
  c = common.imagenet(defaults.base_config(), global_batch_size=4096)
  # 8,192 views: the blockwise loss never holds the (local x 8192) logits.
  c.loss.implementation = "blockwise"
  return c
