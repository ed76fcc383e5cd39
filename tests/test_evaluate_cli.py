"""End to end: ``python -m cljax.evaluate`` on a tiny checkpoint, and checkpoint restore."""

import json
import pathlib
import subprocess
import sys

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import tiny_config

from cljax import methods, sharding, train
from cljax.data import sources
from cljax.evaluate import features, knn, runner

REPO = pathlib.Path(__file__).resolve().parents[1]

_CONFIG_FILE = f"""
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
from helpers import tiny_config


def get_config():
  c = tiny_config()
{{overrides}}
  return c
"""
_OVERRIDES = {
  "data.source": "synthetic",
  "data.num_examples": 256,
  "data.num_classes": 4,
  "data.num_workers": 0,
  "train.num_steps": 2,
  "train.log_every_steps": 1,
  "evals.knn_at_end": False,
  "evals.knn_k": 20,
  "evals.batch_size": 64,
}


def _config():
  c = tiny_config()
  for key, value in _OVERRIDES.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A workdir holding a 2-step checkpoint, and a config file that reproduces its config."""
  root = tmp_path_factory.mktemp("eval")
  workdir = root / "run"
  train.train_and_evaluate(_config(), str(workdir))
  lines = "\n".join(f"  c.{key} = {value!r}" for key, value in _OVERRIDES.items())
  config_file = root / "tiny.py"
  config_file.write_text(_CONFIG_FILE.replace("{overrides}", lines))
  return workdir, config_file


def _assert_png(path):
  data = pathlib.Path(path).read_bytes()
  assert data[:4] == b"\x89PNG" and len(data) > 5000


def test_cli_evaluates_the_latest_checkpoint(run):
  workdir, config_file = run
  cmd = [
    sys.executable, "-m", "cljax.evaluate", f"--config={config_file}", f"--workdir={workdir}",
    "--tsne_points=100", "--pair_examples=64", "--linear_patience=0",
  ]  # fmt: skip
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "kNN top-1 (k=20)" in out.stdout
  printed = json.loads(out.stdout.strip().splitlines()[-1])["eval"]
  saved = json.loads((workdir / "eval" / "step_2.json").read_text())
  assert printed == saved
  assert saved["step"] == 2 and saved["num_train"] == 256 and saved["num_eval"] == 256
  # The kNN figure is that of the cached features (independent check of the wiring).
  train_x, train_y, meta = features.load_features(workdir / "eval" / "features_step2_train.npz")
  test_x, test_y, _ = features.load_features(workdir / "eval" / "features_step2_eval.npz")
  assert meta["step"] == 2 and train_x.shape == (256, saved["feature_dim"])
  want = knn.knn_accuracy(train_x, train_y, test_x, test_y, num_classes=4, k=20)
  assert saved["knn"]["top1"] == pytest.approx(want)
  probe = saved["linear_probe"]
  assert 0 <= probe["top1"] <= probe["top5"] <= 1 and probe["l2"] > 0
  assert probe["skipped_l2"] == [] and len(probe["val_top1"]) == 7  # 0: the whole L2 grid.
  projection = saved["collapse"]["projection"]
  assert set(projection) >= {"embedding_std", "effective_rank", "alignment", "uniformity"}
  assert all(np.isfinite(v) for v in projection.values())
  assert 1.0 <= projection["effective_rank"] <= 16  # The head's output_dim.
  for name in ("curves", "tsne", "similarity"):
    _assert_png(saved["plots"][name])
  assert saved["plots"]["curves"].endswith("curves_step2.png")  # One file per evaluated step.


def test_cli_on_a_mistyped_workdir_creates_nothing_and_says_no_checkpoint_was_found(tmp_path):
  (tmp_path / "not_a_run").mkdir()
  for workdir, why in (("typo", "it does not exist"), ("not_a_run", "it has no checkpoints/")):
    cmd = [
      sys.executable, "-m", "cljax.evaluate", "--config=configs/quickstart.py",
      f"--workdir={tmp_path / workdir}",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error")]
    assert errors == [
      f"Error: no checkpoint found in the workdir {tmp_path / workdir} ({why}"
      f"{' folder' if workdir == 'not_a_run' else ''}): is --workdir={tmp_path / workdir} a "
      "training workdir? Train first with python -m cljax.main."
    ]
  assert [p.name for p in tmp_path.rglob("*")] == ["not_a_run"]  # Nothing was created.


def test_cli_refuses_an_invalid_config_in_one_line_before_looking_for_checkpoints(tmp_path):
  cmd = [
    sys.executable, "-m", "cljax.evaluate", "--config=configs/quickstart.py",
    f"--workdir={tmp_path}", "--config.model.name=resnet5",
  ]  # fmt: skip
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1 and "Traceback" not in out.stderr
  errors = [line for line in out.stderr.splitlines() if line.startswith("Error")]
  assert len(errors) == 1 and errors[0].startswith("Error: model.name='resnet5': must be one of")
  assert not any(tmp_path.iterdir())


def test_restore_matches_plain_orbax(run):
  workdir, _ = run
  mesh = sharding.create_mesh()
  state, step = runner.restore_checkpoint(methods.create_method(_config()), str(workdir), mesh=mesh)
  plain = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "2" / "state")
  assert step == 2 and int(state.step) == 2
  chex.assert_trees_all_equal(jax.device_get(state.params), plain["params"])
  chex.assert_trees_all_equal(jax.device_get(state.batch_stats), plain["batch_stats"])
  with pytest.raises(FileNotFoundError, match="step 7"):
    runner.restore_checkpoint(methods.create_method(_config()), str(workdir), step=7, mesh=mesh)


def test_baselines_random_init_and_pixels():
  config = _config()
  mesh = sharding.create_mesh()
  result = runner.evaluate_baselines(config, mesh, linear_probe=False)
  assert set(result) == {"random_init", "pixels"}
  # Raw pixels of the synthetic source: independent noise images with random labels.
  source = sources.create_source(config.data, "train")
  pixels = np.stack([source[i]["image"] for i in range(len(source))]).reshape(256, -1)
  labels = np.array([source[i]["label"] for i in range(len(source))])
  eval_source = sources.create_source(config.data, "eval")
  eval_pixels = np.stack([eval_source[i]["image"] for i in range(256)]).reshape(256, -1)
  eval_labels = np.array([eval_source[i]["label"] for i in range(256)])
  want = knn.knn_accuracy(
    pixels / 255.0, labels, eval_pixels / 255.0, eval_labels, num_classes=4, k=20
  )
  assert result["pixels"]["knn"]["top1"] == pytest.approx(want)
  assert 0 <= result["random_init"]["knn"]["top1"] <= 1


def test_feature_cache_round_trip(tmp_path):
  x, y = np.arange(12, dtype=np.float32).reshape(4, 3), np.array([0, 1, 1, -1])
  path = str(tmp_path / "f.npz")
  features.save_features(path, x, y, step=5)
  got_x, got_y, meta = features.load_features(path)
  np.testing.assert_array_equal(got_x, x)
  np.testing.assert_array_equal(got_y, y)
  assert meta == {"step": 5}


def test_grey_pixels_keep_one_channel_with_the_same_knn(monkeypatch):
  config = _config()
  rng = np.random.default_rng(0)
  grey = {
    s: rng.integers(0, 256, (n, 16, 16, 1), np.uint8) for s, n in (("train", 96), ("eval", 40))
  }
  labels = {s: rng.integers(0, 4, len(x)).astype(np.int32) for s, x in grey.items()}
  made = {s: sources.ArraySource(np.repeat(x, 3, axis=-1), labels[s]) for s, x in grey.items()}
  monkeypatch.setattr(sources, "create_source", lambda data, split: made[split])
  got = runner.pixel_features(config, sharding.create_mesh())
  for split in ("train", "eval"):
    x, y = got[split]
    np.testing.assert_array_equal(y, labels[split])
    # float32 pixels / 255 against float64: within 2 float32 roundings (a reciprocal and a
    # product, or a division); 7.4e-8 relative was measured, above half an ulp.
    expected = grey[split].reshape(len(y), -1) / 255.0
    np.testing.assert_allclose(x, expected, rtol=2 * np.finfo(np.float32).eps)
  # Three equal channels scale every norm by sqrt(3) and every dot product by 3: the same
  # cosines, so the same neighbours and the same kNN accuracy.
  three = {s: np.repeat(x, 3, axis=-1).reshape(len(x), -1) / 255.0 for s, x in grey.items()}
  want = knn.knn_accuracy(
    three["train"], labels["train"], three["eval"], labels["eval"], num_classes=4, k=20
  )
  assert runner.pixel_knn(config, sharding.create_mesh())["knn_top1_pixels"] == want
