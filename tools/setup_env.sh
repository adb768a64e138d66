#!/usr/bin/env bash
# Create or refresh .venv/ at the repository root and install mdistiller into it (editable).
# Idempotent: pip runs only when requirements.txt or setup.py changed since the last successful install.
#   bash tools/setup_env.sh          # requirements.txt's exact pins, then mdistiller itself
#   bash tools/setup_env.sh --test   # also the extras the tests exercise (setup.py's "test", "wandb", "imagenet")
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
if [ "${1:-}" = "--test" ]; then
    # The extras on top of the pins: setup.py's ranges are met by the pinned torch, so nothing is replaced.
    # Without a package index the wandb logger's and the ImageNet devkit's tests are skipped; the attempt is
    # recorded so it is not repeated.
    test_stamp=.venv/.mdistiller-test-extras
    if [ "$(cat "$test_stamp" 2>/dev/null)" != "$want" ]; then
        echo "[setup] installing the test extras (pytest, pytest-xdist, wandb, scipy)"
        if ! .venv/bin/python -m pip install -q --disable-pip-version-check --retries 1 --timeout 20 \
                -e ".[test,wandb,imagenet]" >.venv/.mdistiller-test-extras.log 2>&1; then
            echo "[setup] warning: could not install wandb and scipy (log: .venv/.mdistiller-test-extras.log);" \
                 "their tests will be skipped. Add them later with:" \
                 ".venv/bin/python -m pip install -e '.[wandb,imagenet]'" >&2
        fi
        echo "$want" > "$test_stamp"
    fi
fi
