#!/usr/bin/env bash
# The GPU check, in one command, on any CUDA machine where CuPy and torch are already installed
# (a Jetson, a cloud GPU image), without network: installs this checkout without downloading,
# runs the gpu-marked tests, then `spade-edge bench gpu --quick`. Everything goes to a log file too.
# Finishes inside 8 minutes (each step has a timeout; the budget is shared).
#
#   jetson/gpu-check.sh [--device N] [--log FILE] [--python PY] [--budget SECONDS]
#                       [--pytest-args ARGS] [--bench-args ARGS] [--dry-run]
#
# Exit status: 0 all passed; 3 no usable GPU (nothing measured, the log says which piece is
# missing); 1 a step failed; 124 a step ran out of time.
# --pytest-args / --bench-args are appended to those steps' command lines (split on spaces).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
device=0 budget=480 dry=0 pytest_args="" bench_args=""
stamp=$(date +%Y%m%d-%H%M%S)
log="$PWD/gpu-check-$stamp.log"
python="${PYTHON:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --log) log=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    --pytest-args) pytest_args=$2; shift 2 ;;
    --bench-args) bench_args=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "gpu-check.sh: unknown argument $1" >&2; usage 2 ;;
  esac
done
if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
json="${log%.log}.json"

mkdir -p "$(dirname "$log")"
: > "$log"
exec > >(tee -a "$log") 2>&1
tee_pid=$!
trap 'exec 1>&- 2>&-; wait "$tee_pid" 2>/dev/null || true' EXIT  # the log complete before we return
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
say() { printf '== %s\n' "$*"; }
show() { local q; printf -v q '%q ' "$@"; echo "+ ${q% }"; }
step() {  # step SECONDS CMD...: run with a timeout of at most what the budget has left
  local limit=$1; shift
  local remaining; remaining=$(left)
  if [ "$remaining" -lt "$limit" ]; then limit=$remaining; fi
  show "$@"
  if [ "$dry" = 1 ]; then return 0; fi
  if [ "$limit" -le 0 ]; then echo "gpu-check: out of time before this step"; return 124; fi
  timeout --kill-after=10 "$limit" "$@"
}

say "gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ), checkout $repo ($(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout')), log $log"
say "python: $python ($("$python" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || echo missing))"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.max.sm --format=csv || true
else
  echo "nvidia-smi: not found (a Jetson has none; tegrastats instead)"
fi

# 1. the pieces: CuPy that sees the device, torch for the peer, pytest
say "1/4 the GPU and the packages"
probe=$(cat <<'PY'
import importlib.util, sys
device = int(sys.argv[1])
missing = [m for m in ("cupy", "torch", "pytest") if importlib.util.find_spec(m) is None]
if missing:
    print("missing Python packages: " + ", ".join(missing) + " (install them first: this check never downloads)")
    sys.exit(3)
import cupy
try:
    n = cupy.cuda.runtime.getDeviceCount()
    p = cupy.cuda.runtime.getDeviceProperties(device)
except Exception as exc:
    print(f"CuPy {cupy.__version__} sees no usable CUDA device {device}: {type(exc).__name__}: {exc}")
    sys.exit(3)
import torch
name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
stand_in = " (stand-in)" if getattr(cupy, "STANDIN", False) else ""
print(f"device {device} of {n}: {name}{stand_in}, compute {p['major']}.{p['minor']}; CuPy {cupy.__version__}; "
      f"torch {torch.__version__} (CUDA {torch.version.cuda}, sees {torch.cuda.device_count()} device(s))")
PY
)
if [ "$dry" = 1 ]; then show "$python" -c '<probe>' "$device"
else
  rc=0; "$python" -c "$probe" "$device" || rc=$?
  if [ "$rc" != 0 ]; then
    echo "gpu-check: no usable GPU here; nothing was tested or measured (log: $log)"
    exit 3
  fi
fi

# 2. this checkout, without downloading: an editable install where pip and setuptools can, else
#    PYTHONPATH (spade_edge runs from the checkout: runtime/, export/, calibration/ are linked in it)
say "2/4 install this checkout (no network)"
installed=$(cd / && "$python" -c 'import spade_edge, os; print(os.path.dirname(os.path.dirname(os.path.realpath(spade_edge.__file__))))' 2>/dev/null || true)
if [ "$installed" = "$repo" ]; then
  echo "spade_edge already imports from this checkout"
elif step 120 "$python" -m pip install --no-index --no-deps --no-build-isolation --quiet -e "$repo"; then
  echo "installed (editable, no dependencies, no index)"
else
  echo "pip could not install offline here; using PYTHONPATH=$repo"
  export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
fi

# 3. the gpu-marked tests (the files that hold them: collecting the whole suite would need every
#    optional package), skips listed with their reasons
say "3/4 pytest -m gpu"
cd "$repo"
mapfile -t gpu_tests < <(grep -rlE 'pytest\.mark\.gpu' tests --include='test_*.py' | sort)
if [ "${#gpu_tests[@]}" = 0 ]; then echo "gpu-check: no gpu-marked tests found under $repo/tests"; exit 1; fi
echo "files with gpu-marked tests: ${gpu_tests[*]}"
# shellcheck disable=SC2206 # the extra arguments are meant to be split
extra_pytest=($pytest_args)
tests_rc=0
step 240 "$python" -m pytest -m gpu -rs -q -p no:cacheprovider "${gpu_tests[@]}" "${extra_pytest[@]}" || tests_rc=$?

# 4. the bench: ours against torch on this GPU
say "4/4 spade-edge bench gpu --quick"
# shellcheck disable=SC2206
extra_bench=($bench_args)
bench_rc=0
step 420 "$python" -m spade_edge bench gpu --quick --device "$device" --json "$json" "${extra_bench[@]}" || bench_rc=$?

say "done in $(( $(date +%s) - start )) s: pytest exit $tests_rc, bench exit $bench_rc; log $log, bench JSON $json"
for rc in "$tests_rc" "$bench_rc"; do
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then exit 124; fi
done
if [ "$bench_rc" = 3 ]; then exit 3; fi
if [ "$tests_rc" != 0 ] || [ "$bench_rc" != 0 ]; then exit 1; fi
