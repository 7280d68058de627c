#!/usr/bin/env bash
# Test a checkpoint on GPUS processes of this node with torchrun:
#   tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py options]
# Multi-node (NNODES, NODE_RANK, MASTER_ADDR, PORT) and PYTHON: see dist_launch.sh.
set -euo pipefail
exec bash "$(dirname "$0")/dist_launch.sh" "$3" test.py "$1" "$2" --launcher pytorch "${@:4}"
