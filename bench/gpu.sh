#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one go, on the GPU machine (../shared/gpu):
#
#   bash ../shared/gpu/pack.sh                  # here, once: writes .gpu/ (Ray bundle)
#   bash bench/gpu.sh                           # there, with .gpu carried: ~10 minutes
#   QUICK=1 bash bench/gpu.sh                   # anywhere, tiny sizes: checks the script
#
# Prints (and keeps under $OUT, default bench-gpu/): the predictor table (bench/
# predictor_gpu.py: images/s, TFLOP/s, peak memory per precision and batch), the pipeline
# table (`drn-label bench` with default options: (a) the bare predictor, (b) the pipeline,
# b/a; then the stand-in feed), and how busy the GPU was in each phase (nvidia-smi dmon,
# one sample a second: mean SM % and the share of samples at 0 %).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-gpu}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
[ -f .gpu/setup.sh ] && source .gpu/setup.sh
PY=${PYTHON:-python3}
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1

if [ "$QUICK" = 1 ]; then
    PRED_SIZES=("64 128"); PRED_ARGS=(--batches 1,2 --iters 2 --archs drn_d_22)
    PIPE=("--images 16 --size 64" "--images 16 --size 64 --width 128")
    STANDIN=("--images 32 --size 64")
else
    PRED_SIZES=("512 1024" "512 512" "1024 2048")
    PRED_ARGS=(--batches 1,8,16,32 --iters 10)
    PIPE=("--images 3000 --size 512" "--images 400 --size 1024 --width 2048")
    STANDIN=("--images 3000 --size 512 --num-classes 2 --batch-size 16")
fi

DMON=""
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    nvidia-smi dmon -s u -d 1 -o T > "$OUT/dmon.txt" 2>&1 &
    DMON=$!
fi
: > "$OUT/phases.txt"
phase() {  # phase NAME COMMAND...: run it, log its output, note when it ran
    local name=$1; shift
    echo "== $name: $*" | tee -a "$OUT/log.txt"
    local t0; t0=$(date +%H:%M:%S)
    "$@" 2>&1 | tee -a "$OUT/log.txt"
    echo "$name $t0 $(date +%H:%M:%S)" >> "$OUT/phases.txt"
}

for hw in "${PRED_SIZES[@]}"; do
    set -- $hw
    phase "predictor-$1x$2" "$PY" bench/predictor_gpu.py --height "$1" --width "$2" "${PRED_ARGS[@]}"
done
if [ "$QUICK" != 1 ]; then
    phase "predictor-compiled-512x1024" "$PY" bench/predictor_gpu.py --height 512 --width 1024 \
        --archs drn_d_22 --precisions bf16,fp16 --batches 32 --iters 20 --compile
fi
for args in "${PIPE[@]}"; do
    phase "pipeline ${args}" "$PY" -m pipeline.cli bench $args --skip-plain --workdir "$OUT/work"
done
for args in "${STANDIN[@]}"; do
    phase "stand-in ${args}" "$PY" -m pipeline.cli bench $args --stand-in --workdir "$OUT/work"
done

if [ -n "$DMON" ]; then
    kill "$DMON" 2>/dev/null
    wait "$DMON" 2>/dev/null
    echo "== GPU busy per phase (nvidia-smi dmon, 1 s samples)"
    "$PY" - "$OUT/dmon.txt" "$OUT/phases.txt" <<'EOF' | tee -a "$OUT/log.txt"
import sys

samples = []  # (HH:MM:SS, sm %)
for line in open(sys.argv[1]):
    parts = line.split()
    if parts and not line.startswith("#") and len(parts) > 2 and parts[2].isdigit():
        samples.append((parts[0], int(parts[2])))
for line in open(sys.argv[2]):
    *name, start, end = line.split()
    sm = [v for t, v in samples if start <= t <= end]
    if sm:
        idle = sum(v == 0 for v in sm) / len(sm)
        print(f"{' '.join(name):<45} {len(sm):>4} samples  mean SM {sum(sm) / len(sm):5.1f} %  "
              f"at 0 %: {100 * idle:5.1f} %")
EOF
fi
echo "figures: $OUT/log.txt"
