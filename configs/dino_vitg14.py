"""DINO, ViT-g/14 on ImageNet 2012, for pods: the state sharded over the devices (FSDP).

    python -m cljax.main --config=configs/dino_vitg14.py --workdir=gs://BUCKET/dino_g14 \\
        --config.data.data_dir=/path/to/tensorflow_datasets

Launch it on every host of a pod (``launch/``). Memory before renting (shapes only, nothing
allocated):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m cljax.bench \\
        --config=configs/dino_vitg14.py --parts=memory --config.data.global_batch_size=16

The recipe is ``configs/dino_vits16.py`` (Caron et al. 2021: multi-crop, teacher EMA,
centring, last layer frozen for the first epoch, AdamW with weight decay 0.04 -> 0.4) on a
ViT-g/14: 40 blocks of width 1408, 16 heads, MLP 6144 (Zhai et al. 2022; 1.01B
parameters). Patch 14 takes 2 global crops of 224 px and 10 local crops of 98 px (7 x 7
patches, DINOv2's local size for patch 14). The larger model takes the official ViT-B
settings where the paper gives them: learning rate 0.00075 x B/256 after 10 warm-up epochs,
teacher temperature 0.04 -> 0.07 over 30 epochs, head output 65,536. Blocks are
rematerialised and run as one scanned loop (one block compiled instead of 40).

Memory (``docs/benchmarks.md``, "Sharded state"): the student, its AdamW moments and the
teacher are 16 bytes a parameter, 16.3 GB whole on every device (more than a TPU v5e holds)
before one activation; under FSDP 16.3 GB / N a device (255 MB on 64 devices).

Hardware: a TPU v4-128 or v5e-256 slice, or 32+ H100s, for the 1,024 images (12 crops
each) of a step. Expected result: none published for DINO (2021) at this size; DINOv2's
ViT-g/14, another recipe (iBOT, KoLeo) on other data (LVD-142M), reaches 86.5% ImageNet
linear. This recipe is a starting point for that scale, not a reproduction. Not run here
(no accelerator was available).
"""

from cljax import defaults

vits16 = defaults.load_sibling(__file__, "dino_vits16.py")


def get_config():
  c = vits16.get_config()
  c.model.variant = "g/14"
  c.model.remat = True
  c.model.scan_blocks = True
  c.mesh.state_sharding = "fsdp"
  c.optim.base_lr = 0.00075  # The official ViT-B/16 rate, x B/256.
  c.data.augment.local_crop_size = 98  # 7 x 7 patches of 14.
  c.train.checkpoint_every_steps = 1000
  return c
