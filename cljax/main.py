"""Command line: ``python -m cljax.main --config=configs/X.py --workdir=DIR``."""

from __future__ import annotations

import glob
import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

# JAX, Flax and the data libraries are imported in main(), after the flags and the config
# are checked: --help and a bad value answer in about a second, not half a minute.
from cljax import cli, compile_cache, validate

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "A config file from configs/; override fields with --config.a.b=v.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Folder for checkpoints, metrics and TensorBoard events; resumed if present."
)
_FORCE_RESUME = flags.DEFINE_bool(
  "force_resume", False, "Resume a workdir even though its saved config differs."
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "HOST:PORT of process 0, for multi-process runs off TPU/SLURM."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
_ALLOW_ZERO_LR = flags.DEFINE_bool(
  "allow_zero_lr", False, "Accept optim.base_lr=0 (a frozen-encoder run)."
)
flags.mark_flags_as_required(["config", "workdir"])


def _multihost_environment() -> bool:
  """True on a multi-host Cloud TPU slice or under a multi-task SLURM job."""
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
  # A TPU VM made by gcloud names its workers through the metadata server, not
  # the environment; jax.distributed finds them (and is harmless on one host).
  tpu_vm = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
  return tpu_vm or "," in tpu_hosts or ("SLURM_JOB_ID" in os.environ and slurm_tasks > 1)


def initialize_distributed() -> None:
  """Starts JAX's multi-controller runtime when this is one process of several.

  Explicit flags win; on Cloud TPU and under SLURM ``jax.distributed``
  detects the coordinator and process ids itself. On CPU the processes talk
  over gloo, so the same code runs on a laptop with several processes.
  """
  import jax

  if _NUM_PROCESSES.value and _NUM_PROCESSES.value > 1:
    if _COORDINATOR.value is None or _PROCESS_ID.value is None:
      raise app.UsageError("--num_processes > 1 needs --coordinator_address and --process_id.")
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  elif _multihost_environment():
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    validate.check_config(_CONFIG.value, allow_zero_lr=_ALLOW_ZERO_LR.value)
    validate.check_workdir_path(_WORKDIR.value)
  except (ValueError, NotADirectoryError) as e:
    cli.exit_with(e)
  import jax

  from cljax import metrics, train

  metrics.setup_logging()
  initialize_distributed()
  compile_cache.setup()
  # A workdir that cannot be written is the user's to fix too.
  with cli.user_errors(PermissionError, NotADirectoryError):
    result = train.train_and_evaluate(
      _CONFIG.value, _WORKDIR.value, force_resume=_FORCE_RESUME.value
    )
  if jax.process_index() == 0:
    if "knn_top1" in result:
      line = f"kNN top-1 of the learned encoder on the eval split: {result['knn_top1']:.1%}"
      baselines = [
        f"{name} {result[key]:.1%}"
        for key, name in (
          ("knn_top1_random_init", "random-init encoder"),
          ("knn_top1_pixels", "raw pixels"),
        )
        if key in result
      ]
      if baselines:
        line += f" (baselines: {', '.join(baselines)})"
      print(line)
    print(json.dumps({"final": result}, sort_keys=True))


if __name__ == "__main__":
  if any(a in ("--help", "-h", "-?", "--helpshort") for a in sys.argv[1:]):
    # absl's --help exits with status 1; asking for help is not an error.
    print(flags.FLAGS.main_module_help())
    sys.exit(0)
  app.run(main, flags_parser=cli.parse_flags)
