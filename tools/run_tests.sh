#!/usr/bin/env bash
# README command 2 (and what CI runs): set up .venv, get Fashion-MNIST, run the whole test suite, then run the
# tests that compare numbers across runs, processes or machines (marker "kernels") a second time on another set of
# CPU kernels (ATen's AVX2 kernels and oneDNN capped at AVX2: other rounding on any x86 machine), so that a test
# which holds only for one kernel set fails on the machine where it is written rather than on the next CPU kind.
# Extra arguments go to pytest, e.g. `bash tools/run_tests.sh -m "not slow" -x`; the second pass then runs the
# "kernels" tests among those selected (none when the arguments choose with -m or -k themselves).
# MDISTILLER_SECOND_KERNELS=0 skips the second pass. With pytest-xdist installed (the "test" extra) the tests run in
# one worker per core, whole files to a worker (module fixtures are trained once); MDISTILLER_TEST_WORKERS=N sets the
# number, 0 runs them in this process.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup_env.sh --test  # the pinned set-up plus the test extras (wandb, scipy)
bash tools/fetch_data.sh
df -h . | tail -1 | awk '{print "disk free before the tests: " $4}'  # a full disk fails checkpoint tests
workers="${MDISTILLER_TEST_WORKERS:-auto}"
parallel=()
if [ "$workers" != 0 ] && .venv/bin/python -c "import xdist" 2>/dev/null; then
    parallel=(-n "$workers" --dist loadfile)
fi
.venv/bin/python -m pytest -q "${parallel[@]}" --durations=15 "$@" tests
if [ "${MDISTILLER_SECOND_KERNELS:-1}" = 0 ]; then
    exit 0
fi
for arg in "$@"; do
    case "$arg" in
        -m|-m*|-k|-k*) echo "[tests] second kernel set skipped: the arguments select tests with -m/-k"; exit 0 ;;
    esac
done
echo "[tests] the 'kernels' tests again with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2"
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python -m pytest -q "${parallel[@]}" -m kernels "$@" tests
