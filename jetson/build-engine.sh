#!/usr/bin/env bash
# Build a TensorRT engine on this device with trtexec and write its sidecar <engine>.json (ONNX
# checksum, TensorRT version, GPU, build options), the record the runtime checks before use.
#
# usage: jetson/build-engine.sh [--dry-run] MODEL.onnx OUT.engine [fp32|fp16|int8] [MAX_BATCH]
#
# The trtexec arguments come from 'spade-edge engine trtexec-args' (the code the Python build
# uses), so both builds agree: TensorRT 10 (JetPack 6) takes --fp16 / --int8, TensorRT 11 --stronglyTyped
# with the precision of the model itself (fp16: 'spade-edge calibrate --precision fp16' first).
# Environment: TRTEXEC (default: trtexec on PATH, else /usr/src/tensorrt/bin/trtexec),
# PYTHON (python3), WORKSPACE_MB (1024), TIMING_CACHE (a file kept between builds),
# TRT_VERSION (the TensorRT the command is for; default: the installed one), DRY_RUN=1 (print only).
set -euo pipefail

usage() {
    echo "usage: $0 [--dry-run] MODEL.onnx OUT.engine [fp32|fp16|int8] [MAX_BATCH]" >&2
    exit 2
}

show() {
    local quoted
    printf -v quoted '%q ' "$@"
    echo "+ ${quoted% }"
}

dry_run=${DRY_RUN:-0}
if [[ ${1:-} == --dry-run ]]; then
    dry_run=1
    shift
fi
[[ $# -ge 2 && $# -le 4 ]] || usage
onnx=$1
out=$2
precision=${3:-fp32}
max_batch=${4:-8}
python=${PYTHON:-python3}

options=(--precision "$precision" --max-batch "$max_batch" --workspace-mb "${WORKSPACE_MB:-1024}")
if [[ -n ${TIMING_CACHE:-} ]]; then
    options+=(--timing-cache "$TIMING_CACHE")
fi
version=()
if [[ -n ${TRT_VERSION:-} ]]; then
    version=(--tensorrt-version "$TRT_VERSION")
fi

listing=$("$python" -m spade_edge engine trtexec-args -m "$onnx" -o "$out" "${options[@]}" "${version[@]}")
mapfile -t build <<<"$listing"
build[0]=${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}
sidecar=("$python" -m spade_edge engine sidecar "$out" -m "$onnx" --tool trtexec "${options[@]}")

if [[ $dry_run == 1 ]]; then
    show "${build[@]}"
    show "${sidecar[@]}"
    exit 0
fi
[[ -x ${build[0]} ]] || { echo "trtexec not found at ${build[0]}: set TRTEXEC" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
"${build[@]}"
"${sidecar[@]}"
