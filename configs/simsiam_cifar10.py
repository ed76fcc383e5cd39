"""SimSiam on CIFAR-10 (the project's offline copy): a CIFAR ResNet-18 recipe, or a CPU one.

    python -m cljax.main --config=configs/simsiam_cifar10.py --workdir=runs/simsiam_c10
    python -m cljax.main --config=configs/simsiam_cifar10.py:cpu --workdir=runs/simsiam_c10_cpu
    python benchmarks/methods_quality.py --methods=simsiam   # the CPU figure in docs/results.md

Data: the shared CIFAR-10 copy at ``../shared/data/cifar10`` (relative to the repository
root; ``--config.data.data_dir=DIR`` elsewhere), device-resident.

- default: one GPU; the paper's CIFAR experiment (Chen & He 2021, appendix D): CIFAR
  ResNet-18, 2-layer projector to 2048-d, predictor 2048-512-2048, SGD lr 0.03 x B/256,
  weight decay 5e-4, batch 512, 800 epochs; about 91.8% kNN top-1 on CIFAR-10 (Fig. D.1).
- ``:cpu``: a 2-core CPU; the tiny ResNet of ``configs/common/cifar10.py``. Measured kNN in
  docs/results.md.
"""

from cljax import defaults

common = defaults.load_sibling(__file__, "common/cifar10.py")


def get_config(preset: str = "gpu"):
  common.check_preset(preset)
  c = common.cifar_resnet18(common.shared_data(defaults.base_config()))
  c.method = "simsiam"
  c.head.output_dim = 2048
  c.head.output_norm = "bn_no_affine"  # The official projector ends in BatchNorm1d(affine=False).
  c.predictor.num_layers = 2
  c.predictor.hidden_dim = 512
  c.optim.name = "sgd"
  c.optim.base_lr = 0.03
  c.optim.lr_scaling = "linear"
  c.optim.decay_mask = "all"  # torch SGD over every parameter, as the official code.
  c.optim.weight_decay = 5e-4
  c.optim.warmup_epochs = 0.0
  c.data.global_batch_size = 512
  c.data.augment.crop_area_min = 0.2
  c.data.augment.color_strength = 0.5
  c.data.augment.blur_prob = 0.0  # 32 px: no blur, as in the CIFAR recipes.
  c.train.num_epochs = 800
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 5000
  if preset == "gpu":
    return c
  common.cpu_preset(c)
  c.head.output_dim = 256
  c.predictor.hidden_dim = 64
  c.optim.base_lr = 0.1
  c.optim.weight_decay = 1e-4
  return c
