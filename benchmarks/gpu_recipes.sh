#!/usr/bin/env bash
# Recipe runs side by side on one lent CUDA GPU, in one call (issue 11; device time is short and
# each start costs minutes). Run from the project root on the GPU machine:
#
#   bash benchmarks/gpu_recipes.sh OUT RUNS [BUDGET_S]
#
# RUNS is a file of lines `NAME FLAGS...`, longest first; each runs as
# `time_to_accuracy.py --data DATA -- --no-compile --logger none FLAGS`, SLOTS at a time. They
# share the GPU, so their seconds are not timings: accuracy is the result. Before them, while the
# data is decoded into the cache on one core, throughput.py (batch 512, compiled) runs on the
# GPU with only two short tests beside it (the temperature-scaling test, pinned to the CPU, and
# the CUDA-only checkpoint test). The JPEG tarball and the
# wheels the machine lacks (grad-cam, ttach) come in .gpu/. A run cut by the budget keeps its
# finished epochs (metrics.csv). OUT gets session.log and runs.tgz (logs and metrics).
# Ran on 2026-11-26 on an H100: gpu_recipes.txt, then gpu_recipes2.txt with RECIPES_ONLY=1 (the
# runs alone, on the machine still warm); figures in README "Performance" and benchmarks/recipes.md.
set -u
OUT=${1:?usage: gpu_recipes.sh OUT RUNS [BUDGET_S]}
RUNS=${2:?usage: gpu_recipes.sh OUT RUNS [BUDGET_S]}
BUDGET=${3:-540}
KEEP=20
DATA=${DATA:-.gpu/cifar10-jpg.tar.gz}
SLOTS=${SLOTS:-6}
W=${WORK:-/tmp/gpu-recipes}
export OMP_NUM_THREADS=2
source "$(dirname "$0")/gpu_setup.sh"

TESTS=""
if [ -n "${RECIPES_ONLY:-}" ]; then  # a second call on a warm machine: the runs alone
    python3 -c "from common.data import load_splits; load_splits('$DATA')"
else
    say "data decode (one core) beside throughput.py (GPU) and the CUDA tests (CPU)"
    python3 -c "from common.data import load_splits; s = load_splits('$DATA'); print('decoded', len(s.train), len(s.test))" > "$W/decode.log" 2>&1 &
    DECODE=$!
    timeout $(left) python3 -m pytest -q -p no:cacheprovider \
        tests/test_ecosystem.py::test_temperature_scaling_fits_the_validation_set \
        tests/test_train.py::test_a_gpu_checkpoint_loads_on_a_machine_without_one > "$W/pytest.log" 2>&1 &
    TESTS=$!
    timeout 100 python3 benchmarks/throughput.py --batch-size 512 2>&1 | grep -v Warning
    wait $DECODE
    cat "$W/decode.log"
fi

say "recipe runs, $SLOTS at a time"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 15 > "$W/gpu_use.csv" 2>/dev/null &
SMI=$!
run() {  # NAME FLAGS...
    local name=$1
    shift
    timeout $(left) python3 benchmarks/time_to_accuracy.py --data "$DATA" --out "$W/$name" -- \
        --no-compile --logger none "$@" > "$W/$name.log" 2>&1
    echo "[$(now)s] $name: $(grep '^epochs=' "$W/$name.log" || echo "cut after $(grep -c '^epoch=' "$W/$name.log") epochs: $(grep '^epoch=' "$W/$name.log" | tail -n 1)")"
}
export -f run now left
export START BUDGET KEEP DATA W
grep -v '^\s*\(#\|$\)' "$RUNS" | xargs -P "$SLOTS" -I{} bash -c 'run {}'
[ -n "$TESTS" ] && wait $TESTS && say "tests: $(tail -n 1 "$W/pytest.log")"
kill $SMI 2>/dev/null

say "packing"
for f in "$W"/*.log; do echo "== $(basename "$f" .log)"; grep -E '^(epoch=|epochs=)' "$f"; done
tar czf "$OUT/runs.tgz" -C "$W" --exclude='*.pt' --exclude='*.png' --exclude='*.html' . 2>/dev/null
ls -la "$OUT"
say "done"
