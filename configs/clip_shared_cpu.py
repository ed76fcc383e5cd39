"""CLIP on captions made from the shared CIFAR-10 images, sized for a 2-core CPU.

    python -m cljax.main --config=configs/clip_shared_cpu.py --workdir=runs/clip_cpu
    python -m cljax.evaluate --config=configs/clip_shared_cpu.py --workdir=runs/clip_cpu \\
        --nolinear_probe --noplots
    python benchmarks/clip_quality.py --budget_minutes=9   # train for a budget, then evaluate

Data: ``train.npz`` / ``test.npz`` of the shared CIFAR-10 copy (``data.data_dir`` defaults to
``../shared/data/cifar10``, relative to the repository root), captioned by
``cljax.data.captions``: class names in 16 training templates, with colour/brightness words
read off the pixels half the time; the 10,000 test images get one caption each from six
other templates. Such captions say little more than the label, so the "zero-shot" figures
measure the pipeline, not transfer (see the README's CLIP section).

Model: a CIFAR-stem ResNet with one basic block per stage (width 16, 64-d features), the
"tiny" causal text Transformer (width 128, 4 blocks, 2 heads, 32 tokens) over the shipped
461-token BPE vocabulary, a 128-d joint space, CLIP's loss with the logit scale learned
from 1/0.07 and clamped at 100. AdamW as CLIP (beta2 0.98, eps 1e-6, weight decay 0.2
scaled down to 0.1 for the short run), batch 256, random resized crops (area 0.5-1) and
flips, no colour augmentation (the captions name colours).

Hardware and expected result: on a 2-core CPU shared with other jobs one step (256 pairs)
took about 3.5 s, so the 9-minute budget of ``benchmarks/clip_quality.py`` made 152 steps
(0.78 epochs) and reached 34% zero-shot top-1 (chance 10%) and 4.7% / 6.8% image-to-text /
text-to-image R@1 (chance 0.25%) on the held-out test images: see ``docs/results.md``.
"""

from cljax import defaults
from cljax.models import text


def get_config():
  c = defaults.base_config()
  c.method = "clip"
  c.clip.embed_dim = 128
  sizes = text.text_size("tiny")
  c.clip.text_width, c.clip.text_depth, c.clip.text_heads = (
    sizes["width"],
    sizes["depth"],
    sizes["num_heads"],
  )
  c.clip.context_length = 32  # The longest caption or prompt here is 22 tokens.
  c.clip.vocab_size = 512  # The shipped vocabulary has 461 tokens.

  c.model.depth = 18
  c.model.stage_sizes = (1, 1, 1)
  c.model.num_filters = 16
  c.model.stem = "cifar"
  c.model.dtype = "float32"  # bfloat16 is slow on CPUs.

  c.optim.name = "adamw"
  c.optim.base_lr = 1e-3
  c.optim.lr_scaling = "none"
  # open_clip: no decay on 1-D parameters (biases, norms, logit scale) or the class and
  # position embeddings (its models' no_weight_decay()); matrices and token embedding decay.
  c.optim.decay_mask = "kernels"
  c.optim.weight_decay = 0.1
  c.optim.warmup_epochs = 0.2
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6

  c.data.source = "encoded_npz"
  c.data.name = "cifar10_shared_captions"
  c.data.data_dir = "../shared/data/cifar10"
  c.data.eval_split = "test"
  c.data.image_size = 32
  c.data.global_batch_size = 256
  c.data.num_workers = 0  # Two cores: worker processes would compete with the step.
  c.data.augment.crop_area_min = 0.5
  c.data.augment.photometric = False

  c.train.num_epochs = 3
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 200
  c.train.max_to_keep = 2

  c.evals.knn_at_end = False  # Zero-shot and retrieval: python -m cljax.evaluate.
  c.evals.batch_size = 500
  return c
