"""cljax.validate: names checked against the registries they copy, ranges, one line each."""

import pathlib
import subprocess
import sys

import pytest
from helpers import tiny_config

from cljax import methods, modalities, models, optim, sharding, validate
from cljax import run as run_lib
from cljax.data import captions, sources
from cljax.methods import base, simclr
from cljax.methods import clip as clip_method
from cljax.methods import dinov2 as dinov2_method
from cljax.models import heads, resnet, vit

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_names_equal_the_registries_and_branches_of_the_dispatching_code():
  bn_views = {"default"} | {c for m in methods.METHODS.values() for c in m.bn_views_choices}
  registries = {
    "method": methods.METHODS,
    "model.name": models.ENCODERS,
    "model.stem": resnet.STEMS,
    "model.dtype": models._DTYPES,
    "model.posemb": vit.POSEMBS,
    "model.bn_views": bn_views,
    "head.output_norm": heads.OUTPUT_NORMS,
    "head.hidden_norm": heads.HIDDEN_NORMS,
    "predictor.output_norm": heads.OUTPUT_NORMS,
    "loss.name": simclr.LOSS_NAMES,
    "loss.implementation": simclr.LOSS_IMPLEMENTATIONS,
    "optim.name": optim.OPTIMIZERS,
    "optim.lr_scaling": optim.LR_SCALINGS,
    "optim.decay_mask": optim.DECAY_MASKS,
    "optim.lars_order": optim.LARS_ORDERS,
    "data.source": sources._FACTORIES,
    "ema.schedule": base.EMA_SCHEDULES,
    "clip.loss": clip_method.DEFAULT_INIT_LOGIT_SCALE,
    "clip.captions": captions.CAPTION_SOURCES,
    "mesh.state_sharding": sharding.STATE_SHARDINGS,
    "data.modality": modalities.MODALITIES,
    "optim.lr_schedule": run_lib.LR_SCHEDULES,
    "dinov2.centering": dinov2_method.CENTERINGS,
    "dinov2.eval_features": dinov2_method.EVAL_FEATURES,
  }
  assert set(registries) == set(validate.NAMES)
  for key, registry in registries.items():
    assert sorted(validate.NAMES[key]) == sorted(registry), key
    assert len(set(validate.NAMES[key])) == len(validate.NAMES[key]), key


def _set(config, key, value):
  *path, last = key.split(".")
  node = config
  for part in path:
    node = node[part]
  node[last] = value
  return config


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("method", "simclrr", r"^method='simclrr': must be one of simclr, moco_v2, .*, supervised "
     r"\(did you mean 'simclr'\?\)\.$"),
    ("model.name", "resnte", r"model.name='resnte': must be one of resnet, vit, vit_dinov2, "
     r"ts2vec \(did you mean"),
    ("optim.name", "adam", r"optim.name='adam': must be one of lars, sgd, adamw \(did you mean "
     r"'adamw'\?\)"),
    ("data.source", "zzz", r"^data.source='zzz': must be one of tfds, .*, prepared, timeseries\.$"),
    ("optim.lr_scaling", "sqr", r"optim.lr_scaling='sqr': .*did you mean 'sqrt'"),
    ("head.output_norm", "bn_noaffine", r"head.output_norm='bn_noaffine': .*'bn_no_affine'"),
    ("model.bn_views", "perview", r"model.bn_views='perview': must be one of default, per_view"),
    ("optim.decay_mask", "kernel", r"optim.decay_mask='kernel': .*did you mean 'kernels'"),
  ],
)  # fmt: skip
def test_an_unknown_name_is_one_line_with_the_choices_and_the_nearest(key, value, message):
  with pytest.raises(ValueError, match=message):
    validate.check_config(_set(tiny_config(), key, value))


def test_a_method_registered_from_outside_is_a_known_name(monkeypatch):
  monkeypatch.setitem(methods.METHODS, "my_method", methods.METHODS["simclr"])
  validate.check_config(_set(tiny_config(), "method", "my_method"))


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("loss.temperature", 0.0, "loss.temperature=0.0: must be > 0."),
    ("dino.teacher_temperature", -0.04, "dino.teacher_temperature=-0.04: must be > 0."),
    ("supcon.base_temperature", 0.0, "supcon.base_temperature=0.0: must be > 0."),
    ("evals.knn_temperature", 0.0, "evals.knn_temperature=0.0: must be > 0."),
    ("optim.weight_decay", -1e-4, "optim.weight_decay=-0.0001: must be >= 0."),
    ("optim.warmup_epochs", -1.0, "optim.warmup_epochs=-1.0: must be >= 0."),
    ("optim.momentum", 1.0, "optim.momentum=1.0: must be in [0, 1)."),
    ("optim.b2", 1.5, "optim.b2=1.5: must be in [0, 1)."),
    ("model.bn_momentum", 1.1, "model.bn_momentum=1.1: must be in [0, 1]."),
    ("ema.base", -0.1, "ema.base=-0.1: must be in [0, 1]."),
    ("dino.center_momentum", 2.0, "dino.center_momentum=2.0: must be in [0, 1]."),
    ("data.image_size", 0, "data.image_size=0: must be an integer >= 1."),
    ("data.num_workers", -1, "data.num_workers=-1: must be >= 0 (0 decodes in the main process)."),
    ("data.augment.num_local_crops", -2, "data.augment.num_local_crops=-2: must be >= 0."),
    ("head.num_layers", 0, "head.num_layers=0: must be an integer >= 1."),
    ("train.checkpoint_every_steps", 0, "train.checkpoint_every_steps=0: must be an integer >= 1."),
    ("train.grad_chunks", 0, "train.grad_chunks=0: must be an integer >= 1 (1: no gradient"),
    ("train.max_nonfinite_streak", -1, "train.max_nonfinite_streak=-1: must be >= 0 (0: never"),
    ("train.stop_at_step", -3, "train.stop_at_step=-3: must be >= 0 (0: train to the end)."),
    ("swav.queue_size", -1, "swav.queue_size=-1: must be >= 0 (0: no queue)."),
    ("swav.epsilon", 0.0, "swav.epsilon=0.0: must be > 0"),
    ("evals.knn_k", 0, "evals.knn_k=0: must be an integer >= 1."),
  ],
)
def test_an_invalid_number_is_one_line_naming_key_value_and_range(key, value, message):
  config = _set(tiny_config(), key, value)
  problems = validate.problems(config)
  assert problems == [problems[0]] and problems[0].startswith(message), problems
  assert "\n" not in problems[0]
  validate.check_config(tiny_config())  # The unchanged config passes.


def test_the_command_line_refuses_a_mistyped_method_in_one_line_before_making_anything(tmp_path):
  cmd = [
    sys.executable, "-m", "cljax.main", "--config=configs/quickstart.py",
    f"--workdir={tmp_path / 'run'}", "--config.method=simclrr",
  ]  # fmt: skip
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [
    "Error: method='simclrr': must be one of simclr, moco_v2, moco_v3, byol, simsiam, dino, "
    "dinov2, swav, barlow_twins, ts2vec, supcon, clip, supervised (did you mean 'simclr'?)."
  ]
  assert not (tmp_path / "run").exists()
