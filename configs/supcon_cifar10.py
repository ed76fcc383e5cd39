"""Supervised contrastive (SupCon) on CIFAR-10 (the project's offline copy): ResNet-18, or CPU.

    python -m cljax.main --config=configs/supcon_cifar10.py --workdir=runs/supcon_c10
    python -m cljax.main --config=configs/supcon_cifar10.py:cpu --workdir=runs/supcon_c10_cpu
    python benchmarks/methods_quality.py --methods=supcon   # the CPU figure in docs/results.md

Data: the shared CIFAR-10 copy at ``../shared/data/cifar10`` (relative to the repository
root; ``--config.data.data_dir=DIR`` elsewhere), device-resident. SupCon uses the labels:
a source without them (label < 0) stops the run with an error.

- default: one GPU; the paper's CIFAR recipe (Khosla et al. 2020, "Supervised Contrastive
  Learning", https://arxiv.org/abs/2004.11362, and the official SupContrast code) on a CIFAR
  ResNet-18: batch 1024 (2048 views), SGD momentum 0.9, lr 0.5 (0.125 x B/256) with 10
  warm-up epochs then cosine, weight decay 1e-4, temperature 0.1 with base temperature 0.07
  (the official loss scale T / T_b), 1000 epochs; crops of 20-100% of the area, colour
  jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale 0.2, no blur. Head: the official
  'mlp' head 512-512-128 (cljax's hidden layer adds a BatchNorm; no BatchNorm at the output).
- ``:cpu``: a 2-core CPU; the tiny ResNet of ``configs/common/cifar10.py``. Measured kNN in
  docs/results.md.

Published: 96.0% linear top-1 on CIFAR-10 with a ResNet-50 (cross-entropy baseline 95.0%,
SimCLR 93.6%; paper Table 2 and the SupContrast README). For a ResNet-18 solo-learn reports
93.8% (batch 256, T = 0.2, 1000 epochs); expect about that from this recipe, which has no
published ResNet-18 figure of its own.
"""

from cljax import defaults

common = defaults.load_sibling(__file__, "common/cifar10.py")


def get_config(preset: str = "gpu"):
  common.check_preset(preset)
  c = common.cifar_resnet18(common.shared_data(defaults.base_config()))
  c.method = "supcon"
  c.head.hidden_dim = 512
  c.head.output_norm = "none"
  c.optim.name = "sgd"
  c.optim.base_lr = 0.125  # x 1024 / 256 = 0.5
  c.optim.lr_scaling = "linear"
  c.optim.decay_mask = "all"  # SupContrast: torch SGD(model.parameters(), ...).
  c.optim.weight_decay = 1e-4
  c.data.global_batch_size = 1024
  c.data.augment.crop_area_min = 0.2
  c.data.augment.color_strength = 0.5
  c.data.augment.blur_prob = 0.0  # 32 px: no blur, as in the CIFAR recipes.
  c.train.num_epochs = 1000
  c.train.checkpoint_every_steps = 2500
  if preset == "gpu":
    return c
  common.cpu_preset(c)
  c.head.output_dim = 64
  c.optim.base_lr = 0.4  # solo-learn's ResNet-18 lr at batch 256: learns faster early.
  c.loss.temperature = 0.2
  return c
