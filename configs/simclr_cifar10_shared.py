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

import importlib.util
import os


def _base_recipe():
  # Loaded by path: config files are read from any working directory, not as a package.
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "simclr_cifar10.py")
  spec = importlib.util.spec_from_file_location("simclr_cifar10_recipe", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(preset: str = "gpu"):
  c = _base_recipe()
  c.data.source = "encoded_npz"
  c.data.name = "cifar10_shared"
  c.data.data_dir = "../shared/data/cifar10"
  c.data.train_split = "train"
  c.data.eval_split = "test"
  if preset == "gpu":
    return c
  if preset != "cpu":
    raise ValueError(f"preset must be 'gpu' or 'cpu', got {preset!r}.")
  c.model.stage_sizes = (1, 1, 1)
  c.model.num_filters = 16
  c.model.dtype = "float32"  # bfloat16 is slow on CPUs.
  c.head.hidden_dim = 256
  c.head.output_dim = 64
  c.loss.temperature = 0.2  # Sharper than the 1000-epoch recipe's 0.5: learns faster early.
  c.optim.weight_decay = 1e-4
  c.optim.warmup_epochs = 0.5
  c.data.global_batch_size = 256
  c.data.num_workers = 0  # Two cores: worker processes would compete with the step.
  c.data.augment.crop_area_min = 0.2
  c.train.num_epochs = 3
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 200
  c.train.max_to_keep = 2
  c.evals.batch_size = 500
  return c
