"""Tests for cljax.metrics: metrics.jsonl, TensorBoard events, terminal output, to_host."""

import io
import json
import math
import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from cljax import metrics


def _read_events(logdir: pathlib.Path) -> list[event_pb2.Event]:
  """Parses TFRecord event files by hand: tensorboard itself is not a dependency."""
  events = []
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      pos += 12  # Length, then its 4-byte CRC.
      events.append(event_pb2.Event.FromString(data[pos : pos + length]))
      pos += length + 4  # Payload, then its CRC.
  return events


def _scalars(logdir: pathlib.Path) -> list[tuple[str, int, float]]:
  return [
    (value.tag, event.step, value.simple_value)
    for event in _read_events(logdir)
    for value in event.summary.value
    if value.HasField("simple_value")
  ]


class _FakeTime:
  """Stands in for the ``time`` module inside cljax.metrics, with a settable clock."""

  def __init__(self):
    self.now = 1000.0

  def monotonic(self) -> float:
    return self.now

  def time(self) -> float:
    return 1.7e9 + self.now

  def time_ns(self) -> int:
    return int(self.time() * 1e9)


@pytest.fixture
def fake_time(monkeypatch) -> _FakeTime:
  clock = _FakeTime()
  monkeypatch.setattr(metrics, "time", clock)
  return clock


def test_jsonl_round_trips_numpy_jax_and_non_finite_values(tmp_path):
  scalars = {
    "loss": np.float32(2.5),
    "acc": jnp.array(0.25),
    "nan": float("nan"),
    "inf": np.float64("inf"),
    "neg_inf": -math.inf,
  }
  w = metrics.MetricWriter(tmp_path, total_steps=10, views_per_step=4, progress=False)
  w.write_scalars(np.int64(3), scalars)
  w.close()

  text = (tmp_path / "metrics.jsonl").read_text()
  # Strict JSON: a NaN/Infinity literal would make parse_constant raise.
  json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
  [record] = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  assert record["step"] == 3 and isinstance(record["time"], float)
  assert record["loss"] == 2.5 and record["acc"] == 0.25
  assert math.isnan(record["nan"])
  assert record["inf"] == math.inf and record["neg_inf"] == -math.inf
  assert set(record) == {"step", "time", *scalars}


def test_resumed_writer_appends_to_the_same_files(tmp_path, fake_time):
  first = metrics.MetricWriter(tmp_path, total_steps=30, views_per_step=8, progress=False)
  first.write_scalars(10, {"loss": 3.0})
  fake_time.now += 2.0
  first.write_scalars(20, {"loss": 2.0})
  first.close()
  second = metrics.MetricWriter(tmp_path, total_steps=30, views_per_step=8, progress=False)
  second.write_scalars(30, {"loss": 1.0})
  second.close()

  records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  assert [(r["step"], r["loss"]) for r in records] == [(10, 3.0), (20, 2.0), (30, 1.0)]
  # 10 steps * 8 views in 2 s; the first write of each writer has no previous write.
  assert records[1]["views_per_sec"] == 40.0
  assert "views_per_sec" not in records[0] and "views_per_sec" not in records[2]
  # Both runs keep their own event file, even when started within the same second.
  assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
  losses = sorted((s, v) for tag, s, v in _scalars(tmp_path / "tensorboard") if tag == "loss")
  assert losses == [(10, 3.0), (20, 2.0), (30, 1.0)]


def test_tensorboard_events_hold_scalars_and_config(tmp_path):
  w = metrics.MetricWriter(tmp_path, total_steps=10, views_per_step=4, progress=False)
  w.write_config({"model": {"depth": 18}, "lr": 0.1})
  w.write_scalars(5, {"loss": 1.25, "lr": 0.5})
  w.close()
  w.close()  # A second close is harmless.

  assert ("loss", 5, 1.25) in _scalars(tmp_path / "tensorboard")
  assert ("lr", 5, 0.5) in _scalars(tmp_path / "tensorboard")
  texts = [
    value
    for event in _read_events(tmp_path / "tensorboard")
    for value in event.summary.value
    if value.tag.startswith("config")
  ]
  assert texts and b"depth" in texts[0].tensor.string_val[0]
  config = json.loads((tmp_path / "config.json").read_text())
  assert config == {"model": {"depth": 18}, "lr": 0.1}


def test_non_tty_prints_one_line_per_write(tmp_path, capsys, fake_time):
  w = metrics.MetricWriter(tmp_path, total_steps=1000, views_per_step=64)
  w.write_scalars(100, {"loss": 5.12, "lr": 0.1})
  fake_time.now += 10.0  # 100 steps in 10 s: 640 views/s, 800 steps left -> 80 s.
  w.write_scalars(200, {"loss": 4.0})
  w.close()
  assert capsys.readouterr().out.splitlines() == [
    "step 100/1000 loss 5.1200",
    "step 200/1000 loss 4.0000 views/s 640 eta 1m20s",
  ]


def test_tty_shows_a_progress_bar(tmp_path, monkeypatch, fake_time):
  class _Tty(io.StringIO):
    def isatty(self) -> bool:
      return True

  tty = _Tty()
  monkeypatch.setattr("sys.stdout", tty)
  w = metrics.MetricWriter(tmp_path, total_steps=1000, views_per_step=64)
  w.write_scalars(100, {"loss": 5.0})
  fake_time.now += 10.0
  w.write_scalars(200, {"loss": 4.0})
  w.close()
  out = tty.getvalue()
  assert "100/1000" in out and "loss 5.0000" in out
  assert "200/1000" in out and "loss 4.0000" in out and "views/s 640" in out
  assert "step 200/1000" not in out  # The bar, not the plain log lines.


@pytest.mark.parametrize(
  ("seconds", "expected"), [(0.4, "0s"), (59, "59s"), (190, "3m10s"), (3725, "1h02m")]
)
def test_format_duration(seconds, expected):
  assert metrics._format_duration(seconds) == expected


def test_disabled_writer_writes_nothing(tmp_path, capsys):
  workdir = tmp_path / "run"
  w = metrics.MetricWriter(workdir, total_steps=10, views_per_step=4, enabled=False)
  w.write_config({"lr": 0.1})
  w.write_scalars(1, {"loss": 1.0})
  w.write_hparams({"lr": 0.1})
  w.close()
  assert not workdir.exists()
  assert capsys.readouterr() == ("", "")


def test_to_host_fetches_once_and_returns_python_floats(monkeypatch):
  calls = []
  device_get = jax.device_get
  monkeypatch.setattr(jax, "device_get", lambda tree: calls.append(1) or device_get(tree))
  tree = metrics.average(
    [
      {"loss": jnp.float32(1.0), "acc": jnp.float32(0.5)},
      {"loss": jnp.float32(3.0), "acc": jnp.float32(1.0)},
    ]
  )
  host = metrics.to_host(tree)
  assert host == {"loss": 2.0, "acc": 0.75}
  assert all(type(v) is float for v in host.values())
  assert len(calls) == 1


def test_average_rejects_empty_list():
  with pytest.raises(ValueError, match="at least one"):
    metrics.average([])


def test_read_jsonl_keeps_ordinary_strings(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text('{"step": 1, "note": "hello", "x": "nan"}\n\n')
  assert metrics.read_jsonl(path)[0]["note"] == "hello"
  assert math.isnan(metrics.read_jsonl(path)[0]["x"])


def test_a_partial_last_line_from_a_killed_run_is_skipped_and_not_continued(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
  writer = metrics.MetricWriter(tmp_path, total_steps=5, views_per_step=2, progress=False)
  writer.write_scalars(3, {"loss": 1.0})
  writer.close()
  assert [r["step"] for r in metrics.read_jsonl(path)] == [1, 3]
