"""Barlow Twins on CIFAR-10 (the project's offline copy): a CIFAR ResNet-18 recipe, or a CPU one.

    python -m cljax.main --config=configs/barlow_twins_cifar10.py --workdir=runs/barlow_c10
    python -m cljax.main --config=configs/barlow_twins_cifar10.py:cpu --workdir=runs/barlow_cpu
    python benchmarks/methods_quality.py --methods=barlow_twins   # the CPU figure

Data: the shared CIFAR-10 copy at ``../shared/data/cifar10`` (relative to the repository
root; ``--config.data.data_dir=DIR`` elsewhere), device-resident.

- default: one GPU; solo-learn's Barlow Twins CIFAR recipe: CIFAR ResNet-18, projector
  2048-2048-2048 (no BatchNorm at the output; the loss standardises it), lambda = 5e-3
  (solo-learn: 0.0051), LARS lr 0.3 x B/256 with trust coefficient 0.02, batch 256, 10
  warm-up epochs then cosine, 1000 epochs, the asymmetric augmentation (solarize p = 0.0 /
  0.2, no blur at 32 px). solo-learn scales the loss by 0.1 with weight decay 1e-4 and one
  learning rate; under LARS that is exactly weight decay 1e-3 on the adapted weights and a
  0.1 gradient scale (``barlow_twins.bias_lr_ratio``) on biases and BatchNorm parameters,
  which is what this recipe sets. Departures: solo-learn clips the LARS trust ratio at 1,
  and its colour jitter is (0.4, 0.4, 0.2, 0.1) where cljax's strength 0.5 gives 0.4 saturation.
- ``:cpu``: a 2-core CPU; the tiny ResNet of ``configs/common/cifar10.py`` with a 256-d
  projector. Measured kNN in docs/results.md.

Published: solo-learn reports 92.1% linear top-1 on CIFAR-10 for this setting (ResNet-18,
1000 epochs); the paper has no CIFAR experiment.
"""

from cljax import defaults

augment = defaults.load_sibling(__file__, "common/augment.py")
common = defaults.load_sibling(__file__, "common/cifar10.py")


def get_config(preset: str = "gpu"):
  common.check_preset(preset)
  c = common.cifar_resnet18(common.shared_data(defaults.base_config()))
  c.method = "barlow_twins"
  c.head.num_layers = 3
  c.head.output_dim = 2048
  c.head.output_norm = "none"
  c.barlow_twins.bias_lr_ratio = 0.1  # solo-learn's loss scale 0.1, on the unadapted params.
  c.optim.base_lr = 0.3
  c.optim.lr_scaling = "linear"
  c.optim.decay_mask = "matrices"  # Official LARS: no decay or adaptation for 1-D params.
  c.optim.lars_order = "momentum_then_lr"  # Official LARS.step: mu = m mu + dp; p -= lr mu.
  c.optim.weight_decay = 1e-3  # solo-learn's 1e-4 with its loss scaled by 0.1.
  c.optim.trust_coefficient = 0.02
  c.data.global_batch_size = 256
  augment.byol_views(c, blur=False)  # 32 px: no blur, as in the CIFAR recipes.
  c.train.num_epochs = 1000
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 5000
  if preset == "gpu":
    return c
  common.cpu_preset(c)
  c.head.output_dim = 256
  c.data.augment.crop_area_min = 0.2
  return c
