#!/usr/bin/env bash
# Train on GPUS processes of this node with torchrun (NCCL on GPUs, gloo on CPUs):
#   tools/dist_train.sh CONFIG GPUS [train.py options]
# Multi-node (NNODES, NODE_RANK, MASTER_ADDR, PORT) and PYTHON: see dist_launch.sh.
set -euo pipefail
exec bash "$(dirname "$0")/dist_launch.sh" "$2" train.py "$1" --launcher pytorch "${@:3}"
