#!/usr/bin/env bash
# The GPU check: one script for a bare, short-lived GPU machine.   bash bench/gpu/check.sh [--dry-run]
#
#   1. puts the wheels carried in .whl/ (`make gpu-wheels`: nflows, zarr, pytest and their dependencies) on
#      the path, without a package index and without touching the machine's own packages;
#   2. runs `pytest -m gpu` (CUDA vs CPU generation, CUDA graph replay vs eager, training steps, production,
#      the evaluation classifier, all on the GPU);
#   3. runs the GPU benchmarks (python -m bench.gpu.bench), writing $OUT/gpu_bench.json after every cell.
#
# Everything fits CHECK_BUDGET_S (default 480 s; dry run 110 s); every phase prints its progress; a run stopped at any
# moment leaves $OUT/pytest.txt and the benchmark cells done so far. --dry-run rehearses the same plan on
# the CPU at toy sizes (the GPU tests then skip), for CI.
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
BUDGET=${CHECK_BUDGET_S:-$( (( DRY )) && echo 110 || echo 480 )}
OUT=${OUT:-$PWD/out/gpu-check}
PY=${PYTHON:-python3}
if (( DRY )) && [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
mkdir -p "$OUT"
T0=$SECONDS
elapsed() { echo $(( SECONDS - T0 )); }
log() { echo "[gpu-check $(elapsed) s] $*"; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

log "plan ($( (( DRY )) && echo "dry run on the CPU" || echo "GPU run")): budget ${BUDGET} s, results in $OUT"
log "  1 wheels from .whl/ -> .whl/site   2 pytest -m gpu   3 python -m bench.gpu.bench"

# 1. wheels ------------------------------------------------------------------------------------------------
if (( DRY )); then
    log "1/3 wheels: dry run, using $PY as it is ($(ls .whl/*.whl 2>/dev/null | wc -l) wheels in .whl/ not unpacked)"
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
    log "1/3 wheels done"
fi
"$PY" -c "import torch, nflows, zarr; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/env.txt"

# 2. GPU tests ---------------------------------------------------------------------------------------------
TEST_S=$(( (BUDGET - $(elapsed)) / 4 ))
(( TEST_S < 45 )) && TEST_S=45
log "2/3 pytest -m gpu (at most ${TEST_S} s)"
timeout "$TEST_S" "$PY" -m pytest -m gpu -q -p no:cacheprovider -rs tests/test_gpu.py 2>&1 | tee "$OUT/pytest.txt"
TESTS=${PIPESTATUS[0]}
log "2/3 pytest exited $TESTS"

# 3. benchmarks --------------------------------------------------------------------------------------------
BENCH_S=$(( BUDGET - $(elapsed) - 15 ))
log "3/3 benchmarks (budget ${BENCH_S} s)"
ARGS=(--out "$OUT" --budget-s "$BENCH_S")
(( DRY )) && ARGS+=(--dry-run)
timeout $(( BENCH_S + 10 )) "$PY" -m bench.gpu.bench "${ARGS[@]}"
BENCH=$?
log "3/3 benchmarks exited $BENCH; results: $OUT/gpu_bench.json"
log "done in $(elapsed) s (pytest $TESTS, bench $BENCH)"
(( TESTS == 0 && BENCH == 0 ))
