#!/usr/bin/env bash
# GPU checks for one H200 session, sized to fit one device call (at most 560 s of step limits), most
# telling first: the kernel tests (compiled for real), the log-prob and attention benchmarks against their
# targets, the engine's GPU tests, a short trainer run end to end, the train-step benchmark.
#
#   OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh
#
# Each step runs under its own timeout; a failing step does not stop the next. Logs, JSON, markdown and
# PNGs are collected in a work folder and packed into $OUT/gpu_results.tar.gz after every step; $OUT also
# gets summary.txt (every step's exit code and duration) and tails.txt (the last lines of every log): three
# files, within the device tool's limits. Copy the figures into benchmarks/RESULTS.md with the date and GPU.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
SCRATCH=$(mktemp -d)  # big outputs (datasets, checkpoints) stay out of the tarball
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
# Attention tile sizes are timed only in bench_attention; elsewhere the first candidate that launches.
export PYTHONUNBUFFERED=1 FSPO_ATTN_AUTOTUNE=0
PY=$(command -v python3 || command -v python)

pack() { tar czf "$OUT/gpu_results.tar.gz" -C "$WORK" . 2>/dev/null; }
step() {  # step NAME TIMEOUT_S COMMAND...: run, log to NAME.log, record the exit code, repack
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s (limit ${limit}s)" | tee -a "$SUMMARY"
    { echo "===== $name (rc=$rc)"; tail -n 40 "$WORK/$name.log"; } >>"$OUT/tails.txt"
    pack
}

: >"$OUT/tails.txt"
nvidia-smi >"$WORK/nvidia-smi.txt" 2>&1
step install 45 "$PY" -m pip install --no-index --no-deps --no-build-isolation -e .
if ! "$PY" -c "import fspo_engine.kernels" 2>>"$SUMMARY"; then
    # The editable install failed: expose the top-level folders as the fspo_engine namespace by hand.
    mkdir -p "$SCRATCH/site/fspo_engine"
    for d in engine kernels data_gen cli benchmarks; do ln -s "$PWD/$d" "$SCRATCH/site/fspo_engine/$d"; done
    export PYTHONPATH="$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "install fallback: PYTHONPATH=$SCRATCH/site" | tee -a "$SUMMARY"
fi
"$PY" -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())" \
    | tee "$WORK/versions.txt" >>"$SUMMARY" 2>&1

# 1. The kernels' `gpu` tests, log-probs first: both Triton kernels compiled for real against the float64
#    reference (fp32, fp16, bf16), bitwise repeatability, the plain paths on CUDA.
step pytest_kernels 150 "$PY" -m pytest -m gpu tests/kernels/test_logprobs.py tests/kernels/test_attention.py \
    -q -rs --durations=15

# 2. linear_logprob_sums at V=128,256, H=4096, bf16: ours (Triton, then the tiled cuBLAS path) vs the
#    3-matmul floor, naive, Liger / CCE when installed, torch.compile, the loss-in-forward variants.
step bench_kernels 90 "$PY" -m fspo_engine.benchmarks.bench_kernels --tokens 4096,16384 --hidden 4096 \
    --reps 3 --out "$WORK/bench_kernels"

# 3. prefix_shared_attention fwd+bwd on FSPO rows (8B heads, bf16, 16k rows), tiles timed: ours vs the
#    official duplicated-context layout (SDPA flash) vs one plain causal document vs compiled flex_attention.
step bench_attention 100 env FSPO_ATTN_AUTOTUNE=1 "$PY" -m fspo_engine.benchmarks.bench_attention --rows 16384 \
    --reps 5 --warmup 2 --out "$WORK/attention"

# 4. The engine's `gpu` tests: packed log-probs through both kernels against transformers on CUDA.
step pytest_engine 45 "$PY" -m pytest -m gpu tests/engine -q -rs --durations=10

# 5. The trainer end to end on CUDA (bf16 autocast, both Triton kernels inside the model): a short
#    quickstart-shaped run with held-out evaluation, then eval. Catches integration errors the op-level
#    tests cannot. Only its metrics, plots and eval report join the results.
step train_smoke 70 bash -c "'$PY' -m fspo_engine.cli.main gen-data --out '$SCRATCH/qs_data' --preset quickstart \
    --users 80 >/dev/null && '$PY' -m fspo_engine.cli.main train --data '$SCRATCH/qs_data' --out '$SCRATCH/qs_run' \
    --max-steps 30 --set run.progress=false --set run.eval_every=10 && \
    '$PY' -m fspo_engine.cli.main eval --model '$SCRATCH/qs_run' --data '$SCRATCH/qs_data' --shots 0,8; \
    rc=\$?; mkdir -p '$WORK/train_smoke'; \
    cp '$SCRATCH/qs_run'/{metrics.jsonl,loss_curve.png,eval.json,eval.png,config.toml} '$WORK/train_smoke/' 2>/dev/null; \
    exit \$rc"

# 6. One IPO training step, Llama-3.2-1B shapes: packed + fused kernels vs the official padded layout on
#    transformers (one episode per micro-batch, full logits, reference forward every step).
step bench_train 60 "$PY" -m fspo_engine.benchmarks.bench_train --size 1B --episodes 8 --steps 2 \
    --out "$WORK/bench_train"

pack
rm -rf "$SCRATCH"
echo "done: $OUT/gpu_results.tar.gz" | tee -a "$SUMMARY"
