#!/usr/bin/env bash
# The GPU check: one command, one prepared run on a lent GPU machine.
#
#   bash benchmarks/gpu_check.sh OUTDIR [--dry]
#
# Stages, each under `timeout` and a shared deadline (MARTHE_CHECK_BUDGET_S, default 345 s
# on a GPU, so that the whole check ends within 6 minutes): environment; backend build
# (the compiled CUDA extension JIT-built and cached, every backend smoke-tested); the GPU
# tests (pytest -m gpu); the kernel and step benchmark suites (one JSON per suite/model,
# so a stage cut short loses only its own numbers); ncu on one fused kernel when ncu
# exists; the results table; the torch.compile / torch.func HVP investigation
# (benchmarks/compile_hvp.py, its table in the log); last, with the time left, the ahead-of-time wheel build
# (setup.py) into a scratch folder. It prints a stage table and the targets table last.
#
# OUTDIR receives at most 7 files (the device tool returns 8 at most): gpu_check.log,
# bench_kernel.json, bench_step_{mlp,vgg11,resnet18}.json, RESULTS_gpu.md, ncu.txt.
#
# With --dry it runs without a GPU: GPU-only stages are skipped with the reason, the GPU
# tests are only collected (they skip), the benchmarks run on the CPU in quick mode. Use
# it to check the pipeline before spending device time (CI does, so the check cannot rot).
# Without --dry and without a CUDA device it stops at once (exit status 3). Exit status 1:
# a stage failed, timed out or found no time left.
set -u -o pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 OUTDIR [--dry]" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
DRY=0
[[ "${2:-}" == "--dry" ]] && DRY=1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
LOG="$OUT/gpu_check.log"
SCRATCH=$(mktemp -d)
: >"$LOG"
rm -f "$OUT"/bench_*.json "$OUT/RESULTS_gpu.md" "$OUT/ncu.txt"

if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif python3 -c "import torch" 2>/dev/null; then
    PY=python3
else
    PY="$ROOT/.venv/bin/python"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ $DRY == 0 ]] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$LOG" 2>&1; then
    # Stop at once rather than spend a lent machine's minutes on CPU benchmarks.
    {
        echo "no CUDA device visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)' 2>&1));"
        echo "nothing run. For a pipeline check without a GPU: $0 OUTDIR --dry"
        nvidia-smi 2>&1 | head -n 15
    } | tee -a "$LOG"
    exit 3
fi
if [[ $DRY == 1 ]]; then
    # Two shared CPU cores run the same stages far slower than the GPU machine.
    BUDGET=${MARTHE_CHECK_BUDGET_S:-1500}
    CAP_SCALE=4
    export MARTHE_BENCH_QUICK=1
else
    BUDGET=${MARTHE_CHECK_BUDGET_S:-345}
    CAP_SCALE=1
    unset TRITON_INTERPRET
    export MARTHE_GPU_TESTS=1
fi
export PY OUT ROOT
START=$(date +%s)
DEADLINE=$((START + BUDGET))
SUMMARY=()

# run_stage NAME CAP RESERVE CMD...: run CMD with a limit of min(CAP, time left - RESERVE)
# seconds (RESERVE keeps time for the stages after it), its output appended to the log.
# CMD may be a function of this script exported with `export -f`.
run_stage() {
    local name=$1 cap=$(($2 * CAP_SCALE)) reserve=$(($3 * CAP_SCALE))
    shift 3
    local now left limit t0 rc status detail first
    now=$(date +%s)
    left=$((DEADLINE - now - reserve))
    limit=$((cap < left ? cap : left))
    if ((limit < 5)); then
        SUMMARY+=("$(printf '%-16s %-9s %5s  %s' "$name" "no time" "-" "deadline reached")")
        echo "=== $name: skipped, no time left ===" >>"$LOG"
        return 0
    fi
    echo "=== $name (limit ${limit}s): $* ===" >>"$LOG"
    first=$(($(wc -l <"$LOG") + 1))
    t0=$(date +%s)
    if declare -F "$1" >/dev/null; then
        timeout -k 10 "$limit" bash -c "$1" >>"$LOG" 2>&1
    else
        timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
    fi
    rc=$?
    case $rc in
        0) status="ok" ;;
        124 | 137) status="TIMEOUT" ;;
        *) status="rc=$rc" ;;
    esac
    # pytest's last summary line ("3 failed, 70 passed in 50s"), when the stage was pytest.
    detail=""
    if [[ "$*" == *pytest* ]]; then
        detail=$(tail -n "+$first" "$LOG" | grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|errors?|deselected)" \
            | tail -n 1 | sed -e 's/=//g' -e 's/^ *//')
    fi
    SUMMARY+=("$(printf '%-16s %-9s %5ss  %s' "$name" "$status" "$(($(date +%s) - t0))" "$detail")")
    echo "=== $name: $status ===" >>"$LOG"
    return 0
}

skip_stage() {
    SUMMARY+=("$(printf '%-16s %-9s %5s  %s' "$1" "skipped" "-" "$2")")
    echo "=== $1: skipped: $2 ===" >>"$LOG"
}

env_info() {
    date -u
    git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || true
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton unavailable:", exc)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
EOF
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    echo "ncu: $(command -v ncu || echo none)  nsys: $(command -v nsys || echo none)"
}

export -f env_info
# Stage minimums reserved for what follows: tests 40, kernel 30, mlp 20, vgg11 25,
# resnet18 30, ncu 15, table 10.
run_stage env 20 170 env_info

export MARTHE_EXT_VERBOSE=1
run_stage build 150 170 "$PY" benchmarks/check_backends.py --failed-file "$SCRATCH/failed"
unset MARTHE_EXT_VERBOSE
FAILED=$(paste -sd, "$SCRATCH/failed" 2>/dev/null || true)
export MARTHE_BENCH_SKIP="$FAILED"
TEST_FILTER=()
if [[ -n "$FAILED" ]]; then
    # Skip what failed to build rather than rebuilding it in every test process.
    TEST_FILTER=(-k "not $(echo "$FAILED" | sed 's/,/ and not /g')")
fi

# In a dry run MARTHE_GPU_TESTS is unset: the GPU tests are collected and skip.
run_stage gpu-tests 90 140 "$PY" -m pytest -m gpu tests/ -q -p no:cacheprovider ${TEST_FILTER[@]+"${TEST_FILTER[@]}"}

BENCH_ARGS=(--benchmark-only -q -p no:cacheprovider --benchmark-columns=median,iqr,rounds
            --benchmark-sort=name)
run_stage bench-kernel 70 110 "$PY" -m pytest benchmarks/test_bench_kernel.py "${BENCH_ARGS[@]}" \
    --benchmark-json="$OUT/bench_kernel.json"
run_stage bench-mlp 40 90 "$PY" -m pytest benchmarks/test_bench_step.py -k "mlp" "${BENCH_ARGS[@]}" \
    --benchmark-json="$OUT/bench_step_mlp.json"
run_stage bench-vgg11 50 55 "$PY" -m pytest benchmarks/test_bench_step.py -k "vgg11" "${BENCH_ARGS[@]}" \
    --benchmark-json="$OUT/bench_step_vgg11.json"
run_stage bench-resnet18 60 25 "$PY" -m pytest benchmarks/test_bench_step.py -k "resnet18" \
    "${BENCH_ARGS[@]}" --benchmark-json="$OUT/bench_step_resnet18.json"

NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
NCU_BACKEND=triton
[[ ",$FAILED," == *",triton,"* ]] && NCU_BACKEND=cuda
if [[ $DRY == 1 ]]; then
    skip_stage ncu "dry run (no GPU)"
elif [[ -z "$NCU" ]]; then
    skip_stage ncu "ncu not found"
elif [[ ",$FAILED," == *",$NCU_BACKEND,"* ]]; then
    skip_stage ncu "no fast backend built"
else
    ncu_run() {
        "$NCU" --clock-control none --profile-from-start off \
            --section SpeedOfLight --section MemoryWorkloadAnalysis \
            "$PY" benchmarks/profile_kernel.py --backend "$NCU_BACKEND" --dynamics adam \
            --numel 67108864 >"$OUT/ncu.txt" 2>&1
        local rc=$?
        tail -n 40 "$OUT/ncu.txt"
        return $rc
    }
    export -f ncu_run
    export NCU NCU_BACKEND
    run_stage ncu 40 10 ncu_run
fi

JSONS=()
for f in "$OUT"/bench_kernel.json "$OUT"/bench_step_mlp.json "$OUT"/bench_step_vgg11.json "$OUT"/bench_step_resnet18.json; do
    [[ -s "$f" ]] && JSONS+=("$f")
done
if [[ ${#JSONS[@]} -gt 0 ]]; then
    run_stage table 15 0 "$PY" -m benchmarks.results_table "${JSONS[@]}" \
        --out "$OUT/RESULTS_gpu.md" --title "marthe_ext benchmark results (GPU check)"
else
    skip_stage table "no benchmark JSON was written"
fi

# Issue 7's torch.compile / torch.func investigation: a table in the log, with what fails.
COMPILE_MODELS=mlp,resnet18
[[ $DRY == 1 ]] && COMPILE_MODELS=mlp
run_stage compile-hvp 60 0 "$PY" benchmarks/compile_hvp.py --models "$COMPILE_MODELS" --rounds 10

if [[ $DRY == 1 ]]; then
    skip_stage wheel-build "dry run"
elif [[ ! -f setup.py ]]; then
    skip_stage wheel-build "no setup.py"
else
    run_stage wheel-build 150 0 "$PY" -m pip wheel --no-build-isolation --no-deps --no-index \
        -w "$SCRATCH/wheel" .
fi

{
    echo
    echo "GPU check: $((($(date +%s) - START)))s, $([[ $DRY == 1 ]] && echo "DRY RUN (no GPU)" || echo "GPU run"), outputs in $OUT"
    [[ -n "$FAILED" ]] && echo "backends that failed to build or run: $FAILED (see gpu_check.log)"
    printf '%-16s %-9s %6s  %s\n' stage status time detail
    printf '%s\n' "${SUMMARY[@]}"
    echo
    if [[ ${#JSONS[@]} -gt 0 ]]; then
        "$PY" -m benchmarks.results_table "${JSONS[@]}" --short 2>&1
    fi
} | tee -a "$LOG"
rm -rf "$SCRATCH"
# A stage that failed, timed out or found no time left fails the check (CI runs --dry).
if printf '%s\n' "${SUMMARY[@]}" | grep -qE '^[^ ]+ +(TIMEOUT|rc=[0-9]+|no time) '; then
    echo "GPU check: a stage did not pass (see the table above and $LOG)" >&2
    exit 1
fi
