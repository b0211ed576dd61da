#!/usr/bin/env bash
# Set up napari-vlsm in ./.venv on a fresh Debian/Ubuntu machine: system libraries for Qt
# under Xvfb, a virtual environment, the CPU build of torch, then the project with the
# napari, ONNX and test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="python3-venv xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0 libxcb-render-util0
 libxcb-shape0 libxcb-randr0 libxcb-xfixes0 libxcb-xkb1 libxcb-cursor0 libxkbcommon-x11-0 libegl1 libgl1
 libopengl0 libdbus-1-3 libfontconfig1 libglib2.0-0"
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  missing=$(for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [ -n "$missing" ]; then
    echo "Installing system packages: $missing"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
  fi
else
  echo "No apt-get: install Xvfb and the Qt xcb libraries with your package manager for the GUI tests."
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch would pull a CUDA build of several GB.
# Elsewhere, TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" keeps it CPU-only.
.venv/bin/python -m pip install -q ${TORCH_PIP_ARGS:-} "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
echo "napari-vlsm is set up in .venv"
