#!/usr/bin/env bash
# The kernels' GPU check, for one call on a machine with one CUDA GPU (sized to finish well under
# 6 minutes on an H100; typically 2-3): the kernel tests compiled for the GPU (no interpreter; the
# GPU-only bf16 tests included), then tools/bench_kernels.py (full, or --quick with QUICK=1).
# Writes environment.txt, kernel_tests.log, bench_kernels.txt, bench_kernels.json and
# bench_kernels.err to $OUT when it is set, else to runs/gpu_check/. The benchmark runs even when
# tests fail; the exit status is non-zero when either failed.
#   usage: bash tools/gpu_check.sh        (PYTHON=... to pick the interpreter; default python3)
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-runs/gpu_check}"
mkdir -p "$out_dir"
python="${PYTHON:-python3}"
unset TRITON_INTERPRET

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$python" -c "import torch, triton; print('torch', torch.__version__, 'triton', \
triton.__version__, 'cuda available', torch.cuda.is_available())"
} 2>&1 | tee "$out_dir/environment.txt"

# megagpt.kernels is the kernels/ folder through setup.py's package_dir: install it if needed.
if ! "$python" -c "import megagpt.kernels" 2>/dev/null; then
  "$python" -m pip install --quiet --no-deps --no-build-isolation -e . \
    >>"$out_dir/environment.txt" 2>&1 \
    || echo "gpu_check: 'pip install -e .' failed" | tee -a "$out_dir/environment.txt"
fi

# Compiling the kernels takes most of the tests' time: spread them over processes (xdist).
parallel=""
if "$python" -c "import xdist" 2>/dev/null; then parallel="-n 8"; fi
# shellcheck disable=SC2086
timeout 180 "$python" -m pytest tests/kernels -q -ra -p no:cacheprovider $parallel 2>&1 \
  | tee "$out_dir/kernel_tests.log"
tests_rc=${PIPESTATUS[0]}

quick=""
if [ "${QUICK:-0}" = "1" ]; then quick="--quick"; fi
# shellcheck disable=SC2086
timeout 150 "$python" tools/bench_kernels.py --json "$out_dir/bench_kernels.json" $quick \
  2>"$out_dir/bench_kernels.err" | tee "$out_dir/bench_kernels.txt"
bench_rc=${PIPESTATUS[0]}

echo "gpu_check: kernel tests exit $tests_rc, benchmark exit $bench_rc (124: timed out);" \
  "files in $out_dir"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
