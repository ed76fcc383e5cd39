"""CLIP ViT-H/14 for pods: the state sharded over the devices (FSDP), blocks rematerialised.

    python -m cljax.main --config=configs/clip_vith14.py --workdir=gs://BUCKET/clip_h14 \\
        --config.data.data_dir=DIR --config.clip.caption_file=DIR/train.jsonl \\
        --config.clip.eval_caption_file=DIR/val.jsonl

Launch it on every host of a pod (``launch/``); data and captions as ``configs/clip_vitb16.py``.
Memory before renting (shapes only, nothing allocated; the captions and tokenizer
overrides only let the command build its batch offline):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m cljax.bench \\
        --config=configs/clip_vith14.py --parts=memory --config.clip.captions=templates \\
        --config.clip.tokenizer=builtin --config.clip.eot_id=2 --config.data.global_batch_size=64

Towers (open_clip's ``ViT-H-14``): image ViT-H/14, 32 blocks of width 1280, 16 heads, MLP
5120, 224 px (630.8M parameters); text Transformer of 24 blocks, width 1024, 16 heads;
shared embedding 1024; 986M parameters in all. Batch 79,104 and 32B samples seen: the
``laion2b_s32b_b79k`` checkpoint's name (LAION-2B, s32b, b79k), so 404,530 steps
(``train.num_steps``). The learning rate and warm-up are not in that name: this recipe
takes CLIP's ViT-L/14 rate, 4e-4 (Radford et al. 2021, Table 20), and CLIP's 2,000 warm-up
steps; check open_clip's training notes before spending a pod on it. AdamW beta2 0.98, eps
1e-6, weight decay 0.2 off biases, norms and embeddings (open_clip's rule, as
``clip_vitb16.py``).

Memory (``docs/benchmarks.md``, "Sharded state"): the train state (float32 parameters and
AdamW's two moments, 12 bytes a parameter) is 11.8 GB whole on every device, more than
half of a TPU v5e's 16 GB before one activation. Under FSDP it is 11.8 GB / N per device:
185 MB on 64 devices, 46 MB on 256. With ``model.remat`` each block keeps only its input
for the backward pass.

Hardware: a TPU v4-256 or v5e-256 slice, or 32+ H100s, for 79,104 pairs a step (about 309
a chip on 256 chips; raise ``train.grad_chunks`` where activations do not fit). Expected
result: open_clip reports 78.0% zero-shot ImageNet top-1 for ``laion2b_s32b_b79k``; on
another data set, less. Not run here (no accelerator was available).
"""

from cljax import defaults

vitb16 = defaults.load_sibling(__file__, "clip_vitb16.py")


def get_config():
  c = vitb16.get_config()
  c.model.variant = "H/14"
  c.model.remat = True
  c.model.scan_blocks = True  # One block compiled instead of 32.
  c.mesh.state_sharding = "fsdp"

  # The tokenizer stays CLIP's byte-level BPE (clip_vitb16.py): open_clip's towers share it.
  c.clip.embed_dim = 1024
  c.clip.text_width, c.clip.text_depth, c.clip.text_heads = 1024, 24, 16

  c.data.global_batch_size = 79104
  c.optim.base_lr = 4e-4
  c.train.num_steps = 32_000_000_000 // 79104  # 32B samples seen.
  c.optim.warmup_epochs = 2000 / (2_320_000_000 // 79104)  # 2,000 steps of LAION-2B's epochs.
  c.train.checkpoint_every_steps = 2000
  return c
