# shellcheck shell=bash
# Helpers shared by the launch scripts (local_multiprocess.sh, slurm_gpu.sbatch,
# tpu_pod.sh), which source this file; it is not run on its own. It only
# defines functions:
#   log, die             messages on stderr, prefixed with the script's name
#   quote, show, trace   print a command as one line of shell
#   is_true              read a yes/no setting such as DRY_RUN
#   need_value           check that an option has its value
#   require_main_args, reject_coordinator_flags
#                        check the arguments meant for cljax.main
#   require_positive_int check a count
#   find_python          choose the Python that runs cljax.main
#   id_list              a comma-separated run of device ids
# A script sets LAUNCH_SCRIPT (its name, for messages) before it calls them.
# The name is not taken from $0: sbatch runs a copy called slurm_script.

# Prints the message printf FORMAT ARGS... would, prefixed with the script's
# name, on stderr; e.g. log 'job %s started' "$id".
log() {
  local format=$1
  shift
  # shellcheck disable=SC2059  # the format comes from the caller, as printf's does
  printf "%s: $format\n" "$LAUNCH_SCRIPT" "$@" >&2
}

# Prints the message "$*" as log does and exits with status 2, the status of
# every usage or set-up error in these scripts.
die() {
  log '%s' "$*"
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

# Prints the command "$@" as one line of shell that runs it.
show() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s\n' "$out"
}

# Prints the command "$@" on stderr as "+ COMMAND", as set -x would, before
# the caller runs it.
trace() {
  printf '+ %s\n' "$(show "$@")" >&2
}

# Whether the setting $1 says yes (1, true, yes, on) or no (0, false, no, off,
# or empty); anything else is an error, which names the setting $2 if given.
is_true() {
  case $1 in
    1 | [Tt]rue | TRUE | [Yy]es | YES | [Oo]n | ON) return 0 ;;
    "" | 0 | [Ff]alse | FALSE | [Nn]o | NO | [Oo]ff | OFF) return 1 ;;
    *)
      if [[ -n ${2:-} ]]; then
        die "$2 must be 1/true/yes or 0/false/no, not '$1'"
      fi
      die "expected 1/true/yes or 0/false/no, not '$1'" ;;
  esac
}

# For an option that takes a value as the next word: called with the words
# left on the command line, the option first, it dies if no value follows.
need_value() {
  (($# > 1)) || die "$1 needs a value"
}

# Dies unless at least one argument for cljax.main follows $1, an example of
# such arguments for the message.
require_main_args() {
  (($# > 1)) || die "no arguments for cljax.main (e.g. $1); -h for help"
}

# Dies if any of the arguments after $1 sets the coordinator, the number of
# processes or a process id, which the launch script decides; the message is
# the argument followed by $1, which says why.
reject_coordinator_flags() {
  local why=$1 arg
  shift
  for arg in "$@"; do
    case $arg in
      -coordinator_address* | --coordinator_address* | -num_processes* | --num_processes* | \
        -process_id* | --process_id*)
        die "$arg$why" ;;
    esac
  done
}

# Dies unless $2, the value of the setting named $1, is a whole number > 0.
require_positive_int() {
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, not '$2'"
}

# Sets PYTHON, unless it is set already: $1 (a virtual environment's python)
# if that is an executable, otherwise python3 from the PATH.
find_python() {
  if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $1 ]]; then PYTHON=$1; else PYTHON=python3; fi
  fi
}

# Prints the $2 device ids from $1 on, comma-separated: id_list 2 3 -> 2,3,4.
id_list() {
  local ids="" d
  for ((d = $1; d < $1 + $2; d++)); do ids+="${ids:+,}$d"; done
  printf '%s\n' "$ids"
}
