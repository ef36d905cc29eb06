#!/usr/bin/env bash
# Install spade-edge on a bare Jetson (JetPack 6: L4T r36, CUDA 12.6, TensorRT 10.3, Python 3.10;
# JetPack 7: L4T r38+, CUDA 13, Python 3.12) as a service run by an unprivileged user.
#
#   sudo jetson/install.sh [--model model.onnx --gallery parts.gallery] [--with-pycuda]
#                          [--build-engine [-- ARGS for build-engine.sh]]
#
# Options:
#   --prefix DIR        virtual environment goes to DIR/venv            [/opt/spade-edge]
#   --user NAME         system user the service runs as                  [spade-edge]
#   --source DIR        install spade-edge from this checkout            [this repository]
#   --package SPEC      install from the package index instead, e.g. 'spade-edge==0.1.0'
#   --jetpack 6|7|auto  which JetPack the board runs                     [auto: /etc/nv_tegra_release]
#   --cpu-only          ONNX Runtime for the CPU only: no CuPy, no GPU ONNX Runtime
#   --ort-index URL     package index with ONNX Runtime GPU wheels for this JetPack
#   --with-pycuda       also build pycuda from source against the board's CUDA (a few minutes)
#   --model F --gallery F   copy them to /var/lib/spade-edge and start the service
#   --build-engine      build the TensorRT engine on this device (jetson/build-engine.sh; arguments
#                       after -- go to it: precision fp32|fp16|int8, max batch) and serve it
#   --no-service        do not install the systemd unit
#   --dry-run           print what would be done, change nothing
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
prefix=/opt/spade-edge user=spade-edge source=$(cd "$here/.." && pwd) package="" jetpack=auto cpu_only=0
ort_index="" with_pycuda=0 model="" gallery="" build_engine=0 service=1 dry=0
engine_args=()
state=/var/lib/spade-edge
model_file=$state/model.onnx device=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=$2; shift 2 ;;
    --user) user=$2; shift 2 ;;
    --source) source=$2; shift 2 ;;
    --package) package=$2; shift 2 ;;
    --jetpack) jetpack=$2; shift 2 ;;
    --cpu-only) cpu_only=1; shift ;;
    --ort-index) ort_index=$2; shift 2 ;;
    --with-pycuda) with_pycuda=1; shift ;;
    --model) model=$2; shift 2 ;;
    --gallery) gallery=$2; shift 2 ;;
    --build-engine) build_engine=1; shift ;;
    --no-service) service=0; shift ;;
    --dry-run) dry=1; shift ;;
    --) shift; engine_args=("$@"); break ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

say() { printf '\n== %s\n' "$*"; }
run() { if [ "$dry" = 1 ]; then printf '+ %s\n' "$*"; else "$@"; fi; }
die() { echo "install.sh: $*" >&2; exit 2; }

if [ "$dry" = 0 ] && [ "$(id -u)" != 0 ]; then die "run as root (sudo), or with --dry-run to see the steps"; fi
if [ -n "$model$gallery" ] && { [ -z "$model" ] || [ -z "$gallery" ]; }; then die "--model and --gallery go together"; fi
if [ "$build_engine" = 1 ] && [ -z "$model" ]; then die "--build-engine needs --model"; fi

# --- which JetPack -----------------------------------------------------------------------------
l4t_major=""
if [ -r /etc/nv_tegra_release ]; then
  l4t_major=$(sed -n 's/^# R\([0-9][0-9]*\) .*/\1/p' /etc/nv_tegra_release)
fi
if [ "$jetpack" = auto ]; then
  case "$l4t_major" in
    36) jetpack=6 ;;
    38|39) jetpack=7 ;;
    "") if [ "$cpu_only" = 1 ]; then jetpack=none
        else die "not a Jetson (no /etc/nv_tegra_release): pass --jetpack 6|7, or --cpu-only"; fi ;;
    *) die "L4T r$l4t_major is not supported here (JetPack 6 = r36, JetPack 7 = r38/r39); pass --jetpack to force" ;;
  esac
fi
case "$jetpack" in
  6) cupy="cupy-cuda12x"; default_index=https://pypi.jetson-ai-lab.io/jp6/cu126 ;;
  7) cupy="cupy-cuda13x"; default_index=https://pypi.jetson-ai-lab.io/sbsa/cu130 ;;
  none) cupy="" default_index="" ;;
  *) die "--jetpack must be 6, 7 or auto" ;;
esac
# --- which GPU: the wheels of each index are built for one ------------------------------------
# Orin (tegra234) is sm_87 (JetPack 6's index), Thor (tegra264) sm_110 (JetPack 7's SBSA index);
# Xavier (tegra194) and older run JetPack 5 at most: Python 3.8 and TensorRT 8.5, below what
# spade-edge needs (Python >= 3.10, TensorRT >= 10.3). JETSON_COMPATIBLE: another file, for tests.
compatible=${JETSON_COMPATIBLE:-/proc/device-tree/compatible}
soc=""
if [ -r "$compatible" ]; then
  soc=$(tr '\0' '\n' < "$compatible" | sed -n 's/^nvidia,\(tegra[0-9][0-9]*\)$/\1/p' | head -n 1)
fi
case "$soc" in
  tegra194|tegra186|tegra210)
    die "this Jetson ($soc: Xavier, TX2 or Nano) runs JetPack 5 or older (Python 3.8, TensorRT 8.5), which spade-edge does not support: it needs Python >= 3.10 and TensorRT >= 10.3 (Orin with JetPack 6, Thor with JetPack 7). Export and build galleries on a workstation; on this board only --cpu-only with a newer Python could run the CPU runtime" ;;
  tegra234) gpu="Orin (sm_87)" ;;
  tegra264) gpu="Thor (sm_110)" ;;
  *) gpu="unknown${soc:+ ($soc)}" ;;
esac
if [ "$cpu_only" = 0 ] && [ -z "$ort_index" ]; then
  if [ "$soc" = tegra264 ] && [ "$jetpack" = 6 ]; then die "Jetson Thor needs JetPack 7 (this says JetPack 6)"; fi
  if [ "$soc" = tegra234 ] && [ "$jetpack" = 7 ]; then
    die "the JetPack 7 index ($default_index) holds Thor (sm_110) wheels; for Orin (sm_87) on JetPack 7 pass --ort-index with an index built for it, or --cpu-only"
  fi
fi
ort_index=${ort_index:-$default_index}
echo "spade-edge install: JetPack $jetpack (L4T r${l4t_major:-?}), GPU $gpu, prefix $prefix, user $user, cpu-only $cpu_only"

# --- system packages ---------------------------------------------------------------------------
say "system packages"
apt_pkgs=(python3-venv python3-pip python3-dev)
if [ "$cpu_only" = 0 ]; then
  # TensorRT's Python bindings come from the L4T repository (JetPack), seen through --system-site-packages
  if ! python3 -c 'import tensorrt' 2>/dev/null; then apt_pkgs+=(python3-libnvinfer); fi
fi
if [ "$with_pycuda" = 1 ]; then apt_pkgs+=(build-essential); fi
run apt-get update
run apt-get install -y --no-install-recommends "${apt_pkgs[@]}"

# --- user and folders --------------------------------------------------------------------------
say "user $user"
if ! id "$user" >/dev/null 2>&1; then
  run useradd --system --home-dir "$state" --no-create-home --shell /usr/sbin/nologin "$user"
fi
for group in video render; do  # the GPU device nodes of a Jetson belong to these groups
  if getent group "$group" >/dev/null; then run usermod -aG "$group" "$user"; fi
done
run install -d -o "$user" -g "$user" -m 0750 "$state"

# --- Python environment ------------------------------------------------------------------------
say "virtual environment $prefix/venv"
pip="$prefix/venv/bin/pip"
run python3 -m venv --system-site-packages "$prefix/venv"
run "$pip" install --upgrade pip
# with the line adapters (Modbus, OPC UA, MQTT: pure Python)
if [ -n "$package" ]; then run "$pip" install "${package}[line]"; else run "$pip" install "${source}[line]"; fi
if [ "$cpu_only" = 1 ]; then
  run "$pip" install "onnxruntime>=1.17"
else
  # ONNX Runtime with the CUDA and TensorRT providers, built for this JetPack's CUDA
  run "$pip" install --extra-index-url "$ort_index" "onnxruntime-gpu>=1.17"
  # CuPy for the board's CUDA (CUDA 12.x on JetPack 6, 13.x on JetPack 7): aarch64 wheels on PyPI
  run "$pip" install "$cupy>=13"
fi
if [ "$with_pycuda" = 1 ]; then
  # pycuda has no aarch64 wheel: built here against the board's own CUDA (cuda.h, libcuda)
  run env CUDA_ROOT=/usr/local/cuda PATH="/usr/local/cuda/bin:$PATH" "$pip" install --no-binary pycuda "pycuda>=2024.1"
fi

# --- model, gallery, engine --------------------------------------------------------------------
if [ -n "$model" ]; then
  say "model and gallery -> $state"
  run install -o "$user" -g "$user" -m 0640 "$model" "$state/model.onnx"
  run install -o "$user" -g "$user" -m 0640 "$gallery" "$state/parts.gallery"
fi
if [ "$build_engine" = 1 ]; then
  say "TensorRT engine (on this device: engines are specific to the GPU and the TensorRT version)"
  run env PYTHON="$prefix/venv/bin/python" "$here/build-engine.sh" "$state/model.onnx" "$state/model.engine" \
    "${engine_args[@]}"
  run chown "$user:$user" "$state/model.engine" "$state/model.engine.json"
  model_file=$state/model.engine device=tensorrt
fi

# --- service -----------------------------------------------------------------------------------
if [ "$service" = 1 ]; then
  say "systemd unit"
  if [ ! -e /etc/default/spade-edge ]; then
    conf="SPADE_EDGE_MODEL=$model_file
SPADE_EDGE_GALLERY=$state/parts.gallery
SPADE_EDGE_HOST=0.0.0.0
SPADE_EDGE_PORT=8080
SPADE_EDGE_DEVICE=$device
SPADE_EDGE_ARGS="
    if [ "$dry" = 1 ]; then printf '+ write /etc/default/spade-edge:\n%s\n' "$conf"
    else printf '%s\n' "$conf" > /etc/default/spade-edge; fi
  fi
  unit=/etc/systemd/system/spade-edge.service
  if [ "$dry" = 1 ]; then echo "+ install $here/spade-edge.service -> $unit (ExecStart in $prefix, User=$user)"
  else
    sed -e "s#/opt/spade-edge#$prefix#g" -e "s#^User=.*#User=$user#" -e "s#^Group=.*#Group=$user#" \
      "$here/spade-edge.service" > "$unit"
    chmod 0644 "$unit"
  fi
  run systemctl daemon-reload
  run systemctl enable spade-edge.service
  if [ -n "$model" ]; then run systemctl restart spade-edge.service; fi
fi

# --- check -------------------------------------------------------------------------------------
say "check"
if [ -n "$model" ]; then run "$prefix/venv/bin/spade-edge" devices --model "$model_file" --device "$device"
else run "$prefix/venv/bin/spade-edge" devices; fi
if [ "$service" = 1 ]; then
  if [ -z "$model" ]; then
    echo "next: copy model.onnx and parts.gallery to $state (or rerun with --model/--gallery), then: systemctl start spade-edge"
  fi
  echo "health: curl -s http://127.0.0.1:8080/health"
else
  echo "run: $prefix/venv/bin/spade-edge serve --model M --gallery G   (or: spade-edge watch DIR -m M -g G)"
fi
