#!/usr/bin/env bash
# GPU checks for one H200 session: install, the `gpu` kernel tests, the kernel benchmarks.
# Run from the repository root; everything lands under $OUT (logs, JSON, markdown, PNG).
# A plain sequence of steps: each runs under its own timeout and a failing step does not stop the
# next one; summary.txt lists every step's exit code. Append new steps at the end.
#
#   OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, record the exit code
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$SUMMARY"
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
step install 180 pip install --no-index --no-deps --no-build-isolation -e .
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
    >"$OUT/versions.txt" 2>&1

# 1. Kernel tests compiled for real (the interpreter ran them on CPU before).
step pytest_gpu_kernels 300 python -m pytest -m gpu tests/kernels -q -rs

# 2. linear_logprob_sums: time and peak memory against naive / torch.compile / Liger / CCE / the
#    3-matmul floor, bf16, V=128,256. H=4096 only here to fit the device budget; the full H sweep is
#    the benchmark's default (`fspo-engine bench kernels`). TRITON_PRINT_AUTOTUNING logs the configs.
step bench_kernels 420 env TRITON_PRINT_AUTOTUNING=1 python -m fspo_engine.benchmarks.bench_kernels \
    --tokens 4096,16384,32768 --hidden 4096 --reps 3 --out "$OUT/bench_kernels"

# 3. prefix_shared_attention (issue 7). Its `gpu` tests ran in step 1; these are the interpreter tests
#    (odd shapes, GQA 1/4/8, shuffled ids, skewed tiles) compiled for real, with untimed tile sizes.
step pytest_attention_compiled 240 python -m pytest tests/kernels/test_attention.py -m "not gpu" -q -rs
# 4. Attention fwd+bwd on FSPO rows (8B heads: Hq=32, Hkv=8, D=128, bf16; rows 16k and 32k): ours vs
#    compiled flex_attention vs the official duplicated-context layout (SDPA flash) vs one plain causal
#    document. Tile sizes are timed on first use (FSPO_ATTN_AUTOTUNE=1, the default).
step bench_attention 420 python -m fspo_engine.benchmarks.bench_attention --rows 16384,32768 --reps 5 \
    --warmup 2 --out "$OUT/attention"
