"""Shared pieces of the ImageNet 2012 recipes: the data and the settings of a multi-host run.

Recipes load this file by path (config files are read from any working directory, not as
a package):

    common = defaults.load_sibling(__file__, "common/imagenet.py")

    def get_config():
      c = common.imagenet(defaults.base_config(), global_batch_size=4096)
      ...  # the recipe
"""


def imagenet(c, global_batch_size, checkpoint_every_steps=2500):
  """Reads tfds ``imagenet2012`` (prepared as ArrayRecord in data_dir, see the README) at 224 px,
  decoding on the host and cropping on the device (``data.crop_on_device``).

  Point ``--config.data.data_dir`` at the tfds folder. Also the run settings of
  ``large_run``.
  """
  c.data.source = "tfds"
  c.data.name = "imagenet2012"
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.image_size = 224
  # Decode on the host (libjpeg-turbo), crop every view on the accelerator: a host core
  # then feeds about 4x the images (docs/benchmarks.md).
  c.data.crop_on_device = True
  return large_run(c, global_batch_size, checkpoint_every_steps)


def large_run(c, global_batch_size, checkpoint_every_steps=2500):
  """The settings of a run of many hosts over a large data set.

  16 data workers per host, a log line every 100 steps, and no kNN evaluation at the end
  (kNN over ImageNet's 1.28M train features is an evaluation job of its own).
  """
  c.data.global_batch_size = global_batch_size
  c.data.num_workers = 16
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = checkpoint_every_steps
  c.evals.knn_at_end = False
  return c
