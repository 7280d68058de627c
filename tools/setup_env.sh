#!/usr/bin/env bash
# Install an OpenMMLab stack, mmcv's compiled ops and mmmetaformer (editable) into a Python
# environment:
#   bash tools/setup_env.sh                 # the project virtualenv .venv, created if missing
#                                           # (`make env`; `make demo` and `make test` run it)
#   bash tools/setup_env.sh --here          # the active environment: the `python` on PATH
#                                           # (an activated virtualenv or conda environment)
#   VENV=DIR bash tools/setup_env.sh        # the virtualenv DIR, created if missing
#   ... --stack onedl                       # the OneDL forks instead of upstream OpenMMLab
# The stacks are pinned in tools/stacks/NAME.txt, which every pip step takes as constraints.
# Idempotent: a stamp in the environment records the inputs of the last successful run, and a
# second run with the same inputs changes nothing.
#
# Neither mmcv 2.1.0 (the newest release mmdet 3.3 / mmseg 1.2 accept) nor onedl-mmcv has a
# wheel for this torch, so mmcv is built once from its PyPI sdist, with torch installed first,
# and the wheel is cached under $MMMETAFORMER_CACHE (default ~/.cache/mmmetaformer), keyed by
# mmcv, torch, Python and device (cpu, or cuXY when FORCE_CUDA=1 or a GPU is visible). Their
# setup.py asks for -std=c++17 (c++14 on old torch); torch 2.14 headers need C++20, so the sdist
# is patched to -std=c++20. The rest of the stack installs while mmcv builds.
# Packages are installed with uv (a pinned release, kept in $MMMETAFORMER_CACHE), which
# downloads in parallel and does not byte-compile: torch and its CUDA libraries install in a
# fraction of pip's time (docs/get_started.md). uv does not read pip's configuration, so the
# index, find-links, constraint and certificate settings pip would use (its config files and
# PIP_* variables) are passed on.
# On a CUDA machine, FORCE_CUDA=1 builds the CUDA ops even without a visible GPU (e.g. in docker
# build); set TORCH_CUDA_ARCH_LIST to the target GPUs to shorten the build.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${MMMETAFORMER_CACHE:-$HOME/.cache/mmmetaformer}"
START=$SECONDS
log() { printf '[setup_env %3dm%02ds] %s\n' $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60)) "$*"; }

usage() {
  echo "usage: bash tools/setup_env.sh [--here] [--stack upstream|onedl]" \
       "  (or VENV=DIR bash tools/setup_env.sh ...)" >&2
  exit 2
}
HERE=0
STACK=upstream
while (( $# )); do
  case "$1" in
    --here) HERE=1 ;;
    --stack) STACK="${2:-}"; shift ;;
    *) usage ;;
  esac
  shift
done
PINS="$ROOT/tools/stacks/$STACK.txt"
[[ -n "$STACK" && -f "$PINS" ]] || usage
MMCV_PIN="$(grep -E '^(onedl-)?mmcv==' "$PINS")"  # e.g. mmcv==2.1.0, built from its sdist
MMCV_NAME="${MMCV_PIN%%==*}"

UV_VERSION=0.13.9
# pip, quiet; a pip.conf can name index folders that do not exist, and pip's warning about
# each (one line per package) is dropped.
pip_() {
  "$PY" -m pip --disable-pip-version-check -q "$@" 2>&1 |
    { grep -vE "^WARNING: Location '[^']*' is ignored" || true; }
}
# uv pip install into the target environment, with pip's index settings (uv_index_args)
uv_install() {
  "$UV" pip install -q --python "$PY" "${uv_index_args[@]}" -c "$PINS" "$@"
}

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
  cat "${BASH_SOURCE[0]}" "$PINS" "$ROOT/setup.cfg" "$ROOT/setup.py"
  echo "FORCE_CUDA=${FORCE_CUDA:-0}"
}
STAMP="$TARGET/.mmmetaformer-env-stamp"
STACK_MARK="$TARGET/.mmmetaformer-stack"
want="$(stamp_inputs | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  log "$TARGET is up to date ($STACK stack)"
  exit 0
fi
# both stacks install the modules mmcv, mmengine, mmdet, ...: one environment holds one stack
if [[ -f "$STACK_MARK" && "$(cat "$STACK_MARK")" != "$STACK" ]]; then
  log "error: $TARGET holds the $(cat "$STACK_MARK") stack; install the $STACK stack into" \
      "another environment (VENV=DIR bash tools/setup_env.sh --stack $STACK)"
  exit 1
fi

if [[ ! -x "$PY" ]]; then
  log "creating $VENV"
  "${PYTHON:-python3.11}" -m venv "$VENV"
fi
echo "$STACK" > "$STACK_MARK"
log "installing the $STACK stack ($PINS) into $TARGET ($("$PY" --version))"

# pip's settings, as uv arguments: each value as pip resolves it (its PIP_* variable, else the
# site, user, global file); indexes merged as pip merges them
pip_conf="$("$PY" -m pip config list 2>/dev/null || true)"
pip_setting() {
  local scope
  for scope in ':env:' site user global; do
    sed -nE "s/^$scope\.$1='(.*)'$/\1/p" <<<"$pip_conf" | grep . && return
  done
  return 0
}
uv_index_args=(--index-strategy unsafe-best-match)
for url in $(pip_setting index-url); do uv_index_args+=(--index-url "$url"); done
for url in $(pip_setting extra-index-url); do uv_index_args+=(--extra-index-url "$url"); done
for url in $(pip_setting find-links); do uv_index_args+=(--find-links "$url"); done
for file in $(pip_setting constraint); do uv_index_args+=(--constraints "$file"); done
cert="$(pip_setting cert)"
if [[ -n "$cert" ]]; then export SSL_CERT_FILE="$cert"; fi

UV="$CACHE/uv-$UV_VERSION/bin/uv"
if [[ ! -x "$UV" ]]; then
  log "installing uv $UV_VERSION into $CACHE"
  mkdir -p "$CACHE"
  uv_tmp="$(mktemp -d "$CACHE/.uv-XXXXXX")"
  pip_ install --target "$uv_tmp" "uv==$UV_VERSION"
  mv -T "$uv_tmp" "$CACHE/uv-$UV_VERSION" 2>/dev/null || rm -rf "$uv_tmp"  # another run won
fi

log "installing torch and build tools"
uv_install torch torchvision "setuptools<81" wheel ninja

device_tag="$("$PY" - <<'PY'
import os, torch
cuda = os.getenv('FORCE_CUDA', '0') == '1' or torch.cuda.is_available()
print('cu' + torch.version.cuda.replace('.', '') if cuda and torch.version.cuda else 'cpu')
PY
)"
torch_version="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
py_tag="$("$PY" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')"
wheel_dir="$CACHE/wheels/${MMCV_PIN/==/-}-torch$torch_version-$py_tag-$device_tag"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# One resolution for everything but mmcv (which needs nothing of it): it runs while mmcv builds.
log "installing the rest of the stack and mmmetaformer (editable; log: $work/stack.log)"
grep -vE '^(onedl-)?mmcv==' "$PINS" > "$work/stack.txt"
uv_install -r "$work/stack.txt" -e "$ROOT[det,seg,export,mim,tests]" > "$work/stack.log" 2>&1 &
stack_pid=$!

if ! ls "$wheel_dir"/*.whl >/dev/null 2>&1; then
  log "building $MMCV_PIN ops for torch $torch_version ($device_tag): the longest step"
  pip_ download "$MMCV_PIN" --no-deps --no-binary :all: --no-build-isolation -d "$work/sdist"
  tar -xzf "$work"/sdist/*.tar.gz -C "$work/sdist"
  src="$(find "$work/sdist" -mindepth 1 -maxdepth 1 -type d)"
  sed -i -E 's/-std=c\+\+1[47]/-std=c++20/g' "$src/setup.py"
  if [[ "$device_tag" != cpu ]]; then export FORCE_CUDA=1; fi
  # CXXFLAGS replaces Python's compile flags (-g -O3): -O2 without debug information (-g0)
  # gives a 7 MB library instead of 32 MB, and a shorter compile and link.
  export CFLAGS="${CFLAGS:-} -O2 -g0" CXXFLAGS="${CXXFLAGS:-} -O2 -g0"
  # Every source includes pytorch_cpp_helper.hpp, i.e. torch's headers, whose parsing is most
  # of each file's compile time. For the CPU build GCC compiles it once into a precompiled
  # header, and every source is made to begin with it (-include): the headers it guards are
  # then not parsed again, whatever a source includes first. Used where the flags match
  # (ninja's, below); elsewhere the header is parsed as usual, and -Winvalid-pch says so.
  helper="$src/mmcv/ops/csrc/common/pytorch_cpp_helper.hpp"
  if [[ "$device_tag" == cpu && -f "$helper" ]] &&
     "${CXX:-c++}" --version | grep -q 'Free Software Foundation'; then
    read -ra torch_includes < <("$PY" -c 'from torch.utils.cpp_extension import include_paths
print(" ".join("-I" + p for p in include_paths()))' 2>/dev/null)
    # shellcheck disable=SC2086  # CXXFLAGS is a list of flags
    "${CXX:-c++}" $CXXFLAGS -fPIC -std=c++20 -DTORCH_API_INCLUDE_EXTENSION_H \
      -DTORCH_EXTENSION_NAME=_ext -I"$(dirname "$helper")" "${torch_includes[@]}" \
      -x c++-header "$helper" -o "$helper.gch"
    CXXFLAGS+=" -Winvalid-pch -include $helper"
  fi
  # ninja's "[done/total]" lines (indented by pip -v) become a progress line every 15 s.
  MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PY" -m pip --disable-pip-version-check wheel -v --no-build-isolation --no-deps \
      "$src" -w "$work/dist" > "$work/build.log" 2>&1 &
  build_pid=$!
  shown=''
  while kill -0 "$build_pid" 2>/dev/null; do
    sleep 15
    progress="$(grep -oE '^ *\[[0-9]+/[0-9]+\]' "$work/build.log" | tail -1 | tr -d ' []' || true)"
    if [[ -n "$progress" && "$progress" != "$shown" ]]; then
      log "$MMCV_NAME ops: $progress files compiled"
      shown="$progress"
    fi
  done
  if ! wait "$build_pid"; then
    tail -40 "$work/build.log" >&2
    log "error: the $MMCV_NAME build failed; the full log is $work/build.log"
    trap - EXIT
    exit 1
  fi
  mkdir -p "$wheel_dir"
  mv "$work"/dist/*.whl "$wheel_dir/"
  log "built $(basename "$wheel_dir"/*.whl), cached in $wheel_dir"
fi

if ! wait "$stack_pid"; then
  cat "$work/stack.log" >&2
  log "error: installing the stack failed (above)"
  exit 1
fi
log "installing $MMCV_NAME from $wheel_dir"
uv_install "$wheel_dir"/*.whl
# the import check, without torch's known `torch.jit.interface` FutureWarning; importing
# mmmetaformer checks the stack's versions and that mmengine finds what it needs
# (pkg_resources: mmmetaformer/requirements.py), and says how to fix what is missing
"$PY" -W 'ignore:`torch.jit.interface` is deprecated:FutureWarning:torch.jit._script' \
  -c "from mmcv.ops import RoIAlign, nms, batched_nms; import mmmetaformer"
echo "$want" > "$STAMP"
log "ready: $TARGET ($STACK stack)"
