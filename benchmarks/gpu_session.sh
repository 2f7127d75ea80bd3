#!/usr/bin/env bash
# Everything measured on one lent CUDA GPU, in one call (device time is short and each start
# costs minutes). Run from the project root on the GPU machine:
#
#   bash benchmarks/gpu_session.sh OUT [BUDGET_S]
#
# with the JPEG CIFAR-10 tarball and the wheels the machine lacks (grad-cam, ttach) in .gpu/.
# Phases, each bounded so that the packing at the end always runs:
#   1. throughput.py alone on the GPU (batch 512 compiled, 128 compiled, 128 eager), while the
#      data is decoded into the cache on one CPU core;
#   2. time_to_accuracy.py, the default recipe, seed 0, alone on the GPU: its seconds per epoch
#      are the reported ones (phase 3 starts beside it only if it outlasts its window);
#   3. side by side, figures of accuracy only: the default recipe with seed 1, recipe variants
#      at 8 epochs (eager, three at a time), the three scripts end to end on CUDA, and the
#      test suite on the CPU cores.
# OUT gets session.log, runs.tgz (every run's logs, metrics and reports) and the seed-0 best.pt
# without its optimizer state, in parts of 15 MB (cat them to rebuild it).
# DATA, EXTRA (flags appended to every train.py run) and SLOTS change it for a dry run.
# Ran once, 2026-11-26, on an H200 (README "Performance", benchmarks/recipes.md); the rows G2,
# G8-G14 of recipes.md came from three short calls after it, the same variant() by hand. Its runs
# take train.py's defaults, which were then `--lr 0.1 --cutout 8 --crop-pad 4`: run today, it
# measures today's recipe (and its cutout0 and lr0.2 variants are default8 again).
set -u
OUT=${1:?usage: gpu_session.sh OUT [BUDGET_S]}
BUDGET=${2:-560}
KEEP=25
DATA=${DATA:-.gpu/cifar10-jpg.tar.gz}
EXTRA=${EXTRA:-}
SLOTS=${SLOTS:-3}
W=${WORK:-/tmp/gpu-session}
source "$(dirname "$0")/gpu_setup.sh"
# The real-data tests look for ../shared/data/cifar10-jpg.tar.gz: linked there only where no such
# file is (never over one: a dry run on the CPU machine must leave its copy alone).
if [ ! -e ../shared/data/cifar10-jpg.tar.gz ]; then
    mkdir -p ../shared/data 2>/dev/null && ln -s "$(realpath "$DATA")" ../shared/data/cifar10-jpg.tar.gz 2>/dev/null
fi

say "phase 1: data decode (one CPU core) beside throughput.py (GPU)"
python3 -c "from common.data import load_splits; s = load_splits('$DATA'); print('decoded', len(s.train), len(s.test))" > "$W/decode.log" 2>&1 &
DECODE=$!
for flags in "--batch-size 512" "--batch-size 128" "--batch-size 128 --no-compile"; do
    say "throughput.py $flags"
    timeout $(($(left) < 110 ? $(left) : 110)) python3 benchmarks/throughput.py $flags ${TP_EXTRA:-} 2>&1 | grep -v Warning
done
wait $DECODE
cat "$W/decode.log"

say "phase 2: the default recipe, seed 0, alone on the GPU"
timeout $(left) python3 benchmarks/time_to_accuracy.py --data "$DATA" --out "$W/default_s0" -- --seed 0 $EXTRA \
    > "$W/default_s0.log" 2>&1 &
TIMED=$!
ALONE_UNTIL=${ALONE_UNTIL:-330}
while kill -0 $TIMED 2>/dev/null && [ "$(now)" -lt "$ALONE_UNTIL" ]; do sleep 2; done
kill -0 $TIMED 2>/dev/null && say "default_s0 still running: phase 3 starts beside it (its later epochs are not timed alone)"
cat "$W/default_s0.log"

say "phase 3: side by side"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 10 > "$W/gpu_use.csv" 2>/dev/null &
SMI=$!
timeout $(left) python3 benchmarks/time_to_accuracy.py --data "$DATA" --out "$W/default_s1" -- --seed 1 $EXTRA \
    > "$W/default_s1.log" 2>&1 &
SEED1=$!
variant() {  # NAME FLAGS...: an 8-epoch run of the default recipe with FLAGS changed (eager)
    local name=$1
    shift
    timeout $(left) python3 benchmarks/time_to_accuracy.py --data "$DATA" --out "$W/v_$name" -- \
        --epochs 8 --no-compile --logger none "$@" $EXTRA > "$W/v_$name.log" 2>&1
    echo "[$(now)s] v_$name: $(tail -n 1 "$W/v_$name.log")"
}
export -f variant now left
export START BUDGET KEEP DATA EXTRA W
(
    printf '%s\n' \
        "default8" \
        "epochs16 --epochs 16" \
        "cutout0 --cutout 0" \
        "lr0.2 --lr 0.2" \
        "ls0 --label-smoothing 0" \
        "batch64 --batch-size 64" \
        "nodecaynorms --no-decay-norms" \
        "batch256 --batch-size 256" \
        "epochs12 --epochs 12" \
        "lr0.05 --lr 0.05" \
        "wd2.5e-4 --weight-decay 2.5e-4" \
        "warmup0.1 --warmup 0.1" |
        xargs -P "$SLOTS" -I{} bash -c 'variant {}'
) &
VARIANTS=$!
(
    set -x
    R="$W/smoke"
    timeout $(left) python3 train.py --data "$DATA" --subset 2000 --epochs 2 --out "$R" ${SMOKE_EXTRA:-} &&
        timeout $(left) python3 evaluate.py --ckpt "$R/best.pt" --tta &&
        timeout $(left) python3 explain.py --ckpt "$R/best.pt" &&
        timeout $(left) python3 explain.py --ckpt "$R/best.pt" --layer layer4 --n 8 --method all \
            --out "$R/all-methods"
    echo "smoke rc=$?"
) > "$W/smoke.log" 2>&1 &
SMOKE=$!
if [ -n "${SKIP_TESTS:-}" ]; then
    echo "tests skipped (SKIP_TESTS)" > "$W/pytest.log"
elif python3 -c "import xdist" 2>/dev/null; then
    OMP_NUM_THREADS=2 timeout $(left) python3 -m pytest -q -n 4 -p no:cacheprovider tests > "$W/pytest.log" 2>&1
else
    OMP_NUM_THREADS=4 timeout $(left) python3 -m pytest -q -p no:cacheprovider tests > "$W/pytest.log" 2>&1
fi
say "pytest: $(tail -n 1 "$W/pytest.log")"
wait $SMOKE
say "smoke: $(tail -n 1 "$W/smoke.log")"
wait $VARIANTS $TIMED $SEED1
kill $SMI 2>/dev/null

say "packing"
cat "$W/default_s0.log" "$W/default_s1.log"
for f in "$W"/v_*.log; do echo "$(basename "$f" .log): $(grep '^epochs=' "$f" || tail -n 1 "$f")"; done
grep -E "passed|failed|error" "$W/pytest.log" | tail -n 3
for run in default_s0 smoke; do
    if [ -f "$W/$run/best.pt" ]; then
        python3 -c "import torch, sys; c = torch.load(sys.argv[1], weights_only=True); c.pop('optimizer', None); torch.save(c, sys.argv[2])" \
            "$W/$run/best.pt" "$W/gpu_best.pt" && (cd "$W" && split -b 15M -d gpu_best.pt "$OUT/${run}_best.pt.part") && break
    fi
done
tar czf "$OUT/runs.tgz" -C "$W" --exclude='*.pt' --exclude='*.npz' --exclude='all-methods/*.png' . 2>/dev/null
ls -la "$OUT"
say "done"
