#!/usr/bin/env bash
# One GPU node: all its GPUs in one process, so jax sees them as local devices of one host and
# the mesh spans them over NVLink without a distributed runtime.
#   launch/gpu.sh setup                                   .venv with requirements + jax[cuda12]
#   launch/gpu.sh run CONFIG WORKDIR [--config.x=y ...]   train; log in WORKDIR/log.txt
#   launch/gpu.sh run configs/imagenet256.py:size=L workdirs/heptapod-L --config.optim.lr=4e-4
# --dry-run anywhere (or DRY_RUN=1) prints the command instead of running it.
# launch/slurm.sbatch sources this file for the same XLA flags on every node.
set -euo pipefail

# XLA flags for training throughput on NVIDIA GPUs (jax/jaxlib 0.10; tests/test_launch.py checks
# that the installed jaxlib knows each name, since XLA aborts on an unknown one). Kept to the
# ones that matter for this model; NVIDIA's JAX-Toolbox "GPU performance" page has the rest.
heptapod_gpu_xla_flags=(
  # Schedule collectives (FSDP parameter all-gathers, gradient reduce-scatters / all-reduces)
  # to overlap with compute. Still off by default on GPU; JAX's GPU performance tips and the
  # JAX-Toolbox images turn it on.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # The transformer's blocks run under nn.scan (a while loop). Pipelining moves a layer's
  # all-gather / reduce-scatter / all-reduce into the neighbouring iteration, which is what gives
  # the scheduler above compute to hide them behind inside the loop.
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
)

# Sets heptapod_gpu_env to the VAR=VALUE words a training process should get. The flags above go
# first so that the caller's own XLA_FLAGS (later on the line, and XLA keeps the last) win.
# XLA_PYTHON_CLIENT_MEM_FRACTION: jax preallocates 75% of each GPU by default; 0.9 leaves room
# for cuDNN/NCCL workspaces while letting larger batches fit (NVIDIA's recommendation).
heptapod_gpu_environment() {
  local flags="${heptapod_gpu_xla_flags[*]}"
  [[ -z ${XLA_FLAGS:-} ]] || flags+=" $XLA_FLAGS"
  heptapod_gpu_env=("XLA_FLAGS=$flags"
    "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}")
}

# One line per command, quoted so that it can be pasted into a shell: plain words as they are,
# others in single quotes, control characters as $'..'.
heptapod_quote_cmd() {
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
  printf '%s' "${line# }"
}

heptapod_is_true() { case ${1:-} in '' | 0 | false | no) return 1 ;; *) return 0 ;; esac; }

_gpu_usage() {
  cat >&2 <<EOF
usage: $0 [--dry-run] setup
       $0 [--dry-run] run CONFIG WORKDIR [--config.FIELD=VALUE ...]
  setup   create .venv (PYTHON_BIN, default python3) with requirements.txt and jax[cudaCUDA]
          at requirements.txt's jax version (CUDA=12 by default, or 13)
  run     train on all GPUs of this machine; output also goes to WORKDIR/log.txt
          (to LOG_DIR/NAME.log, default workdirs/logs, when WORKDIR is a gs:// or other URL)
environment: PYTHON (default .venv/bin/python), XLA_FLAGS (added after the defaults),
  XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.9), DRY_RUN=1
EOF
}

_gpu_die_usage() { echo "error: $*" >&2; _gpu_usage; exit 2; }

_gpu_main() {
  local dry_run=false args=()
  heptapod_is_true "${DRY_RUN:-}" && dry_run=true
  while (($#)); do
    case $1 in
      --dry-run) dry_run=true ;;
      --) shift; args+=("$@"); break ;;
      *) args+=("$1") ;;
    esac
    shift
  done
  ((${#args[@]})) || _gpu_die_usage "missing SUBCOMMAND (setup or run)"
  local subcommand=${args[0]}
  args=("${args[@]:1}")
  cd "$(dirname "$0")/.."
  case $subcommand in
    setup) _gpu_setup ;;
    run) _gpu_run ;;
    -h | --help | help) _gpu_usage ;;
    *) _gpu_die_usage "unknown subcommand '$subcommand'" ;;
  esac
}

_gpu_run_cmd() {
  if $dry_run; then heptapod_quote_cmd "$@"; echo; else "$@"; fi
}

_gpu_setup() {
  ((${#args[@]} == 0)) || _gpu_die_usage "setup takes no arguments, got: ${args[*]}"
  local jax_version cuda=${CUDA:-12}
  # The jax version is written once, in requirements.txt; the CUDA plugin must match it exactly.
  jax_version=$(sed -n 's/^jax==\([^[:space:];#]*\).*/\1/p' requirements.txt | head -n 1)
  [[ -n $jax_version ]] || { echo "error: requirements.txt pins no jax==VERSION" >&2; exit 1; }
  [[ -x .venv/bin/python ]] || _gpu_run_cmd "${PYTHON_BIN:-python3}" -m venv .venv
  _gpu_run_cmd .venv/bin/python -m pip install --quiet --upgrade pip
  _gpu_run_cmd .venv/bin/python -m pip install --quiet -r requirements.txt "jax[cuda$cuda]==$jax_version"
  _gpu_run_cmd .venv/bin/python -m pip install --quiet --no-deps -e .
}

_gpu_run() {
  case ${#args[@]} in
    0) _gpu_die_usage "run: missing CONFIG and WORKDIR" ;;
    1) _gpu_die_usage "run: missing WORKDIR (after CONFIG ${args[0]})" ;;
  esac
  local config=${args[0]} workdir=${args[1]}
  local python=${PYTHON:-.venv/bin/python}
  local log=$workdir/log.txt
  if [[ $workdir == *://* ]]; then
    local name=${workdir%/}
    log=${LOG_DIR:-workdirs/logs}/${name##*/}.log
  fi
  heptapod_gpu_environment
  local cmd=(env "${heptapod_gpu_env[@]}" "$python" -m heptapod_jax.main "--config=$config"
    "--workdir=$workdir" "${args[@]:2}")
  if $dry_run; then
    printf '%s 2>&1 | %s\n' "$(heptapod_quote_cmd "${cmd[@]}")" "$(heptapod_quote_cmd tee -a -i "$log")"
    return 0
  fi
  [[ -x $python ]] || { echo "error: no $python: run '$0 setup' first (or set PYTHON)" >&2; exit 1; }
  mkdir -p "$(dirname "$log")"
  # exec: this process becomes python, so SIGTERM/SIGINT reach the trainer directly (it saves a
  # checkpoint and exits); tee -i ignores Ctrl-C so that it still records those last lines.
  exec > >(tee -a -i "$log") 2>&1
  exec "${cmd[@]}"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  _gpu_main "$@"
fi
