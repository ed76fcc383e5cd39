"""Command line: ``python -m cljax.evaluate --config=configs/X.py --workdir=DIR``."""

from __future__ import annotations

import json

import jax
from absl import app, flags
from ml_collections import config_flags

from cljax import cli, compile_cache, metrics, validate
from cljax.evaluate import linear, runner

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "The run's config file from configs/; override fields with --config.a.b=v.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "The pretraining workdir to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate; default the latest.")
_LINEAR = flags.DEFINE_bool("linear_probe", True, "L-BFGS linear probe on cached features.")
_LINEAR_MAX_STEPS = flags.DEFINE_integer(
  "linear_max_steps", 1000, "L-BFGS iterations per linear-probe fit at most."
)
_LINEAR_PATIENCE = flags.DEFINE_integer(
  "linear_patience",
  linear.DEFAULT_PATIENCE,
  "The linear probe's L2 sweep (strongest first) stops after this many strengths without a "
  "better held-out score; 0 fits every strength of the grid.",
  lower_bound=0,
)
_PLOTS = flags.DEFINE_bool("plots", True, "Write the t-SNE and similarity PNGs.")
_TSNE_POINTS = flags.DEFINE_integer("tsne_points", 2000, "Eval-split points in the t-SNE map.")
_PAIRS = flags.DEFINE_integer(
  "pair_examples", 512, "Eval images whose two augmented views give alignment and similarities."
)
_BASELINES = flags.DEFINE_bool(
  "baselines", False, "Also evaluate the randomly initialised encoder and raw pixels."
)
_ANOMALY = flags.DEFINE_bool(
  "anomaly",
  False,
  "One-class anomaly detection: each class in turn normal, test examples scored by their "
  "kNN distance to its training examples; AUROC of the features and of the raw inputs.",
)
_SVM = flags.DEFINE_bool(
  "svm", False, "TS2Vec's classification protocol: an RBF SVM, C by 5-fold cross-validation."
)
_LINEAR_SGD_EPOCHS = flags.DEFINE_integer(
  "linear_sgd_epochs", 0, "> 0: also SimCLR's SGD linear protocol (crop+flip) for this many epochs."
)
_FINETUNE = flags.DEFINE_list(
  "finetune_fractions", [], "Label fractions to fine-tune the whole network on, e.g. 0.01,0.1."
)
_FINETUNE_EPOCHS = flags.DEFINE_integer(
  "finetune_epochs", None, "Fine-tuning epochs; default SimCLR's (60 for 1%, 30 for 10%)."
)
_CLASSIFIER_BATCH = flags.DEFINE_integer(
  "classifier_batch_size", 4096, "Global batch of the SGD linear protocol and fine-tuning."
)
_ZERO_SHOT = flags.DEFINE_bool(
  "zero_shot",
  None,
  "Zero-shot accuracy (prompt ensemble) and image-text retrieval R@1/5/10; default: on for "
  "methods with a text tower (clip).",
)
_WORKERS = flags.DEFINE_integer("num_workers", 0, "grain worker processes for the eval pipeline.")
flags.mark_flags_as_required(["config", "workdir"])


def _summary(result: dict) -> list[str]:
  lines = [f"step {result['step']}: {result['num_train']} train / {result['num_eval']} eval"]
  if "knn" in result:
    lines.append(f"kNN top-1 (k={result['knn']['k']}): {result['knn']['top1']:.2%}")
  if "linear_probe" in result:
    probe = result["linear_probe"]
    lines.append(
      f"linear probe top-1 {probe['top1']:.2%}, top-5 {probe['top5']:.2%} (l2={probe['l2']:g})"
    )
  for name, base in result.get("baselines", {}).items():
    parts = [f"kNN {base['knn']['top1']:.2%}"]
    if "linear_probe" in base:
      parts.append(f"linear {base['linear_probe']['top1']:.2%}")
    lines.append(f"baseline {name}: " + ", ".join(parts))
  if "svm" in result:
    lines.append(f"RBF SVM top-1 (C={result['svm']['C']:g}): {result['svm']['top1']:.2%}")
  if "anomaly" in result:
    a = result["anomaly"]
    lines.append(
      f"anomaly AUROC (one class normal, mean over {len(a['encoder']['per_class'])}): "
      f"features {a['encoder']['mean']:.3f}, raw inputs {a['raw']['mean']:.3f}"
    )
  if "zero_shot" in result:
    zs = result["zero_shot"]
    lines.append(
      f"zero-shot top-1 {zs['top1']:.2%} (chance {zs['chance']:.2%}, {zs['num_prompts']} "
      f"prompts, {zs['num_images']} images)"
    )
  if "retrieval" in result:
    r = result["retrieval"]
    for name in ("image_to_text", "text_to_image"):
      got, chance = r[name], r[f"chance_{name}"]
      recalls = ", ".join(f"R@{k[1:]} {got[k]:.2%} (chance {chance[k]:.2%})" for k in got)
      lines.append(f"retrieval {name.replace('_', '-')}: {recalls}")
  projection = result["collapse"]["projection"]
  lines.append(
    f"embeddings: std x sqrt(d) {projection['embedding_std_ratio']:.3f}, effective rank "
    f"{projection['effective_rank']:.1f}, alignment {projection['alignment']:.3f}, "
    f"uniformity {projection['uniformity']:.3f}"
  )
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    # The same checks as training (a run is evaluated with its own config; no rate is used).
    validate.check_config(_CONFIG.value, allow_zero_lr=True)
  except ValueError as e:
    cli.exit_with(e)
  metrics.setup_logging()
  compile_cache.setup()
  with cli.user_errors():
    result = _evaluate()
  if jax.process_index() == 0:
    print("\n".join(_summary(result)))
    print(json.dumps({"eval": result}, sort_keys=True))


def _evaluate() -> dict:
  return runner.evaluate_checkpoint(
    _CONFIG.value,
    _WORKDIR.value,
    step=_STEP.value,
    linear_probe=_LINEAR.value,
    linear_max_steps=_LINEAR_MAX_STEPS.value,
    linear_patience=_LINEAR_PATIENCE.value or None,
    plot=_PLOTS.value,
    tsne_points=_TSNE_POINTS.value,
    pair_examples=_PAIRS.value,
    baselines=_BASELINES.value,
    anomaly=_ANOMALY.value,
    svm_protocol=_SVM.value,
    linear_sgd_epochs=_LINEAR_SGD_EPOCHS.value,
    finetune_fractions=[float(f) for f in _FINETUNE.value],
    finetune_epochs=_FINETUNE_EPOCHS.value,
    classifier_batch_size=_CLASSIFIER_BATCH.value,
    num_workers=_WORKERS.value,
    zero_shot=_ZERO_SHOT.value,
  )


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
