"""Checkpoints you can trust: digests, corrupt versus incompatible, unverifiable configs."""

import importlib.util
import pathlib
import shutil
import subprocess
import sys

import orbax.checkpoint as ocp
import pytest
from helpers import tiny_config

from cljax import checkpoint, train, validate

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(num_steps=4):
  c = tiny_config()
  c.data.source = "synthetic"
  c.data.num_examples = 256
  c.data.num_classes = 4
  c.data.num_workers = 0
  c.train.num_steps = num_steps
  c.train.log_every_steps = 1
  c.train.checkpoint_every_steps = 2
  c.train.max_to_keep = 10
  c.evals.knn_at_end = False
  return c


def _steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_silently_changed_arrays_in_the_latest_checkpoint_fall_back_to_the_previous_one(
  tmp_path, caplog
):
  train.train_and_evaluate(_config(), str(tmp_path))
  # Step 4's state rewritten as valid orbax files with one weight changed by a finite amount:
  # silent corruption that no storage-layer check can see; only the digests do.
  path = tmp_path / "checkpoints" / "4" / "state"
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(path)
  kernel = state["params"]["encoder"]["conv_init"]["kernel"]
  state["params"]["encoder"]["conv_init"]["kernel"] = kernel.at[0, 0, 0, 0].add(1.0)
  shutil.rmtree(path)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, state)
  with caplog.at_level("INFO"):
    train.train_and_evaluate(_config(), str(tmp_path))
  assert "step 4 cannot be restored (1 arrays differ from their digests" in caplog.text
  assert "at step 2." in caplog.text  # Resumed from the previous checkpoint.
  assert list((tmp_path / "checkpoints_unreadable").iterdir())  # Kept, not deleted.
  assert _steps(tmp_path) == [2, 4]  # Step 4 trained again and saved.


def test_64_flipped_bytes_in_the_latest_checkpoints_data_fall_back_to_the_previous_one(
  tmp_path, caplog
):
  # The case: 64 consecutive bytes inverted in the middle of the newest state's data
  # files. Whether the storage layer notices (a decode error) or not (a changed
  # value, once restored as a NaN leaf), the checkpoint must not be resumed.
  train.train_and_evaluate(_config(), str(tmp_path))
  # Which data file holds the arrays depends on how OCDBT merged the writes: flip them all.
  state = tmp_path / "checkpoints" / "4" / "state"
  for path in [*state.glob("d/*"), *state.glob("ocdbt.process_*/d/*")]:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))
  with caplog.at_level("INFO"):
    train.train_and_evaluate(_config(), str(tmp_path))
  assert "step 4 cannot be restored" in caplog.text
  assert "at step 2." in caplog.text  # Resumed from the previous checkpoint.
  assert list((tmp_path / "checkpoints_unreadable").iterdir())  # Kept, not deleted.
  assert _steps(tmp_path) == [2, 4]


def test_a_checkpoint_without_digests_restores_with_a_warning(tmp_path, caplog):
  config = _config()
  config.train.stop_at_step = 2
  train.train_and_evaluate(config, str(tmp_path))
  for f in sorted((tmp_path / "checkpoints" / "2" / "digests").rglob("*"), reverse=True):
    f.rmdir() if f.is_dir() else f.unlink()
  (tmp_path / "checkpoints" / "2" / "digests").rmdir()  # As written before digests existed.
  config.train.stop_at_step = 0
  with caplog.at_level("INFO"):
    train.train_and_evaluate(config, str(tmp_path))
  assert "step 2 has no digests" in caplog.text and "at step 2." in caplog.text
  assert not (tmp_path / "checkpoints_unreadable").exists()


def test_force_resume_with_another_width_fails_and_leaves_the_checkpoints(tmp_path):
  train.train_and_evaluate(_config(num_steps=2), str(tmp_path))
  before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
  config = _config(num_steps=4)
  config.model.num_filters = 16
  with pytest.raises(
    checkpoint.IncompatibleCheckpointError,
    match=r"(?s)conv_init/kernel: saved float32\[3, 3, 3, 8\], now float32\[3, 3, 3, 16\].*"
    r"--force_resume continues only with configs whose state has the same structure",
  ):
    train.train_and_evaluate(config, str(tmp_path), force_resume=True)
  assert not (tmp_path / "checkpoints_unreadable").exists()
  after = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
  assert [p for p in before if "checkpoints" in p] == [p for p in after if "checkpoints" in p]


def test_an_emptied_saved_config_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
  train.train_and_evaluate(_config(), str(tmp_path))
  for f in (tmp_path / "checkpoints" / "4" / "config").rglob("*"):
    if f.is_file():
      f.write_bytes(b"")
  config = _config(num_steps=6)
  config.loss.temperature = 0.3  # Changed: an unchecked resume would go unnoticed.
  with caplog.at_level("INFO"), pytest.raises(ValueError, match="at step 2 was written with"):
    train.train_and_evaluate(config, str(tmp_path))
  assert "step 4 cannot be restored" in caplog.text and "saved config cannot be read" in caplog.text
  assert list((tmp_path / "checkpoints_unreadable").iterdir())


def test_evaluate_of_an_incompatible_checkpoint_is_one_clean_error(tmp_path):
  spec = importlib.util.spec_from_file_location("quickstart", REPO / "configs" / "quickstart.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  overrides = {"train.num_steps": 2, "data.global_batch_size": 32, "evals.knn_at_end": False}
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  config.model.stage_sizes = (1,)
  train.train_and_evaluate(config, str(tmp_path))
  cmd = [
    sys.executable, "-m", "cljax.evaluate", "--config=configs/quickstart.py",
    f"--workdir={tmp_path}", "--config.model.stage_sizes=(1,)",
    "--config.model.num_filters=32", "--plots=False", "--linear_probe=False",
    *(f"--config.{k}={v}" for k, v in overrides.items()),
  ]  # fmt: skip
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 1
  assert "Event loop is closed" not in out.stderr and "Traceback" not in out.stderr
  assert "does not fit the current config" in out.stderr
  # A mistyped workdir is reported, and nothing is created in it.
  missing = tmp_path / "typo"
  out = subprocess.run(
    [*cmd[:4], f"--workdir={missing}", *cmd[5:]], cwd=REPO, capture_output=True, text=True
  )
  assert out.returncode == 1 and "does not exist" in out.stderr and not missing.exists()


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("optim.base_lr", -1.0, r"optim.base_lr=-1.0: must be > 0"),
    ("optim.base_lr", 0.0, r"optim.base_lr=0.0: must be > 0 \(0 only with --allow_zero_lr\)"),
    ("data.global_batch_size", 0, r"data.global_batch_size=0: must be an integer >= 1"),
    ("data.augment.blur_prob", 1.5, r"data.augment.blur_prob=1.5: must be a probability"),
    ("data.augment.crop_area_min", 0.0, r"crop_area_min=0.0, .*0 < min <= max <= 1"),
  ],
)
def test_invalid_values_are_one_line_naming_key_value_and_range(key, value, message):
  config = _config()
  section, *rest = key.split(".")
  node = config[section]
  for part in rest[:-1]:
    node = node[part]
  node[rest[-1]] = value
  with pytest.raises(ValueError, match=message):
    validate.check_config(config)
  validate.check_config(_config())  # The unchanged config passes.


def test_main_help_exits_0_and_a_negative_learning_rate_is_refused(tmp_path):
  out = subprocess.run(
    [sys.executable, "-m", "cljax.main", "--help"], cwd=REPO, capture_output=True, text=True
  )
  assert out.returncode == 0 and "--workdir" in out.stdout
  cmd = [
    sys.executable, "-m", "cljax.main", "--config=configs/quickstart.py",
    f"--workdir={tmp_path / 'run'}", "--config.optim.base_lr=-1",
  ]  # fmt: skip
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert "optim.base_lr=-1.0: must be > 0" in out.stderr
  assert not (tmp_path / "run").exists()  # Refused before anything was made.
