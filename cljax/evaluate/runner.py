"""Evaluates a workdir's checkpoint: features, kNN, linear probe, collapse metrics, plots.

``python -m cljax.evaluate --config=configs/X.py --workdir=DIR`` calls ``evaluate_checkpoint``,
which writes into ``DIR/eval/``::

    step_<N>.json                 every result below, for checkpoint step N
    features_step<N>_<split>.npz  cached encoder features (reused by the next evaluation)
    curves_step<N>.png            loss and accuracy curves from DIR/metrics.jsonl, the kNN
                                  accuracy against the random-init and raw-pixel baselines
    tsne_step<N>.png              t-SNE of eval-split encoder features, coloured by class
    similarity_step<N>.png        positive- vs negative-pair cosine similarity of the head's
                                  embeddings
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from cljax import (
  checkpoint,
  collapse,
  errors,
  methods,
  metrics,
  modalities,
  run,
  sharding,
  step,
  xla_options,
)
from cljax.data import sources
from cljax.data import views as views_lib
from cljax.evaluate import anomaly as anomaly_lib
from cljax.evaluate import classifier, features, knn, linear, plots
from cljax.evaluate import svm as svm_lib

# Rows used for the O(n^2) uniformity of encoder features; the std and rank use all rows.
_UNIFORMITY_ROWS = 4096


def abstract_state(method: methods.Method, mesh: Mesh, num_classes: int = 0) -> Any:
  """The TrainState's shapes and dtypes, replicated over ``mesh``: the restore target.

  ``num_classes >= 2`` includes the online probe (as training does for labelled data).
  """
  # Any callable schedule gives the optimiser state the saved structure; its values are unused.
  create = functools.partial(
    step.create_train_state,
    method,
    learning_rate_fn=lambda _: 0.0,
    input_shape=method.modality.input_shape(method.config),
  )
  shapes = jax.eval_shape(
    lambda key: create(key, mesh=mesh, num_classes=num_classes), jax.random.key(0)
  )
  rep = sharding.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)


def _saved_num_classes(saved: Any) -> int:
  """Classes of the online probe in a saved state's metadata, 0 without a probe."""
  probe = saved.get("probe_params") if hasattr(saved, "get") else None
  return int(probe["kernel"].shape[-1]) if probe else 0


def restore_checkpoint(
  method: methods.Method, workdir: str, *, step: int | None = None, mesh: Mesh
) -> tuple[Any, int]:
  """The train state at ``step`` (default: the latest) of ``workdir``, replicated on ``mesh``.

  The checkpoint is verified as training verifies it (``cljax.checkpoint``). Without
  ``step``, an unusable latest checkpoint is skipped with a warning and the previous one
  evaluated; evaluation changes nothing in the workdir, so it is left where it is.

  Raises:
    FileNotFoundError: if the workdir has no checkpoint (at ``step``).
    IncompatibleCheckpointError: the checkpoint is intact but does not fit the config.
    UnusableCheckpointError: the checkpoint at ``step``, or every one, cannot be used.
  """
  path = os.path.abspath(workdir)
  directory = os.path.join(path, "checkpoints")
  if not os.path.isdir(directory):  # Checked here: the manager would create the folder.
    why = "it has no checkpoints/ folder" if os.path.isdir(path) else "it does not exist"
    raise errors.DataNotFoundError(
      f"no checkpoint found in the workdir {path} ({why}): is --workdir={workdir} a training "
      "workdir? Train first with python -m cljax.main."
    )
  manager = checkpoint.create_manager(workdir, method.config, read_only=True)
  try:
    steps = manager.all_steps()
    if not steps or (step is not None and step not in steps):
      raise errors.DataNotFoundError(
        f"no checkpoint {'' if step is None else f'at step {step} '}in {manager.directory} "
        f"(found steps {sorted(steps)}); train first with python -m cljax.main."
      )
    candidates = [step] if step is not None else sorted(steps, reverse=True)
    for s in candidates:
      try:
        target_fn = functools.partial(_restore_target, manager, s, method, mesh)
        return checkpoint.restore_verified(manager, s, method.config, target_fn), s
      except checkpoint.UnusableCheckpointError as e:
        if s == candidates[-1]:
          raise checkpoint.UnusableCheckpointError(
            f"The checkpoint at step {s} in {manager.directory} cannot be used: {e}"
          ) from e
        logging.warning("The checkpoint at step %d cannot be used (%s); trying the previous.", s, e)
  finally:
    manager.close()


def _restore_target(manager: Any, step: int, method: methods.Method, mesh: Mesh) -> Any:
  """The restore target of ``step``: the TrainState, with the online probe it was saved with."""
  metadata = checkpoint.saved_state_metadata(manager, step)
  return abstract_state(method, mesh, _saved_num_classes(metadata))


def two_view_embeddings(
  method: methods.Method,
  state: Any,
  source: Any,
  mesh: Mesh,
  *,
  num_examples: int = 512,
  seed: int = 0,
) -> dict[str, np.ndarray]:
  """Encoder features and head embeddings of two augmented views of ``num_examples`` images.

  The views are drawn as in pretraining (the config's crop, flip and photometric settings),
  and passed through the network in eval mode.

  Returns:
    ``{"features_a", "features_b", "z_a", "z_b"}``, each (m, dim) with m = ``num_examples``
    rounded down to whole devices (and at most the source's size).
  """
  config = method.config
  devices = mesh.devices.size
  batch = min(num_examples, len(source)) // devices * devices
  # The method's own training views (its modality's), as a step draws them, without local
  # crops, at this batch size.
  config = config.copy_and_resolve_references()
  config.data.global_batch_size, config.data.num_workers = batch, 0
  spec = views_lib.ViewSpec.from_config(config.data).replace(num_local_crops=0)
  it = method.modality.train_iterator(config, source, mesh, spec, device_resident=False)
  host = next(it)
  keys = [k for k in method.modality.batch_keys if k in host and k not in ("local_views",)]
  batch_arrays = sharding.host_to_global({k: host[k] for k in keys}, mesh)
  modality = method.modality

  @functools.partial(jax.jit, compiler_options=xla_options.for_mesh(mesh))
  def embed(variables, arrays, key):
    arrays = modality.prepare_batch(config, arrays)
    x = modality.views(config, arrays, key, jnp.zeros((), jnp.int32))["global"]
    return state.apply_fn(variables, x, train=False)

  variables = method.eval_variables(state)
  f, z = embed(variables, batch_arrays, jax.random.key(seed))
  # Gathered so that every process holds all rows (multi-host arrays are not addressable).
  f, z = multihost_utils.process_allgather((f, z), tiled=True)
  f, z = np.asarray(f, np.float32), np.asarray(z)
  n = len(f) // 2
  out = {"features_a": f[:n], "features_b": f[n:], "z_a": z[:n], "z_b": z[n:]}
  return out


def frozen_feature_evals(
  config: ml_collections.ConfigDict,
  train: tuple[np.ndarray, np.ndarray],
  test: tuple[np.ndarray, np.ndarray],
  *,
  linear_probe: bool = True,
  l2_grid: Sequence[float] = linear.DEFAULT_L2_GRID,
  max_steps: int = 1000,
  patience: int | None = linear.DEFAULT_PATIENCE,
  name: str = "encoder",
  knn_features: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, Any]:
  """kNN (``evals.knn_k``, ``evals.knn_temperature``) and optionally the L-BFGS linear probe
  on cached ``(features, labels)`` of the train and the test split (``patience``: the L2
  sweep's early stop, ``linear.linear_probe``; None sweeps the whole grid). ``knn_features``
  picks the columns kNN compares (``Method.knn_features``; default all), the probe reads all.

  Returns:
    ``{"knn": {"top1", "k", "temperature", "seconds"}, "linear_probe": {...}}``, or ``{}``
    when a split is empty or unlabelled.
  """
  (train_x, train_y), (test_x, test_y) = train, test
  if not len(train_y) or not len(test_y) or train_y.min() < 0 or test_y.min() < 0:
    return {}
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  k, temperature = config.evals.knn_k, config.evals.knn_temperature
  t0 = time.time()
  columns = knn_features or (lambda x: x)
  top1 = knn.knn_accuracy(
    columns(train_x),
    train_y,
    columns(test_x),
    test_y,
    num_classes=num_classes,
    k=k,
    temperature=temperature,
  )
  out = {"knn": {"top1": top1, "k": k, "temperature": temperature}}
  out["knn"]["seconds"] = time.time() - t0
  logging.info("kNN of %s features: %.4f (%.1fs).", name, top1, out["knn"]["seconds"])
  if linear_probe:
    logging.info(
      "Linear probe of %s features (%d x %d): L-BFGS at up to %d L2 strengths, then a refit...",
      name,
      *train_x.shape,
      len(l2_grid),
    )
    t0 = time.time()
    out["linear_probe"] = linear.linear_probe(
      train_x,
      train_y,
      test_x,
      test_y,
      num_classes=num_classes,
      l2_grid=l2_grid,
      max_steps=max_steps,
      patience=patience,
      progress=features.progress,
    )
    out["linear_probe"]["seconds"] = time.time() - t0
    probe, skipped = out["linear_probe"], out["linear_probe"]["skipped_l2"]
    logging.info(
      "Linear probe of %s features: top-1 %.4f at L2 %g (%.0fs%s).",
      name,
      probe["top1"],
      probe["l2"],
      probe["seconds"],
      f"; not fitted, the held-out score having stopped improving: L2 {skipped}" if skipped else "",
    )
  return out


def _collapse(features_eval: np.ndarray, pairs: dict[str, np.ndarray]) -> dict[str, Any]:
  """Collapse metrics of the encoder features (eval split) and of the head's two-view output."""
  rows = np.random.default_rng(0).permutation(len(features_eval))[:_UNIFORMITY_ROWS]
  encoder = collapse.collapse_metrics(jnp.asarray(features_eval))
  encoder["uniformity"] = collapse.uniformity(jnp.asarray(features_eval[rows]))
  projection = collapse.collapse_metrics(jnp.asarray(pairs["z_a"]), jnp.asarray(pairs["z_b"]))
  result = {
    "encoder": {k: float(v) for k, v in encoder.items()},
    "projection": {k: float(v) for k, v in projection.items()},
  }
  # Warnings for the head's output only: pooled ReLU features are all non-negative, so their
  # normalised std sits well below 1/sqrt(d) even in a healthy encoder.
  result["warnings"] = collapse.collapse_warnings(result["projection"])
  return result


def evaluate_state(
  method: methods.Method,
  state: Any,
  mesh: Mesh,
  *,
  out_dir: str | None = None,
  tag: str = "",
  title: str = "",
  linear_probe: bool = True,
  linear_max_steps: int = 1000,
  linear_patience: int | None = linear.DEFAULT_PATIENCE,
  plot: bool = True,
  tsne_points: int = 2000,
  pair_examples: int = 512,
  num_workers: int = 0,
) -> dict[str, Any]:
  """kNN, linear probe and collapse metrics of ``state``'s encoder; plots into ``out_dir``.

  Args:
    method: the run's method (its config: data, model, evals sections).
    state: a TrainState (restored or freshly initialised).
    mesh: devices to run on.
    out_dir: where to cache features and write plots; None: nothing is written.
    tag: suffix of the cached-feature and plot file names (e.g. ``"step100"``).
    title: what the plots' titles say was evaluated (e.g. ``"step 100"``).
    linear_probe: run the L-BFGS linear probe.
    linear_max_steps: L-BFGS iterations per fit at most.
    linear_patience: L2 strengths without a better held-out score before the probe's sweep
      stops (``linear.linear_probe``); None: the whole grid.
    plot: write the t-SNE and similarity-histogram PNGs (needs ``out_dir``).
    tsne_points: eval-split points in the t-SNE map.
    pair_examples: eval-split images whose two views give the pair statistics.
    num_workers: grain worker processes for feature extraction.

  Returns:
    ``{"knn", "linear_probe", "collapse", "num_train", "num_eval", "feature_dim", "plots"}``
    (no kNN or probe when the data is unlabelled).
  """
  config = method.config
  cache = lambda split: out_dir and os.path.join(out_dir, f"features_{tag}_{split}.npz")
  t0 = time.time()
  (train_x, train_y), (test_x, test_y) = (
    features.split_features(
      config, method, state, split, mesh, cache_path=cache(split), num_workers=num_workers
    )
    for split in ("train", "eval")
  )
  result: dict[str, Any] = {
    "num_train": len(train_y),
    "num_eval": len(test_y),
    "feature_dim": int(train_x.shape[1]),
    "feature_seconds": time.time() - t0,
  }
  evals = frozen_feature_evals(
    config,
    (train_x, train_y),
    (test_x, test_y),
    linear_probe=linear_probe,
    max_steps=linear_max_steps,
    patience=linear_patience,
    name=title or "encoder",
    knn_features=method.knn_features,
  )
  result.update(evals)
  eval_source = sources.create_source(config.data, "eval")
  pairs = two_view_embeddings(method, state, eval_source, mesh, num_examples=pair_examples)
  result["collapse"] = _collapse(test_x, pairs)
  for warning in result["collapse"]["warnings"]:
    logging.warning("Collapse diagnostic: %s", warning)
  result["plots"] = {}
  where = f", {title}" if title else ""
  if plot and out_dir and jax.process_index() == 0:
    positive, negative = collapse.pair_similarities(pairs["z_a"], pairs["z_b"])
    result["plots"]["similarity"] = plots.plot_similarity_histogram(
      positive,
      negative,
      os.path.join(out_dir, f"similarity_{tag}.png"),
      title=f"projection-head embeddings of two views, cosine similarity{where}",
    )
    if evals:  # Labelled.
      t0 = time.perf_counter()
      logging.info("t-SNE map of %d eval features...", min(tsne_points, len(test_y)))
      result["plots"]["tsne"] = plots.plot_tsne(
        test_x,
        test_y,
        os.path.join(out_dir, f"tsne_{tag}.png"),
        class_names=getattr(eval_source, "class_names", None),
        max_points=tsne_points,
        title=f"t-SNE of encoder features ({method.eval_network} network, before the head)" + where,
      )
      logging.info("t-SNE map: %.0fs.", time.perf_counter() - t0)
  return result


def _knn_lines(result: dict[str, Any]) -> dict[str, dict[str, float]]:
  """This evaluation's kNN accuracies, as horizontal lines of the curves' kNN panel."""
  lines = {}
  if "knn" in result:
    lines[f"learned, step {result['step']}"] = result["knn"]["top1"]
  labels = {"random_init": "random-init encoder", "pixels": "raw pixels"}
  for name, base in result.get("baselines", {}).items():
    lines[labels.get(name, name)] = base["knn"]["top1"]
  return {"knn_top1": lines} if lines else {}


def _json_ready(tree: Any) -> Any:
  """Makes numbers plain floats and keys strings; non-finite floats become strings."""
  if isinstance(tree, dict):
    return {str(k): _json_ready(v) for k, v in tree.items()}
  if isinstance(tree, list | tuple):
    return [_json_ready(v) for v in tree]
  if isinstance(tree, np.generic | jax.Array):
    tree = tree.item()
  if isinstance(tree, float) and not np.isfinite(tree):
    return str(tree)
  return tree


def evaluate_checkpoint(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  step: int | None = None,
  linear_sgd_epochs: int = 0,
  finetune_fractions: Sequence[float] = (),
  finetune_epochs: int | None = None,
  classifier_batch_size: int = 4096,
  baselines: bool = False,
  anomaly: bool = False,
  svm_protocol: bool = False,
  zero_shot: bool | None = None,
  mesh: Mesh | None = None,
  **kwargs: Any,
) -> dict[str, Any]:
  """Evaluates the checkpoint of ``workdir`` at ``step`` (default: the latest).

  Writes ``workdir/eval/step_<N>.json`` and the PNGs listed in the module docstring.

  Args:
    config: the run's config.
    workdir: the pretraining workdir.
    step: checkpoint step; default the latest.
    linear_sgd_epochs: > 0 also runs SimCLR's SGD linear protocol for that many epochs.
    finetune_fractions: label fractions to fine-tune on (e.g. ``(0.01, 0.1)``).
    finetune_epochs: default SimCLR's (60 below 10% of the labels, else 30).
    classifier_batch_size: batch of the SGD linear protocol and of fine-tuning.
    baselines: also evaluate (kNN and linear probe) the encoder at random initialisation
      (the run's seed) and raw pixels.
    anomaly: one-class anomaly detection (``cljax.evaluate.anomaly``): each class in turn
      normal, test examples scored by their kNN distance to its training examples; AUROC of
      the encoder's features and of the raw inputs, into ``result["anomaly"]``.
    svm_protocol: TS2Vec's RBF-SVM classification protocol (``cljax.evaluate.svm``), into
      ``result["svm"]``.
    zero_shot: zero-shot classification and image-text retrieval
      (``cljax.evaluate.zero_shot``), into ``result["zero_shot"]`` and ``["retrieval"]``;
      default: where the method has a text tower (``Method.zero_shot``: CLIP).
    mesh: default all devices.
    **kwargs: passed to ``evaluate_state`` (linear_probe, plot, tsne_points, ...).

  Returns:
    Everything written to the JSON file.
  """
  mesh = mesh or sharding.create_mesh()
  method = methods.create_method(config)
  state, step = restore_checkpoint(method, workdir, step=step, mesh=mesh)
  out_dir = os.path.join(os.path.abspath(workdir), "eval")
  logging.info("Evaluating %s at step %d into %s.", workdir, step, out_dir)
  result = {"step": step, "workdir": os.path.abspath(workdir)}
  result.update(
    evaluate_state(
      method, state, mesh, out_dir=out_dir, tag=f"step{step}", title=f"step {step}", **kwargs
    )
  )
  if baselines:
    result["baselines"] = evaluate_baselines(
      config,
      mesh,
      linear_probe=kwargs.get("linear_probe", True),
      linear_max_steps=kwargs.get("linear_max_steps", 1000),
      linear_patience=kwargs.get("linear_patience", linear.DEFAULT_PATIENCE),
    )
  curves = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(curves) and jax.process_index() == 0:
    result["plots"]["curves"] = plots.plot_curves(
      metrics.read_jsonl(curves),
      os.path.join(out_dir, f"curves_step{step}.png"),
      baselines=_knn_lines(result),
      title=f"{os.path.basename(os.path.abspath(workdir))}, evaluated at step {step}",
    )
  if anomaly or svm_protocol:
    cached = lambda split: os.path.join(out_dir, f"features_step{step}_{split}.npz")
    train, test = (
      features.split_features(config, method, state, split, mesh, cache_path=cached(split))
      for split in ("train", "eval")
    )
    if svm_protocol:
      result["svm"] = svm_lib.svm_accuracy(train, test)
      logging.info("RBF SVM (C by 5-fold CV): top-1 %.4f.", result["svm"]["top1"])
    if anomaly:
      raw = pixel_features(config, mesh)
      result["anomaly"] = {
        "encoder": anomaly_lib.one_class_auroc(train, test),
        "raw": anomaly_lib.one_class_auroc(raw["train"], raw["eval"], normalize=False),
      }
      logging.info(
        "One-class AUROC (kNN distance), mean over classes: encoder %.4f, raw inputs %.4f.",
        result["anomaly"]["encoder"]["mean"],
        result["anomaly"]["raw"]["mean"],
      )
  if method.zero_shot if zero_shot is None else zero_shot:
    from cljax.evaluate import zero_shot as zero_shot_lib  # Needs `tokenizers`: CLIP only.

    result.update(zero_shot_lib.evaluate_zero_shot(config, state, mesh))
  common = dict(batch_size=classifier_batch_size, mesh=mesh)
  if linear_sgd_epochs > 0:
    result["linear_probe_sgd"] = classifier.linear_probe_sgd(
      method, state, num_epochs=linear_sgd_epochs, **common
    )
  for fraction in finetune_fractions:
    result.setdefault("finetune", {})[f"{fraction:.0%}"] = classifier.finetune(
      method, state, label_fraction=fraction, num_epochs=finetune_epochs, **common
    )
  result = _json_ready(result)
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, f"step_{step}.json"), "w") as f:
      json.dump(result, f, indent=2, sort_keys=True)
  return result


def pixel_features(
  config: ml_collections.ConfigDict, mesh: Mesh
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Raw inputs of the train and eval splits (images: centre crops): the no-learning baseline.

  Flattened, as the modality gives them (``Modality.raw_features``; pixels in [0, 1]). Where
  every image of both splits is grey (R = G = B, as Fashion-MNIST is stored), one channel
  is kept: the kNN's cosine similarities are exactly those of the three copies, and a
  linear probe on three copies is one on a single copy with a third of its L2 penalty (the
  grid's choice absorbs that), at a third of the cost.

  Returns:
    ``{"train": (x, y), "eval": (x, y)}``.
  """
  modality = modalities.get(config)
  raw = lambda variables, x: modality.raw_features(x)
  out = {}
  for split in ("train", "eval"):
    batches = features.eval_batches(config, split)
    x, y, _ = features.extract(
      raw, None, batches, mesh, desc=f"{split} raw inputs", input_key=modality.input_key
    )
    out[split] = (x, y)
  if modality.name != "image":
    return out
  out = {k: (x.reshape(len(x), -1, 3), y) for k, (x, y) in out.items()}
  grey = all(bool(np.all(x[..., :1] == x[..., 1:])) for x, _ in out.values())
  return {k: (x[..., 0] if grey else x.reshape(len(x), -1), y) for k, (x, y) in out.items()}


def pixel_knn(config: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, float]:
  """``{"knn_top1_pixels": ...}``: the kNN of raw pixels, as the final kNN of training runs it;
  ``{}`` for unlabelled data."""
  t0 = time.perf_counter()
  data = pixel_features(config, mesh)
  result = frozen_feature_evals(
    config, data["train"], data["eval"], linear_probe=False, name="raw-pixel"
  )
  if not result:
    return {}
  logging.info(
    "Raw-pixel kNN baseline in %.0fs, reading the pixels included.", time.perf_counter() - t0
  )
  return {"knn_top1_pixels": result["knn"]["top1"]}


def evaluate_baselines(
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  *,
  linear_probe: bool = True,
  linear_max_steps: int = 1000,
  linear_patience: int | None = linear.DEFAULT_PATIENCE,
) -> dict[str, Any]:
  """kNN and linear probe of the randomly initialised encoder and of raw pixels
  (``pixel_features``).

  The encoder is the run's own initial state (``run.create_run``: same seed, same key).
  """
  r = run.create_run(config, mesh=mesh, with_iterator=False)
  init = r.initial_state(with_probe=False)
  data = {
    "random_init": [
      features.split_features(config, r.method, init, split, mesh) for split in ("train", "eval")
    ],
    "pixels": list(pixel_features(config, mesh).values()),
  }
  out = {}
  for name, (train, test) in data.items():
    t0 = time.perf_counter()
    evals = frozen_feature_evals(
      config,
      train,
      test,
      linear_probe=linear_probe,
      max_steps=linear_max_steps,
      patience=linear_patience,
      name=name,
      knn_features=r.method.knn_features if name == "random_init" else None,
    )
    logging.info("Baseline %s: %.0fs.", name, time.perf_counter() - t0)
    if evals:
      out[name] = evals
  return out
