#!/usr/bin/env bash
# Cloud TPU launcher for ddep_jax: creates a TPU VM (or a queued resource),
# installs this repository on every worker, prepares a dataset into the
# bucket, runs a stage on all workers at once, follows its log, keeps it going
# through preemptions and deletes the TPU. docs/LAUNCH.md has the recipes.
#
# Usage: launch/tpu.sh SUBCOMMAND [options] [--config.a.b=value ...] [-- more main.py flags]
#
# Subcommands:
#   create   TPU VM (gcloud compute tpus tpu-vm create); with --queued a queued
#            resource (gcloud compute tpus queued-resources create), then waits
#            until it is ACTIVE
#   install  on every worker: the repository (git archive of --git_ref copied
#            with tpu-vm scp, or git clone of --git_url), a venv with Python
#            --python_version (uv), pip install -e '.[tpu,gcp]', gcsfuse, and
#            gs://BUCKET mounted read-only (--implicit-dirs) at --mount
#   prepare  --dataset=NAME on worker 0 only: copies --manual from the bucket to
#            --scratch, builds the TFDS dataset there (python -m
#            ddep_jax.data.prepare) and rsyncs it into gs://BUCKET/tfds
#   run      python -m ddep_jax.main --config=... --workdir=gs://... on all
#            workers at once (--worker=all), in the background (setsid nohup, so
#            it survives an ssh drop), each worker appending to its own
#            REPO_DIR/logs/<log>.log; --distributed=yes on multi-host slices;
#            --config.data.data_dir=<mount>/tfds unless given
#   status   the TPU's state and, per worker, whether the job runs or how it ended
#   logs     tail -F of a worker's log (--worker=N, default 0; --worker=all)
#   stop     SIGTERM to the job on every worker: it saves a checkpoint, exits 75
#   retry    run, then watch: a preempted/suspended/failed/missing TPU is deleted,
#            re-created and re-installed and the run restarted on the SAME
#            workdir (it resumes from its latest checkpoint); exit status 75 also
#            restarts it. Stops when the job exits 0 (exit 0), exits with any
#            other status (that status), or after --max_retries restarts (1)
#   delete   the TPU VM, or with --queued the queued resource (and its node)
#
# Options (environment variable in brackets, default after it):
#   --project=P            [PROJECT] gcloud's configured project
#   --zone=Z               [ZONE] required
#   --name=NAME            [TPU_NAME] required: the TPU VM (queued: its node id)
#   --accelerator=TYPE     [ACCELERATOR] e.g. v4-32, v5p-64, v5litepod-16, v6e-16
#   --runtime_version=V    [RUNTIME_VERSION] from the accelerator: v6e
#                          v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5e
#                          v2-alpha-tpuv5-lite, v2/v3/v4 tpu-ubuntu2204-base
#   --queued               [QUEUED=1] use a queued resource
#   --qr_name=QR           [QR_NAME] <name>-qr
#   --spot | --reserved | --best_effort | --on_demand
#                          [PROVISIONING=spot|reserved|best-effort|on-demand]
#                          on-demand; best-effort needs --queued (gcloud alpha)
#   --valid_until=DURATION [VALID_UNTIL] queued: give up after e.g. 6h
#   --service_account=SA   [SERVICE_ACCOUNT] the VM's service account
#   --create_arg=ARG       extra gcloud create flag, repeatable
#   --bucket=B             [BUCKET] gs://B holds manual/ tfds/ encoders/ runs/
#   --mount=DIR            [GCS_MOUNT] /mnt/gcs: where workers mount gs://B
#   --data_dir=DIR         [DATA_DIR] <mount>/tfds: --config.data.data_dir
#   --repo_dir=DIR         [REPO_DIR] ddep_jax: the checkout on the workers
#                          (relative to the home folder)
#   --git_url=URL          [GIT_URL] install: clone URL instead of copying
#   --git_ref=REF          [GIT_REF] HEAD: what to archive or check out
#   --python_version=V     [PYTHON_VERSION] 3.12 (TPU images ship 3.10)
#   --config=FILE[:ARGS]   run/retry: the stage config (required, unless --harness)
#   --harness=RECIPE       run/retry: instead of one stage, the label-efficiency
#                          grid of RECIPE (python -m ddep_jax.experiments.
#                          label_efficiency --recipe=RECIPE --out=WORKDIR, e.g.
#                          cityscapes_1x; its flags such as
#                          --checkpoint=supervised=gs://... go after '--')
#   --workdir=gs://...     run/retry: the run's folder (required; resumes)
#   --log=NAME             [log name] <workdir basename>; status/logs/stop:
#                          the last run started on the worker
#   --env=KEY=VALUE        environment of the job, repeatable
#   --num_workers=N        [NUM_WORKERS] hosts of the slice (asked from gcloud)
#   --distributed=MODE     yes | no | auto [yes when more than one worker]
#   --worker=N|all         logs: [0]
#   --dataset=NAME         prepare: TFDS name (imagenet21k, cityscapes_seg, ...)
#   --manual=gs://...      prepare: [gs://BUCKET/manual/NAME] manual downloads
#   --scratch=DIR          [PREPARE_DIR] ddep_prepare: worker 0's build folder
#   --wait                 run/prepare: wait for the job, exit with its status
#   --max_retries=N        [MAX_RETRIES] 20: retry's restarts
#   --poll_seconds=S       [POLL_SECONDS] 60
#   --internal_ip          [INTERNAL_IP=1] ssh/scp over internal IPs
#   --dry_run              [DRY_RUN=1] print the commands, run none
# Every command is printed (shell-quoted) before it runs; the job's own exit
# status: 0 finished, 75 preempted (rerun on the same workdir to resume).

# Remote commands are assembled in single quotes on purpose: their $(...) and
# $VARS expand on the TPU workers, not here.
# shellcheck disable=SC2016
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() { sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "tpu.sh: error: $*" >&2; exit 2; }
note() { echo "tpu.sh: $*" >&2; }

PROJECT=${PROJECT:-}
ZONE=${ZONE:-}
TPU_NAME=${TPU_NAME:-}
ACCELERATOR=${ACCELERATOR:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
QUEUED=${QUEUED:-0}
QR_NAME=${QR_NAME:-}
PROVISIONING=${PROVISIONING:-on-demand}
VALID_UNTIL=${VALID_UNTIL:-}
SERVICE_ACCOUNT=${SERVICE_ACCOUNT:-}
BUCKET=${BUCKET:-}
MOUNT=${GCS_MOUNT:-/mnt/gcs}
DATA_DIR=${DATA_DIR:-}
REPO_DIR=${REPO_DIR:-ddep_jax}
GIT_URL=${GIT_URL:-}
GIT_REF=${GIT_REF:-HEAD}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
NUM_WORKERS=${NUM_WORKERS:-}
MAX_RETRIES=${MAX_RETRIES:-20}
POLL_SECONDS=${POLL_SECONDS:-60}
SCRATCH=${PREPARE_DIR:-ddep_prepare}
INTERNAL_IP=${INTERNAL_IP:-0}
DRY_RUN=${DRY_RUN:-0}
CONFIG=""
HARNESS=""
WORKDIR=""
LOG_NAME=""
DISTRIBUTED=""
WORKER=0
DATASET=""
MANUAL=""
WAIT=0
CREATE_ARGS=()
JOB_ENV=()
MAIN_ARGS=()

if [[ $# -lt 1 ]]; then usage >&2; exit 2; fi
CMD=""
while [[ $# -gt 0 ]]; do
  arg=$1
  case $arg in
    -h|--help) usage; exit 0 ;;
    --dry_run) DRY_RUN=1 ;;
    --queued) QUEUED=1 ;;
    --spot) PROVISIONING=spot ;;
    --reserved) PROVISIONING=reserved ;;
    --best_effort) PROVISIONING=best-effort ;;
    --on_demand) PROVISIONING=on-demand ;;
    --internal_ip) INTERNAL_IP=1 ;;
    --wait) WAIT=1 ;;
    --project=*) PROJECT=${arg#*=} ;;
    --zone=*) ZONE=${arg#*=} ;;
    --name=*) TPU_NAME=${arg#*=} ;;
    --accelerator=*) ACCELERATOR=${arg#*=} ;;
    --runtime_version=*) RUNTIME_VERSION=${arg#*=} ;;
    --qr_name=*) QR_NAME=${arg#*=} ;;
    --valid_until=*) VALID_UNTIL=${arg#*=} ;;
    --service_account=*) SERVICE_ACCOUNT=${arg#*=} ;;
    --create_arg=*) CREATE_ARGS+=("${arg#*=}") ;;
    --bucket=*) BUCKET=${arg#*=} ;;
    --mount=*) MOUNT=${arg#*=} ;;
    --data_dir=*) DATA_DIR=${arg#*=} ;;
    --repo_dir=*) REPO_DIR=${arg#*=} ;;
    --git_url=*) GIT_URL=${arg#*=} ;;
    --git_ref=*) GIT_REF=${arg#*=} ;;
    --python_version=*) PYTHON_VERSION=${arg#*=} ;;
    --config=*) CONFIG=${arg#*=} ;;
    --harness=*) HARNESS=${arg#*=} ;;
    --config.*) MAIN_ARGS+=("$arg") ;;
    --workdir=*) WORKDIR=${arg#*=} ;;
    --log=*) LOG_NAME=${arg#*=} ;;
    --env=*) JOB_ENV+=("${arg#*=}") ;;
    --num_workers=*) NUM_WORKERS=${arg#*=} ;;
    --distributed=*) DISTRIBUTED=${arg#*=} ;;
    --worker=*) WORKER=${arg#*=} ;;
    --dataset=*) DATASET=${arg#*=} ;;
    --manual=*) MANUAL=${arg#*=} ;;
    --scratch=*) SCRATCH=${arg#*=} ;;
    --max_retries=*) MAX_RETRIES=${arg#*=} ;;
    --poll_seconds=*) POLL_SECONDS=${arg#*=} ;;
    --) shift; MAIN_ARGS+=("$@"); break ;;
    help) usage; exit 0 ;;
    -*) die "unknown option '$arg' (options with a value are written --option=VALUE;" \
            "launch/tpu.sh -h lists them)" ;;
    *)
      [[ -z $CMD ]] || die "unexpected argument '$arg' (main.py's flags go after '--')"
      CMD=$arg ;;
  esac
  shift
done
case $CMD in
  create|install|prepare|run|status|logs|stop|retry|delete) ;;
  '') usage >&2; die "no subcommand given" ;;
  *) die "unknown subcommand '$CMD' (launch/tpu.sh -h lists them)" ;;
esac

# ---------------------------------------------------------------- checks
BUCKET=${BUCKET#gs://}
BUCKET=${BUCKET%%/*}
QR_NAME=${QR_NAME:-${TPU_NAME:+$TPU_NAME-qr}}
if [[ -z $DATA_DIR && -n $BUCKET ]]; then DATA_DIR=$MOUNT/tfds; fi
if [[ -z $MANUAL && -n $BUCKET && -n $DATASET ]]; then MANUAL=gs://$BUCKET/manual/$DATASET; fi
if [[ -z $LOG_NAME && -n $WORKDIR ]]; then
  LOG_NAME=${WORKDIR%/}
  LOG_NAME=${LOG_NAME##*/}
fi
LOG_NAME=${LOG_NAME//[^A-Za-z0-9._-]/_}
# Remote paths are relative to the worker's home folder: '~/x' means 'x'.
REPO_DIR=${REPO_DIR#\~/}
SCRATCH=${SCRATCH#\~/}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
is_uint "$MAX_RETRIES" || die "--max_retries=$MAX_RETRIES is not a whole number"
is_uint "$POLL_SECONDS" || die "--poll_seconds=$POLL_SECONDS is not a whole number"
[[ -z $NUM_WORKERS ]] || is_uint "$NUM_WORKERS" || die "--num_workers=$NUM_WORKERS is not a whole number"
[[ $WORKER == all ]] || is_uint "$WORKER" || die "--worker=$WORKER: expected a number or 'all'"
case $PROVISIONING in on-demand|spot|reserved|best-effort) ;;
  *) die "PROVISIONING=$PROVISIONING: expected on-demand, spot, reserved or best-effort" ;; esac
case $DISTRIBUTED in ''|yes|no|auto) ;;
  *) die "--distributed=$DISTRIBUTED: expected yes, no or auto" ;; esac
for kv in ${JOB_ENV[@]+"${JOB_ENV[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env=$kv: expected --env=NAME=VALUE"
done

# require OPTION VALUE [why]: a clear error naming the missing option.
require() {
  if [[ -z $2 ]]; then die "'$CMD' needs $1${3:+ ($3)}"; fi
}
require_tpu() {
  require --zone "$ZONE" "or ZONE"
  require --name "$TPU_NAME" "or TPU_NAME"
}
require_run() {
  if [[ -n $HARNESS ]]; then
    [[ -z $CONFIG ]] || die "--harness runs its recipe's configs: drop --config"
    local a
    for a in ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"}; do
      [[ $a != --config.* ]] || die "--harness takes no $a (the recipe sets the configs)"
    done
  else
    require --config "$CONFIG" "e.g. --config=configs/ddep_imagenet21k.py"
  fi
  require --workdir "$WORKDIR" "e.g. --workdir=gs://BUCKET/runs/NAME"
}
default_runtime() {
  if [[ -n $RUNTIME_VERSION ]]; then return; fi
  case $ACCELERATOR in
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v2-*|v3-*|v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    *) die "no default runtime version for --accelerator=$ACCELERATOR; give --runtime_version" ;;
  esac
}
require_create() {
  require_tpu
  require --accelerator "$ACCELERATOR" "or ACCELERATOR, e.g. v4-32"
  default_runtime
  if [[ $PROVISIONING == best-effort && $QUEUED != 1 ]]; then
    die "--best_effort needs --queued (queued resources only)"
  fi
}

# ---------------------------------------------------------------- running
print_cmd() { printf '+'; printf ' %q' "$@"; printf '\n'; }
# run CMD...: prints CMD shell-quoted, then runs it unless this is a dry run.
run() {
  print_cmd "$@"
  if [[ $DRY_RUN != 1 ]]; then "$@"; fi
}
# capture VAR CMD...: run, with CMD's stdout stored in VAR ('' in a dry run).
capture() {
  local __var=$1 __out="" __rc=0
  shift
  print_cmd "$@"
  if [[ $DRY_RUN != 1 ]]; then __out=$("$@") || __rc=$?; fi
  printf -v "$__var" '%s' "$__out"
  return "$__rc"
}
pause() { if [[ $DRY_RUN != 1 && $POLL_SECONDS -gt 0 ]]; then sleep "$POLL_SECONDS"; fi; }

WHERE=()  # --zone [--project] of every gcloud call
set_where() { WHERE=("--zone=$ZONE"); if [[ -n $PROJECT ]]; then WHERE+=("--project=$PROJECT"); fi; }

# tpu_ssh WORKER REMOTE_COMMAND: gcloud ... ssh (SSH_ARGS: its argv).
tpu_ssh_args() {
  SSH_ARGS=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker="$1")
  if [[ $INTERNAL_IP == 1 ]]; then SSH_ARGS+=(--internal-ip); fi
  SSH_ARGS+=(--command="$2")
}
tpu_ssh() { tpu_ssh_args "$1" "$2"; run "${SSH_ARGS[@]}"; }

q() { printf '%q' "$1"; }           # one word, quoted for the workers' bash
qwords() {                          # words, quoted and joined by spaces
  local out="" w
  for w in "$@"; do out+="${out:+ }$(printf '%q' "$w")"; done
  printf '%s' "$out"
}

# ---------------------------------------------------------------- remote snippets
gcsfuse_install_snippet() {
  printf '%s' 'command -v gcsfuse >/dev/null || { echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && sudo apt-get -o DPkg::Lock::Timeout=600 update -qq && sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq gcsfuse; }'
}
mount_snippet() {  # gs://BUCKET read-only at MOUNT, unless mounted already
  local m
  m=$(q "$MOUNT")
  printf '%s' "{ mountpoint -q $m || { sudo mkdir -p $m && sudo chown \"\$(id -u):\$(id -g)\" $m && gcsfuse -o ro --implicit-dirs $(q "$BUCKET") $m; }; }"
}
# log_name_snippet [ON_NONE]: sets the remote variable n to the job's log
# name: LOG_NAME, else the last job started on that worker (logs/latest);
# without one, runs ON_NONE (default: a message and exit 1).
log_name_snippet() {
  if [[ -n $LOG_NAME ]]; then
    printf '%s' "n=$(q "$LOG_NAME")"
  else
    printf '%s' "{ n=\$(cat logs/latest 2>/dev/null) || { ${1:-echo \"\$(hostname): no job was started in \$PWD/logs\"; exit 1;} }; }"
  fi
}
# The pid in logs/$n.pid belongs to a live job (a bash whose command line
# runs ddep_jax).
alive_snippet() {
  printf '%s' 'pid=$(cat "logs/$n.pid" 2>/dev/null || true); alive() { [ -n "$pid" ] && grep -qs ddep_jax "/proc/$pid/cmdline"; }'
}
# launch_snippet BODY: starts BODY (already quoted for the workers' bash) as
# job LOG_NAME in REPO_DIR, detached (setsid nohup, stdin closed), appending to
# logs/<log>.log; logs/<log>.rc receives its exit status. The wrapper shell
# survives SIGTERM (trap) so that it can record the job's 75 after a
# preemption. A job that is still running is not started twice.
launch_snippet() {
  local inner
  inner="trap true TERM; $1; echo \$? > $(q "logs/$LOG_NAME.rc")"
  printf '%s' "cd $(q "$REPO_DIR") && mkdir -p logs && $(log_name_snippet) && $(alive_snippet) && "
  printf '%s' 'if alive; then echo "$(hostname): job $n is running already (pid $pid); not starting it again"; else '
  printf '%s' 'rm -f "logs/$n.rc"; echo "$n" > logs/latest; echo "=== $(date -u +%FT%TZ) $(hostname) start" >> "logs/$n.log"; '
  printf '%s' "setsid nohup bash -c $(q "$inner") >> \"logs/\$n.log\" 2>&1 < /dev/null & "
  printf '%s' 'echo $! > "logs/$n.pid"; echo "$(hostname): started job $n (pid $!), log $PWD/logs/$n.log"; fi'
}
# One line per worker: 'ddep-status: rc=<exit status>|running|none'.
status_snippet() {
  printf '%s' "cd $(q "$REPO_DIR") 2>/dev/null || { echo 'ddep-status: rc=none'; exit 0; }; "
  printf '%s' "$(log_name_snippet "echo 'ddep-status: rc=none'; exit 0;"); $(alive_snippet); "
  printf '%s' 'if [ -s "logs/$n.rc" ]; then echo "ddep-status: rc=$(cat "logs/$n.rc")"; elif alive; then echo "ddep-status: rc=running"; else echo "ddep-status: rc=none"; fi'
}
stop_snippet() {
  printf '%s' "cd $(q "$REPO_DIR") && $(log_name_snippet) && $(alive_snippet); "
  printf '%s' 'if alive; then pkill -TERM -P "$pid" && echo "$(hostname): sent SIGTERM to job $n"; else echo "$(hostname): job $n is not running"; fi'
}

# ---------------------------------------------------------------- TPU state
# Sets STATE: the queued resource's state (QR_STATE) while it is not ACTIVE,
# else the node's (READY, PREEMPTED, ...); MISSING when it does not exist.
STATE=""
QR_STATE=""
tpu_state() {
  local s=""
  if [[ $QUEUED == 1 ]]; then
    capture s gcloud compute tpus queued-resources describe "$QR_NAME" "${WHERE[@]}" \
      --format='value(state.state)' || s=""
    QR_STATE=${s:-MISSING}
    STATE=$QR_STATE
    if [[ $STATE != ACTIVE ]]; then return 0; fi
  fi
  capture s gcloud compute tpus tpu-vm describe "$TPU_NAME" "${WHERE[@]}" \
    --format='value(state)' || s=""
  STATE=${s:-MISSING}
}

# The slice's number of hosts from the accelerator type (when gcloud cannot
# be asked): v2/v3/v4/v5p count TensorCores, 8 per host; v5e/v6e count chips,
# one host up to 8 chips, 4 chips per host above.
hosts_from_accelerator() {
  local n=${ACCELERATOR##*-}
  is_uint "$n" || return 0
  case $ACCELERATOR in
    v2-*|v3-*|v4-*|v5p-*) echo $(( n > 8 ? n / 8 : 1 )) ;;
    v5litepod-*|v5e-*|v6e-*) echo $(( n > 8 ? n / 4 : 1 )) ;;
  esac
}
decide_distributed() {
  if [[ -n $DISTRIBUTED ]]; then return 0; fi
  local n=$NUM_WORKERS eps="" seps
  if [[ -z $n ]]; then
    capture eps gcloud compute tpus tpu-vm describe "$TPU_NAME" "${WHERE[@]}" \
      --format='value(networkEndpoints[].ipAddress)' || eps=""
    if [[ -n ${eps//[[:space:]]/} ]]; then
      seps=${eps//[^;,]/}
      n=$(( ${#seps} + 1 ))
    else
      n=$(hosts_from_accelerator)
    fi
  fi
  if [[ -z $n ]]; then
    DISTRIBUTED=yes
    note "number of workers unknown (give --num_workers): passing --distributed=yes"
  elif (( n > 1 )); then DISTRIBUTED=yes
  else DISTRIBUTED=no
  fi
}

# ---------------------------------------------------------------- subcommands
cmd_create() {
  local -a a
  if [[ $QUEUED == 1 ]]; then
    a=(gcloud)
    if [[ $PROVISIONING == best-effort ]]; then a+=(alpha); fi
    a+=(compute tpus queued-resources create "$QR_NAME" --node-id="$TPU_NAME" "${WHERE[@]}"
        --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME_VERSION")
    case $PROVISIONING in
      spot) a+=(--spot) ;; reserved) a+=(--reserved) ;; best-effort) a+=(--best-effort) ;;
    esac
    if [[ -n $VALID_UNTIL ]]; then a+=(--valid-until-duration="$VALID_UNTIL"); fi
  else
    a=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${WHERE[@]}"
       --accelerator-type="$ACCELERATOR" --version="$RUNTIME_VERSION")
    case $PROVISIONING in spot) a+=(--spot) ;; reserved) a+=(--reserved) ;; esac
  fi
  if [[ -n $SERVICE_ACCOUNT ]]; then a+=(--service-account="$SERVICE_ACCOUNT"); fi
  a+=(${CREATE_ARGS[@]+"${CREATE_ARGS[@]}"})
  run "${a[@]}" || return
  if [[ $QUEUED == 1 ]]; then wait_active || return; fi
}

wait_active() {  # polls the queued resource until ACTIVE; 1 if it fails
  local s="" last=""
  while true; do
    capture s gcloud compute tpus queued-resources describe "$QR_NAME" "${WHERE[@]}" \
      --format='value(state.state)' || s=""
    case $s in
      ACTIVE) note "queued resource $QR_NAME is ACTIVE"; return 0 ;;
      FAILED|SUSPENDED|SUSPENDING) note "queued resource $QR_NAME is $s"; return 1 ;;
    esac
    if [[ $DRY_RUN == 1 ]]; then return 0; fi
    if [[ $s != "$last" ]]; then note "queued resource $QR_NAME: ${s:-no state yet}; polling every ${POLL_SECONDS}s"; fi
    last=$s
    pause
  done
}

cmd_delete() {
  if [[ $QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$QR_NAME" "${WHERE[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${WHERE[@]}" --quiet
  fi
}

cmd_install() {
  local code setup tarball=${TMPDIR:-/tmp}/ddep_jax-$TPU_NAME.tar.gz dirty="" d
  d=$(q "$REPO_DIR")
  if [[ -n $GIT_URL ]]; then
    code="{ [ -d $d/.git ] || git clone --quiet $(q "$GIT_URL") $d; } && git -C $d fetch --quiet origin $(q "$GIT_REF") && git -C $d checkout --quiet --detach FETCH_HEAD"
  else
    capture dirty git -C "$REPO" status --porcelain --untracked-files=no || dirty=""
    if [[ -n $dirty ]]; then
      note "warning: uncommitted changes in $REPO are not installed (git archive $GIT_REF)"
    fi
    run git -C "$REPO" archive --format=tar.gz -o "$tarball" "$GIT_REF" || return
    local -a scp=(gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:ddep_jax_src.tar.gz"
                  "${WHERE[@]}" --worker=all)
    if [[ $INTERNAL_IP == 1 ]]; then scp+=(--internal-ip); fi
    run "${scp[@]}" || return
    code="mkdir -p $d && find $d -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs -exec rm -rf {} + && tar -xzf ddep_jax_src.tar.gz -C $d && rm -f ddep_jax_src.tar.gz"
  fi
  setup="set -e; $code; cd $d"
  setup+="; if [ ! -x .venv/bin/python ]; then { python3 -m pip install --user --quiet uv || python3 -m pip install --user --quiet --break-system-packages uv; } && \"\$HOME/.local/bin/uv\" venv --seed --python=$(q "$PYTHON_VERSION") .venv; fi"
  setup+="; .venv/bin/pip install --quiet --upgrade pip && .venv/bin/pip install --quiet -e '.[tpu,gcp]'"
  if [[ -n $BUCKET ]]; then
    setup+="; $(gcsfuse_install_snippet); $(mount_snippet)"
  else
    note "no --bucket: gcsfuse is not installed and nothing is mounted"
  fi
  setup+="; echo \"\$(hostname): ddep_jax installed in \$PWD\""
  tpu_ssh all "$setup"
}

cmd_prepare() {
  require --dataset "$DATASET" "e.g. --dataset=cityscapes_seg"
  require --bucket "$BUCKET" "or BUCKET: the dataset goes to gs://BUCKET/tfds"
  require --manual "$MANUAL" "gs:// folder of the manual downloads"
  if [[ -z $LOG_NAME ]]; then LOG_NAME=prepare_${DATASET//[^A-Za-z0-9._-]/_}; fi
  local body
  body="s=\$(cd && mkdir -p $(q "$SCRATCH") && cd $(q "$SCRATCH") && pwd) && mkdir -p \"\$s/manual/\"$(q "$DATASET") \"\$s/tfds\""
  body+=" && gcloud storage rsync -r $(q "$MANUAL") \"\$s/manual/\"$(q "$DATASET")"
  body+=" && .venv/bin/python -m ddep_jax.data.prepare $(q "--dataset=$DATASET") --manual_dir=\"\$s/manual/\"$(q "$DATASET") --data_dir=\"\$s/tfds\""
  body+=" && gcloud storage rsync -r \"\$s/tfds\" $(q "gs://$BUCKET/tfds")"
  tpu_ssh 0 "$(launch_snippet "$body")"
  finish_launch 0
}

main_argv() {  # MAIN_ARGV: the job's command line
  MAIN_ARGV=()
  if [[ ${#JOB_ENV[@]} -gt 0 ]]; then MAIN_ARGV+=(env "${JOB_ENV[@]}"); fi
  if [[ -n $HARNESS ]]; then
    MAIN_ARGV+=(.venv/bin/python -m ddep_jax.experiments.label_efficiency
                "--recipe=$HARNESS" "--out=$WORKDIR" "--distributed=$DISTRIBUTED")
    if [[ -n $DATA_DIR ]]; then MAIN_ARGV+=("--data_dir=$DATA_DIR"); fi
    MAIN_ARGV+=(${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})
    return
  fi
  MAIN_ARGV+=(.venv/bin/python -m ddep_jax.main "--config=$CONFIG" "--workdir=$WORKDIR"
              "--distributed=$DISTRIBUTED")
  local a has_data_dir=0
  for a in ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"}; do
    if [[ $a == --config.data.data_dir=* ]]; then has_data_dir=1; fi
  done
  if [[ $has_data_dir == 0 && -n $DATA_DIR ]]; then MAIN_ARGV+=("--config.data.data_dir=$DATA_DIR"); fi
  MAIN_ARGV+=(${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})
}

launch_run() {
  decide_distributed
  main_argv
  local body
  body=$(qwords "${MAIN_ARGV[@]}")
  if [[ -n $BUCKET ]]; then
    tpu_ssh all "$(mount_snippet) && $(launch_snippet "$body")"
  else
    tpu_ssh all "$(launch_snippet "$body")"
  fi
}

cmd_run() {
  require_run
  if [[ $WORKDIR != gs://* ]]; then
    note "warning: --workdir=$WORKDIR is not a gs:// URL: each worker writes its own" \
         "local copy, and it is lost with the VM"
  fi
  launch_run || return
  finish_launch all
}

# JOB: the job's state over all workers: running, 0, 75, lost (no worker
# runs it and none recorded a status), unknown (no answer), or the first
# exit status that is neither 0 nor 75.
JOB=""
job_status() {
  local out="" line rc running=0 preempted=0 lost=0 done=0
  tpu_ssh_args "$1" "$(status_snippet)"
  if ! capture out "${SSH_ARGS[@]}"; then JOB=unknown; return 0; fi
  while IFS= read -r line; do
    if [[ $line =~ ddep-status:\ rc=([A-Za-z0-9]+) ]]; then
      rc=${BASH_REMATCH[1]}
      case $rc in
        running) running=1 ;;
        none) lost=1 ;;
        0) done=1 ;;
        75) preempted=1 ;;
        *) JOB=$rc; return 0 ;;
      esac
    fi
  done <<< "$out"
  if (( running )); then JOB=running
  elif (( preempted )); then JOB=75
  elif (( lost )); then JOB=lost
  elif (( done )); then JOB=0
  else JOB=unknown
  fi
}

# After a launch: with --wait, poll until the job ends and return its status.
finish_launch() {
  local worker=$1
  if [[ $WAIT != 1 ]]; then
    note "started in the background; follow it with: launch/tpu.sh logs --zone=$ZONE --name=$TPU_NAME --log=$LOG_NAME"
    return 0
  fi
  while true; do
    job_status "$worker"
    case $JOB in
      running|unknown) ;;
      0) note "job $LOG_NAME finished"; return 0 ;;
      75) note "job $LOG_NAME was preempted (75); run it again to resume"; return 75 ;;
      lost) note "job $LOG_NAME is gone without an exit status (VM restarted?)"; return 1 ;;
      *) note "job $LOG_NAME failed with exit status $JOB (launch/tpu.sh logs)"; return "$JOB" ;;
    esac
    if [[ $DRY_RUN == 1 ]]; then return 0; fi
    pause
  done
}

cmd_retry() {
  local restarts=0 launched=0 unknown=0 first=1 exists
  while true; do
    tpu_state
    case $STATE in
      READY|ACTIVE) ;;
      CREATING|STARTING|RESTARTING|REPAIRING|PROVISIONING|WAITING_FOR_RESOURCES|ACCEPTED|DELETING)
        note "TPU is $STATE; waiting"; pause; continue ;;
      *)
        if (( first )) && [[ $STATE == MISSING ]]; then
          note "TPU $TPU_NAME does not exist yet: creating it"
        elif (( restarts >= MAX_RETRIES )); then
          note "TPU is $STATE and --max_retries=$MAX_RETRIES restarts are used up"; return 1
        else
          restarts=$(( restarts + 1 ))
          note "TPU is $STATE: re-creating it, restart $restarts of $MAX_RETRIES"
        fi
        first=0
        exists=$STATE
        if [[ $QUEUED == 1 ]]; then exists=$QR_STATE; fi
        if [[ $exists != MISSING ]]; then cmd_delete || note "delete failed; creating anyway"; fi
        if ! cmd_create; then note "create failed; trying again"; pause; continue; fi
        if ! cmd_install; then note "install failed; trying again"; pause; continue; fi
        launched=0 ;;  # the TPU is new: launch on it right away
    esac
    first=0
    if (( ! launched )); then
      if ! launch_run; then note "launch failed; trying again"; pause; continue; fi
      launched=1
      if [[ $DRY_RUN == 1 ]]; then
        note "dry run: one round shown (state, re-create, install, run); then it polls the job"
        job_status all
        return 0
      fi
      pause
      continue
    fi
    job_status all
    case $JOB in
      running) unknown=0 ;;
      0) note "job $LOG_NAME finished (exit status 0) after $restarts restart(s)"; return 0 ;;
      75|lost)
        if (( restarts >= MAX_RETRIES )); then
          note "job $LOG_NAME ended with '$JOB' and --max_retries=$MAX_RETRIES restarts are used up"; return 1
        fi
        restarts=$(( restarts + 1 ))
        note "job $LOG_NAME ended with '$JOB' (preempted): restart $restarts of $MAX_RETRIES on $WORKDIR"
        launched=0
        continue ;;
      unknown)
        unknown=$(( unknown + 1 ))
        note "no job status from the workers ($unknown)" ;;
      *)
        note "job $LOG_NAME failed with exit status $JOB: not retrying (launch/tpu.sh logs --log=$LOG_NAME)"
        return "$JOB" ;;
    esac
    pause
  done
}

# ---------------------------------------------------------------- main
case $CMD in
  create) require_create ;;
  delete|install|status|logs|stop) require_tpu ;;
  prepare) require_tpu ;;
  run) require_tpu; require_run ;;
  retry)
    require_create; require_run
    [[ $WORKDIR == gs://* ]] || die "'retry' needs a gs:// --workdir (the VM's disk is lost when it is re-created)" ;;
esac
if [[ $QUEUED == 1 ]]; then require --qr_name "$QR_NAME"; fi
set_where

case $CMD in
  create) cmd_create ;;
  delete) cmd_delete ;;
  install) cmd_install ;;
  prepare) cmd_prepare ;;
  run) cmd_run ;;
  status)
    tpu_state
    echo "TPU $TPU_NAME: $STATE"
    tpu_ssh all "$(status_snippet)" ;;
  logs)
    tpu_ssh "$WORKER" "cd $(q "$REPO_DIR") && $(log_name_snippet) && tail -n 200 -F \"logs/\$n.log\"" ;;
  stop) tpu_ssh all "$(stop_snippet)" ;;
  retry) cmd_retry ;;
esac
