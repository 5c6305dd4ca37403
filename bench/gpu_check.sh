#!/usr/bin/env bash
# The GPU check, one device call (< 10 min): install what the image lacks (wheels carried in .whl/: numpy 2.4.x,
# which numba-cuda needs, and gguf), run the `cuda` tests for real, build the two same-shape random-weight
# models, run bench/e2e_gpu.py (table on stdout, JSON + PNG in $OUT; its CPU runs are left to the next step), then
# `pyquant bench --device cpu,cuda` on each built GGUF (bench_NAME.json + .png in $OUT; this image has no
# llama-cpp-python: that row says so) and `pyquant run --device cuda`.
#   bash bench/gpu_check.sh            E2E_ARGS="--no-cpu --models qwen" bash bench/gpu_check.sh
#   E2E_ARGS= bash bench/gpu_check.sh    (bench/e2e_gpu.py with its CPU runs too)
#   BENCH_ARGS="-r 3" bash bench/gpu_check.sh   (more repetitions than the 2 the time budget allows)
#   BASE=.base bash bench/gpu_check.sh   (also times the code in .base, e.g. `git archive HEAD~3 | tar -x -C .base`)
#   PYTEST_ARGS= bash bench/gpu_check.sh  (every test, not stopping at the first failure)
#   KERNELS=1 bash bench/gpu_check.sh     (also bench/kernels_cuda.py: decode GEMV launch shapes, attention variants)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pyquant-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import numpy, numba, numba.cuda as c, torch; print('numpy', numpy.__version__, 'numba', numba.__version__, \
'torch', torch.__version__, c.get_current_device().name)"
rc=0
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -m cuda ${PYTEST_ARGS--x} tests/test_kernels_cuda.py -p no:cacheprovider 2>&1 \
    | tee "$OUT/tests.log" | tail -25 || rc=1
timeout ${E2E_TIMEOUT:-420} python3 bench/e2e_gpu.py --out "$OUT" ${E2E_ARGS---no-cpu} 2>&1 | tee "$OUT/e2e.log" \
    | tail -40 || rc=1
for name in qwen gemma; do  # the user-facing command on the files e2e_gpu.py built
    gguf=/tmp/pyquant-e2e/$name-q4_k_m.gguf
    [ -f "$gguf" ] || continue
    timeout ${BENCH_TIMEOUT:-240} python3 -m pyquant.cli bench -m "$gguf" --device cpu,cuda -t 16 ${BENCH_ARGS:--r 2} \
        --json "$OUT/bench_$name.json" --plot "$OUT/bench_$name.png" 2>&1 | tee "$OUT/bench_$name.log" | tail -14 \
        || rc=1
done
if [ -n "${KERNELS:-}" ]; then  # decode kernel variants (bench/kernels_cuda.py), each checked, then timed
    timeout ${KERNELS_TIMEOUT:-200} python3 bench/kernels_cuda.py --json "$OUT/kernels.json" 2>&1 \
        | grep -v Warning | tail -30 || rc=1
fi
if [ -n "${BASE:-}" ]; then  # a baseline checkout (git archive of an older commit), timed on the same machine
    timeout ${BASE_TIMEOUT:-300} python3 bench/e2e_gpu.py --code "$BASE" --no-peer --no-cpu --out "$OUT/base" \
        ${BASE_ARGS:-} 2>&1 | tee "$OUT/base.log" | tail -20 || rc=1
fi
gguf=/tmp/pyquant-e2e/qwen-q4_k_m.gguf
if [ -f "$gguf" ]; then
    timeout 120 python3 -m pyquant.cli run --device cuda -m "$gguf" -p "Hello" -n 16 --temp 0 2>&1 | tail -3 || rc=1
fi
exit $rc
