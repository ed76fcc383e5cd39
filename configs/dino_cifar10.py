"""DINO on the project's offline CIFAR-10 copy: a GPU recipe, or a CPU-sized one.

    python -m cljax.main --config=configs/dino_cifar10.py --workdir=runs/dino_c10
    python -m cljax.main --config=configs/dino_cifar10.py:cpu --workdir=runs/dino_c10_cpu
    python -m cljax.evaluate --config=configs/dino_cifar10.py:cpu --workdir=runs/dino_c10_cpu

Data: ``train.npz`` and ``test.npz`` of the shared CIFAR-10 copy (JPEG-encoded, read by the
"encoded_npz" source), as ``configs/simclr_cifar10_shared.py``. ``data.data_dir`` defaults to
``../shared/data/cifar10``, relative to the working directory (the repository root); point it
elsewhere with ``--config.data.data_dir=DIR``.

Encoder: a CIFAR-stem ResNet (3x3 stem, no max-pool), not a ViT. A ViT learns little from
32 px images in a few epochs (it has no convolutional prior and DINO's ViT results need
hundreds of epochs), while the ResNet is the encoder of the other CIFAR recipes, so the
CPU figures compare with SimCLR's in docs/results.md. Multi-crop: 2 global crops of 32 px
and local crops of 16 px (a quarter of the pixels each), with the crop areas of the
official README's ResNet-50 command, global (0.14, 1) and local (0.05, 0.14).

Hardware and expected results:
- default (no argument): for one GPU. CIFAR ResNet-18, 2 x 32 px + 6 x 16 px crops, batch
  512, 1000 epochs; head 2048 -> 256 -> 4096 prototypes, teacher 0.04 -> 0.07 over 50
  epochs and EMA 0.99 -> 1 as in solo-learn's CIFAR DINO recipe (which adds no local crops
  and reports about 89.5% linear top-1 for ResNet-18 after 1000 epochs), but AdamW 0.001 x
  B/256 with DINO's weight decay, 0.04 -> 0.4 by a half cosine, instead of its LARS (see
  the comment in ``get_config``). Not measured here; the JPEG copy is not bit-exact CIFAR-10.
- ``:cpu``: a 2-core CPU; the tiny ResNet of ``configs/common/cifar10.py`` (one basic block
  per stage, width 16, 64-d features), 2 x 32 px + 2 x 16 px crops at batch 256 (student
  and teacher together about 1.6x SimCLR's compute per image), head 256 -> 64 -> 1024,
  constant teacher temperature 0.04, EMA 0.99, last layer frozen for a quarter epoch,
  AdamW 0.002, 3 epochs. Measured with ``python benchmarks/methods_quality.py
  --methods=dino --steps=300`` (1.54 epochs, schedules sized to end there; 2026-11-27, a
  shared 2-core CPU, 30 min): kNN top-1 (k=200) 36.7% against 32.6% for the same encoder
  at random initialisation (SimCLR's CPU preset, same budget: 43.9%). DINO starts slowly:
  the teacher's entropy was still near uniform (6.3 of ln 1024 = 6.9) at the end. Over
  those 300 steps neither ``ema.base=0.95`` (35.9%) nor ``norm_last_layer=False`` (36.7%)
  did better.
"""

from cljax import defaults

augment = defaults.load_sibling(__file__, "common/augment.py")
common = defaults.load_sibling(__file__, "common/cifar10.py")


def get_config(preset: str = "gpu"):
  common.check_preset(preset)
  c = common.cifar_resnet18(common.shared_data(defaults.base_config()))
  c.method = "dino"
  c.dino.out_dim = 4096
  c.dino.teacher_temperature = 0.07
  c.dino.warmup_teacher_temperature_epochs = 50.0
  # Unused by DINO; the width of its logged embeddings, for tools that read head.output_dim
  # (benchmarks/methods_quality.py's embedding_std x sqrt(d)).
  c.head.output_dim = c.dino.bottleneck_dim
  c.ema.base = 0.99

  # AdamW, as DINO's ViT recipe. LARS leaves biases unadapted, and the gradient of the
  # head's last MLP bias scales with 1 / |x| of its small pre-normalisation output (weights
  # of std 0.02): a few LARS steps moved that bias past the inputs' signal and collapsed
  # every embedding to one point (measured on the :cpu preset: embedding_std 0.03 -> 5e-4
  # within 10 steps); AdamW's per-parameter step sizes do not.
  c.optim.name = "adamw"
  c.optim.base_lr = 0.001  # x 512 / 256 = 0.002
  c.optim.lr_scaling = "linear"
  c.optim.decay_mask = "matrices"  # DINO's get_params_groups: no decay on biases, norms.
  c.optim.weight_decay = 0.04
  c.optim.weight_decay_end = 0.4  # The official half cosine over the run.

  c.data.global_batch_size = 512
  c.data.num_workers = 4
  c.data.augment.crop_area_min = 0.14
  c.data.augment.num_local_crops = 6
  c.data.augment.local_crop_size = 16
  c.data.augment.local_crop_area_max = 0.14
  augment.byol_views(c, blur=False)  # 32 px: no blur, as in the CIFAR recipes.

  c.train.num_epochs = 1000
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 5000
  if preset == "gpu":
    return c
  common.cpu_preset(c)
  c.dino.out_dim = 1024
  c.dino.hidden_dim = 256
  c.dino.bottleneck_dim = 64
  c.head.output_dim = 64
  c.dino.teacher_temperature = 0.04
  c.dino.warmup_teacher_temperature_epochs = 0.0
  c.dino.freeze_last_layer_epochs = 0.25
  c.optim.base_lr = 0.002  # x 256 / 256
  c.data.augment.num_local_crops = 2
  return c
