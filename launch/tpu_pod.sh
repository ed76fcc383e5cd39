#!/usr/bin/env bash
# Runs cljax on every worker of a Cloud TPU VM (a single host or a pod slice):
# create-or-reuse the TPU VM, put this repository on every worker, install,
# and start `python -m cljax.main` everywhere. See usage() or run with -h.
set -euo pipefail

LAUNCH_SCRIPT=tpu_pod.sh
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh [OPTIONS] [--] MAIN_ARGS...

1. Reuses the TPU VM NAME if it exists (starting it if STOPPED, waiting if it
   is being created), otherwise creates it:
     gcloud compute tpus tpu-vm describe/create NAME --zone=ZONE ...
2. Puts the code on every worker: by default this working tree (the files
   `git ls-files -co --exclude-standard` lists: committed, changed and new,
   but not ignored ones such as .venv or runs/), packed and copied with
   `gcloud compute tpus tpu-vm scp --worker=all`; or, with --git-url, a clone.
3. Installs it on every worker (--install-cmd; the default puts Python 3.12 and
   `pip install -e . "jax[tpu]"` in REMOTE_DIR/.venv with uv, because TPU VM
   images ship Python 3.10 and cljax needs >= 3.11).
4. Runs on every worker at once:
     gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all \
         --command="cd REMOTE_DIR && ... python -m cljax.main MAIN_ARGS"
   jax.distributed finds the other workers itself on Cloud TPU, so no
   coordinator flags are passed. The command ends when every worker's main
   does (unless --detach).

MAIN_ARGS go to cljax.main unchanged; paths in them are on the workers,
relative to REMOTE_DIR. --workdir must be a directory every worker sees (a
shared file system mounted on all of them), since checkpoints are written by
all processes and read back by all of them.

Options (each also read from the environment variable in brackets):
  --name NAME              TPU VM name                          [TPU_NAME, default cljax]
  --zone ZONE              zone                                 [TPU_ZONE, default us-central2-b]
  --accelerator-type TYPE  e.g. v4-32, v5litepod-16, v5p-32,    [TPU_ACCELERATOR_TYPE, default v4-32]
                           v6e-16
  --runtime-version V      TPU software version                 [TPU_RUNTIME_VERSION, default from the
                                                                 type: tpu-ubuntu2204-base for v2-v4,
                                                                 v2-alpha-tpuv5-lite, v2-alpha-tpuv5,
                                                                 v2-alpha-tpuv6e]
  --project PROJECT        GCP project                          [TPU_PROJECT, default gcloud's]
  --spot                   create a Spot TPU VM                 [TPU_SPOT=1]
  --remote-dir DIR         code on the workers, relative to the [TPU_REMOTE_DIR, default cljax]
                           home directory or absolute
  --git-url URL            clone URL on the workers instead of  [TPU_GIT_URL]
                           copying this tree
  --git-ref REF            branch, tag or commit to check out   [TPU_GIT_REF, default HEAD]
  --install-cmd CMD        install command, run in REMOTE_DIR   [TPU_INSTALL_CMD]
  --python PATH            interpreter on the workers, relative [TPU_PYTHON, default .venv/bin/python]
                           to REMOTE_DIR or absolute
  --skip-install           no copy/clone and no install: run what is there
  --env KEY=VALUE          set an environment variable for main (repeatable),
                           e.g. --env LIBTPU_INIT_ARGS=--xla_tpu_...
  --detach                 start main with nohup (output in REMOTE_DIR/main.log on
                           each worker) and return at once; follow it with
                           gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=0 \
                               --command="tail -f REMOTE_DIR/main.log"
  --dry-run                print the commands instead of running them  [DRY_RUN=1]
  -h, --help               this text

Example:
  launch/tpu_pod.sh --name=r50 --zone=us-central2-b --accelerator-type=v4-32 -- \
      --config=configs/simclr_r50.py --workdir=/mnt/shared/runs/r50 \
      --config.data.data_dir=/mnt/shared/tfds

Ctrl-C stops gcloud here but not always main on the workers. If a run fails
with "TPU in use", an earlier main still holds the chips: find it with
`sudo lsof -w /dev/accel* /dev/vfio/*` on the workers, stop it, and retry.
Delete the TPU VM when done: gcloud compute tpus tpu-vm delete NAME --zone=ZONE
EOF
}

# Prints the command; runs it too unless this is a dry run.
run() {
  if ((dry_run)); then
    show "$@"
  else
    trace "$@"
    "$@"
  fi
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAME=${TPU_NAME:-cljax}
ZONE=${TPU_ZONE:-us-central2-b}
ACCELERATOR_TYPE=${TPU_ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${TPU_RUNTIME_VERSION:-}
PROJECT=${TPU_PROJECT:-}
REMOTE_DIR=${TPU_REMOTE_DIR:-cljax}
GIT_URL=${TPU_GIT_URL:-}
GIT_REF=${TPU_GIT_REF:-HEAD}
REMOTE_PYTHON=${TPU_PYTHON:-.venv/bin/python}
# Runs on the workers, so $HOME and $PATH are theirs, expanded there.
# shellcheck disable=SC2016
DEFAULT_INSTALL_CMD='export PATH="$HOME/.local/bin:$PATH"; '\
'command -v uv >/dev/null 2>&1 || curl -LsSf https://astral.sh/uv/install.sh | sh; '\
'uv venv --quiet --allow-existing --python 3.12 .venv; '\
'uv pip install --quiet --python .venv/bin/python -e . "jax[tpu]"'
INSTALL_CMD=${TPU_INSTALL_CMD:-$DEFAULT_INSTALL_CMD}
spot=0
if is_true "${TPU_SPOT:-0}"; then spot=1; fi
dry_run=0
if is_true "${DRY_RUN:-0}"; then dry_run=1; fi
skip_install=0
detach=0
remote_env=()

main_args=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --spot) spot=1 ;;
    --skip-install) skip_install=1 ;;
    --detach) detach=1 ;;
    --name | --zone | --accelerator-type | --runtime-version | --project | --remote-dir | \
      --git-url | --git-ref | --install-cmd | --python | --env)
      need_value "$@"
      set -- "$1=$2" "${@:3}"
      continue ;;
    --name=*) NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --accelerator-type=*) ACCELERATOR_TYPE=${1#*=} ;;
    --runtime-version=*) RUNTIME_VERSION=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --remote-dir=*) REMOTE_DIR=${1#*=} ;;
    --git-url=*) GIT_URL=${1#*=} ;;
    --git-ref=*) GIT_REF=${1#*=} ;;
    --install-cmd=*) INSTALL_CMD=${1#*=} ;;
    --python=*) REMOTE_PYTHON=${1#*=} ;;
    --env=*)
      [[ ${1#*=} =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env needs KEY=VALUE, not '${1#*=}'"
      remote_env+=("${1#*=}") ;;
    --) shift; main_args+=("$@"); break ;;
    *) main_args+=("$1") ;;
  esac
  shift
done

require_main_args "--config=configs/simclr_r50.py --workdir=DIR" ${main_args[@]+"${main_args[@]}"}
reject_coordinator_flags ": on Cloud TPU jax.distributed detects the coordinator and process ids itself" \
  "${main_args[@]}"
[[ -n $NAME && -n $ZONE && -n $ACCELERATOR_TYPE && -n $REMOTE_DIR ]] ||
  die "--name, --zone, --accelerator-type and --remote-dir must not be empty"
if [[ -z $RUNTIME_VERSION ]]; then
  case $ACCELERATOR_TYPE in
    v2-* | v3-* | v4-*) RUNTIME_VERSION="tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) die "no default runtime version for '$ACCELERATOR_TYPE'; pass --runtime-version" ;;
  esac
fi

scope=("--zone=$ZONE")
if [[ -n $PROJECT ]]; then scope+=("--project=$PROJECT"); fi
tpu=(gcloud compute tpus tpu-vm)
qdir=$(quote "$REMOTE_DIR")

# --- 1. the TPU VM -----------------------------------------------------------

describe=("${tpu[@]}" describe "$NAME" "${scope[@]}" "--format=value(state,acceleratorType)")
create=("${tpu[@]}" create "$NAME" "${scope[@]}" "--accelerator-type=$ACCELERATOR_TYPE"
  "--version=$RUNTIME_VERSION")
if ((spot)); then create+=(--spot); fi
start=("${tpu[@]}" start "$NAME" "${scope[@]}")

ensure_tpu() {
  local out err rc state type waited=0
  while :; do
    trace "${describe[@]}"
    rc=0
    out=$("${describe[@]}" 2>"$scratch/describe.err") || rc=$?
    err=$(<"$scratch/describe.err")
    if ((rc != 0)); then
      if [[ $err == *NOT_FOUND* || $err == *"not found"* ]]; then
        log 'no TPU VM %s in %s; creating a %s' "$NAME" "$ZONE" "$ACCELERATOR_TYPE"
        run "${create[@]}"
        return
      fi
      printf '%s\n' "$err" >&2
      die "gcloud could not describe TPU VM $NAME (status $rc)"
    fi
    read -r state type <<<"$out" || true
    case $state in
      READY)
        if [[ -n ${type:-} && ${type##*/} != "$ACCELERATOR_TYPE" ]]; then
          log 'warning: reusing %s, a %s, not a %s' "$NAME" "${type##*/}" "$ACCELERATOR_TYPE"
        else
          log 'reusing TPU VM %s (READY)' "$NAME"
        fi
        return ;;
      STOPPED)
        run "${start[@]}"
        return ;;
      CREATING | STARTING | RESTARTING | REPAIRING)
        ((waited < 1800)) || die "TPU VM $NAME still $state after 30 minutes"
        log 'TPU VM %s is %s; waiting' "$NAME" "$state"
        sleep 30
        waited=$((waited + 30)) ;;
      *)
        die "TPU VM $NAME is ${state:-in an unknown state}; delete it (gcloud compute tpus tpu-vm delete $NAME --zone=$ZONE) and run this again" ;;
    esac
  done
}

if ((dry_run)); then
  show "${describe[@]}"
  echo "# if it does not exist:"
  show "${create[@]}"
  echo "# if it is STOPPED:"
  show "${start[@]}"
else
  command -v gcloud >/dev/null 2>&1 || die "gcloud not found; install the Google Cloud CLI"
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  ensure_tpu
fi

# --- 2./3. code and install on every worker ---------------------------------

ssh_all() {
  run "${tpu[@]}" ssh "$NAME" "${scope[@]}" --worker=all "--command=$1"
}

if ((!skip_install)); then
  install="cd $qdir; $INSTALL_CMD"
  if [[ -n $GIT_URL ]]; then
    ssh_all "set -e; if [ ! -d $qdir/.git ]; then rm -rf $qdir; git clone --quiet $(quote "$GIT_URL") $qdir; fi; \
git -C $qdir fetch --quiet origin $(quote "$GIT_REF"); git -C $qdir checkout --quiet --force --detach FETCH_HEAD; \
$install"
  else
    if ((!dry_run)) && ! git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      die "$REPO is not a git checkout; use --git-url or --skip-install"
    fi
    tarball=${scratch:-${TMPDIR:-/tmp}}/cljax-src.tar.gz
    remote_tarball=cljax-src.tar.gz
    # Committed, changed and new files, not ignored ones; files deleted but
    # not yet committed are left out (tar would fail on them).
    # shellcheck disable=SC2016
    pack="cd $(quote "$REPO") && git ls-files -z -co --exclude-standard"\
' | while IFS= read -r -d "" f; do if [ -e "$f" ]; then printf "%s\0" "$f"; fi; done'\
" | tar -czf $(quote "$tarball") --null -T -"
    if ((dry_run)); then
      printf '%s\n' "$pack"
    else
      printf '+ %s\n' "$pack" >&2
      bash -c "set -euo pipefail; $pack"
    fi
    run "${tpu[@]}" scp "$tarball" "$NAME:$remote_tarball" "${scope[@]}" --worker=all
    # Replaces the code but keeps the virtual environment, so that reinstalling is quick.
    ssh_all "set -e; mkdir -p $qdir; find $qdir -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +; \
tar -xzf $remote_tarball -C $qdir; rm -f $remote_tarball; $install"
  fi
fi

# --- 4. main on every worker ------------------------------------------------

main_cmd=$(show env PYTHONUNBUFFERED=1 ${remote_env[@]+"${remote_env[@]}"} "$REMOTE_PYTHON" -m cljax.main "${main_args[@]}")
if ((detach)); then
  ssh_all "cd $qdir && nohup $main_cmd > main.log 2>&1 < /dev/null &"
  follow=$(show "${tpu[@]}" ssh "$NAME" "${scope[@]}" --worker=0 "--command=tail -f $qdir/main.log")
  if ((dry_run)); then
    printf '# follow the output of process 0 with:\n# %s\n' "$follow"
  else
    log 'started; follow the output of process 0 with:\n  %s' "$follow"
  fi
else
  ssh_all "cd $qdir && $main_cmd"
fi
