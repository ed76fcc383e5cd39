"""BYOL on CIFAR-10 (the project's offline copy): a CIFAR ResNet-18 recipe, or a CPU one.

    python -m cljax.main --config=configs/byol_cifar10.py --workdir=runs/byol_c10
    python -m cljax.main --config=configs/byol_cifar10.py:cpu --workdir=runs/byol_c10_cpu
    python benchmarks/methods_quality.py --methods=byol   # the CPU figure in docs/results.md

Data: the shared CIFAR-10 copy at ``../shared/data/cifar10`` (relative to the repository
root; ``--config.data.data_dir=DIR`` elsewhere), device-resident.

- default: one GPU; CIFAR ResNet-18, projector and predictor 4096-256, target decay 0.99
  cosine-ramped to 1, LARS lr 1.0 x B/256, weight decay 1e-5, batch 256, 1000 epochs, the
  asymmetric blur/solarize of BYOL (solo-learn's BYOL CIFAR recipe reports 92.6% linear
  top-1 on CIFAR-10).
- ``:cpu``: a 2-core CPU; the tiny ResNet of ``configs/common/cifar10.py``. Measured kNN in
  docs/results.md.
"""

from cljax import defaults

augment = defaults.load_sibling(__file__, "common/augment.py")
common = defaults.load_sibling(__file__, "common/cifar10.py")


def get_config(preset: str = "gpu"):
  common.check_preset(preset)
  c = common.cifar_resnet18(common.shared_data(defaults.base_config()))
  c.method = "byol"
  c.head.hidden_dim = 4096
  c.head.output_dim = 256
  c.head.output_norm = "none"
  c.predictor.num_layers = 2
  c.ema.base = 0.99
  c.optim.base_lr = 1.0
  c.optim.lr_scaling = "linear"
  c.optim.lars_order = "momentum_then_lr"  # BYOL's scale_by_lars, then scale(-lr).
  c.optim.weight_decay = 1e-5
  c.data.global_batch_size = 256
  augment.byol_views(c, blur=False)  # 32 px: no blur, as in the CIFAR recipes.
  c.train.num_epochs = 1000
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 5000
  if preset == "gpu":
    return c
  common.cpu_preset(c)
  c.head.output_dim = 64
  c.optim.weight_decay = 1e-4
  c.data.augment.crop_area_min = 0.2
  return c
