#!/usr/bin/env bash
# The GPU check: one script for a bare, short-lived GPU machine.   bash bench/gpu/check.sh [--dry-run]
#
#   1. puts the wheels carried in .whl/ (`make gpu-wheels`: nflows, zarr, pytest and their dependencies) on
#      the path, without a package index and without touching the machine's own packages;
#   2. runs `pytest -m gpu` (CUDA vs CPU generation, CUDA graph replay vs eager, training steps, production,
#      the evaluation classifier, all on the GPU);
#   3. runs the GPU benchmarks (python -m bench.gpu.bench), writing $OUT/gpu_bench.json after every cell;
#   4. runs the convergence benchmark (python -m bench.fidelity --device cuda) at the reference DS2 preset, the
#      whole chain with budgets in minutes, in the last CHECK_FIDELITY_S seconds (default 240 s; dry run 120 s, --quick,
#      teachers only): $OUT/fidelity.json, its figures in $OUT/fidelity_figures, its step logs in
#      $OUT/fidelity_logs.
#
# Everything fits CHECK_BUDGET_S (default 570 s; dry run 240 s); every phase prints its progress; a run stopped at any
# moment leaves $OUT/pytest.txt and the benchmark cells done so far. --dry-run rehearses the same plan on
# the CPU at toy sizes (the GPU tests then skip), for CI.
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
BUDGET=${CHECK_BUDGET_S:-$( (( DRY )) && echo 240 || echo 570 )}
FIDELITY_S=${CHECK_FIDELITY_S:-$( (( DRY )) && echo 120 || echo 240 )}
OUT=${OUT:-$PWD/out/gpu-check}
PY=${PYTHON:-python3}
if (( DRY )) && [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
mkdir -p "$OUT"
T0=$SECONDS
elapsed() { echo $(( SECONDS - T0 )); }
log() { echo "[gpu-check $(elapsed) s] $*"; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

log "plan ($( (( DRY )) && echo "dry run on the CPU" || echo "GPU run")): budget ${BUDGET} s, results in $OUT"
log "  1 wheels from .whl/ -> .whl/site   2 pytest -m gpu   3 python -m bench.gpu.bench   4 python -m bench.fidelity"

# 1. wheels ------------------------------------------------------------------------------------------------
if (( DRY )); then
    log "1/4 wheels: dry run, using $PY as it is ($(ls .whl/*.whl 2>/dev/null | wc -l) wheels in .whl/ not unpacked)"
else
    # Unpacking a wheel onto sys.path is what installing it amounts to for these packages; numpy only when the
    # machine's is older than zarr needs.
    "$PY" - <<'PY' || exit 1
import glob, importlib.util, sys, zipfile
wheels = sorted(glob.glob(".whl/*.whl"))
missing = [m for m in ("nflows", "zarr", "pytest") if importlib.util.find_spec(m) is None]
if missing and not wheels:
    sys.exit(f"error: {', '.join(missing)} missing and .whl/ is empty: run `make gpu-wheels` before the GPU run")
try:
    import numpy
    old_numpy = int(numpy.__version__.split(".")[0]) < 2
except ImportError:
    old_numpy = True
for w in wheels:
    if w.split("/")[-1].startswith("numpy-") and not old_numpy:
        continue
    zipfile.ZipFile(w).extractall(".whl/site")
print(f"unpacked {len(wheels)} wheels into .whl/site (missing before: {', '.join(missing) or 'none'})")
PY
    export PYTHONPATH="$PWD/.whl/site:$PYTHONPATH"
    log "1/4 wheels done"
fi
"$PY" -c "import torch, nflows, zarr; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/env.txt"

# 2. GPU tests ---------------------------------------------------------------------------------------------
TEST_S=$(( (BUDGET - FIDELITY_S - $(elapsed)) / 3 ))
(( TEST_S < 45 )) && TEST_S=45
log "2/4 pytest -m gpu (at most ${TEST_S} s)"
timeout "$TEST_S" "$PY" -m pytest -m gpu -q -p no:cacheprovider -rs tests/test_gpu.py 2>&1 | tee "$OUT/pytest.txt"
TESTS=${PIPESTATUS[0]}
log "2/4 pytest exited $TESTS"

# 3. benchmarks --------------------------------------------------------------------------------------------
BENCH_S=$(( BUDGET - FIDELITY_S - $(elapsed) - 10 ))
log "3/4 benchmarks (budget ${BENCH_S} s)"
ARGS=(--out "$OUT" --budget-s "$BENCH_S")
(( DRY )) && ARGS+=(--dry-run)
timeout $(( BENCH_S + 10 )) "$PY" -m bench.gpu.bench "${ARGS[@]}"
BENCH=$?
log "3/4 benchmarks exited $BENCH; results: $OUT/gpu_bench.json"

# 4. convergence benchmark ---------------------------------------------------------------------------------
# Its data and models stay out of $OUT (they are large); on a machine kept warm a second run resumes them.
FID_S=$(( BUDGET - $(elapsed) - 5 ))
(( FID_S < 30 )) && FID_S=30  # timeout 0 would mean no limit at all
if (( DRY )); then
    WORK=$(mktemp -d)
    FID=(--quick --teachers-only --device cpu --jobs 2)
else
    WORK=${FIDELITY_WORK:-$PWD/out/gpu-fidelity}
    FID=(--preset ds2 --device cuda --train 6000 --heldout 3000 --jobs 4 --threads 2
         --budget flow1=minutes:0.75 --budget flow2=minutes:0.75 --budget flow3=minutes:1
         --budget flow2_student=minutes:0.5 --budget flow3_student=minutes:0.6)
fi
log "4/4 convergence benchmark (at most ${FID_S} s): work folder $WORK"
timeout -k 30 "$FID_S" "$PY" -m bench.fidelity --work "$WORK" --renormalised-only "${FID[@]}" \
    --out "$OUT/fidelity.json" --figures "$OUT/fidelity_figures" 2>&1 | tee "$OUT/fidelity.txt"
FIDELITY=${PIPESTATUS[0]}
mkdir -p "$OUT/fidelity_logs" && cp "$WORK"/logs/*.log "$OUT/fidelity_logs/" 2>/dev/null
(( DRY )) && rm -rf "$WORK"
log "4/4 convergence benchmark exited $FIDELITY; results: $OUT/fidelity.json"
log "done in $(elapsed) s (pytest $TESTS, bench $BENCH, fidelity $FIDELITY)"
(( TESTS == 0 && BENCH == 0 && FIDELITY == 0 ))
