#!/usr/bin/env bash
# torchrun for a script of tools/ on NPROC processes of this node (NCCL on GPUs, gloo on CPUs);
# dist_train.sh and dist_test.sh call it:
#   tools/dist_launch.sh NPROC SCRIPT [SCRIPT arguments]
# tools/launch.py runs torchrun: it first refuses in one process what every process would refuse
# (config, checkpoint, datasets), then says a failure of the workers in one `error:` line.
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and PORT on every node.
# PYTHON selects the interpreter (default: the active environment, else .venv; see below).
set -euo pipefail
NPROC=$1
SCRIPT=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
TOOLS="$(cd "$(dirname "$0")" && pwd)"
# The interpreter: $PYTHON, else `python` of an active virtualenv / conda environment, else the
# project's .venv (tools/setup_env.sh) when it exists, else `python`.
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python
  if [[ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" && -x "$TOOLS/../.venv/bin/python" ]]; then
    PYTHON="$TOOLS/../.venv/bin/python"
  fi
fi

PYTHONPATH="$TOOLS/..${PYTHONPATH:+:$PYTHONPATH}" \
exec "$PYTHON" "$TOOLS/launch.py" \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$NPROC" \
    --master_port="$PORT" \
    "$TOOLS/$SCRIPT" "${@:3}"
