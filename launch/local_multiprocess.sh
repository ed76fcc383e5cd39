#!/usr/bin/env bash
# N cljax processes on this machine, joined over loopback: the multi-process
# code paths (per-process data shards, collectives over gloo, multi-host
# checkpoints) without a cluster. See usage() or run with -h.
set -euo pipefail

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

die() {
  printf 'local_multiprocess.sh: %s\n' "$*" >&2
  exit 2
}

# Quotes one word for a POSIX shell, leaving plain words as they are.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints a command as one line of shell that runs it.
show() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s\n' "$out"
}

is_true() {
  case $1 in
    1 | [Tt]rue | TRUE | [Yy]es | YES | [Oo]n | ON) return 0 ;;
    "" | 0 | [Ff]alse | FALSE | [Nn]o | NO | [Oo]ff | OFF) return 1 ;;
    *) die "DRY_RUN must be 1/true/yes or 0/false/no, not '$1'" ;;
  esac
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-}
PLATFORM=${PLATFORM:-cpu}
COORDINATOR_PORT=${COORDINATOR_PORT:-}
KILL_GRACE_S=${KILL_GRACE_S:-10}
dry_run=0
if is_true "${DRY_RUN:-0}"; then dry_run=1; fi
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi

main_args=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    -n | --num-processes) (($# > 1)) || die "$1 needs a value"; NUM_PROCESSES=$2; shift ;;
    --num-processes=*) NUM_PROCESSES=${1#*=} ;;
    -d | --devices-per-process) (($# > 1)) || die "$1 needs a value"; DEVICES_PER_PROCESS=$2; shift ;;
    --devices-per-process=*) DEVICES_PER_PROCESS=${1#*=} ;;
    --platform) (($# > 1)) || die "$1 needs a value"; PLATFORM=$2; shift ;;
    --platform=*) PLATFORM=${1#*=} ;;
    --port) (($# > 1)) || die "$1 needs a value"; COORDINATOR_PORT=$2; shift ;;
    --port=*) COORDINATOR_PORT=${1#*=} ;;
    --) shift; main_args+=("$@"); break ;;
    *) main_args+=("$1") ;;
  esac
  shift
done

((${#main_args[@]})) || die "no arguments for cljax.main (e.g. --config=configs/quickstart.py --workdir=runs/mp); -h for help"
for arg in "${main_args[@]}"; do
  case $arg in
    -coordinator_address* | --coordinator_address* | -num_processes* | --num_processes* | \
      -process_id* | --process_id*)
      die "$arg is set by this script for each process; use -n/--num-processes and --port" ;;
  esac
done
[[ $NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] || die "--num-processes must be a positive integer, not '$NUM_PROCESSES'"
case $PLATFORM in
  cpu) DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-4} ;;
  gpu) DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-1} ;;
  *) die "--platform must be cpu or gpu, not '$PLATFORM'" ;;
esac
[[ $DEVICES_PER_PROCESS =~ ^[1-9][0-9]*$ ]] ||
  die "--devices-per-process must be a positive integer, not '$DEVICES_PER_PROCESS'"
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
  local i=$1 first ids="" d
  cmd=(env PYTHONUNBUFFERED=1)
  if [[ $PLATFORM == cpu ]]; then
    cmd+=(JAX_PLATFORMS=cpu
      "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS")
  else
    first=$((i * DEVICES_PER_PROCESS))
    for ((d = first; d < first + DEVICES_PER_PROCESS; d++)); do ids+="${ids:+,}$d"; done
    # JAX_LOCAL_DEVICE_IDS: all of this process's GPUs, even inside a SLURM
    # allocation, where jax.distributed would otherwise keep only one.
    local locals=""
    for ((d = 0; d < DEVICES_PER_PROCESS; d++)); do locals+="${locals:+,}$d"; done
    cmd+=("CUDA_VISIBLE_DEVICES=$ids" "JAX_LOCAL_DEVICE_IDS=$locals")
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
  printf 'local_multiprocess.sh: interrupted; stopping all processes\n' >&2
  ((status)) || status=$1
  stop_all
}

trap 'on_signal 130' INT
trap 'on_signal 143' TERM
trap 'signal_all KILL' EXIT

printf 'local_multiprocess.sh: %d processes x %d %s devices, coordinator 127.0.0.1:%s\n' \
  "$NUM_PROCESSES" "$DEVICES_PER_PROCESS" "$PLATFORM" "$COORDINATOR_PORT" >&2
for ((i = 0; i < NUM_PROCESSES; i++)); do
  build_command "$i"
  printf '+ %s\n' "$(show "${cmd[@]}")" >&2
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
      printf 'local_multiprocess.sh: process %d exited with status %d; stopping the others\n' "$i" "$rc" >&2
      ((status)) || status=$rc
      stop_all
    fi
  done
  if ((stopping && running && SECONDS >= stop_deadline)); then
    printf 'local_multiprocess.sh: still running after %ss; killing\n' "$KILL_GRACE_S" >&2
    signal_all KILL
    stop_deadline=$((SECONDS + 3600))
  fi
  ((running)) && sleep 0.2
done
trap - EXIT

if ((status)); then
  printf 'local_multiprocess.sh: failed (status %d)\n' "$status" >&2
  exit "$status"
fi
printf 'local_multiprocess.sh: all %d processes finished\n' "$NUM_PROCESSES" >&2
