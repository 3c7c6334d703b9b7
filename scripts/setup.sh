#!/usr/bin/env bash
# Sourced by scripts/test.sh and scripts/demo.sh: creates ./.venv and installs everything the package, notebooks,
# tests and benchmarks need (a CPU build of PyTorch first), plus Debian's Chromium for the browser test when run as
# root. UNIFUSE_SKIP_INSTALL=1 reuses .venv as it is. PYTHON picks the interpreter for the venv (default python3).
if [ "${UNIFUSE_SKIP_INSTALL:-0}" != 1 ]; then
  [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # CPU torch first, so that no dependency pulls a multi-GB CUDA build: 2.13.0 lies on this machine's
  # disk; elsewhere pip takes it from PyTorch's CPU index.
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q torch==2.13.0 \
      || .venv/bin/pip install -q "torch>=2.11,<2.15" --index-url https://download.pytorch.org/whl/cpu
  fi
  .venv/bin/pip install -q -e ".[dev]"
  if [ "${UNIFUSE_NO_BROWSER:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1; then
    # Debian's Chromium for the browser test of the JupyterLab widgets (no browser download)
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    elif command -v sudo >/dev/null 2>&1; then sudo -n apt-get install -y -qq chromium >/dev/null || true
    fi
  fi
fi
