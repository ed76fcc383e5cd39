"""SimCLR on CIFAR-10 with a CIFAR ResNet-18: the common 1000-epoch recipe.

    python -m cljax.main --config=configs/simclr_cifar10.py --workdir=runs/simclr_cifar10
    # tfds cifar10 must be prepared in data_dir (``tfds build cifar10``), or use the
    # project's offline copy: --config.data.source=encoded_npz --config.data.data_dir=DIR
    # (a folder with train.npz and test.npz as in the shared CIFAR-10 data).

Hardware: one GPU (or TPU host); batch 512.

Expected result: about 90-91% linear-probe and 88-90% kNN (k=200) top-1 after
1000 epochs (SimCLR appendix B.9; solo-learn 90.7% linear; lightly 87.9% kNN
after 800 epochs).
"""

from cljax import defaults


def get_config():
  c = defaults.base_config()
  c.model.depth = 18
  c.model.stem = "cifar"

  c.loss.temperature = 0.5
  c.optim.base_lr = 1.0  # x 512 / 256 = 2.0
  c.optim.lr_scaling = "linear"
  c.optim.weight_decay = 1e-4

  c.data.name = "cifar10"  # tfds.
  c.data.eval_split = "test"
  c.data.image_size = 32
  c.data.global_batch_size = 512
  c.data.num_workers = 4
  c.data.device_resident = True  # 50,000 x 32 x 32 x 3 bytes = 154 MB per device.
  c.data.augment.color_strength = 0.5
  c.data.augment.blur_prob = 0.0

  c.train.num_epochs = 1000
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 5000
  return c
