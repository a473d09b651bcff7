#!/usr/bin/env bash
# The one GPU call (one H200, one command of at most 10 minutes): what matters first, each step under its
# own limit. The limits total 455 s (7.6 min), leaving a cold start (imports, CUDA context, Triton's first
# compiles) room inside a 600 s call:
#
#   OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh          # device tool: timeout_s=600
#
#   setup        20 s  editable install, versions, nvidia-smi, Liger-Kernel / cut-cross-entropy from the wheels
#                      in benchmarks/wheels/ (the GPU image has no registry)
#   1 kernels    90 s  linear_logprob_sums at V=128,256, H=4096, bf16, T=4096 and 16384: ours (Triton) vs the
#                      3-GEMM floor vs the tiled cuBLAS torch path (then naive, for the memory ratio); the
#                      tiles the autotuner chose, the vocab split plan, the grad-hidden GEMM path, a
#                      profiler table per shape
#   2 attention 120 s  prefix_shared_attention fwd+bwd on a 16k FSPO row (8B heads, bf16, tiles timed): ours vs
#                      the official duplicated-context layout vs compiled flex_attention (then a plain causal
#                      row); chosen tiles, profiler table
#   3 train      70 s  one IPO step, Llama-3.2-1B shapes: packed rows + our kernels vs the official layout
#   4 tests     100 s  in parallel: the kernels' and the engine's `gpu` tests (compiled kernels vs float64) and
#                      a short trainer run end to end; pytest-timeout per test, each job cut by SIGINT so that
#                      pytest still prints its summary
#   5 peers      55 s  T=4096: ours again beside Liger-Kernel, cut-cross-entropy with and without its gradient
#                      filter, and the naive path (same process: side-by-side ratios)
#
# Tests, the train step and the trainer run pin tile configs (FSPO_AUTOTUNE=0: fewer compiles, and the same
# tiles as any later run); the two kernel benchmarks time them. Logs, JSON, markdown, PNGs and profiles are
# collected in a work folder and packed into $OUT/gpu_results.tar.gz after every step; $OUT also gets
# summary.txt (each step's exit code and duration) and tails.txt (the end of every log). Copy the figures
# into benchmarks/RESULTS.md with the date and GPU.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
SCRATCH=$(mktemp -d)  # big outputs (datasets, checkpoints) and the peers' install stay out of the tarball
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
: >"$OUT/tails.txt"
export PYTHONUNBUFFERED=1
PY=$(command -v python3 || command -v python)

pack() { tar czf "$OUT/gpu_results.tar.gz" -C "$WORK" . 2>/dev/null; }
log_tail() { { echo "===== $1 (rc=$2)"; tail -n 40 "$WORK/$1.log"; } >>"$OUT/tails.txt"; }
step() {  # step NAME LIMIT_S COMMAND...: run under a SIGINT limit (SIGKILL 10 s later), log, record, repack
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout -s INT -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s (limit ${limit}s)" | tee -a "$SUMMARY"
    log_tail "$name" "$rc"
    pack
}

# ---- setup (20 s)
t0=$SECONDS
nvidia-smi >"$WORK/nvidia-smi.txt" 2>&1
timeout 15 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$WORK/install.log" 2>&1
# Probe a real attribute: fspo_engine.kernels is a namespace package, which any folder of that name would satisfy.
if ! "$PY" -c "from fspo_engine.kernels.logprobs import linear_logprob_sums" 2>>"$WORK/install.log"; then
    # The editable install failed: expose the top-level folders as the fspo_engine namespace by hand.
    mkdir -p "$SCRATCH/site/fspo_engine"
    for d in engine kernels data_gen cli benchmarks configs; do ln -s "$PWD/$d" "$SCRATCH/site/fspo_engine/$d"; done
    export PYTHONPATH="$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "install fallback: PYTHONPATH=$SCRATCH/site" | tee -a "$SUMMARY"
fi
# Peers for step 5 only, from the committed wheels (pure Python; their own Triton kernels JIT-compile).
timeout 10 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SCRATCH/peers" \
    benchmarks/wheels/*.whl >>"$WORK/install.log" 2>&1 || echo "peer wheels: install failed" >>"$SUMMARY"
"$PY" -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())" \
    2>&1 | tee "$WORK/versions.txt" >>"$SUMMARY"
echo "setup $((SECONDS - t0))s (limit 20s)" | tee -a "$SUMMARY"

# ---- 1. log-prob headline (90 s)
step bench_kernels 90 "$PY" -m fspo_engine.benchmarks.bench_kernels --tokens 4096,16384 --hidden 4096 \
    --variants ours,floor,ours_torch,naive --reps 5 --profile --out "$WORK/bench_kernels"

# ---- 2. attention headline (120 s); FSPO_ATTN_AUTOTUNE=1: tiles timed per shape
step bench_attention 120 env FSPO_ATTN_AUTOTUNE=1 "$PY" -m fspo_engine.benchmarks.bench_attention --rows 16384 \
    --variants ours,official,flex,plain --reps 5 --warmup 2 --profile --out "$WORK/attention"

# ---- 3. end-to-end step against the official layout (70 s)
step bench_train 70 env FSPO_AUTOTUNE=0 "$PY" -m fspo_engine.benchmarks.bench_train --size 1B --episodes 8 \
    --steps 2 --out "$WORK/bench_train"

# ---- 4. tests and the trainer run, in parallel (100 s)
export FSPO_AUTOTUNE=0
XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 4"
t0=$SECONDS
( timeout -s INT -k 10 100 "$PY" -m pytest -m gpu tests/kernels $XDIST --timeout 90 -q -rfEs --durations=10 \
    >"$WORK/pytest_kernels.log" 2>&1; echo $? >"$SCRATCH/rc_kernels" ) &
( timeout -s INT -k 10 100 "$PY" -m pytest -m gpu tests/engine --timeout 60 -q -rfEs --durations=10 \
    >"$WORK/pytest_engine.log" 2>&1; echo $? >"$SCRATCH/rc_engine" ) &
( timeout -s INT -k 10 100 bash -c "'$PY' -m fspo_engine.cli.main gen-data --out '$SCRATCH/qs_data' \
    --preset quickstart --users 80 >/dev/null && '$PY' -m fspo_engine.cli.main train --data '$SCRATCH/qs_data' \
    --out '$SCRATCH/qs_run' --max-steps 30 --set run.progress=false --set run.eval_every=10 && \
    '$PY' -m fspo_engine.cli.main eval --model '$SCRATCH/qs_run' --data '$SCRATCH/qs_data' --shots 0,8" \
    >"$WORK/train_smoke.log" 2>&1; echo $? >"$SCRATCH/rc_smoke" ) &
wait
mkdir -p "$WORK/train_smoke"
cp "$SCRATCH/qs_run"/{metrics.jsonl,loss_curve.png,eval.json,eval.png,config.toml} "$WORK/train_smoke/" 2>/dev/null
for job in kernels engine smoke; do
    name=$([ $job = smoke ] && echo train_smoke || echo "pytest_$job")
    rc=$(cat "$SCRATCH/rc_$job" 2>/dev/null || echo "?")
    echo "$name rc=$rc (parallel, $((SECONDS - t0))s for all, limit 100s each)" | tee -a "$SUMMARY"
    log_tail "$name" "$rc"
done
unset FSPO_AUTOTUNE
pack

# ---- 5. peers (55 s)
step bench_peers 55 env PYTHONPATH="$SCRATCH/peers${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m fspo_engine.benchmarks.bench_kernels \
    --tokens 4096 --hidden 4096 --variants ours,liger,cce,cce_nofilter,naive --reps 3 --out "$WORK/bench_peers"

pack
rm -rf "$SCRATCH"
echo "done: $OUT/gpu_results.tar.gz" | tee -a "$SUMMARY"
