#!/usr/bin/env bash
# Create or refresh .venv/ at the repository root and install mdistiller into it (editable).
# Idempotent: pip runs only when requirements.txt or setup.py changed since the last successful install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.mdistiller-installed
want="$(cat requirements.txt setup.py | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing requirements into .venv (torch takes about a minute)"
    .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt "pytest>=7"
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
    echo "$want" > "$stamp"
else
    echo "[setup] .venv is up to date"
fi
