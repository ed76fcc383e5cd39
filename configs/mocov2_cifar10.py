"""MoCo v2 on CIFAR-10 (the project's offline copy): a CIFAR ResNet-18 recipe, or a CPU one.

    python -m cljax.main --config=configs/mocov2_cifar10.py --workdir=runs/mocov2_c10
    python -m cljax.main --config=configs/mocov2_cifar10.py:cpu --workdir=runs/mocov2_c10_cpu
    python benchmarks/methods_quality.py --methods=moco_v2   # the CPU figure in docs/results.md

Data: the shared CIFAR-10 copy at ``../shared/data/cifar10`` (relative to the repository
root; ``--config.data.data_dir=DIR`` elsewhere), device-resident.

- default: one GPU; CIFAR ResNet-18, batch 256, symmetric loss with both views' keys
  enqueued into a 4,096-key queue, T = 0.2, momentum 0.99 cosine-ramped to 1, SGD lr 0.3,
  weight decay 5e-4, head 2048-256 without BatchNorm, 1000 epochs (solo-learn's
  "mocov2plus" CIFAR recipe, which reports 92.9% linear top-1 on CIFAR-10).
- ``:cpu``: a 2-core CPU; the tiny ResNet of ``configs/common/cifar10.py``. Measured kNN in
  docs/results.md.

Runs started before 2026-11-27 used a head with BatchNorm; resume or evaluate them with
``--config.head.hidden_norm=bn --config.head.output_norm=bn``.
"""

from cljax import defaults

common = defaults.load_sibling(__file__, "common/cifar10.py")


def get_config(preset: str = "gpu"):
  common.check_preset(preset)
  c = common.cifar_resnet18(common.shared_data(defaults.base_config()))
  c.method = "moco_v2"
  c.head.output_dim = 256
  c.head.hidden_norm = "none"  # MoCo v2's MLP head has no BatchNorm.
  c.head.output_norm = "none"
  c.moco.queue_size = 4096
  c.moco.symmetric = True
  c.ema.base = 0.99
  c.loss.temperature = 0.2
  c.optim.name = "sgd"
  c.optim.base_lr = 0.3
  c.optim.lr_scaling = "linear"
  c.optim.decay_mask = "all"  # torch SGD(model.parameters(), weight_decay=...).
  c.optim.weight_decay = 5e-4
  c.data.global_batch_size = 256
  c.data.augment.color_strength = 0.5
  c.data.augment.blur_prob = 0.0  # 32 px: no blur, as in the CIFAR recipes.
  c.train.num_epochs = 1000
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 5000
  if preset == "gpu":
    return c
  common.cpu_preset(c)
  c.head.output_dim = 64
  c.optim.base_lr = 0.5
  c.optim.weight_decay = 1e-4
  c.data.augment.crop_area_min = 0.2
  return c
