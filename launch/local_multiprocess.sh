#!/usr/bin/env bash
# N cljax processes on this machine, joined over loopback: the multi-process
# code paths (per-process data shards, collectives over gloo, multi-host
# checkpoints) without a cluster. See usage() or run with -h.
set -euo pipefail

LAUNCH_SCRIPT=local_multiprocess.sh
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/local_multiprocess.sh [OPTIONS] [--] MAIN_ARGS...

Starts N `python -m cljax.main` processes on this machine, all joined to one
coordinator on 127.0.0.1 (--coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=i), waits for all of them and fails if any
fails (the others are then stopped: SIGTERM, then SIGKILL after a grace
period). Each output line is prefixed with its process id: "[0] ...".
Run it from the repository root; MAIN_ARGS go to every process unchanged.

Options (each also read from the environment variable in brackets):
  -n, --num-processes N        processes to start                  [NUM_PROCESSES, default 2]
  -d, --devices-per-process K  devices each process sees           [DEVICES_PER_PROCESS,
                               cpu: 4 fake CPU devices              default 4 on cpu, 1 on gpu]
                               gpu: process i gets GPUs i*K..i*K+K-1
      --platform cpu|gpu       cpu: JAX_PLATFORMS=cpu and           [PLATFORM, default cpu]
                               XLA_FLAGS=--xla_force_host_platform_device_count=K;
                               gpu: CUDA_VISIBLE_DEVICES per process
      --port PORT              coordinator port                     [COORDINATOR_PORT, default: a free one]
      --dry-run                print the commands instead of running them  [DRY_RUN=1]
  -h, --help                   this text
Other environment: PYTHON (default .venv/bin/python if the repository has
one, else python3), KILL_GRACE_S (default 10).

Example (2 processes x 4 CPU devices = 8 devices, one global batch):
  launch/local_multiprocess.sh -n 2 -- \
      --config=configs/quickstart.py --workdir=runs/mp --config.train.num_steps=20
EOF
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-}
PLATFORM=${PLATFORM:-cpu}
COORDINATOR_PORT=${COORDINATOR_PORT:-}
KILL_GRACE_S=${KILL_GRACE_S:-10}
dry_run=0
if is_true "${DRY_RUN:-0}" DRY_RUN; then dry_run=1; fi
find_python "$REPO/.venv/bin/python"

main_args=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    -n | --num-processes) need_value "$@"; NUM_PROCESSES=$2; shift ;;
    --num-processes=*) NUM_PROCESSES=${1#*=} ;;
    -d | --devices-per-process) need_value "$@"; DEVICES_PER_PROCESS=$2; shift ;;
    --devices-per-process=*) DEVICES_PER_PROCESS=${1#*=} ;;
    --platform) need_value "$@"; PLATFORM=$2; shift ;;
    --platform=*) PLATFORM=${1#*=} ;;
    --port) need_value "$@"; COORDINATOR_PORT=$2; shift ;;
    --port=*) COORDINATOR_PORT=${1#*=} ;;
    --) shift; main_args+=("$@"); break ;;
    *) main_args+=("$1") ;;
  esac
  shift
done

require_main_args "--config=configs/quickstart.py --workdir=runs/mp" ${main_args[@]+"${main_args[@]}"}
reject_coordinator_flags " is set by this script for each process; use -n/--num-processes and --port" \
  "${main_args[@]}"
require_positive_int --num-processes "$NUM_PROCESSES"
case $PLATFORM in
  cpu) DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-4} ;;
  gpu) DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-1} ;;
  *) die "--platform must be cpu or gpu, not '$PLATFORM'" ;;
esac
require_positive_int --devices-per-process "$DEVICES_PER_PROCESS"
[[ $KILL_GRACE_S =~ ^[0-9]+$ ]] || die "KILL_GRACE_S must be a whole number of seconds"
if [[ -z $COORDINATOR_PORT ]]; then
  # Port 0 makes the OS pick a free port; the socket closes before the
  # coordinator binds it, a race that only matters on a very busy machine.
  COORDINATOR_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') ||
    die "could not pick a free port with $PYTHON; pass --port"
fi
if ! [[ $COORDINATOR_PORT =~ ^[0-9]+$ ]] || ((COORDINATOR_PORT < 1 || COORDINATOR_PORT > 65535)); then
  die "--port must be a port number, not '$COORDINATOR_PORT'"
fi

# The command of process $1, into the array `cmd`.
build_command() {
  local i=$1
  cmd=(env PYTHONUNBUFFERED=1)
  if [[ $PLATFORM == cpu ]]; then
    cmd+=(JAX_PLATFORMS=cpu
      "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS")
  else
    # JAX_LOCAL_DEVICE_IDS: all of this process's GPUs, even inside a SLURM
    # allocation, where jax.distributed would otherwise keep only one.
    cmd+=("CUDA_VISIBLE_DEVICES=$(id_list $((i * DEVICES_PER_PROCESS)) "$DEVICES_PER_PROCESS")"
      "JAX_LOCAL_DEVICE_IDS=$(id_list 0 "$DEVICES_PER_PROCESS")")
  fi
  cmd+=("$PYTHON" -m cljax.main
    "--coordinator_address=127.0.0.1:$COORDINATOR_PORT"
    "--num_processes=$NUM_PROCESSES"
    "--process_id=$i"
    "${main_args[@]}")
}

if ((dry_run)); then
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    build_command "$i"
    show "${cmd[@]}"
  done
  exit 0
fi

# Prefixes every line of stdin with "[$1] ". It ignores SIGTERM and SIGINT so
# that it outlives its process and passes on that process's last words.
prefix() {
  local line
  trap '' TERM INT
  while IFS= read -r line || [[ -n $line ]]; do
    printf '[%s] %s\n' "$1" "$line"
  done
}

# Job control puts each process (with its prefixer and the subshell that
# waits for both) in its own process group, so that one signal reaches the
# group; Ctrl-C reaches this script only, which then stops every group.
set -m
pids=()
alive=()
status=0
stopping=0
stop_deadline=0

# Sends $1 to the process group of every process still running.
signal_all() {
  local i
  for i in "${!pids[@]}"; do
    if ((alive[i])); then kill "-$1" -- "-${pids[i]}" 2>/dev/null || true; fi
  done
}

stop_all() {
  if ((!stopping)); then
    stopping=1
    stop_deadline=$((SECONDS + KILL_GRACE_S))
    signal_all TERM
  fi
}

on_signal() {
  log 'interrupted; stopping all processes'
  ((status)) || status=$1
  stop_all
}

trap 'on_signal 130' INT
trap 'on_signal 143' TERM
trap 'signal_all KILL' EXIT

log '%d processes x %d %s devices, coordinator 127.0.0.1:%s' \
  "$NUM_PROCESSES" "$DEVICES_PER_PROCESS" "$PLATFORM" "$COORDINATOR_PORT"
for ((i = 0; i < NUM_PROCESSES; i++)); do
  build_command "$i"
  trace "${cmd[@]}"
  # The subshell traps SIGTERM (its children get the default action back), so
  # it lives until the process really exits: only then is process i done.
  (
    trap : TERM INT
    "${cmd[@]}" </dev/null 2>&1 | prefix "$i"
  ) &
  pids[i]=$!
  alive[i]=1
done

running=$NUM_PROCESSES
while ((running)); do
  for i in "${!pids[@]}"; do
    ((alive[i])) || continue
    kill -0 "${pids[i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[i]}" || rc=$?
    alive[i]=0
    running=$((running - 1))
    if ((rc != 0)) && ((!stopping)); then
      log 'process %d exited with status %d; stopping the others' "$i" "$rc"
      ((status)) || status=$rc
      stop_all
    fi
  done
  if ((stopping && running && SECONDS >= stop_deadline)); then
    log 'still running after %ss; killing' "$KILL_GRACE_S"
    signal_all KILL
    stop_deadline=$((SECONDS + 3600))
  fi
  ((running)) && sleep 0.2
done
trap - EXIT

if ((status)); then
  log 'failed (status %d)' "$status"
  exit "$status"
fi
log 'all %d processes finished' "$NUM_PROCESSES"
