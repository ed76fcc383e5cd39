"""The base config every recipe in ``configs/`` starts from: all keys, SimCLR defaults."""

from __future__ import annotations

import importlib.util
import os
import types

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Every config key cljax reads, with SimCLR v1 (ResNet-50, ImageNet) defaults.

  Recipes override fields; because configs are locked when loaded, a
  ``--config.x.y=v`` override of a key that is not here is an error.
  """
  c = ml_collections.ConfigDict()
  # A name in cljax.methods.METHODS: "simclr" | "moco_v2" | "moco_v3" | "byol" | "simsiam" |
  # "dino" | "swav" | "barlow_twins" | "supcon" | "clip" | "supervised" (cross-entropy).
  c.method = "simclr"

  # Each method's own sections (ema, moco, simsiam, dino, swav, barlow_twins, clip,
  # supcon), from the method's module: ``Method.config_sections`` in cljax/methods/.
  from cljax import methods  # Here, so that importing defaults stays light.

  for section, defaults in methods.config_sections().items():
    c[section] = defaults

  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet"  # "resnet" | "vit"
  c.model.depth = 50
  c.model.width_multiplier = 1
  c.model.num_filters = 64
  c.model.stem = "imagenet"  # "imagenet" | "cifar"
  c.model.stage_sizes = ()  # Non-empty overrides the depth's blocks per stage (toy models).
  c.model.dtype = "bfloat16"  # Compute dtype; parameters are always float32.
  c.model.bn_momentum = 0.9
  # How BatchNorm sees a step's views in training: "per_view" (a forward pass per view, each
  # normalised by its own statistics: the official code of BYOL, MoCo v2/v3, SimSiam and
  # Barlow Twins) | "pooled" (one pass over all views: SimCLR's) | "default" (the method's
  # official choice; methods that only pool offer only "pooled"). Global across devices
  # either way.
  c.model.bn_views = "default"
  # ViT only (model.name = "vit"): "Ti/16" | "S/16" | "B/16" | "L/16"; the
  # number after the slash is the patch size.
  c.model.variant = "S/16"
  c.model.posemb = "sincos2d"  # "sincos2d" (fixed) | "learn"
  c.model.freeze_patch_embed = False  # MoCo v3: a frozen random patch projection.
  # ViT memory and compile time: recompute each block's activations in the backward pass;
  # run the blocks as one scanned loop (stacked parameters: another checkpoint layout).
  c.model.remat = False
  c.model.scan_blocks = False
  # DINOv2's ViT only (model.name = "vit_dinov2", cljax.models.vit_dinov2; model.variant
  # "S/14" | "B/14" | "L/14" | "g/14" | "custom:dim=..,depth=..,heads=..,patch=.."): the
  # side its learned position embeddings are made for (other sizes interpolate them: the
  # global crop size), stochastic depth (uniform over blocks), LayerScale's initial value
  # (0: none), register tokens, and the FFN ("default": the variant's; "mlp" | "swiglufused").
  c.model.img_size = 224
  c.model.drop_path_rate = 0.0
  c.model.layerscale = 1e-5
  c.model.num_register_tokens = 0
  c.model.ffn_layer = "default"
  # TS2Vec's series encoder (model.name = "ts2vec", cljax.models.ts2vec): the official sizes.
  c.model.tsencoder = ml_collections.ConfigDict()
  c.model.tsencoder.hidden_dims = 64
  c.model.tsencoder.output_dims = 320
  c.model.tsencoder.depth = 10  # Hidden blocks; one more block maps to output_dims.
  c.model.tsencoder.mask_mode = "binomial"  # Timestamp masking in training.
  c.model.tsencoder.dropout = 0.1

  c.head = ml_collections.ConfigDict()
  c.head.num_layers = 2  # SimCLR v1: 2, v2: 3.
  c.head.hidden_dim = 2048
  c.head.output_dim = 128
  # After the last Dense: "bn", BatchNorm with a scale (SimCLR v2); "bn_no_affine", without
  # scale or bias (MoCo v3, SimSiam's projector); "none", a bias instead; "none_no_bias",
  # neither (MoCo v3's ResNet predictor).
  c.head.output_norm = "bn"
  c.head.hidden_norm = "bn"  # "bn": BatchNorm in the hidden layers; "none" (MoCo v2): bias.

  # The prediction MLP of BYOL, SimSiam and MoCo v3 (0 layers: none). Its
  # output has the head's output_dim.
  c.predictor = ml_collections.ConfigDict()
  c.predictor.num_layers = 0
  c.predictor.hidden_dim = 4096
  c.predictor.output_norm = "none"  # As head.output_norm (MoCo v3 ViT: "bn_no_affine").

  c.loss = ml_collections.ConfigDict()
  c.loss.temperature = 0.1
  # SimCLR's loss: "nt_xent" | "debiased" (Chuang et al. 2020, class prior
  # tau_plus) | "hard_negative" (Robinson et al. 2021, concentration beta) |
  # "decoupled" (Yeh et al. 2022, no positive in the denominator).
  c.loss.name = "nt_xent"
  c.loss.tau_plus = 0.1
  c.loss.beta = 1.0
  # "plain" materialises the (local x global) logits; "blockwise" streams over
  # key blocks with an online log-sum-exp: same value and gradient, memory
  # O(local x block_size). Worth it from about 8k global views.
  c.loss.implementation = "plain"
  c.loss.block_size = 1024

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "lars"  # "lars" | "sgd" | "adamw"
  c.optim.base_lr = 0.075
  c.optim.lr_scaling = "sqrt"  # "linear": base_lr * B / 256; "sqrt": base_lr * sqrt(B).
  c.optim.weight_decay = 1e-6
  # >= 0: weight decay follows a half cosine from weight_decay to this over the run (DINO:
  # 0.04 -> 0.4; SGD and AdamW only); < 0: constant.
  c.optim.weight_decay_end = -1.0
  c.optim.momentum = 0.9
  c.optim.trust_coefficient = 1e-3
  # Where LARS applies the learning rate, which matters while it changes: "lr_then_momentum",
  # to each step's update before the momentum sums it (optax.lars, SimCLR's LARS);
  # "momentum_then_lr", to the sum (PyTorch's SGD rule: BYOL, Barlow Twins, MoCo v3, SwAV).
  c.optim.lars_order = "lr_then_momentum"
  # Which parameters weight decay (and LARS's trust ratio) applies to, as each recipe's
  # official code does (tests/test_fidelity_optim.py): "kernels": not biases, norm scales and
  # offsets, a ViT's class token and position embeddings or CLIP's logit scale (SimCLR, BYOL:
  # on a ResNet the same as "matrices"; CLIP: open_clip's 1-D and no_weight_decay() rule);
  # "matrices": parameters of 2+ dimensions that are not biases, PyTorch's ``p.ndim >= 2``
  # (DINO, Barlow Twins, MoCo v3's LARS); "all" (MoCo v2, SimSiam, SupCon, MoCo v3's AdamW,
  # SwAV's LARC). Never a ``frozen_*`` module.
  c.optim.decay_mask = "kernels"
  c.optim.b2 = 0.999  # AdamW's second-moment decay (CLIP: 0.98).
  c.optim.eps = 1e-8  # AdamW's epsilon (CLIP: 1e-6).
  c.optim.warmup_epochs = 10.0
  c.optim.lr_schedule = "warmup_cosine"  # | "constant" (the peak throughout: TS2Vec)

  c.data = ml_collections.ConfigDict()
  # What the data is: "image" | "series" (cljax.modalities): its sources, views, evaluation.
  c.data.modality = "image"
  # "tfds" | "folder" | "npz" | "idx" | "encoded_npz" | "synthetic" | "embedded" | "prepared"
  c.data.source = "tfds"
  c.data.name = "imagenet2012"
  c.data.data_dir = ""  # Empty: tfds's default (~/tensorflow_datasets) or the source's own.
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.num_examples = 0  # Only for "synthetic".
  c.data.num_classes = 0  # Only for "synthetic".
  c.data.image_size = 224
  c.data.global_batch_size = 4096
  # Keep the whole uint8 data set on every device and crop/flip there: no host
  # work per step. For data sets that fit in device memory (CIFAR-size).
  c.data.device_resident = False
  # Decode only on the host (libjpeg-turbo), into a canvas_size x canvas_size canvas, and cut
  # every view on the device inside the step (cljax/data/decode.py): for JPEG data sets
  # (ImageNet, folders of photos), where the host's resizes would bound the step.
  c.data.crop_on_device = False
  c.data.canvas_size = 512  # Holds ImageNet's usual 500x375 whole; larger images are shrunk.
  # libjpeg-turbo's fast DCT/upsampling: ~10% faster on 500x375 JPEGs, pixels <=91 off (mean 1.7).
  c.data.jpeg_fast_dct = False
  c.data.num_workers = 8  # grain worker processes per host; 0 decodes in the main process.
  c.data.strict = False  # True: an unreadable image in a folder is fatal, not skipped.
  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.crop_area_min = 0.08
  c.data.augment.crop_area_max = 1.0
  # Multi-crop (SwAV, DINO): this many extra low-resolution local views per image.
  c.data.augment.num_local_crops = 0
  c.data.augment.local_crop_size = 96
  c.data.augment.local_crop_area_min = 0.05
  c.data.augment.local_crop_area_max = 0.4
  c.data.augment.flip = True
  c.data.augment.photometric = True  # Colour jitter, grayscale, blur, solarize on device.
  c.data.augment.color_strength = 1.0
  c.data.augment.color_jitter_prob = 0.8
  c.data.augment.grayscale_prob = 0.2
  c.data.augment.blur_prob = 0.5
  c.data.augment.solarize_prob = 0.0
  # The second view's probabilities when they differ (BYOL: blur 1.0 / 0.1,
  # solarize 0.0 / 0.2); < 0 means the same as the first view's.
  c.data.augment.blur_prob_b = -1.0
  c.data.augment.solarize_prob_b = -1.0
  # Multi-crop's local views' blur probability (DINO: 0.5, its global views 1.0 / 0.1);
  # < 0 means the same as the first view's. Local views are never solarized unless the
  # first view is.
  c.data.augment.blur_prob_local = -1.0

  c.train = ml_collections.ConfigDict()
  c.train.seed = 0
  c.train.num_epochs = 100
  c.train.num_steps = 0  # > 0 overrides num_epochs.
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 1000
  c.train.max_to_keep = 3
  c.train.grad_chunks = 1  # > 1: gradient caching, activations of 1/grad_chunks at a time.
  c.train.max_nonfinite_streak = 5  # Stop after this many NaN/Inf steps in a row (0: never).
  c.train.stop_at_step = 0  # > 0: save and stop there, e.g. to split a run into jobs.

  # How the train state lies on the devices (the batch is always split over all of them):
  # "replicated" (data parallelism) or "fsdp" (each leaf of at least fsdp_min_elements
  # elements split over the devices: parameters, optimiser state, target network).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.state_sharding = "replicated"
  c.mesh.fsdp_min_elements = 2**16

  c.evals = ml_collections.ConfigDict()
  c.evals.collapse_metrics = False  # Log effective rank, alignment, uniformity every step.
  c.evals.online_probe = True  # Linear classifier on frozen features during training (labels).
  c.evals.online_probe_lr = 1e-3
  c.evals.knn_at_end = True  # kNN on the eval split when training ends (labelled data).
  c.evals.knn_baseline = False  # Also the kNN of the randomly initialised encoder.
  c.evals.knn_k = 200
  c.evals.knn_temperature = 0.07
  c.evals.batch_size = 512
  return c


def load_sibling(config_file: str, relative_path: str) -> types.ModuleType:
  """Loads the Python file at ``relative_path`` from the folder of ``config_file``.

  Config files are read by path from any working directory, not imported as a
  package; recipes share pieces (a data set, a CPU preset, a base recipe) this way:
  ``common = defaults.load_sibling(__file__, "common/cifar10.py")``.
  """
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), relative_path)
  name = "cljax_recipe_" + os.path.splitext(relative_path)[0].replace(os.sep, "_").replace("/", "_")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
