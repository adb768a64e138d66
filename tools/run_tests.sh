#!/usr/bin/env bash
# README command 2 (and what CI runs): set up .venv, get Fashion-MNIST, run the whole test suite.
# Extra arguments go to pytest, e.g. `bash tools/run_tests.sh -m "not slow" -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup_env.sh --test  # the pinned set-up plus the test extras (wandb)
bash tools/fetch_data.sh
df -h . | tail -1 | awk '{print "disk free before the tests: " $4}'  # a full disk fails checkpoint tests
exec .venv/bin/python -m pytest -q "$@" tests
