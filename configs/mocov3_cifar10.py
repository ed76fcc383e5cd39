"""MoCo v3 on CIFAR-10 (the project's offline copy): a CIFAR ResNet-18 recipe, or a CPU one.

    python -m cljax.main --config=configs/mocov3_cifar10.py --workdir=runs/mocov3_c10
    python -m cljax.main --config=configs/mocov3_cifar10.py:cpu --workdir=runs/mocov3_c10_cpu
    python benchmarks/methods_quality.py --methods=moco_v3   # the CPU figure in docs/results.md

Data: the shared CIFAR-10 copy at ``../shared/data/cifar10`` (relative to the repository
root; ``--config.data.data_dir=DIR`` elsewhere), device-resident.

- default: one GPU; MoCo v3 with a CIFAR ResNet-18 (the paper's ResNet variant: LARS) and
  the official ``MoCo_ResNet`` heads: a 2-layer projector 4096-256 ending in BatchNorm
  without affine parameters, a 2-layer predictor 4096-256 ending in a bias-free Linear;
  T = 0.2, momentum 0.99 cosine-ramped to 1, LARS lr 0.3 x B/256 (momentum before the
  learning rate, as the official ``LARS.step``), weight decay 1e-6, batch 256, 1000 epochs
  (solo-learn's MoCo v3 CIFAR recipe reports 93.1% linear top-1 on CIFAR-10). A ViT-S/4
  variant with the official ``MoCo_ViT`` heads and optimiser: ``--config.model.name=vit
  --config.model.variant=S/4 --config.head.num_layers=3
  --config.predictor.output_norm=bn_no_affine --config.optim.name=adamw
  --config.optim.decay_mask=all`` (MoCo v3 decays every parameter with AdamW).
- ``:cpu``: a 2-core CPU; the tiny ResNet of ``configs/common/cifar10.py``. Measured kNN in
  docs/results.md.
"""

from cljax import defaults

common = defaults.load_sibling(__file__, "common/cifar10.py")


def get_config(preset: str = "gpu"):
  common.check_preset(preset)
  c = common.cifar_resnet18(common.shared_data(defaults.base_config()))
  c.method = "moco_v3"
  # MoCo_ResNet: projector _build_mlp(2, ...) ends in BatchNorm1d(affine=False), predictor
  # _build_mlp(2, ..., last_bn=False) in a bias-free Linear.
  c.head.num_layers = 2
  c.head.hidden_dim = 4096
  c.head.output_dim = 256
  c.head.output_norm = "bn_no_affine"
  c.predictor.num_layers = 2
  c.predictor.hidden_dim = 4096
  c.predictor.output_norm = "none_no_bias"
  c.ema.base = 0.99
  c.loss.temperature = 0.2
  c.optim.base_lr = 0.3
  c.optim.lr_scaling = "linear"
  c.optim.decay_mask = "matrices"  # MoCo v3's LARS: ndim > 1 only (its AdamW: all).
  c.optim.lars_order = "momentum_then_lr"  # Its LARS.step: mu = m mu + dp; p -= lr mu.
  c.data.global_batch_size = 256
  # BYOL's asymmetric solarisation (p = 0.0 / 0.2); 32 px: no blur, as in the CIFAR recipes.
  c.data.augment.color_strength = 0.5
  c.data.augment.blur_prob = 0.0
  c.data.augment.solarize_prob_b = 0.2
  c.train.num_epochs = 1000
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 5000
  if preset == "gpu":
    return c
  common.cpu_preset(c)
  c.head.output_dim = 64
  c.optim.base_lr = 1.0
  c.optim.weight_decay = 1e-4
  c.data.augment.crop_area_min = 0.2
  return c
