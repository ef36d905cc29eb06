#!/usr/bin/env bash
# Latency percentiles of spade-edge over a folder of images, with tegrastats (power, GPU load,
# memory) sampled during the run and the power mode (nvpmodel, jetson_clocks) in the result.
#
#   jetson/bench.sh -m model.onnx -g parts.gallery -i images/ [-o bench.json] [--device auto]
#                   [--repeat 3] [--warmup 5] [--interval-ms 100] [--python PY] [--dry-run]
#
# On a machine without the Jetson tools the run still happens; the result says what was missing.
# Tools can be pointed elsewhere with TEGRASTATS=, NVPMODEL=, JETSON_CLOCKS= (the tests do).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }

model="" gallery="" images="" out="bench-$(date +%Y%m%d-%H%M%S).json"
device=auto repeat=1 warmup=5 interval=100 dry=0
python="${PYTHON:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    -m|--model) model=$2; shift 2 ;;
    -g|--gallery) gallery=$2; shift 2 ;;
    -i|--images) images=$2; shift 2 ;;
    -o|--out) out=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --interval-ms) interval=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "bench.sh: unknown argument $1" >&2; usage 2 ;;
  esac
done
if [ -z "$model" ] || [ -z "$gallery" ] || [ -z "$images" ]; then echo "bench.sh: -m, -g and -i are required" >&2; usage 2; fi
if [ -z "$python" ]; then
  if [ -x /opt/spade-edge/venv/bin/python ]; then python=/opt/spade-edge/venv/bin/python; else python=python3; fi
fi

run() { if [ "$dry" = 1 ]; then printf '+ %s\n' "$*"; else "$@"; fi; }

tegrastats=${TEGRASTATS:-$(command -v tegrastats || true)}
nvpmodel=${NVPMODEL:-$(command -v nvpmodel || true)}
jetson_clocks=${JETSON_CLOCKS:-$(command -v jetson_clocks || true)}
sudo_n=()
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then sudo_n=(sudo -n); fi

work=$(mktemp -d)
teg_pid=""
cleanup() {
  if [ -n "$teg_pid" ]; then kill "$teg_pid" 2>/dev/null || true; wait "$teg_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# power mode, as the board reports it (jetson_clocks --show needs root: tried through sudo -n)
if [ -n "$nvpmodel" ]; then run "$nvpmodel" -q > "$work/nvpmodel.txt" 2>&1 || true
else echo "nvpmodel not found (not a Jetson?)" > "$work/nvpmodel.txt"; fi
if [ -n "$jetson_clocks" ]; then run "${sudo_n[@]}" "$jetson_clocks" --show > "$work/clocks.txt" 2>&1 || true
else echo "jetson_clocks not found (not a Jetson?)" > "$work/clocks.txt"; fi
l4t=$(head -n 1 /etc/nv_tegra_release 2>/dev/null || echo none)
board=$(uname -m)
if [ -r /proc/device-tree/model ]; then board=$(tr -d '\0' < /proc/device-tree/model); fi

meta=(--meta "l4t=$l4t" --meta "board=$board" --meta "python=$python")
if [ -n "$tegrastats" ]; then
  if [ "$dry" = 1 ]; then echo "+ $tegrastats --interval $interval > $work/tegrastats.log &"
  else "$tegrastats" --interval "$interval" > "$work/tegrastats.log" 2>&1 & teg_pid=$!; fi
else
  meta+=(--meta "tegrastats_reason=tegrastats not found (not a Jetson?)")
fi

run "$python" -m spade_edge bench jetson run -m "$model" -g "$gallery" -i "$images" \
  --device "$device" --repeat "$repeat" --warmup "$warmup" -o "$work/latency.json"

if [ -n "$teg_pid" ]; then kill "$teg_pid" 2>/dev/null || true; wait "$teg_pid" 2>/dev/null || true; teg_pid=""; fi
teg_args=()
if [ -n "$tegrastats" ]; then teg_args=(--tegrastats "$work/tegrastats.log"); fi
run "$python" -m spade_edge bench jetson report --latency "$work/latency.json" "${teg_args[@]}" \
  --nvpmodel "$work/nvpmodel.txt" --clocks "$work/clocks.txt" "${meta[@]}" -o "$out"
[ "$dry" = 1 ] || echo "bench.sh: wrote $out"
