"""DINOv2 on the project's offline CIFAR-10 copy: a GPU recipe, or a CPU-sized one.

    python -m cljax.main --config=configs/dinov2_cifar10.py --workdir=runs/dinov2_c10
    python -m cljax.main --config=configs/dinov2_cifar10.py:cpu --workdir=runs/dinov2_c10_cpu
    python -m cljax.evaluate --config=configs/dinov2_cifar10.py:cpu --workdir=runs/dinov2_c10_cpu

Data: ``train.npz`` and ``test.npz`` of the shared CIFAR-10 copy, as
``configs/dino_cifar10.py`` (``--config.data.data_dir=DIR`` to point elsewhere).

The method is DINOv2's (Oquab et al. 2024, ``cljax.methods.dinov2``): DINO's image-level
loss, iBOT's masked-patch loss on a shared head, KoLeo (weight 0.1), Sinkhorn-Knopp
centring (the official ViT-L/g choice), teacher EMA, teacher temperature 0.04 -> 0.07, last
layers at learning rate 0 at first, AdamW with weight decay 0.04 -> 0.4, layer-wise learning
rates (0.9 a block) and gradient clipping at 3.0 per module, the official defaults. The
encoder is DINOv2's ViT at patch 4 (8 x 8 patches of a 32 px crop; 4 x 4 of a 16 px local
crop); the crops are DINOv2's area ranges, global (0.32, 1), local (0.05, 0.32).

Hardware and expected results:
- default (no argument): for one GPU. A ViT-S/4 (width 384, 12 blocks, 6 heads; 21.3M
  parameters), 2 x 32 px + 8 x 16 px crops, batch 512, 300 epochs, stochastic depth 0.1,
  heads 2048 -> 256 -> 16,384 prototypes, teacher EMA 0.992 -> 1. No DINOv2 figure on
  CIFAR-10 is published to hold it to (solo-learn's DINO recipe, a ResNet-18 after 1000
  epochs, reports about 89.5% linear: ``configs/dino_cifar10.py``). Not measured here (no
  GPU was lent).
- ``:cpu``: a 2-core CPU. A 4-block ViT of width 128 (0.8M parameters), 2 x 32 px + 2 x
  16 px crops at batch 256, heads 256 -> 64 -> 1,024 prototypes, teacher EMA 0.99 and
  temperature 0.04 -> 0.07 over 0.2 epochs, last layers held for 0.1 epochs, 3 epochs. Its
  measured learning curve against DINO's is in docs/results.md ("DINOv2 and DINO"):
  ``python benchmarks/time_to_accuracy.py --recipes=configs/dino_cifar10.py:cpu,``
  ``configs/dinov2_cifar10.py:cpu``.
"""

from cljax import defaults

augment = defaults.load_sibling(__file__, "common/augment.py")
common = defaults.load_sibling(__file__, "common/cifar10.py")


def get_config(preset: str = "gpu"):
  common.check_preset(preset)
  c = common.shared_data(defaults.base_config())
  c.method = "dinov2"
  c.model.name = "vit_dinov2"
  c.model.variant = "custom:dim=384,depth=12,heads=6,patch=4"
  c.model.img_size = 32
  c.model.drop_path_rate = 0.1
  d = c.dinov2
  d.centering = "sinkhorn_knopp"
  d.head.out_dim = 16384
  # Unused by DINOv2; the width of its logged embeddings, for tools that read head.output_dim.
  c.head.output_dim = d.head.bottleneck_dim
  d.warmup_teacher_temperature_epochs = 30.0
  c.ema.base = 0.992  # DINOv2's momentum_teacher.

  c.optim.name = "adamw"
  c.optim.base_lr = 0.004  # x sqrt(512 / 1024)
  c.optim.lr_scaling = "sqrt_wrt_1024"
  c.optim.decay_mask = "dinov2"
  c.optim.weight_decay = 0.04
  c.optim.weight_decay_end = 0.4

  c.data.global_batch_size = 512
  c.data.num_workers = 4
  a = c.data.augment
  a.crop_area_min = 0.32
  a.num_local_crops = 8
  a.local_crop_size = 16
  a.local_crop_area_max = 0.32
  augment.byol_views(c, blur=False)  # 32 px: no blur, as in the CIFAR recipes.

  c.train.num_epochs = 300
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 5000
  if preset == "gpu":
    return c
  common.cpu_preset(c)
  c.model.variant = "custom:dim=128,depth=4,heads=4,patch=4"
  c.model.drop_path_rate = 0.0
  d.head.out_dim, d.head.hidden_dim, d.head.bottleneck_dim = 1024, 256, 64
  c.head.output_dim = 64
  d.warmup_teacher_temperature_epochs = 0.2
  d.freeze_last_layer_epochs = 0.1
  c.ema.base = 0.99
  a.num_local_crops = 2
  return c
