"""Shared pieces of the CIFAR-10 recipes: the offline data copy and the 2-core CPU preset.

Recipes load this file by path (config files are read from any working directory, not as
a package):

    common = defaults.load_sibling(__file__, "common/cifar10.py")

    def get_config(preset="gpu"):
      common.check_preset(preset)
      c = common.cifar_resnet18(common.shared_data(defaults.base_config()))
      ...  # the recipe
      if preset == "gpu":
        return c
      common.cpu_preset(c)
      ...  # the recipe's own CPU choices
"""

PRESETS = ("gpu", "cpu")


def check_preset(preset):
  """Raises ``ValueError`` unless ``preset`` (``--config=configs/X.py:preset``) is known."""
  if preset not in PRESETS:
    raise ValueError(
      f"preset must be one of {PRESETS} (--config=configs/<recipe>.py:cpu), got {preset!r}."
    )


def shared_data(c):
  """Reads the project's offline CIFAR-10 copy (JPEG ``train.npz``/``test.npz``).

  ``data.data_dir`` is relative to the working directory (the repository root);
  point it elsewhere with ``--config.data.data_dir=DIR``.
  """
  c.data.source = "encoded_npz"
  c.data.name = "cifar10_shared"
  c.data.data_dir = "../shared/data/cifar10"
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.image_size = 32
  c.data.device_resident = True  # 50,000 x 32 x 32 x 3 bytes = 154 MB per device.
  return c


def cifar_resnet18(c):
  """A CIFAR ResNet-18: the 3x3 stem without max-pool, for 32 px images."""
  c.model.depth = 18
  c.model.stem = "cifar"
  return c


def cpu_preset(c):
  """Sizes a CIFAR recipe for a 2-core CPU: the quickstart's tiny ResNet, batch 256.

  A one-block-per-stage CIFAR ResNet of width 16 (64-d features), float32 (bfloat16 is
  slow on CPUs), heads of width 256; a few hundred views/s, about three epochs in 15
  minutes. Method-specific choices (output widths, learning rates) stay with the recipe.
  """
  c.model.stage_sizes = (1, 1, 1)
  c.model.num_filters = 16
  c.model.dtype = "float32"
  c.head.hidden_dim = 256
  c.predictor.hidden_dim = 256
  c.data.global_batch_size = 256
  c.data.num_workers = 0  # Two cores: worker processes would compete with the step.
  c.optim.warmup_epochs = 0.5
  c.train.num_epochs = 3
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 200
  c.train.max_to_keep = 2
  c.evals.batch_size = 500
  return c
