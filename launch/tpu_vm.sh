#!/usr/bin/env bash
# Cloud TPU VMs (one host or a whole pod slice) through gcloud: see usage() and docs/pods.md.
#   launch/tpu_vm.sh create --accelerator-type=v5litepod-256 [--queued] [--spot]
#   launch/tpu_vm.sh setup
#   launch/tpu_vm.sh run configs/imagenet256.py:size=H gs://BUCKET/heptapod-H --config.optim.lr=4e-4
#   launch/tpu_vm.sh logs 0 | status | stop | delete
# --dry-run anywhere (or DRY_RUN=1) prints each command instead of running it.
#
# The commands that must run on every worker (install, start, stop) live in this same script as
# _worker-* subcommands: `setup` ships the repo, so each worker runs its own copy through
# `gcloud ... ssh --worker=all`, and what runs there can be read (and dry-run) here.
set -euo pipefail

usage() {
  cat >&2 <<EOF
usage: $0 [options] SUBCOMMAND [ARGS]
  create                      create the TPU VM (--queued: as a queued resource; --spot: Spot)
  setup                       copy the repo's HEAD to every worker, install requirements + jax[tpu]
  run CONFIG WORKDIR [--config.FIELD=VALUE ...]
                              train on every worker in a detached tmux session
  logs [WORKER]               follow a worker's log (default worker 0)
  status                      state of the TPU and of the run on each worker
  stop                        SIGTERM the run on every worker (it checkpoints), then end tmux
  delete                      delete the TPU VM (with --queued: the queued resource)
options (or environment variables):
  --name=NAME                 TPU_NAME         TPU VM / queued resource name (required)
  --zone=ZONE                 ZONE             e.g. us-west4-a (required)
  --accelerator-type=TYPE     ACCELERATOR_TYPE e.g. v5litepod-256, v5p-128 (create)
  --runtime-version=VERSION   RUNTIME_VERSION  default from the type (v2-alpha-tpuv5-lite, ...)
  --project=PROJECT           PROJECT          default: gcloud's configured project
  --queued, --spot            QUEUED=1, SPOT=1
  --session=NAME              SESSION          tmux session on the workers (default heptapod)
  --run-name=NAME             RUN_NAME         log name (default: the workdir's last component)
  --grace=SECONDS             STOP_GRACE       how long stop waits for the checkpoint (default 300)
  --dry-run                   DRY_RUN=1        print the commands, run nothing
  --                          pass what follows to heptapod_jax.main unparsed
EOF
}

die_usage() { echo "error: $*" >&2; usage; exit 2; }
die() { echo "error: $*" >&2; exit 1; }
is_true() { case ${1:-} in '' | 0 | false | no) return 1 ;; *) return 0 ;; esac; }

dry_run=false; is_true "${DRY_RUN:-}" && dry_run=true
queued=false; is_true "${QUEUED:-}" && queued=true
spot=false; is_true "${SPOT:-}" && spot=true
name=${TPU_NAME:-}
zone=${ZONE:-}
accelerator_type=${ACCELERATOR_TYPE:-}
runtime_version=${RUNTIME_VERSION:-}
project=${PROJECT:-}
session=${SESSION:-heptapod}
run_name=${RUN_NAME:-}
# Seconds `stop` waits for the run to checkpoint after SIGTERM before it ends the session.
stop_grace=${STOP_GRACE:-300}
# Where the repo lives on each worker, relative to the login directory (ssh starts there).
remote_dir=heptapod-jax
# Per-worker logs, relative to $HOME on the worker.
log_dir=heptapod_logs

set_option() {
  case $1 in
    --name) name=$2 ;;
    --zone) zone=$2 ;;
    --accelerator-type | --type) accelerator_type=$2 ;;
    --runtime-version | --version) runtime_version=$2 ;;
    --project) project=$2 ;;
    --session) session=$2 ;;
    --run-name) run_name=$2 ;;
    --grace) stop_grace=$2 ;;
  esac
}

# Launcher options may stand anywhere, so `run ... --zone=z` works too; whatever is not one of
# them (the config, the workdir, --config.x=y and other heptapod_jax.main flags) is kept in order.
args=()
while (($#)); do
  case $1 in
    --dry-run) dry_run=true ;;
    --queued) queued=true ;;
    --spot) spot=true ;;
    --name=* | --zone=* | --accelerator-type=* | --type=* | --runtime-version=* | --version=* | \
      --project=* | --session=* | --run-name=* | --grace=*)
      set_option "${1%%=*}" "${1#*=}" ;;
    --name | --zone | --accelerator-type | --type | --runtime-version | --version | --project | \
      --session | --run-name | --grace)
      (($# >= 2)) || die_usage "$1 needs a value"
      set_option "$1" "$2"; shift ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1") ;;
  esac
  shift
done
((${#args[@]})) || die_usage "missing SUBCOMMAND"
subcommand=${args[0]}
args=("${args[@]:1}")

# One line per command, quoted so that it can be pasted into a shell: plain words as they are,
# others in single quotes (easier to read than %q's backslashes), control characters as $'..'.
print_cmd() {
  local arg line=''
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      line+=" $arg"
    elif [[ $arg == *[[:cntrl:]]* ]]; then
      line+=" $(printf '%q' "$arg")"
    else
      line+=" '${arg//\'/\'\\\'\'}'"
    fi
  done
  printf '%s\n' "${line# }"
}

run_cmd() {
  if $dry_run; then print_cmd "$@"; else "$@"; fi
}

require() {
  local missing=()
  local what
  for what in "$@"; do
    case $what in
      name) [[ -n $name ]] || missing+=("TPU_NAME (--name)") ;;
      zone) [[ -n $zone ]] || missing+=("ZONE (--zone)") ;;
      accelerator_type) [[ -n $accelerator_type ]] || missing+=("ACCELERATOR_TYPE (--accelerator-type)") ;;
    esac
  done
  if ((${#missing[@]})); then
    local joined
    printf -v joined '%s, ' "${missing[@]}"
    die_usage "$subcommand: missing ${joined%, }"
  fi
}

# gcloud's flags that place every call: zone and, when given, project.
location() {
  location_flags=("--zone=$zone")
  [[ -z $project ]] || location_flags+=("--project=$project")
}

# The software image that the TPU docs pair with JAX for each generation.
default_runtime_version() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

# A command for the workers' login shell: cd into the shipped repo and run this script there.
worker_command() {
  local quoted
  printf -v quoted '%q ' "$@"
  printf 'cd %q && bash launch/tpu_vm.sh %s' "$remote_dir" "${quoted% }"
}

ssh_workers() {  # ssh_workers WORKER COMMAND
  run_cmd gcloud compute tpus tpu-vm ssh "$name" "${location_flags[@]}" "--worker=$1" "--command=$2"
}

cmd_create() {
  ((${#args[@]} == 0)) || die_usage "create takes no arguments, got: ${args[*]}"
  require name zone accelerator_type
  location
  if [[ -z $runtime_version ]]; then
    runtime_version=$(default_runtime_version "$accelerator_type") ||
      die_usage "no default runtime version for $accelerator_type: set RUNTIME_VERSION (--runtime-version)"
  fi
  local extra=()
  $spot && extra+=(--spot)
  if $queued; then
    # A queued resource waits for capacity instead of failing when the zone has none now; the
    # node it creates gets the same name, so every other subcommand addresses it as usual.
    run_cmd gcloud compute tpus queued-resources create "$name" "--node-id=$name" "${location_flags[@]}" \
      "--accelerator-type=$accelerator_type" "--runtime-version=$runtime_version" "${extra[@]}"
    $dry_run || echo "queued; '$0 status --queued --name=$name --zone=$zone' shows when it is ACTIVE" >&2
  else
    run_cmd gcloud compute tpus tpu-vm create "$name" "${location_flags[@]}" \
      "--accelerator-type=$accelerator_type" "--version=$runtime_version" "${extra[@]}"
  fi
}

cmd_setup() {
  ((${#args[@]} == 0)) || die_usage "setup takes no arguments, got: ${args[*]}"
  require name zone
  location
  cd "$(dirname "$0")/.."
  # The committed tree, not the working tree: what runs on the pod is a commit you can name.
  if ! git diff-index --quiet HEAD -- 2>/dev/null; then
    echo "warning: uncommitted changes are not copied; the workers get HEAD $(git rev-parse --short HEAD)" >&2
  fi
  # Global, not local: the EXIT trap that removes it runs after this function has returned.
  tarball=${TMPDIR:-/tmp}/heptapod-jax-$name.tar.gz
  run_cmd git archive --format=tar.gz -o "$tarball" HEAD
  $dry_run || trap 'rm -f "$tarball"' EXIT
  run_cmd gcloud compute tpus tpu-vm scp "$tarball" "$name:$remote_dir.tar.gz" "${location_flags[@]}" --worker=all
  # heptapod_jax/ is replaced so that a module deleted upstream cannot linger; the rest is
  # unpacked over what is there, keeping .venv (a reinstall is minutes) and any local workdirs.
  local unpack
  printf -v unpack 'mkdir -p %q && cd %q && rm -rf heptapod_jax && tar -xzf ../%q && rm ../%q && cd ..' \
    "$remote_dir" "$remote_dir" "$remote_dir.tar.gz" "$remote_dir.tar.gz"
  ssh_workers all "$unpack && $(worker_command _worker-setup)"
}

cmd_run() {
  case ${#args[@]} in
    0) die_usage "run: missing CONFIG and WORKDIR" ;;
    1) die_usage "run: missing WORKDIR (after CONFIG ${args[0]})" ;;
  esac
  require name zone
  location
  local workdir=${args[1]%/}
  local run=${run_name:-${workdir##*/}}
  if [[ $workdir != *://* ]]; then
    echo "warning: WORKDIR $workdir is on each worker's own disk; a multi-host slice needs one" \
      "that every host shares (gs://BUCKET/...)" >&2
  fi
  ssh_workers all "$(worker_command _worker-run "--session=$session" "--run-name=$run" -- "${args[@]}")"
  $dry_run || echo "started; follow worker 0 with: $0 logs 0 --name=$name --zone=$zone" >&2
}

cmd_logs() {
  ((${#args[@]} <= 1)) || die_usage "logs takes at most one WORKER, got: ${args[*]}"
  local worker=${args[0]:-0}
  [[ $worker =~ ^[0-9]+$ ]] || die_usage "WORKER must be a worker number, got '$worker'"
  require name zone
  location
  local log=$log_dir/latest.log
  [[ -z $run_name ]] || log=$log_dir/$run_name.worker$worker.log
  ssh_workers "$worker" "$(printf 'tail -n 200 -F %q' "$log")"
}

cmd_status() {
  ((${#args[@]} == 0)) || die_usage "status takes no arguments, got: ${args[*]}"
  require name zone
  location
  if $queued; then
    run_cmd gcloud compute tpus queued-resources describe "$name" "${location_flags[@]}" \
      '--format=value(state.state)'
  fi
  run_cmd gcloud compute tpus tpu-vm describe "$name" "${location_flags[@]}" \
    '--format=table(state,health,acceleratorType,runtimeVersion)'
  ssh_workers all "$(worker_command _worker-status "--session=$session")"
}

cmd_stop() {
  ((${#args[@]} == 0)) || die_usage "stop takes no arguments, got: ${args[*]}"
  require name zone
  location
  ssh_workers all "$(worker_command _worker-stop "--session=$session" "--grace=$stop_grace")"
}

cmd_delete() {
  ((${#args[@]} == 0)) || die_usage "delete takes no arguments, got: ${args[*]}"
  require name zone
  location
  # gcloud asks for confirmation itself; --force also deletes the node the queued resource made.
  if $queued; then
    run_cmd gcloud compute tpus queued-resources delete "$name" "${location_flags[@]}" --force
  else
    run_cmd gcloud compute tpus tpu-vm delete "$name" "${location_flags[@]}"
  fi
}

# --- On a worker (reached through `gcloud ... ssh --worker=all`) ---

worker_id() {
  if [[ -n ${TPU_WORKER_ID:-} ]]; then
    echo "$TPU_WORKER_ID"
  elif $dry_run; then
    echo 0
  else
    # Each TPU VM host knows its index from the metadata server (the same source jax uses).
    curl -sf -m 10 -H 'Metadata-Flavor: Google' \
      http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number ||
      die "cannot read this TPU worker's number from the metadata server; set TPU_WORKER_ID"
  fi
}

# The version pinned as `NAME==VERSION` in requirements.txt: the one place it is written.
pinned_version() {
  sed -n "s/^$1==\([^[:space:];#]*\).*/\1/p" requirements.txt | head -n 1
}

# A Python >= 3.11 with venv: the pinned numpy and jax no longer support 3.10, which is what
# the Ubuntu 22.04 TPU images ship as python3.
pick_python() {
  local candidate
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null &&
      "$candidate" -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

cmd_worker_setup() {
  cd "$(dirname "$0")/.."
  local jax_version
  jax_version=$(pinned_version jax)
  [[ -n $jax_version ]] || die "requirements.txt pins no jax==VERSION"
  local python apt=()
  command -v tmux >/dev/null || apt+=(tmux)
  python=$(pick_python) || { apt+=(python3.11 python3.11-venv); python=python3.11; }
  if ((${#apt[@]})); then
    run_cmd sudo apt-get update -qq
    run_cmd sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt[@]}"
  fi
  [[ -x .venv/bin/python ]] || run_cmd "$python" -m venv .venv
  run_cmd .venv/bin/python -m pip install --quiet --upgrade pip
  # One resolve for both, so jax[tpu] brings the libtpu that matches the pinned jax/jaxlib.
  run_cmd .venv/bin/python -m pip install --quiet -r requirements.txt "jax[tpu]==$jax_version"
  run_cmd .venv/bin/python -m pip install --quiet --no-deps -e .
  $dry_run || echo "worker $(worker_id): $(.venv/bin/python -c 'import jax; print("jax", jax.__version__)') ready" >&2
}

cmd_worker_run() {
  ((${#args[@]} >= 2)) || die_usage "_worker-run: missing CONFIG or WORKDIR"
  cd "$(dirname "$0")/.."
  local config=${args[0]} workdir=${args[1]}
  local id run=${run_name:-heptapod}
  id=$(worker_id)
  local log=$HOME/$log_dir/$run.worker$id.log
  # --distributed=on: jax finds the other workers through the TPU metadata server; main.py's
  # auto mode looks at environment variables that a TPU VM's ssh session does not have. It
  # comes first so that a --distributed=... among the overrides still wins.
  local cmd=(.venv/bin/python -m heptapod_jax.main --distributed=on "--config=$config"
    "--workdir=$workdir" "${args[@]:2}")
  local cmd_line header inner
  printf -v cmd_line '%q ' "${cmd[@]}"
  header="[$(date -u +%Y-%m-%dT%H:%M:%SZ)] worker $id: ${cmd_line% }"
  # exec: the pane's process becomes python itself, so `stop` can signal it by the pane's pid.
  # Straight into the log, not through tee: when python exits tmux closes the pane and hangs up
  # on its processes, and a tee there could die before it wrote the last lines (the checkpoint
  # message). `logs` follows the file.
  printf -v inner 'cd %q; exec >> %q 2>&1; printf "%%s\\n" %q; exec %s' \
    "$PWD" "$log" "$header" "${cmd_line% }"
  if ! $dry_run; then
    command -v tmux >/dev/null || die "no tmux on worker $id: run 'setup' first"
    if tmux has-session -t "$session" 2>/dev/null; then
      die "worker $id: tmux session '$session' is running already; 'stop' it first or pass --session"
    fi
  fi
  run_cmd mkdir -p "$HOME/$log_dir"
  run_cmd ln -sfn "${log##*/}" "$HOME/$log_dir/latest.log"
  run_cmd tmux new-session -d -s "$session" bash -c "$inner"
  $dry_run || echo "worker $id: started in tmux session '$session', log $log" >&2
}

cmd_worker_status() {
  local id state=stopped last=''
  id=$(worker_id)
  tmux has-session -t "$session" 2>/dev/null && state=running
  last=$(tail -n 1 "$HOME/$log_dir/latest.log" 2>/dev/null || true)
  echo "worker $id: $state | ${last:-no log}"
}

cmd_worker_stop() {
  local id
  id=$(worker_id)
  if ! $dry_run && ! tmux has-session -t "$session" 2>/dev/null; then
    echo "worker $id: no tmux session '$session'"
    return 0
  fi
  # SIGTERM, not a killed session: the trainer (or, with several processes, jax's preemption
  # sync) saves a checkpoint at an agreed step and exits, so the next `run` resumes from there.
  # shellcheck disable=SC2016  # $1 and $(...) are for the inner bash, not this one.
  run_cmd bash -c 'kill -TERM "$(tmux display-message -p -t "$1" "#{pane_pid}")"' _ "$session"
  # Whatever is still running after the grace period is ended with the session.
  # shellcheck disable=SC2016
  if ! run_cmd timeout "$stop_grace" \
    bash -c 'while tmux has-session -t "$1" 2>/dev/null; do sleep 1; done' _ "$session" || $dry_run; then
    run_cmd tmux kill-session -t "$session"
  fi
  $dry_run || echo "worker $id: stopped"
}

case $subcommand in
  create) cmd_create ;;
  setup) cmd_setup ;;
  run) cmd_run ;;
  logs) cmd_logs ;;
  status) cmd_status ;;
  stop) cmd_stop ;;
  delete) cmd_delete ;;
  _worker-setup) cmd_worker_setup ;;
  _worker-run) cmd_worker_run ;;
  _worker-status) cmd_worker_status ;;
  _worker-stop) cmd_worker_stop ;;
  -h | --help | help) usage; exit 0 ;;
  *) die_usage "unknown subcommand '$subcommand'" ;;
esac
