#!/usr/bin/env bash
# Install the pinned OpenMMLab stack, mmcv's compiled ops and mmmetaformer (editable) into a
# Python environment:
#   bash tools/setup_env.sh                 # the project virtualenv .venv, created if missing
#                                           # (`make env`; `make demo` and `make test` run it)
#   bash tools/setup_env.sh --here          # the active environment: the `python` on PATH
#                                           # (an activated virtualenv or conda environment)
#   VENV=DIR bash tools/setup_env.sh        # the virtualenv DIR, created if missing
# Idempotent: a stamp in the environment records the inputs of the last successful run, and a
# second run with the same inputs changes nothing.
#
# mmcv 2.1.0 (the newest release mmdet 3.3 / mmseg 1.2 accept) has no wheel for this torch,
# so it is built once from its PyPI sdist, with torch installed first, and the wheel is cached
# under $MMMETAFORMER_CACHE (default ~/.cache/mmmetaformer), keyed by mmcv, torch, Python and
# device (cpu, or cuXY when FORCE_CUDA=1 or a GPU is visible). Its setup.py asks for -std=c++17;
# torch 2.14 headers need C++20, so the sdist is patched to -std=c++20.
# On a CUDA machine, FORCE_CUDA=1 builds the CUDA ops even without a visible GPU (e.g. in docker
# build); set TORCH_CUDA_ARCH_LIST to the target GPUs to shorten the build.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${MMMETAFORMER_CACHE:-$HOME/.cache/mmmetaformer}"
START=$SECONDS
log() { printf '[setup_env %3dm%02ds] %s\n' $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60)) "$*"; }

case "${1:-}" in
  --here) HERE=1 ;;
  '') HERE=0 ;;
  *) echo "usage: bash tools/setup_env.sh [--here]   (or VENV=DIR bash tools/setup_env.sh)" >&2
     exit 2 ;;
esac

TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
BUILD_PINS=("setuptools<81" wheel ninja)
MMCV_VERSION=2.1.0
STACK_PINS=(
  mmengine==0.10.7 mmdet==3.3.0 mmsegmentation==1.2.2 mmpretrain==1.2.0
  timm==1.0.22 pycocotools ftfy regex pytest onnx onnxruntime onnxscript
)

active="${VIRTUAL_ENV:-${CONDA_PREFIX:-}}"
if (( HERE )); then
  PY="$(command -v "${PYTHON:-python}")" || {
    echo "[setup_env] error: no ${PYTHON:-python} on PATH; activate your environment first" >&2
    exit 1; }
  TARGET="$("$PY" -c 'import sys; print(sys.prefix)')"
  [[ -n "$active" ]] || log "note: no virtualenv or conda environment is active; using $PY"
else
  VENV="${VENV:-$ROOT/.venv}"
  PY="$VENV/bin/python"
  TARGET="$VENV"
  if [[ -n "$active" && "$(realpath -m "$active")" != "$(realpath -m "$VENV")" ]]; then
    log "note: installing into $VENV, not into the active environment $active" \
        "(bash tools/setup_env.sh --here installs there)"
  fi
fi

stamp_inputs() {
  cat "${BASH_SOURCE[0]}" "$ROOT/setup.cfg" "$ROOT/setup.py"
  echo "FORCE_CUDA=${FORCE_CUDA:-0}"
}
STAMP="$TARGET/.mmmetaformer-env-stamp"
want="$(stamp_inputs | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  log "$TARGET is up to date"
  exit 0
fi

if [[ ! -x "$PY" ]]; then
  log "creating $VENV"
  "${PYTHON:-python3.11}" -m venv "$VENV"
fi
log "installing into $TARGET ($("$PY" --version))"
PIP=("$PY" -m pip --disable-pip-version-check -q)

log "installing torch and build tools"
"${PIP[@]}" install "${TORCH_PINS[@]}" "${BUILD_PINS[@]}"

device_tag="$("$PY" - <<'PY'
import os, torch
cuda = os.getenv('FORCE_CUDA', '0') == '1' or torch.cuda.is_available()
print('cu' + torch.version.cuda.replace('.', '') if cuda and torch.version.cuda else 'cpu')
PY
)"
torch_version="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
py_tag="$("$PY" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')"
wheel_dir="$CACHE/wheels/mmcv-$MMCV_VERSION-torch$torch_version-$py_tag-$device_tag"

# The stack (everything but mmcv) installs while mmcv builds: neither needs the other.
stack_log="$(mktemp)"
log "installing the OpenMMLab stack (log: $stack_log)"
"${PIP[@]}" install "${STACK_PINS[@]}" "${TORCH_PINS[@]}" > "$stack_log" 2>&1 &
stack_pid=$!

if ! ls "$wheel_dir"/mmcv-*.whl >/dev/null 2>&1; then
  log "building mmcv $MMCV_VERSION ops for torch $torch_version ($device_tag); about 8 minutes on 2 cores"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  "${PIP[@]}" download "mmcv==$MMCV_VERSION" --no-deps --no-binary :all: --no-build-isolation -d "$work"
  tar -xzf "$work/mmcv-$MMCV_VERSION.tar.gz" -C "$work"
  sed -i 's/-std=c++17/-std=c++20/g' "$work/mmcv-$MMCV_VERSION/setup.py"
  if [[ "$device_tag" != cpu ]]; then export FORCE_CUDA=1; fi
  # No debug information (-g0): a 7 MB library instead of 32 MB, and a shorter compile and link.
  # ninja's "[done/total]" lines become a progress line (every 15 s, when it moved).
  CFLAGS="${CFLAGS:-} -g0" CXXFLAGS="${CXXFLAGS:-} -g0" MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PY" -m pip --disable-pip-version-check wheel -v --no-build-isolation --no-deps \
      "$work/mmcv-$MMCV_VERSION" -w "$work/dist" > "$work/build.log" 2>&1 &
  build_pid=$!
  shown=''
  while kill -0 "$build_pid" 2>/dev/null; do
    sleep 15
    progress="$(grep -oE '^ *\[[0-9]+/[0-9]+\]' "$work/build.log" | tail -1 | tr -d ' []' || true)"
    if [[ -n "$progress" && "$progress" != "$shown" ]]; then
      log "mmcv ops: $progress files compiled"
      shown="$progress"
    fi
  done
  if ! wait "$build_pid"; then
    tail -40 "$work/build.log" >&2
    log "error: the mmcv build failed; the full log is $work/build.log"
    trap - EXIT
    exit 1
  fi
  mkdir -p "$wheel_dir"
  mv "$work"/dist/mmcv-*.whl "$wheel_dir/"
fi

if ! wait "$stack_pid"; then
  cat "$stack_log" >&2
  log "error: installing the OpenMMLab stack failed (above)"
  exit 1
fi
log "installing mmcv from $wheel_dir and mmmetaformer"
"${PIP[@]}" install "$wheel_dir"/mmcv-*.whl "${STACK_PINS[@]}" "${TORCH_PINS[@]}"
"${PIP[@]}" install --no-build-isolation --no-deps -e "$ROOT"
# the import check, without torch's known `torch.jit.interface` FutureWarning
"$PY" -W 'ignore:`torch.jit.interface` is deprecated:FutureWarning:torch.jit._script' \
  -c "from mmcv.ops import RoIAlign, nms, batched_nms; import mmmetaformer"
echo "$want" > "$STAMP"
log "ready: $TARGET"
