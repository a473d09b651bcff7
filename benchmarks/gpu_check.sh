#!/usr/bin/env bash
# GPU checks for one H200 session, sized to fit one device call (at most 570 s of step limits):
# install, every `gpu` test (kernels compiled for real, bf16 numerics, the packed-vs-transformers
# invariant on CUDA), then the kernel, attention and train-step benchmarks.
#
#   OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh
#
# Each step runs under its own timeout; a failing step does not stop the next. Logs, JSON, markdown and
# PNGs are collected in a work folder and packed into $OUT/gpu_results.tar.gz after every step (the device
# tool returns at most 8 files), with $OUT/summary.txt listing every step's exit code and duration.
# Copy the figures into benchmarks/RESULTS.md with the date and the GPU.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1 FSPO_ATTN_AUTOTUNE=${FSPO_ATTN_AUTOTUNE:-1}

pack() { tar czf "$OUT/gpu_results.tar.gz" -C "$WORK" . 2>/dev/null; }
step() {  # step NAME TIMEOUT_S COMMAND...: run, log to NAME.log, record the exit code, repack
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s (limit ${limit}s)" | tee -a "$SUMMARY"
    tail -n 40 "$WORK/$name.log" >"$WORK/$name.tail.txt"
    pack
}

nvidia-smi >"$WORK/nvidia-smi.txt" 2>&1
step install 60 pip install --no-index --no-deps --no-build-isolation -e .
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())" \
    | tee "$WORK/versions.txt" >>"$SUMMARY" 2>&1

# 1. Every `gpu` test: both Triton kernels compiled for real against the float64 reference (fp32, fp16,
#    bf16), bitwise repeatability, and packed log-probs against transformers on CUDA.
step pytest_gpu 150 python -m pytest -m gpu tests -q -rs -x

# 2. linear_logprob_sums at V=128,256, H=4096, bf16: ours vs naive / torch.compile / Liger / CCE when
#    installed, and the 3-matmul floor; time and peak memory.
step bench_kernels 100 python -m fspo_engine.benchmarks.bench_kernels --tokens 4096,16384 --hidden 4096 \
    --reps 3 --out "$WORK/bench_kernels"

# 3. prefix_shared_attention fwd+bwd on FSPO rows (8B heads, bf16, 16k rows): ours vs compiled
#    flex_attention vs the official duplicated-context layout (SDPA flash) vs one plain causal document.
step bench_attention 100 python -m fspo_engine.benchmarks.bench_attention --rows 16384 --reps 5 --warmup 2 \
    --out "$WORK/attention"

# 4. One IPO training step, Llama-3.2-1B shapes: packed + fused kernels vs the official padded layout
#    on transformers (full logits, reference forward every step).
step bench_train 80 python -m fspo_engine.benchmarks.bench_train --size 1B --episodes 8 --steps 3 \
    --out "$WORK/bench_train"

# 5. The trainer end to end on CUDA (bf16 autocast, both Triton kernels inside the model): a short
#    quickstart-shaped run, then eval. Catches integration errors the op-level tests cannot.
step train_smoke 80 bash -c "fspo-engine gen-data --out $WORK/qs_data --preset quickstart --users 80 >/dev/null && \
    fspo-engine train --data $WORK/qs_data --out $WORK/qs_run --max-steps 30 --set run.progress=false && \
    fspo-engine eval --model $WORK/qs_run --data $WORK/qs_data --shots 0,8"

cp "$WORK"/*.tail.txt "$OUT"/ 2>/dev/null || true
pack
echo "done: $OUT/gpu_results.tar.gz" | tee -a "$SUMMARY"
