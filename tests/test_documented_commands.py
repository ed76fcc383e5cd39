"""Every command a user is told to type (README.md, docs/*.md, the configs' docstrings) runs.

Each documented command is parsed exactly as its program's command line parses it: absl
flags, the config file and its ``--config.a.b=v`` overrides; every flag name it shows must
be one the program knows. One command per recipe, per evaluation and per benchmark then runs
at tiny size (``documented_runner.shrink``: 2 steps of 16 synthetic 32 px images, at most 2
local crops, a one-block encoder, small heads; the method, encoder kind, optimiser and the
recipe's other choices stay). Commands that share a workdir run in order, so a recipe whose
docstring prints ``python -m cljax.evaluate`` is trained, then evaluated; an evaluation with
no documented training of its own gets one. ``make`` targets must exist (``make -n``); the
cljax commands they run join the others, and ``make lint`` runs.

Where the documents hold a stand-in (``DIR``, ``<data_dir>``, ``N``), a workdir or output
folder becomes a temporary folder and any other such flag is checked by name only. Data is
synthetic in the runs: the recipes' data sets (ImageNet, the CIFAR-10 copy) are either not
here or too large for the suite's budget; reading them is tested by the data tests. What is
not run is listed in ``NOT_RUN`` (make targets) and ``NOT_RUN_CONFIGS`` (recipes), each
with its reason, and both are checked against the documents and the configs, so they
cannot go stale.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import documented_commands as docs
import documented_runner as runner

REPO = docs.REPO
PROGRAMS = ("cljax.data.prepare", "cljax.main", "cljax.evaluate", "cljax.bench")
# make targets that are documented but not run here, with the reason.
NOT_RUN = {
  "test": "the test suite itself (.ci/run runs it)",
  "tensorboard": "installs the tensorboard extra from the network and serves until stopped",
  "install": "the set-up every other target runs first",
}
# Recipes whose documented commands are parsed but not run, with the reason.
NOT_RUN_CONFIGS = {
  "configs/clip_vitb16.py": "its tokenizer (clip.tokenizer='hf:...') downloads from the network",
  "configs/clip_vith14.py": "clip_vitb16.py's tokenizer, which downloads from the network",
}
# Appended to the run of each program: the smallest measurement or evaluation.
TINY_FLAGS = {
  "cljax.evaluate": ["--linear_max_steps=20", "--tsne_points=32", "--pair_examples=32"],
  "cljax.bench": ["--windows=1", "--steps_per_window=1", "--warmup_steps=0", "--jpeg_workers=0"],
  "cljax.data.prepare": ["--workers=0"],
}
_OUTPUT_FLAGS = ("workdir", "out_dir")


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "x"


def _make_commands(target: str) -> list[docs.Command]:
  """The cljax commands ``make TARGET`` runs (its recipe, from ``make -n``)."""
  out = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, f"make {target} (documented) fails: {out.stderr}"
  found = []
  for line in out.stdout.splitlines():
    line = re.sub(r"^\S*/python3? ", "python ", line.strip())
    command = docs._parse(line, f"Makefile (make {target})")
    if command and command.program != "make":
      found.append(command)
  return found


def _job(command: docs.Command, tmp: str, run: bool) -> tuple[dict, str | None]:
  """The runner's job for ``command`` and the workdir it writes (None: parse only)."""
  args, names, workdir = [], [], None
  config = command.config
  for arg in command.args:
    if not arg.startswith("--"):
      continue
    name, _, value = arg[2:].partition("=")
    names.append(name)
    if name in _OUTPUT_FLAGS:
      value = os.path.join(tmp, _slug(f"{value}_{config}"))
      workdir = value
    elif "=" in arg and (not value or docs._is_placeholder(value)):
      continue  # The user's own value: checked by name only.
    args.append(f"--{name}={value}" if "=" in arg else arg)
  # A command without its program's required flags is a fragment quoted in prose.
  parse = config is not None and (command.program == "cljax.bench" or workdir is not None)
  if run and parse:
    args += TINY_FLAGS.get(command.program, [])
  return {"args": args, "parse": parse, "run": run and parse, "names": names}, workdir


def _jobs(tmp: str) -> tuple[dict[str, list[tuple[docs.Command, dict]]], list[str]]:
  """Every documented command as a runner job, by program; and the make targets to run."""
  commands, targets = [], []
  for command in docs.collect():
    if command.program != "make":
      commands.append(command)
      continue
    target = command.args[0]
    recipe = _make_commands(target)  # Every documented target exists.
    if target not in NOT_RUN and target not in targets:
      commands += recipe
      targets.append(target)
  jobs = {p: [] for p in PROGRAMS}
  seen, trained = set(), set()
  for command in commands:
    if command.program == "cljax.main" and "help" in command.flags:
      continue  # Run on its own (absl's --help exits); test_main covers it.
    # One run per recipe file (its presets differ in sizes, which the run shrinks anyway),
    # per evaluated config and per benchmarked config and parts.
    key = (command.program, (command.config or "").split(":")[0])
    if command.program == "cljax.evaluate":
      key = (command.program, command.config)
    elif command.program == "cljax.bench":
      key = (command.program, command.config, command.flags.get("parts"))
    run = key not in seen and (command.config or "").split(":")[0] not in NOT_RUN_CONFIGS
    seen.add(key)
    job, workdir = _job(command, tmp, run)
    if command.program == "cljax.main" and job["run"]:
      trained.add(workdir)
    if command.program == "cljax.evaluate" and job["run"] and workdir not in trained:
      # Trained first: an evaluation needs its run.
      train_args = (f"--config={command.config}", f"--workdir={command.flags['workdir']}")
      train = docs.Command(command.where, "", "cljax.main", train_args)
      jobs["cljax.main"].append((train, _job(train, tmp, True)[0]))
      trained.add(workdir)
    jobs[command.program].append((command, job))
  return jobs, targets


def _run_program(program: str, jobs: list, tmp: str) -> list[str]:
  results = runner.run_jobs(program, [job for _, job in jobs], tmp)
  failures = []
  for (command, job), result in zip(jobs, results, strict=True):
    if result["status"] != "ok":
      what = "ran" if job["run"] else "parsed"
      failures.append(
        f"{command.where}: python -m {program} {' '.join(command.args)}\n  {what} as "
        f"{' '.join(job['args'])}: {result['status']}\n{result['error']}"
      )
  return failures


def test_the_collector_finds_the_commands_users_are_shown():
  commands = docs.collect()
  texts = [(c.where.split(":")[0], c.program, " ".join(c.args)) for c in commands]
  assert (
    "configs/dino_cifar10.py",
    "cljax.evaluate",
    "--config=configs/dino_cifar10.py:cpu --workdir=runs/dino_c10_cpu",
  ) in texts
  assert ("README.md", "make", "quickstart") in texts
  # A command broken over lines in a prose code span, and one with continuations.
  mine = [t for t in texts if "runs/mine" in t[2]][0]
  assert mine[2].endswith("--config.evals.online_probe=False")
  assert any(t[2].endswith("--config.optim.base_lr=0.5") for t in texts)
  assert len({c.config for c in commands if c.program == "cljax.main"}) >= 20
  documented_targets = {c.args[0] for c in commands if c.program == "make"}
  assert set(NOT_RUN) <= documented_targets, "NOT_RUN names a target no document shows"
  import runpy

  clip_b16 = runpy.run_path(str(REPO / "configs/clip_vitb16.py"))["get_config"]()
  assert clip_b16.clip.tokenizer.startswith("hf:"), "NOT_RUN_CONFIGS's reason no longer holds"


def test_the_runner_catches_an_unknown_flag_and_a_bad_override(tmp_path):
  jobs = [
    (
      docs.Command("x", "", "cljax.main", ()),
      {
        "args": ["--config=configs/quickstart.py", f"--workdir={tmp_path}"],
        "parse": True,
        "run": False,
        "names": ["config", "workdir", "no_such_flag"],
      },
    ),
    (
      docs.Command("y", "", "cljax.main", ()),
      {
        "args": [
          "--config=configs/quickstart.py",
          f"--workdir={tmp_path}",
          "--config.train.num_stepz=2",
        ],
        "parse": True,
        "run": False,
        "names": [],
      },
    ),
  ]
  failures = _run_program("cljax.main", jobs, str(tmp_path))
  assert len(failures) == 2
  assert "unknown flag(s) of cljax.main: no_such_flag" in failures[0]
  assert "train has no key 'num_stepz'" in failures[1]


def test_every_documented_command_parses_and_runs_at_tiny_size(tmp_path):
  jobs, targets = _jobs(str(tmp_path))
  failures = []
  for program in PROGRAMS:
    if jobs[program]:
      failures += _run_program(program, jobs[program], str(tmp_path))
  bin_dir = os.path.dirname(sys.executable)
  for target in targets:
    if target == "lint":
      recipe = subprocess.run(["make", "-n", "lint"], cwd=REPO, capture_output=True, text=True)
      for line in recipe.stdout.splitlines():
        if "ruff" in line:
          cmd = re.sub(r"^\S*/ruff", os.path.join(bin_dir, "ruff"), line.strip())
          out = subprocess.run(cmd, shell=True, cwd=REPO, capture_output=True, text=True)
          if out.returncode:
            failures.append(f"make lint: {cmd}\n{out.stdout[-2000:]}{out.stderr[-1000:]}")
  ran = sum(job["run"] for program in PROGRAMS for _, job in jobs[program])
  parsed = sum(job["parse"] for program in PROGRAMS for _, job in jobs[program])
  assert ran >= 25 and parsed >= 50, (ran, parsed)
  assert not failures, f"{len(failures)} documented command(s) fail:\n\n" + "\n\n".join(failures)


def test_every_flag_the_docs_quote_is_known_where_they_promise_it(tmp_path):
  """A ``--flag`` quoted in prose is known to each program its sentence promises it on
  ("On `cljax.main`, `cljax.evaluate` and `cljax.bench`, `--compilation_cache_dir` ..."),
  else to some cljax program, benchmark script or launcher (XLA's own flags aside)."""
  quoted = docs.collect_flags()
  assert any(f.name == "compilation_cache_dir" and len(f.programs) == 3 for f in quoted)
  programs = [p for p in PROGRAMS if p != "cljax.data.prepare"] + ["cljax.data.prepare"]
  names = sorted({f.name for f in quoted})
  # One names-only job per program and flag: which programs know which flags.
  jobs = {
    p: [{"args": [], "parse": False, "run": False, "names": [n]} for n in names] for p in programs
  }
  known = {
    p: {
      n
      for n, r in zip(names, runner.run_jobs(p, jobs[p], str(tmp_path)), strict=True)
      if r["status"] == "ok"
    }
    for p in programs
  }
  anywhere = set().union(*known.values()) | docs.repository_flags()
  wrong = []
  for flag in quoted:
    missing = [p for p in flag.programs if flag.name not in known[p]]
    if missing or (flag.name not in anywhere and not flag.name.startswith("xla_")):
      wrong.append(f"{flag.where}: --{flag.name} unknown to {missing or 'every program'}")
  assert not wrong, "\n".join(wrong)
