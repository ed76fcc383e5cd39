"""Two processes x 4 CPU devices over loopback (gloo) == one process x 8 devices, and a
checkpoint of either resumes on the other.

The two processes shard the train state (``mesh.state_sharding="fsdp"``), the one process
replicates it: the same losses, and checkpoints that cross both the process count and the
layout."""

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import chex
import numpy as np
import pytest
from helpers import xla_flags

from cljax import metrics

REPO = pathlib.Path(__file__).resolve().parents[1]


FSDP = ("--config.mesh.state_sharding=fsdp", "--config.mesh.fsdp_min_elements=64")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _command(workdir, *extra):
  return [
    sys.executable, "-m", "cljax.main", "--config=configs/quickstart.py", f"--workdir={workdir}",
    "--config.data.source=synthetic", "--config.data.num_examples=256",
    "--config.data.num_classes=4", "--config.data.image_size=16",
    "--config.data.global_batch_size=16", "--config.model.stage_sizes=(1,)",
    "--config.model.num_filters=8", "--config.head.hidden_dim=32",
    "--config.train.num_steps=4", "--config.train.log_every_steps=1",
    "--config.train.checkpoint_every_steps=2",
    "--config.evals.knn_at_end=False", *extra,
  ]  # fmt: skip


def _env(devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices))


def _losses(workdir):
  return [r["loss"] for r in metrics.read_jsonl(workdir / "metrics.jsonl")]


def _run_one(workdir) -> str:
  out = subprocess.run(
    _command(workdir), cwd=REPO, env=_env(8), capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stderr


def _run_two(workdir, *extra) -> list[str]:
  """Both processes' stderr, once both have finished (and succeeded)."""
  return _finish(_start_two(workdir, *extra))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same 4 steps run by 1 process x 8 devices and by 2 x 4: the two workdirs, and the
  stderr of the two processes."""
  tmp_path = tmp_path_factory.mktemp("runs")
  single, multi = tmp_path / "single", tmp_path / "multi"
  _run_one(single)
  return single, multi, _run_two(multi)


def test_two_processes_give_the_same_losses_as_one(runs):
  single, multi, errs = runs
  assert "2 process(es), 8 device(s)" in errs[0]
  single_losses, multi_losses = _losses(single), _losses(multi)
  assert len(single_losses) == len(multi_losses) == 4
  # Same global batches and augmentations; only the order of float sums differs.
  np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-5)
  # Process 0 alone writes metrics; both wrote their data-iterator state.
  written = {p.name for p in (multi / "checkpoints" / "4" / "data").iterdir()}
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= written


def test_a_checkpoint_resumes_on_another_process_count(runs):
  """Issue 27's repro: an intact checkpoint of 2 processes resumes on 1 (and back), continuing
  the same global stream; before, it was moved to checkpoints_unreadable/ and training
  restarted from step 0 with exit status 0."""
  single, multi, _ = runs
  reference = _losses(single)
  for workdir, resume in ((multi, _run_one), (single, _run_two)):
    shutil.rmtree(workdir / "checkpoints" / "4")  # Preempted after step 3.
    err = resume(workdir)
    err = err if isinstance(err, str) else err[0]
    assert "Resumed from" in err and "at step 2" in err, err[-3000:]
    assert not (workdir / "checkpoints_unreadable").exists()
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4]
    rows = metrics.read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 3, 4]  # Steps 3 and 4 again, not 1.
    # The same global batches and augmentations after the change of process count.
    np.testing.assert_allclose([r["loss"] for r in rows[4:]], reference[2:], rtol=1e-5)


def _start_two(workdir, *extra) -> list[subprocess.Popen]:
  port = _free_port()
  return [
    subprocess.Popen(
      _command(
        workdir,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
        *FSDP,
        *extra,
      ),
      cwd=REPO,
      env=_env(4),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]


def _finish(procs) -> list[str]:
  errs = []
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    errs.append(err)
  return errs


def test_fsdp_processes_killed_mid_run_resume_to_the_uninterrupted_result(tmp_path):
  """2 processes x 4 devices under FSDP: process 1 is SIGKILLed once step 4's checkpoint is
  on disk, process 0 then too (as a scheduler stops a job that lost a host), both restart
  and end bitwise where the uninterrupted run ends. The same checkpoints then resume as one
  process x 8 devices, replicated."""
  longer = ("--config.train.num_steps=12", "--config.train.checkpoint_every_steps=4")
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  _finish(_start_two(straight, *longer))
  procs = _start_two(killed, *longer)
  deadline = time.monotonic() + 600
  while not (killed / "checkpoints" / "4").is_dir() and time.monotonic() < deadline:
    time.sleep(0.05)
  for p in reversed(procs):
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
  rows = metrics.read_jsonl(killed / "metrics.jsonl")
  assert rows and rows[-1]["step"] < 12  # Killed mid-run.
  _finish(_start_two(killed, *longer))
  final = lambda w: _restore(w, 12)
  chex.assert_trees_all_equal(final(killed), final(straight))
  assert _losses(killed)[-1] == _losses(straight)[-1]
  # The same checkpoints, one process of 8 devices, the state replicated.
  shutil.rmtree(killed / "checkpoints" / "12")
  out = subprocess.run(
    _command(killed, *longer), cwd=REPO, env=_env(8), capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "at step 8." in out.stderr
  chex.assert_trees_all_close(final(killed), final(straight), rtol=0, atol=5e-6)


def _restore(workdir, step):
  import jax
  import orbax.checkpoint as ocp

  path = workdir / "checkpoints" / str(step) / "state"
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
    checkpointer.metadata(path).item_metadata,
  )
  return jax.device_get(checkpointer.restore(path, target))
