#!/usr/bin/env bash
# Runs a recipe on this machine (CPU, or all local GPUs/TPU chips of one host).
#   launch/local.sh CONFIG WORKDIR [--config.x=y ...]
#   launch/local.sh configs/demo.py:head=local workdirs/demo_local --config.train.num_steps=600
# Set DRY_RUN=1 to print the command instead of running it.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--config.FIELD=VALUE ...]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
config=$1; workdir=$2; shift 2
python=${PYTHON:-.venv/bin/python}
[[ -x $python ]] || { echo "no $python: run 'make venv' first (or set PYTHON)" >&2; exit 1; }
cmd=("$python" -m heptapod_jax.main "--config=$config" "--workdir=$workdir" "$@")
if [[ -n ${DRY_RUN:-} ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
mkdir -p "$workdir"
# tee -i: Ctrl-C reaches the trainer (which then saves a checkpoint), not the logger.
"${cmd[@]}" 2>&1 | tee -i -a "$workdir/log.txt"
