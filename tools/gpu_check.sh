#!/usr/bin/env bash
# The GPU check, for one call on a machine with one CUDA GPU (every step capped, about 525 s of
# caps in all, which the steps rarely reach, so the whole stays within about 8 minutes on an
# H100; the kernel tests and benchmarks alone take at most 250 s): tools/bench_train.py on the
# Small config (Triton kernels with CUDA graphs, profiled, beside the Hugging Face peer; Triton without graphs; torch's ops without and with
# graphs; graphs with 2 micro-batches of 32 sequences instead of 8 of 8) and the Base config
# (CUDA graphs, beside the peer), bf16, dropout 0; the memory check (measured peak beside the
# validator's estimate) on the Large config; pretrain_gpt.py on the tiny model (bf16,
# CUDA graphs, a checkpoint and a resume); the kernel tests compiled for the GPU (no interpreter;
# the GPU-only bf16 and autotuning tests included); tools/bench_kernels.py (full, or --quick with
# QUICK=1; each call timed as made and its device work alone, from CUDA graph replays); and
# tools/bench_host_overhead.py (the kernels' host code on this machine's CPU).
# Writes environment.txt, kernel_tests.log, bench_kernels.{txt,json,err},
# bench_host_overhead.{txt,json}, bench_train_*.{txt,json}
# to runs/gpu_check/; when $OUT is set (the device tool brings back at most 8 files) it also packs
# them into $OUT/gpu_check.tgz and copies the text reports beside it, after every step (a run cut
# off by the device's limit still brings back what finished). Each step runs even when an
# earlier one failed; each step's exit status and seconds against its cap are added to
# environment.txt (`timeout -k`: a step that ignores or outlives its SIGTERM, as a trainer saving
# a checkpoint does, is killed 10 s later); the exit status is non-zero when any failed.
#   usage: bash tools/gpu_check.sh        (PYTHON=... to pick the interpreter; default python3;
#                                          GPU_CHECK_DIR=... for another folder than runs/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${GPU_CHECK_DIR:-runs/gpu_check}"
rm -rf "$out_dir"
mkdir -p "$out_dir"
pack() {
  [ -n "${OUT:-}" ] || return 0
  tar czf "$OUT/.gpu_check.tgz.tmp" -C "$out_dir" . && mv "$OUT/.gpu_check.tgz.tmp" "$OUT/gpu_check.tgz"
  cat "$out_dir"/bench_train_*.txt >"$OUT/bench_train.txt" 2>/dev/null
  cp "$out_dir/environment.txt" "$out_dir/kernel_tests.log" "$out_dir/bench_kernels.txt" \
    "$out_dir/bench_host_overhead.txt" "$OUT/" 2>/dev/null
  return 0
}
trap pack EXIT
python="${PYTHON:-python3}"
capped() {   # name, seconds, command...: run it under its cap; returns its exit status
  local name=$1 cap=$2 start=$SECONDS rc
  shift 2
  timeout -k 10 "$cap" "$@"
  rc=$?
  echo "gpu_check: $name exit $rc in $((SECONDS - start)) s (cap $cap s)" >>"$out_dir/environment.txt"
  return $rc
}
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$python" -c "import torch, triton; print('torch', torch.__version__, 'triton', \
triton.__version__, 'cuda available', torch.cuda.is_available())"
} 2>&1 | tee "$out_dir/environment.txt"

# megagpt.kernels is the kernels/ folder through setup.py's package_dir. Where the package is not
# installed (a bare GPU machine without network, where `pip install -e .` cannot fetch its build
# backend), a link megagpt/kernels -> ../kernels stands in for it while the check runs.
if ! "$python" -c "import megagpt.kernels" 2>/dev/null; then
  ln -s ../kernels megagpt/kernels && trap 'rm -f megagpt/kernels; pack' EXIT
  echo "gpu_check: megagpt.kernels linked to kernels/ for this run" | tee -a "$out_dir/environment.txt"
fi

# Training first (the figures that matter most), then the GPU tests, then the kernel benchmark.
train_rc=0
bench_train() {   # name, seconds, config, extra arguments
  local name=$1 seconds=$2 config=$3
  shift 3
  capped "train $name" "$seconds" "$python" tools/bench_train.py --config "$config" --steps 5 --warmup 2 \
    --model.dropout=0 --json "$out_dir/bench_train_$name.json" "$@" 2>&1 \
    | tee "$out_dir/bench_train_$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || train_rc=$rc
  pack
}
# Small and Base with CUDA graphs beside the Hugging Face peer (the speed-up and MFU figures);
# Small without graphs, with Triton and with torch's ops, and torch's ops with graphs; the memory
# check on Large.
bench_train small_graphs 60 configs/training/small_model.json --training.cuda_graphs=true --profile
bench_train small_triton 25 configs/training/small_model.json --no-peer
torch_ops="--kernels.attention=sdpa --kernels.layernorm=torch --kernels.softmax=torch
  --kernels.bias_gelu=torch --kernels.cross_entropy=torch"
# shellcheck disable=SC2086
bench_train small_torch 20 configs/training/small_model.json --no-peer $torch_ops
# torch's ops with CUDA graphs: device time against device time, the kernels' worth in a step
# shellcheck disable=SC2086
bench_train small_torch_graphs 20 configs/training/small_model.json --no-peer $torch_ops \
  --training.cuda_graphs=true
# The same 65,536 tokens a step in 2 micro-batches of 32 sequences, as a card this size allows.
bench_train small_graphs_mb32 25 configs/training/small_model.json --no-peer \
  --training.cuda_graphs=true --training.batch_size=32 --training.grad_accumulation_steps=2
bench_train base_graphs 50 configs/training/base_model.json --training.cuda_graphs=true
bench_train large_memory 30 configs/training/large_model.json --no-peer --steps 2 --warmup 1 \
  --training.grad_accumulation_steps=2

# The real entry point on the GPU: 30 steps of the tiny model (bf16, CUDA graphs) with a
# checkpoint at 15 written in the background (checkpoint.async_save: copied from the device),
# then a resume to step 40 (the checkpoints stay outside what is packed).
pretrain() {   # max_steps, extra arguments
  local steps=$1
  shift
  capped "pretrain to $steps" 22 "$python" pretrain_gpt.py --config configs/training/tiny_model.json \
    --data.mock=true --data.num_workers=0 --parallel.world_size=1 \
    --parallel.tensor_parallel_size=1 --parallel.pipeline_parallel_size=1 \
    --training.precision=bf16 --training.cuda_graphs=true --training.max_steps="$steps" \
    --training.eval_interval=15 --training.log_interval=5 --checkpoint.save_interval=15 \
    --logging.run_dir=/tmp/gpu_check_pretrain --checkpoint.save_dir=/tmp/gpu_check_pretrain/ckpt \
    --logging.tensorboard=false "$@" 2>&1 | tee -a "$out_dir/bench_train_pretrain.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || train_rc=$rc
}
rm -rf /tmp/gpu_check_pretrain
pretrain 30 --checkpoint.async_save=true
pretrain 40
pack

# Compiling the kernels takes most of the tests' time: spread them over processes (xdist).
# Then the other GPU-only tests (CUDA graphs, sampling a GPU model).
parallel=""
if "$python" -c "import xdist" 2>/dev/null; then parallel="-n 8"; fi
# shellcheck disable=SC2086
capped "kernel tests" 110 "$python" -m pytest tests/kernels tests/integration/test_cuda_graphs.py \
  tests/unit/test_generation.py::test_a_cpu_generator_samples_for_a_gpu_model_as_for_a_cpu_one -v -ra \
  -p no:cacheprovider $parallel 2>&1 | tee "$out_dir/kernel_tests.log"
tests_rc=${PIPESTATUS[0]}
pack

quick=""
if [ "${QUICK:-0}" = "1" ]; then quick="--quick"; fi
# shellcheck disable=SC2086
capped "kernel benchmark" 120 "$python" tools/bench_kernels.py --json "$out_dir/bench_kernels.json" $quick \
  2>"$out_dir/bench_kernels.err" | tee "$out_dir/bench_kernels.txt"
bench_rc=${PIPESTATUS[0]}
pack

# The host code a kernel call costs on this machine's CPU (launches stubbed; about 10 s).
capped "host overhead" 20 "$python" tools/bench_host_overhead.py --calls 100 --rounds 5 \
  --json "$out_dir/bench_host_overhead.json" 2>&1 | tee "$out_dir/bench_host_overhead.txt"
host_rc=${PIPESTATUS[0]}

echo "gpu_check: kernel tests exit $tests_rc, kernel benchmark exit $bench_rc, host overhead" \
  "exit $host_rc, training benchmark exit $train_rc (124: timed out, 137: killed 10 s after" \
  "that); files in $out_dir"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$host_rc" -eq 0 ] && [ "$train_rc" -eq 0 ]
