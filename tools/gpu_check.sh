#!/usr/bin/env bash
# The GPU check: one command for a lent GPU machine, under 8 minutes by its sections' limits, never run by CI.
#
#   bash tools/gpu_check.sh [OUTDIR]        (OUTDIR default: $OUT where set, else output/gpu_check)
#
# Sections, each under its own time limit so that one failure or hang still leaves the others' results:
#   env_info  the GPU, driver, torch/CUDA versions, CPU
#   tests  tests/test_cuda.py (the CUDA paths against the float32 CPU path and the published identities) and
#          tests/test_cuda_graphs.py (replayed updates against eager ones; no host wait in any update)
#   e2e    Fashion-MNIST end to end on the GPU: a resnet20 teacher, then KD in float32, bf16 and fp16 autocast,
#          KD+DOT under fp16 loss scaling, DKD with the SPEED probe's choice; best/last top-1 and minutes per run,
#          and what the probe chose in each run
#   bench  KD resnet32x4 -> resnet8x4 on synthetic CIFAR-100: a full epoch of our loop (data included) against
#          the torchvision baseline at batch 64 (defaults and float32), with the step breakdown
#   graphs the update alone at batch 64, 128 and 256: eager against SPEED.CUDA_GRAPHS, vanilla and DOT
#   packed 1, 2 and 5 Fashion-MNIST KD runs sharing the GPU (--seeds --runs-per-device; MPS where it runs): the
#          images/s of each and together; the 5 is a 5-seed, 2-epoch run end to end
# Files written to OUTDIR: status.txt (each section's exit code and seconds), <section>.txt (its full output),
# e2e.md (the end-to-end table). Needs Fashion-MNIST where tools/fetch_data.sh looks (data/FashionMNIST/raw/ or
# Debian's folder) and, where the machine lacks a package of requirements.txt (yacs), its wheel in .whl/.
#
# GPU_CHECK_SMOKE=1 runs every section with tiny sizes on the CPU, to test this script where no GPU is lent.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUTDIR="$(mkdir -p "${1:-${OUT:-output/gpu_check}}" && cd "${1:-${OUT:-output/gpu_check}}" && pwd)"
WORK="${GPU_CHECK_WORK:-/tmp/mdistiller_gpu_check}"
SECTION="${GPU_CHECK_SECTION:-}"  # set: this process runs that one section (under the parent's time limit)
[ -z "$SECTION" ] && rm -rf "$WORK" && mkdir -p "$WORK"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
SMOKE="${GPU_CHECK_SMOKE:-0}"

if [ -n "$SECTION" ] && [ -d "$WORK/site" ]; then
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
elif ! "$PYTHON" -c "import yacs" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl \
        && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "$SMOKE" = 1 ]; then
    DEVICE=cpu
    E2E=(DATASET.TRAIN_SUBSET 256 DATASET.TEST_SUBSET 256 SOLVER.EPOCHS 1 SOLVER.LR_DECAY_STAGES "[1]")
    BENCH=(--steps 1 --warmup 1 --rounds 1 --epoch-images 32 --baseline-workers 0)
    BATCHES=(8)
    PACKED=(DATASET.TRAIN_SUBSET 128 DATASET.TEST_SUBSET 128 SOLVER.EPOCHS 1 SOLVER.LR_DECAY_STAGES "[1]")
    GRAPHS_ON=auto  # CUDA graphs are CUDA's: on the CPU auto resolves to off
    export MDISTILLER_TEST_DEVICE=cpu
else
    DEVICE=cuda
    E2E=()
    BENCH=(--steps 20 --warmup 5 --rounds 3 --epoch-images 0 --baseline-workers 12)
    BATCHES=(64 128 256)
    PACKED=(DATASET.TRAIN_SUBSET 20000 SOLVER.EPOCHS 2 SOLVER.LR_DECAY_STAGES "[2]")
    GRAPHS_ON=on
fi

section() {  # section NAME SECONDS: this script again running function NAME, its output to NAME.txt, a status line
    local name=$1 limit=$2 start rc
    echo "== $name (limit ${limit} s)"
    start=$(date +%s)
    GPU_CHECK_SECTION=$name timeout -k 10 "$limit" bash "${BASH_SOURCE[0]}" "$OUTDIR" > "$OUTDIR/$name.txt" 2>&1
    rc=$?
    echo "$name: exit $rc, $(( $(date +%s) - start )) s$([ "$rc" = 124 ] && echo ' (time limit)')" \
        | tee -a "$OUTDIR/status.txt"
}

env_info() {
    nvidia-smi || echo "no nvidia-smi"
    "$PYTHON" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", "sm", f"{p.major}.{p.minor}", p.multi_processor_count,
          "SMs | bf16", torch.cuda.is_bf16_supported())
print("cpu threads", torch.get_num_threads(), "| cpu capability", torch.backends.cpu.get_cpu_capability())
EOF
    lscpu | grep -E "Model name|^CPU\(s\)" || true
    git rev-parse HEAD 2>/dev/null || echo "no git checkout"
}

tests() {
    "$PYTHON" -m pytest -q -p no:cacheprovider -o tmp_path_retention_policy=failed tests/test_cuda.py \
        tests/test_cuda_graphs.py
}

e2e() {
    local prefix="$WORK/runs" common=(EXPERIMENT.DEVICE "$DEVICE" LOG.PREFIX "$WORK/runs" "${E2E[@]}")
    local t=configs/fashion_mnist
    "$PYTHON" tools/train.py --cfg $t/vanilla/resnet20.yaml "${common[@]}" || return 1
    "$PYTHON" tools/train.py --cfg $t/kd/resnet20_resnet8.yaml "${common[@]}" EXPERIMENT.TAG kd_fp32 SPEED.AMP off \
        SPEED.TEACHER_HALF off
    "$PYTHON" tools/train.py --cfg $t/kd/resnet20_resnet8.yaml "${common[@]}" EXPERIMENT.TAG kd_bf16 SPEED.AMP bf16
    if [ "$DEVICE" = cuda ]; then
        "$PYTHON" tools/train.py --cfg $t/kd/resnet20_resnet8.yaml "${common[@]}" EXPERIMENT.TAG kd_fp16 SPEED.AMP fp16
        "$PYTHON" tools/train.py --cfg $t/dot/kd_resnet20_resnet8.yaml "${common[@]}" EXPERIMENT.TAG dot_fp16 \
            SPEED.AMP fp16
    fi
    "$PYTHON" tools/train.py --cfg $t/dkd/resnet20_resnet8.yaml "${common[@]}" EXPERIMENT.TAG dkd_auto
    "$PYTHON" - "$prefix" > "$OUTDIR/e2e.md" <<'EOF'
import json, os, sys
prefix = sys.argv[1]
print("| run | method | trainer | amp | teacher half | best top-1 | last top-1 | train s | img/s |")
print("|---|---|---|---|---|---|---|---|---|")
for name in sorted(os.listdir(prefix)):
    path = os.path.join(prefix, name, "summary.json")
    if not os.path.isfile(path):
        print(f"| {name} | unfinished |")
        continue
    s = json.load(open(path))
    print(f"| {name} | {s['distiller']} | {s['trainer']} | {s['speed']['amp']} | {s['speed']['teacher_half']} | "
          f"{s['best_top1']:.2f} | {s['last_top1']:.2f} | {s['train_time_s']:.1f} | {s['images_per_s']:.0f} |")
print(f"\ndevice: {s['device']}, torch {s['torch_version']}")
EOF
    echo "what the SPEED probe chose in each run (train.log):" >> "$OUTDIR/e2e.md"
    grep -h "SPEED probe\|CUDA_GRAPHS auto" "$prefix"/*/train.log | sed 's/^/    /' >> "$OUTDIR/e2e.md"
    cat "$OUTDIR/e2e.md"
}

packed() {  # 1, 2 and 5 KD runs sharing the device (tools/train.py --seeds --runs-per-device): aggregate images/s
    local t=configs/fashion_mnist/kd/resnet20_resnet8.yaml n i seeds start
    : > "$WORK/packed_wall.txt"
    for n in 1 2 5; do
        seeds=(); for ((i = 0; i < n; i++)); do seeds+=("$i"); done
        start=$(date +%s%N)
        "$PYTHON" tools/train.py --seeds "${seeds[@]}" --runs-per-device "$n" --cfg $t EXPERIMENT.DEVICE "$DEVICE" \
            LOG.PREFIX "$WORK/runs" EXPERIMENT.TAG "packed$n" "${PACKED[@]}"
        echo "packed$n $(( ($(date +%s%N) - start) / 1000000 ))" >> "$WORK/packed_wall.txt"
    done
    "$PYTHON" - "$WORK/runs" "$WORK/packed_wall.txt" <<'EOF'
import glob, json, os, sys
prefix = sys.argv[1]
walls = {k: int(v) / 1000 for k, v in (line.split() for line in open(sys.argv[2]).read().splitlines())}
print("| runs at once | runs finished | images/s of each | their sum | images / wall s (start-up included) |")
print("|---|---|---|---|---|")
for n in (1, 2, 5):
    runs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(prefix, f"*_packed{n}_seed*", "summary.json")))]
    if not runs:
        print(f"| {n} | 0 | | | |")
        continue
    images = sum(r["images_per_s"] * r["train_time_s"] for r in runs)
    each = ", ".join(f"{r['images_per_s']:.0f}" for r in runs)
    print(f"| {n} | {len(runs)} | {each} | {sum(r['images_per_s'] for r in runs):.0f} | "
          f"{images / walls[f'packed{n}']:.0f} |")
EOF
}

bench() {  # the first batch size: the defaults and float32 (TF32 convolutions, PyTorch's CUDA default)
    local cfg=configs/cifar100/kd/resnet32x4_resnet8x4.yaml bs="${BATCHES[0]}"
    echo "### batch $bs"
    "$PYTHON" tools/benchmark.py --cfg $cfg --synthetic --random-teacher "${BENCH[@]}" --baseline torchvision \
        --epoch-rounds 1 --json --compare "SPEED.AMP auto" "SPEED.AMP off SPEED.TEACHER_HALF off" \
        -- SOLVER.BATCH_SIZE "$bs" EXPERIMENT.DEVICE "$DEVICE"
}

graphs() {  # the update alone, eager against CUDA graphs, vanilla and DOT, at each batch size
    local cfg=configs/cifar100/kd/resnet32x4_resnet8x4.yaml
    for bs in "${BATCHES[@]}"; do
        echo "### batch $bs"
        "$PYTHON" tools/benchmark.py --cfg $cfg --synthetic --random-teacher "${BENCH[@]}" --no-data --no-breakdown \
            --json --compare "SPEED.CUDA_GRAPHS off" "SPEED.CUDA_GRAPHS $GRAPHS_ON" \
            "SPEED.CUDA_GRAPHS off SOLVER.UPDATE_RULE dot" "SPEED.CUDA_GRAPHS $GRAPHS_ON SOLVER.UPDATE_RULE dot" \
            -- SOLVER.BATCH_SIZE "$bs" EXPERIMENT.DEVICE "$DEVICE"
    done
}

if [ -n "$SECTION" ]; then
    "$SECTION"
    exit $?
fi
: > "$OUTDIR/status.txt"
# GPU_CHECK_SECTIONS="tests dot" runs only those (e.g. again after a fix)
SECTIONS="${GPU_CHECK_SECTIONS:-env_info tests e2e bench graphs packed}"
declare -A LIMIT=([env_info]=20 [tests]=120 [e2e]=110 [bench]=70 [graphs]=90 [packed]=70)
for name in $SECTIONS; do
    section "$name" "${LIMIT[$name]}"
done
echo "== done; files in $OUTDIR"
cat "$OUTDIR/status.txt"
cat "$OUTDIR/e2e.md" 2>/dev/null
tail -n 25 "$OUTDIR/bench.txt" 2>/dev/null | grep -v '^{' || true
