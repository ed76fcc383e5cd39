"""How close every value comparison in the test suite comes to its tolerance.

A pytest plugin. It wraps ``numpy.testing.assert_allclose`` (which chex's
``assert_trees_all_close`` calls too) and records, per test, the worst ratio of the
difference found to the difference allowed, ``|a - b| / (atol + rtol |b|)``: 1 is the edge,
and a test near it passes on one machine and fails on another whose kernels round in
another order. Ratios above 1 are the tests' own teeth (``assert not allclose`` or checks
under ``pytest.raises``).

    PYTHONPATH=benchmarks python -m pytest -p tolerance_margins tests
    XLA_FLAGS=--xla_cpu_max_isa=SSE4_2 PYTHONPATH=benchmarks \\
      python -m pytest -p tolerance_margins tests   # another CPU target

Prints the tests between ``--margins_report`` (default 0.2) and 1 at the end, and writes
every test's worst ratio to ``--margins_out`` (JSONL) when given.
"""

import json

import numpy as np
import numpy.testing

_assert_allclose = numpy.testing.assert_allclose
_current: dict[str, str | None] = {"test": None}
_worst: dict[str, dict] = {}


def _record(actual, desired, rtol, atol) -> None:
  try:
    a, b = np.asarray(actual), np.asarray(desired)
    if a.dtype.kind not in "fiub" or b.dtype.kind not in "fiub" or not a.size or not b.size:
      return
    a, b = np.broadcast_arrays(a.astype(np.float64), b.astype(np.float64))
  except ValueError:  # Ragged or unbroadcastable inputs: the assertion itself reports them.
    return
  finite = np.isfinite(a) & np.isfinite(b)
  if _current["test"] is None or not finite.any():
    return
  diff = np.abs(a - b)[finite]
  allowed = atol + rtol * np.abs(b)[finite]
  with np.errstate(divide="ignore", invalid="ignore"):
    ratio = float(np.max(np.where(allowed > 0, diff / allowed, np.where(diff > 0, np.inf, 0))))
  test = _current["test"]
  if test not in _worst or ratio > _worst[test]["ratio"]:
    _worst[test] = {"test": test, "ratio": ratio, "rtol": rtol, "atol": atol}
    _worst[test]["max_diff"] = float(diff.max())


def _assert_allclose_recorded(actual, desired, rtol=1e-7, atol=0, *args, **kwargs):
  _record(actual, desired, float(rtol), float(atol))
  return _assert_allclose(actual, desired, rtol, atol, *args, **kwargs)


numpy.testing.assert_allclose = _assert_allclose_recorded


def pytest_addoption(parser):
  parser.addoption("--margins_out", default=None, help="JSONL of every test's worst ratio.")
  parser.addoption("--margins_report", type=float, default=0.2, help="Print ratios above.")


def pytest_runtest_setup(item):
  _current["test"] = item.nodeid  # Module fixtures count towards the test that builds them.


def pytest_runtest_teardown(item):
  _current["test"] = None


def pytest_terminal_summary(terminalreporter, config):
  rows = sorted(_worst.values(), key=lambda r: -r["ratio"])
  if config.getoption("margins_out"):
    with open(config.getoption("margins_out"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  low = config.getoption("margins_report")
  near = [r for r in rows if low < r["ratio"] <= 1]
  terminalreporter.section(f"tolerance margins: {len(rows)} tests compare values")
  terminalreporter.write_line(f"{len(near)} use more than {low:g} of their tolerance:")
  for r in near:
    terminalreporter.write_line(
      f"{r['ratio']:6.3f}  diff {r['max_diff']:.2e}  rtol {r['rtol']:g} atol {r['atol']:.3g}"
      f"  {r['test']}"
    )
