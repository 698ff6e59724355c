#!/usr/bin/env bash
# One ddep_jax stage on several GPU machines without a cluster manager: starts
# process i on host i over ssh, all at once, with
#   --coordinator_address=<host 0>:<port> --num_processes=N --process_id=i
# then waits for all of them and exits with the worst exit status (any status
# other than 0 and 75 first, the largest of them; else 75 if a process was
# preempted; else 0).
#
# Usage: launch/gpu_multinode.sh --hosts=FILE [options] -- MAIN_FLAGS...
#   e.g. launch/gpu_multinode.sh --hosts=hosts.txt -- \
#          --config=configs/ddep_imagenet21k.py:ckpt=/shared/encoders/r50 \
#          --workdir=/shared/runs/ddep_r50
# MAIN_FLAGS go to python -m ddep_jax.main unchanged (any quoting survives).
#
# Options (environment variable in brackets, default after it):
#   --hosts=FILE      [HOSTS_FILE] one [user@]host per line; '#' starts a
#                     comment; line i runs process i, line 0 is the coordinator
#   --coordinator=H   [COORDINATOR] how the others reach host 0 [its name
#                     without user@]
#   --port=P          [COORDINATOR_PORT] 12345: the coordinator's port
#   --repo_dir=DIR    [REPO_DIR] this checkout's path: the repository on every
#                     host (same path, e.g. a shared file system)
#   --python=PATH     [PYTHON] .venv/bin/python (relative to --repo_dir)
#   --env=KEY=VALUE   set for every process, repeatable
#   --ssh=PROGRAM     [SSH] ssh; called as PROGRAM -o BatchMode=yes HOST COMMAND
#   --dry_run         [DRY_RUN=1] print the ssh commands, run none
# Each host's output is printed with a '[i host]' prefix. Ctrl-C or SIGTERM
# here sends SIGTERM to every process (over ssh, by the pid each one wrote to
# $TMPDIR/ddep_multinode_<port>_<i>.pid), which makes them save a checkpoint and
# exit 75; run the same command again to resume from the workdir, which
# must be shared by all hosts (a network file system, or gs:// with the gcp
# extra).

set -euo pipefail

usage() { sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_multinode.sh: error: $*" >&2; exit 2; }
note() { echo "gpu_multinode.sh: $*" >&2; }

HOSTS_FILE=${HOSTS_FILE:-}
COORDINATOR=${COORDINATOR:-}
PORT=${COORDINATOR_PORT:-12345}
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PYTHON=${PYTHON:-.venv/bin/python}
SSH=${SSH:-ssh}
DRY_RUN=${DRY_RUN:-0}
JOB_ENV=()
MAIN_ARGS=()

while [[ $# -gt 0 ]]; do
  arg=$1
  case $arg in
    -h|--help) usage; exit 0 ;;
    --dry_run) DRY_RUN=1 ;;
    --hosts=*) HOSTS_FILE=${arg#*=} ;;
    --coordinator=*) COORDINATOR=${arg#*=} ;;
    --port=*) PORT=${arg#*=} ;;
    --repo_dir=*) REPO_DIR=${arg#*=} ;;
    --python=*) PYTHON=${arg#*=} ;;
    --env=*) JOB_ENV+=("${arg#*=}") ;;
    --ssh=*) SSH=${arg#*=} ;;
    --) shift; MAIN_ARGS+=("$@"); break ;;
    *) die "unknown option '$arg' (ddep_jax.main's flags go after '--';" \
           "launch/gpu_multinode.sh -h lists the options)" ;;
  esac
  shift
done

[[ -n $HOSTS_FILE ]] || die "needs --hosts=FILE (or HOSTS_FILE): one host per line"
[[ -r $HOSTS_FILE ]] || die "--hosts=$HOSTS_FILE: cannot read it"
[[ $PORT =~ ^[0-9]+$ ]] || die "--port=$PORT is not a number"
[[ ${#MAIN_ARGS[@]} -gt 0 ]] || die "needs ddep_jax.main's flags after '--' (--config=... --workdir=...)"
for kv in ${JOB_ENV[@]+"${JOB_ENV[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env=$kv: expected --env=NAME=VALUE"
done

HOSTS=()
while IFS= read -r line || [[ -n $line ]]; do
  line=${line%%#*}
  read -r host _ <<< "$line" || true
  if [[ -n ${host:-} ]]; then HOSTS+=("$host"); fi
done < "$HOSTS_FILE"
N=${#HOSTS[@]}
[[ $N -gt 0 ]] || die "--hosts=$HOSTS_FILE lists no host"
if [[ -z $COORDINATOR ]]; then COORDINATOR=${HOSTS[0]#*@}; fi

print_cmd() { printf '+'; printf ' %q' "$@"; printf '\n'; }
qwords() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(printf '%q' "$w")"; done
  printf '%s' "$out"
}
# Where process I's pid is kept on its host (expanded there).
# shellcheck disable=SC2016
pidfile() { printf '"${TMPDIR:-/tmp}"/ddep_multinode_%s_%s.pid' "$PORT" "$1"; }

# remote_command I: what host I runs (in its login shell, bash).
remote_command() {
  local i=$1
  local -a argv=()
  if [[ ${#JOB_ENV[@]} -gt 0 ]]; then argv+=(env "${JOB_ENV[@]}"); fi
  argv+=("$PYTHON" -m ddep_jax.main "${MAIN_ARGS[@]}"
         "--coordinator_address=$COORDINATOR:$PORT" "--num_processes=$N" "--process_id=$i")
  printf 'cd %q && echo $$ > %s && exec %s' "$REPO_DIR" "$(pidfile "$i")" "$(qwords "${argv[@]}")"
}

prefix() {  # prefix LABEL: copies stdin to stdout, each line after LABEL
  local line
  while IFS= read -r line || [[ -n $line ]]; do printf '%s %s\n' "$1" "$line"; done
}

STOPPING=0
# shellcheck disable=SC2329  # called by the trap below
stop_all() {
  if [[ $STOPPING == 1 ]]; then return; fi
  STOPPING=1
  note "stopping: SIGTERM to the process on every host (each saves a checkpoint and exits 75)"
  local i
  for (( i = 0; i < N; i++ )); do
    print_cmd "$SSH" -o BatchMode=yes "${HOSTS[$i]}" "kill -TERM \$(cat $(pidfile "$i")) 2>/dev/null || true"
    "$SSH" -o BatchMode=yes "${HOSTS[$i]}" "kill -TERM \$(cat $(pidfile "$i")) 2>/dev/null || true" || true
  done
}

note "$N processes, coordinator $COORDINATOR:$PORT"
if [[ $DRY_RUN != 1 ]]; then
  RC_DIR=$(mktemp -d)
  trap 'rm -rf "$RC_DIR"' EXIT
fi
# Each ssh runs in a subshell that records its exit status in RC_DIR/i; the
# subshell's trap (reset to the default in ssh itself) lets it outlive Ctrl-C
# and SIGTERM long enough to do so.
for (( i = 0; i < N; i++ )); do
  cmd=("$SSH" -o BatchMode=yes "${HOSTS[$i]}" "$(remote_command "$i")")
  print_cmd "${cmd[@]}"
  if [[ $DRY_RUN != 1 ]]; then
    (
      trap true INT TERM
      rc=0
      "${cmd[@]}" < /dev/null > >(prefix "[$i ${HOSTS[$i]}]") 2>&1 || rc=$?
      echo "$rc" > "$RC_DIR/$i"
    ) &
  fi
done
if [[ $DRY_RUN == 1 ]]; then exit 0; fi
trap stop_all INT TERM

# `wait` returns early when a trapped signal arrives: wait until every
# subshell is gone.
all_done() {
  local i
  for (( i = 0; i < N; i++ )); do [[ -s $RC_DIR/$i ]] || return 1; done
}
until all_done; do
  if [[ -z $(jobs -p) ]]; then break; fi
  wait || true
done

WORST=0
for (( i = 0; i < N; i++ )); do
  rc=$(cat "$RC_DIR/$i" 2>/dev/null || echo 255)
  note "process $i (${HOSTS[$i]}) exited with status $rc"
  if [[ $rc != 0 && $rc != 75 ]]; then
    if [[ $WORST == 0 || $WORST == 75 || $rc -gt $WORST ]]; then WORST=$rc; fi
  elif [[ $rc == 75 && $WORST == 0 ]]; then
    WORST=75
  fi
done
note "exit status $WORST"
exit "$WORST"
