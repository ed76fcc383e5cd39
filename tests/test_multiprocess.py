"""Two processes x 4 CPU devices over loopback (gloo) == one process x 8 devices."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
from helpers import xla_flags

from cljax import metrics

REPO = pathlib.Path(__file__).resolve().parents[1]


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
    "--config.evals.knn_at_end=False", *extra,
  ]  # fmt: skip


def _env(devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices))


def _losses(workdir):
  return [r["loss"] for r in metrics.read_jsonl(workdir / "metrics.jsonl")]


def test_two_processes_give_the_same_losses_as_one(tmp_path):
  single = tmp_path / "single"
  out = subprocess.run(
    _command(single), cwd=REPO, env=_env(8), capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stderr[-3000:]

  multi = tmp_path / "multi"
  port = _free_port()
  procs = [
    subprocess.Popen(
      _command(
        multi,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ),
      cwd=REPO,
      env=_env(4),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  assert "2 process(es), 8 device(s)" in outs[0][1]
  single_losses, multi_losses = _losses(single), _losses(multi)
  assert len(single_losses) == len(multi_losses) == 4
  # Same global batches and augmentations; only the order of float sums differs.
  np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-5)
  # Process 0 alone writes metrics; both wrote their data-iterator state.
  written = {p.name for p in (multi / "checkpoints" / "4" / "data").iterdir()}
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= written
