"""SimCLR on the project's offline CIFAR-10 copy: the published recipe, or a CPU-sized one.

    python -m cljax.main --config=configs/simclr_cifar10_shared.py --workdir=runs/c10
    python -m cljax.main --config=configs/simclr_cifar10_shared.py:cpu --workdir=runs/c10_cpu
    python -m cljax.evaluate --config=configs/simclr_cifar10_shared.py:cpu --workdir=runs/c10_cpu
    python benchmarks/cifar10_quality.py --budget_minutes=15   # pretrain, then evaluate

Data: ``train.npz`` and ``test.npz`` of the shared CIFAR-10 copy (JPEG-encoded, read by the
"encoded_npz" source). ``data.data_dir`` defaults to ``../shared/data/cifar10``, relative to
the working directory (the repository root); point it elsewhere with
``--config.data.data_dir=DIR``.

Hardware and expected results:
- default (no argument): ``configs/simclr_cifar10.py`` unchanged but for the data, i.e. CIFAR
  ResNet-18, batch 512, LARS 1.0 x B/256, t=0.5, 1000 epochs, for one GPU. Published for
  this recipe: lightly 84.8% kNN after 200 epochs and 87.9% after 800; solo-learn 90.7%
  linear after 1000. The JPEG copy is not bit-exact CIFAR-10; expect figures close to those.
- ``:cpu``: a one-block-per-stage ResNet of width 16 at batch 256 (the quickstart's model),
  sized for a 2-core CPU, where it runs a few hundred views/s, i.e. about three epochs in
  15 minutes: see ``docs/results.md`` for measured kNN and linear-probe accuracy.
"""

from cljax import defaults

common = defaults.load_sibling(__file__, "common/cifar10.py")
recipe = defaults.load_sibling(__file__, "simclr_cifar10.py")


def get_config(preset: str = "gpu"):
  common.check_preset(preset)
  c = common.shared_data(recipe.get_config())
  if preset == "gpu":
    return c
  common.cpu_preset(c)
  c.head.output_dim = 64
  c.loss.temperature = 0.2  # Sharper than the 1000-epoch recipe's 0.5: learns faster early.
  c.data.augment.crop_area_min = 0.2
  return c
