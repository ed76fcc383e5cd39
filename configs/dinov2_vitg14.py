"""DINOv2, ViT-g/14 on ImageNet 2012, for pods: the state sharded over the devices (FSDP).

    python -m cljax.main --config=configs/dinov2_vitg14.py --workdir=gs://BUCKET/dinov2_g14 \\
        --config.data.data_dir=/path/to/tensorflow_datasets

Launch it on every host of a pod (``launch/``). Memory before renting, and the compiled
step on 8 CPU devices (shapes only, nothing allocated; KoLeo needs 2 images a device in
each of the two compiles, at the batch and at half of it):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m cljax.bench \\
        --config=configs/dinov2_vitg14.py --parts=memory --config.data.global_batch_size=32

Recipe: ``dinov2/configs/train/vitg14.yaml`` of facebookresearch/dinov2 over its default
config (``configs/dinov2_vitl14.py`` says which values those are), on ImageNet-1k (the
official run reads LVD-142M, which is not public):
- ViT-g (``vit_giant2``: width 1536, 40 blocks, 24 heads, SwiGLU FFN; 1.13B parameters at
  224 px, 1.23B with the two heads),
  stochastic depth 0.4, LayerScale 1e-5;
- separate DINO and iBOT heads of 131,072 prototypes each, bottleneck 384; Sinkhorn-Knopp
  centring (3 iterations);
- teacher EMA 0.994 -> 1; 500 official epochs with 80 of warm-up, base learning rate
  2e-4 x sqrt(B / 1024), weight decay 0.04 -> 0.2, no layer-wise decay (1.0), patch
  embedding x 0.2, clipping at 3.0; local crops of 98 px.
The yaml gives 12 images per GPU but no GPU count; the batch here is 2,048, where one
official epoch (1,250 steps) is two ImageNet epochs (schedules below in ImageNet epochs).

Memory: the student, its AdamW moments and the teacher take 16 bytes a parameter, 19.8 GB
whole on every device (more than a TPU v5e's 16 GB) before one activation; here they are
split over the devices (``mesh.state_sharding="fsdp"``), the 40 blocks run as one scanned
loop whose layers are gathered one at a time, and each block is rematerialised in the
backward pass. ``docs/benchmarks.md`` ("Sharded state") has the table.

Hardware: a TPU v4-256/v5e-256 slice or 64+ H100s. Expected result: the released ViT-g/14
reaches 86.5% ImageNet linear (87.0% with registers), trained on LVD-142M and then at 518 px;
on ImageNet-1k alone expect less. Not run here (no accelerator was available).
"""

from cljax import defaults

vitl14 = defaults.load_sibling(__file__, "dinov2_vitl14.py")


def get_config():
  c = vitl14.get_config()
  official_epoch = vitl14.OFFICIAL_EPOCH
  c.model.variant = "g/14"
  c.model.drop_path_rate = 0.4
  c.model.remat = True
  c.model.scan_blocks = True
  c.mesh.state_sharding = "fsdp"
  d = c.dinov2
  d.centering = "sinkhorn_knopp"
  d.head.out_dim = 131072
  d.head.bottleneck_dim = 384
  d.ibot_separate_head = True
  d.ibot_head.out_dim = 131072
  d.ibot_head.bottleneck_dim = 256  # The yaml sets the DINO head's bottleneck only.
  d.layerwise_decay = 1.0
  c.ema.base = 0.994
  c.optim.base_lr = 2e-4
  c.optim.weight_decay_end = 0.2
  c.optim.warmup_epochs = 80 * official_epoch
  c.train.num_epochs = int(500 * official_epoch)
  c.train.checkpoint_every_steps = 1000
  return c
