"""cljax.errors: input a user can fix ends in one ``Error:`` line and exit 1, from every entry
point; anything else keeps its traceback."""

from __future__ import annotations

import os

import documented_runner as runner
import pytest

from cljax import cli, errors

# A small folder recipe every case below starts from, plus the case's own overrides.
_BASE = [
  "--config=configs/quickstart.py",
  "--config.data.num_workers=0",
  "--config.train.num_steps=2",
  "--config.evals.knn_at_end=False",
]


def _cases(tmp: str) -> list[tuple[str, list[str], str]]:
  """(case, overrides, what the one line must say) for ``python -m cljax.main``."""
  empty = os.path.join(tmp, "empty")
  os.makedirs(os.path.join(empty, "train"))
  not_npz = os.path.join(tmp, "not_npz")
  os.makedirs(not_npz)
  with open(os.path.join(not_npz, "train.npz"), "wb") as f:
    f.write(b"these bytes are no npz file")
  tfds_dir = os.path.join(tmp, "tfds")
  os.makedirs(tfds_dir)
  captions = os.path.join(tmp, "captions")
  os.makedirs(os.path.join(captions, "train", "a"))
  from PIL import Image

  Image.new("RGB", (8, 8)).save(os.path.join(captions, "train", "a", "0.png"))
  good_jsonl = os.path.join(tmp, "good.jsonl")
  with open(good_jsonl, "w") as f:
    f.write('{"image": "a/0.png", "caption": "a photo"}\n')
  bad_jsonl = os.path.join(tmp, "bad.jsonl")
  with open(bad_jsonl, "w") as f:
    f.write('{"image": "a/0.png", "caption": "a photo"}\n{not json\n')
  clip = ["--config=configs/clip_shared_cpu.py", "--config.data.source=folder"]
  clip += [f"--config.data.data_dir={captions}", "--config.clip.captions=file"]
  clip += ["--config.data.global_batch_size=1"]
  return [
    ("missing folder", ["--config.data.source=folder", "--config.data.data_dir=/nowhere"],
     "image folder /nowhere/train does not exist"),
    ("empty folder", ["--config.data.source=folder", f"--config.data.data_dir={empty}"],
     "no readable images"),
    ("missing npz", ["--config.data.source=npz", f"--config.data.data_dir={empty}"],
     "no .npz file"),
    ("unreadable npz", ["--config.data.source=npz", f"--config.data.data_dir={not_npz}"],
     "as a NumPy .npz file"),
    ("missing tfds dir", ["--config.data.source=tfds", "--config.data.data_dir=/nowhere"],
     "tfds data_dir /nowhere does not exist"),
    ("unprepared tfds", ["--config.data.source=tfds", "--config.data.name=mnist",
                         f"--config.data.data_dir={tfds_dir}"], "is not prepared in"),
    ("missing prepared copy", ["--config.data.source=prepared",
                               f"--config.data.data_dir={empty}"], "the prepared copy"),
    ("missing caption file", [*clip, "--config.clip.caption_file=/nowhere.jsonl"],
     "caption file /nowhere.jsonl does not exist"),
    ("bad caption file", [*clip, f"--config.clip.caption_file={bad_jsonl}"],
     "line 2 is not JSON"),
    ("missing tokenizer", [*clip, f"--config.clip.caption_file={good_jsonl}",
                           "--config.clip.tokenizer=/nowhere.json"],
     "clip.tokenizer='/nowhere.json' is neither"),
  ]  # fmt: skip


def _job(args: list[str]) -> dict:
  names = [a[2:].split("=")[0] for a in args]
  return {"args": args, "parse": True, "run": True, "shrink": False, "names": names}


def _assert_one_line(result: dict, case: str, expected: str) -> None:
  assert result["status"] == "exit 1", (case, result)
  # Log lines may come before it (the runner has no absl app); no traceback does.
  lines = [x for x in result["error"].strip().splitlines() if not x.startswith("INFO:")]
  assert len(lines) == 1 and lines[0].startswith("Error: "), (case, result["error"])
  assert expected in lines[0], (case, lines[0])


def test_bad_input_is_one_error_line_and_exit_1_from_main(tmp_path):
  cases = _cases(str(tmp_path))
  jobs = []
  for i, (_, overrides, _) in enumerate(cases):
    args = [*_BASE, f"--workdir={tmp_path / f'run{i}'}", *overrides]
    # The case's --config comes last so that it wins over the base recipe.
    configs = [a for a in args if a.startswith("--config=")]
    jobs.append(_job([configs[-1], *[a for a in args if not a.startswith("--config=")]]))
  results = runner.run_jobs("cljax.main", jobs, str(tmp_path))
  for (case, _, expected), result in zip(cases, results, strict=True):
    _assert_one_line(result, case, expected)


def test_bad_input_is_one_error_line_from_bench_and_prepare(tmp_path):
  folder = ["--config.data.source=folder", "--config.data.data_dir=/nowhere"]
  bench = runner.run_jobs(
    "cljax.bench", [_job([*_BASE, *folder, "--parts=step", "--windows=1"])], str(tmp_path)
  )
  _assert_one_line(bench[0], "bench", "image folder /nowhere/train does not exist")
  prepare = runner.run_jobs(
    "cljax.data.prepare",
    [_job([_BASE[0], f"--out_dir={tmp_path / 'copy'}", *folder])],
    str(tmp_path),
  )
  _assert_one_line(prepare[0], "prepare", "image folder /nowhere/train does not exist")


def test_only_user_input_errors_become_one_line(capsys):
  with pytest.raises(SystemExit) as exit_, cli.user_errors():
    raise errors.DataError("data.data_dir=/x holds no images")
  assert exit_.value.code == 1
  assert capsys.readouterr().err == "Error: data.data_dir=/x holds no images\n"
  # Anything else is a failure to report, with its traceback: a plain ValueError too.
  for unexpected in (RuntimeError("a bug"), ValueError("a bug"), FileNotFoundError("a bug")):
    with pytest.raises(type(unexpected)), cli.user_errors():
      raise unexpected
  with pytest.raises(SystemExit), cli.user_errors(PermissionError):
    raise PermissionError("the workdir cannot be written")
  assert issubclass(errors.DataNotFoundError, FileNotFoundError)
  assert issubclass(errors.DataError, ValueError)
