#!/usr/bin/env bash
# srun for a script of tools/, one task per GPU; slurm_train.sh and slurm_test.sh call it:
#   [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS=...] \
#   tools/slurm_launch.sh PARTITION JOB_NAME SCRIPT [SCRIPT arguments]
# PYTHON selects the interpreter (default: the active environment, else .venv; see below).
# Before srun, tools/launch.py --check-only refuses in one process what every task would refuse
# (config, checkpoint, datasets); in the tasks, rank 0 reports a user error, the others only
# unexpected errors, with their rank.
set -euo pipefail
PARTITION=$1
JOB_NAME=$2
SCRIPT=$3
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-}
TOOLS="$(cd "$(dirname "$0")" && pwd)"
# The interpreter: $PYTHON, else `python` of an active virtualenv / conda environment, else the
# project's .venv (tools/setup_env.sh) when it exists, else `python`.
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python
  if [[ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" && -x "$TOOLS/../.venv/bin/python" ]]; then
    PYTHON="$TOOLS/../.venv/bin/python"
  fi
fi

export PYTHONPATH="$TOOLS/..${PYTHONPATH:+:$PYTHONPATH}"
# mmengine sets these for every distributed run, with a warning in each task
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
"$PYTHON" "$TOOLS/launch.py" --check-only "$TOOLS/$SCRIPT" "${@:4}"
srun -p "$PARTITION" \
    --job-name="$JOB_NAME" \
    --gres=gpu:"$GPUS_PER_NODE" \
    --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" \
    --cpus-per-task="$CPUS_PER_TASK" \
    --kill-on-bad-exit=1 \
    $SRUN_ARGS \
    "$PYTHON" -u "$TOOLS/$SCRIPT" "${@:4}"
