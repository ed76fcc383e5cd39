"""CLIP ViT-B/16 with the published hyperparameters, for your own image-caption data.

    python -m cljax.main --config=configs/clip_vitb16.py --workdir=runs/clip_b16 \\
        --config.data.data_dir=DIR --config.clip.caption_file=DIR/train.jsonl \\
        --config.clip.eval_caption_file=DIR/val.jsonl
    python -m cljax.evaluate --config=configs/clip_vitb16.py --workdir=runs/clip_b16 ...

Data: ``DIR/train/`` and ``DIR/val/`` folders of images (``data.source="folder"``) and JSON
Lines or CSV files pairing their paths (relative to the split folder) with captions; see
``cljax.data.captions``. Tokenizer: CLIP's own 49,408-token byte-level BPE from the Hugging
Face Hub (``hf:openai/clip-vit-base-patch16``, downloaded once by ``tokenizers``), EOT id
49407.

Hyperparameters (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision"): Table 18 (common): batch 32,768, 32 epochs, vocabulary 49,408,
maximum logit scale 100, weight decay 0.2, 2,000 warm-up iterations then cosine decay,
AdamW beta1 0.9, beta2 0.98, eps 1e-6 (ViT); Table 20 (CLIP-ViT): ViT-B/16 learning rate
5e-4, embedding dimension 512, input resolution 224, 12 layers of width 768 with 12 heads,
text Transformer of 12 layers, width 512, 8 heads. Context 77 tokens (76 plus SOT, as
open_clip); temperature initialised to 0.07.

Differences from the paper: the ViT has no LayerNorm before its Transformer and takes the
class token after the final LayerNorm (cljax.models.vit); images get open_clip's random
resized crop (area 0.9-1) instead of CLIP's only-resize. Warm-up is given in epochs:
2,000 iterations of 12,207 (= 400M pairs / 32,768) per epoch is 0.164 epochs; rescale
``optim.warmup_epochs`` for a data set of another size.

Hardware: the paper trained ViT-B/16 on 400M pairs for 12 days on 256 V100s; 32,768 pairs
per step need many accelerators (and ``train.grad_chunks`` to fit). Expected result on
400M pairs: about 68.6% zero-shot ImageNet top-1, the figure OpenAI reports for its
ViT-B/16; far less on smaller data sets. Not run here (no accelerator was available).
"""

from cljax import defaults

common = defaults.load_sibling(__file__, "common/imagenet.py")


def get_config():
  c = common.large_run(defaults.base_config(), global_batch_size=32768, checkpoint_every_steps=2000)
  c.method = "clip"
  c.clip.tokenizer = "hf:openai/clip-vit-base-patch16"
  c.clip.eot_id = 49407
  c.clip.init_logit_scale = 1 / 0.07
  c.clip.captions = "file"
  c.clip.retrieval_examples = 5000  # As MS-COCO's 5k test split.

  c.model.name = "vit"
  c.model.variant = "B/16"
  c.model.posemb = "learn"

  c.optim.name = "adamw"
  c.optim.base_lr = 5e-4
  c.optim.lr_scaling = "none"
  # open_clip: no decay on 1-D parameters (biases, norms, logit scale) or the class and
  # position embeddings (its models' no_weight_decay()); matrices and token embedding decay.
  c.optim.decay_mask = "kernels"
  c.optim.weight_decay = 0.2
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6
  c.optim.warmup_epochs = 2000 / (400_000_000 // 32768)

  c.data.source = "folder"
  c.data.name = "image_text_pairs"
  c.data.eval_split = "val"
  c.data.augment.crop_area_min = 0.9
  c.data.augment.flip = False
  c.data.augment.photometric = False

  c.train.num_epochs = 32
  c.evals.online_probe = False
  c.evals.batch_size = 1024
  return c
