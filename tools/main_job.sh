#!/usr/bin/env bash
# README command 1: set up .venv, get Fashion-MNIST, train the Fashion-MNIST runs and print the result table.
# Finished runs are reused, so running it again only prints the table.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup_env.sh
bash tools/fetch_data.sh
exec .venv/bin/python tools/main_job.py "$@"
