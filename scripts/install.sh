#!/usr/bin/env bash
# Create (if needed) a virtual environment and install v4kernels into it exactly as the README
# says: CPU torch first (pinned; an unpinned torch pulls a multi-GB CUDA build), then the package
# without build isolation so the native CPU extension builds against that torch.
# usage: scripts/install.sh [VENV_DIR]   (default .venv)
set -euo pipefail
VENV="${1:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0 triton==3.7.1 numpy
"$VENV/bin/pip" install -q --disable-pip-version-check --no-build-isolation -e '.[test,bench]'
