"""How fast and how lean is the fused lm_head log-prob op, against the obvious alternatives?

For T target rows (all with a target, in T/256 segments), hidden size H and vocab V, forward + backward of:

- ours        `linear_logprob_sums` (Triton on GPU, the chunked torch path on CPU);
- ours_torch  the chunked plain-torch path (GPU only: on CPU it is `ours`);
- naive       logits = h @ W^T -> log_softmax (fp32) -> gather -> segment sum, what the official code does;
- compiled    `torch.compile` of naive (skipped when compiling fails, e.g. no C++ compiler);
- liger       Liger-Kernel's fused linear cross-entropy, reduction="sum" (when installed);
- cce         cut-cross-entropy's `linear_cross_entropy`, reduction="sum" (when installed), with its default
              gradient filter (filter_eps="high": skips dlogits blocks below bf16 resolution, approximate);
- cce_nofilter  the same with filter_eps=None: exact gradients, the like-for-like comparison with ours;
- floor       GPU only: three bare matmuls of the same shapes (h @ W^T, dlogits @ W, dlogits^T @ h), the
              work any exact method must do; the issue's target is ours <= 1.5 x floor.
- loss_fwd    the chunked-loss design (Liger's): gradients computed in the forward, for a loss known there to
              be linear in the segment sums (SFT), so the backward only scales them. Row chunks outside,
              the whole vocab inside: 3 GEMM passes instead of ours' 4, but an fp32 [V, H] grad-weight read
              and written once per row chunk. Tile memory as ours'; loss_fwd_4x with 4x that.
              Benchmark-only: it answers whether the op should have such a variant (see logprobs.py).

Peak memory is the memory the variant adds on top of its inputs: on GPU `torch.cuda.max_memory_allocated`
over one fwd+bwd minus what was allocated before it; on CPU each variant runs in its own process and
reports ru_maxrss minus that of a process that only built the inputs (tracemalloc cannot see torch),
with glibc's mmap threshold fixed so that freed tensors leave the RSS (see run_cpu).
Gradients (grad-hidden, grad-weight) are part of every variant's peak.

On GPU the run also records which tile configs the autotuner chose for our two Triton kernels, the vocab
split plan and which GEMM accumulates grad-hidden (`torch.addmm(out_dtype=float32)` in place, or the
slower fallback), and with --profile a short torch.profiler table (CUDA time per kernel) of one fwd+bwd
of ours per shape. Peers (Liger-Kernel, cut-cross-entropy) are found on the import path: gpu_check.sh
installs them from the wheels in benchmarks/wheels/.

    python -m fspo_engine.benchmarks.bench_kernels [--out DIR] [--tokens 4096,16384] [--hidden 4096]
    fspo-engine bench kernels --tokens 4096 --hidden 2048,4096
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fspo_engine.data_gen.atomic import write_text_atomic

# Most telling first: a step timeout cuts the tail.
VARIANTS = ("ours", "floor", "ours_torch", "naive", "liger", "cce", "cce_nofilter", "compiled", "loss_fwd",
            "loss_fwd_4x")  # fmt: skip
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROWS_PER_SEGMENT = 256  # an FSPO response of a few hundred tokens


def make_inputs(t, h, v, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)  # on the device: a [V, H] randn on CPU takes seconds
    hidden = torch.randn(t, h, generator=g, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, device=device) * h**-0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (t,), generator=g, device=device)
    segs = (torch.arange(t) // ROWS_PER_SEGMENT).to(device)
    return hidden, weight, targets, segs, int(segs.max()) + 1 if t else 0


def naive_logprob_sums(hidden, weight, targets, segs, num_segments):
    """The plain path: [T, V] logits, fp32 log-softmax, gather, segment sum."""
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)  # [T, V] fp32
    picked = logp.gather(1, targets[:, None]).squeeze(1)
    return torch.zeros(num_segments, device=hidden.device).index_add(0, segs, picked)


class _SumLossInForward(torch.autograd.Function):
    """sum over counted rows of log_softmax(h @ W^T)[target], with both gradients computed in the forward.

    Valid only for a loss linear in the segment sums (here their plain sum): the backward scales the saved
    gradients by the upstream scalar. Row chunks of [c, V] fp32 logits, c from the tile budget."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, segs, chunk_bytes):
        from fspo_engine.kernels.logprobs import _gemm_dtype, _mm_acc

        keep = ((targets != -100) & (segs >= 0)).nonzero().squeeze(1)
        h, t = hidden.index_select(0, keep).to(_gemm_dtype(hidden)), targets.index_select(0, keep)
        w = weight.to(h.dtype)  # a copy only for 16-bit inputs on CPU
        n, v = h.shape[0], w.shape[0]
        step = max(1, chunk_bytes // (8 * v))  # the fp32 logits chunk and one temporary
        gh = torch.zeros(n, h.shape[1], dtype=torch.float32, device=h.device)
        gw = torch.zeros(v, h.shape[1], dtype=torch.float32, device=h.device)  # fp32 across chunks
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        for i in range(0, n, step):
            h_c, t_c = h[i : i + step], t[i : i + step]
            logits = _mm_acc(h_c, w.T)  # [c, V] fp32
            lse = torch.logsumexp(logits, dim=1)
            total += (logits.gather(1, t_c[:, None]).squeeze(1) - lse).double().sum()
            d = logits.sub_(lse[:, None]).exp_().neg_()  # d logp / d logits = onehot - softmax
            d[torch.arange(d.shape[0], device=d.device), t_c] += 1.0
            d = d.to(h.dtype)
            _mm_acc(d, w, out=gh[i : i + step])
            _mm_acc(d.T, h_c, out=gw)
            del logits, d
        grad_hidden = torch.zeros_like(hidden)
        grad_hidden[keep] = gh.to(hidden.dtype)
        ctx.save_for_backward(grad_hidden, gw.to(weight.dtype))
        return total.float()

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors  # scaled in place: no second [V, H] (one backward only)
        return grad_hidden.mul_(grad_out), grad_weight.mul_(grad_out), None, None, None


def build(variant, device):
    """fn(hidden, weight, targets, segs, S) -> scalar loss, or a string saying why it cannot run."""
    from fspo_engine.kernels.logprobs import linear_logprob_sums, linear_logprob_sums_torch

    if variant == "ours":
        return lambda *a: linear_logprob_sums(*a).sum()
    if variant == "ours_torch":
        if device == "cpu":
            return "same as ours on CPU"
        return lambda *a: linear_logprob_sums_torch(*a).sum()
    if variant == "naive":
        return lambda *a: naive_logprob_sums(*a).sum()
    if variant == "compiled":
        compiled = torch.compile(naive_logprob_sums)
        return lambda *a: compiled(*a).sum()
    if variant == "liger":
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            return "liger-kernel not installed"
        if device == "cpu":
            return "liger-kernel needs CUDA"
        loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        return lambda h, w, t, s, n: loss(w, h, t)
    if variant in ("cce", "cce_nofilter"):
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError:
            return "cut-cross-entropy not installed"
        if device == "cpu":
            return "cut-cross-entropy needs CUDA"
        eps = {} if variant == "cce" else {"filter_eps": None}  # default: its gradient filter on
        return lambda h, w, t, s, n: linear_cross_entropy(h, w, t, reduction="sum", **eps)
    if variant in ("loss_fwd", "loss_fwd_4x"):
        from fspo_engine.kernels.logprobs import DEFAULT_CHUNK_BYTES, DEFAULT_CHUNK_BYTES_CUDA

        budget = (DEFAULT_CHUNK_BYTES_CUDA if device == "cuda" else DEFAULT_CHUNK_BYTES) * (
            4 if variant == "loss_fwd_4x" else 1
        )
        return lambda h, w, t, s, n: _SumLossInForward.apply(h, w, t, s, budget)
    if variant == "floor":
        if device == "cpu":
            return "GPU only"
        return "floor"  # measured by floor_ms
    raise ValueError(f"variant: unknown {variant!r}")


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def fwd_bwd(fn, inputs):
    hidden, weight = inputs[0], inputs[1]
    hidden.grad = weight.grad = None
    fn(*inputs).backward()


def time_ms(fn, inputs, device, reps):
    """Median fwd+bwd wall time over reps, after one warm-up call (compiles, autotunes)."""
    fwd_bwd(fn, inputs)
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fwd_bwd(fn, inputs)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def floor_ms(t, h, v, dtype, reps):
    """Three bare matmuls of the op's shapes, in the input dtype (cuBLAS): the work floor."""
    hidden = torch.randn(t, h, device="cuda", dtype=dtype)
    weight = torch.randn(v, h, device="cuda", dtype=dtype)
    dlogits = torch.randn(t, v, device="cuda", dtype=dtype)

    def three():
        hidden @ weight.T
        dlogits @ weight
        dlogits.T @ hidden

    three()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        three()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def profile_table(fn, inputs, rows=12) -> str:
    """torch.profiler's CUDA time per kernel over one fwd+bwd (already warmed up), top `rows`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fwd_bwd(fn, inputs)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)


def gpu_meta() -> dict:
    """Which tile configs the autotuner chose (per key) and which grad-hidden GEMM runs."""
    from fspo_engine.kernels import logprobs as L

    return {"grad_hidden_accumulation": L.grad_hidden_accumulation("cuda"),
            "autotune": os.environ.get("FSPO_AUTOTUNE", "1"),
            "tuned": {name: {str(k): str(c) for k, c in kernel.cache.items()}
                      for name, kernel in (("fwd", L._fwd_kernel), ("dlogits", L._dlogits_kernel))}}  # fmt: skip


def run_gpu(variant, t, h, v, dtype, reps, profile_out=None):
    if variant == "floor":
        return {"time_ms": floor_ms(t, h, v, dtype, reps), "peak_mb": None}
    fn = build(variant, "cuda")
    if isinstance(fn, str):
        return {"skipped": fn}
    inputs = make_inputs(t, h, v, dtype, "cuda")
    try:
        ms = time_ms(fn, inputs, "cuda", reps)
        if profile_out is not None:
            try:
                from fspo_engine.kernels import logprobs as L

                cols, nsplit = L._split_plan(v, t, L._num_sms(torch.device("cuda")))
                text = f"forward vocab splits {nsplit} x {cols}\n{profile_table(fn, inputs)}"
            except Exception as exc:  # noqa: BLE001 - the profile is extra; the timing stands without it
                text = f"profiler failed: {type(exc).__name__}: {exc}"
            write_text_atomic(profile_out, f"T={t} H={h} V={v} {dtype}\n{text}\n")
        inputs[0].grad = inputs[1].grad = None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(fn, inputs)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    except torch.OutOfMemoryError:
        return {"skipped": "out of memory"}
    except Exception as exc:  # noqa: BLE001 - a peer library failing must not stop the others
        return {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    finally:
        del inputs
        torch.cuda.empty_cache()
    return {"time_ms": ms, "peak_mb": peak}


def _maxrss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(variant, t, h, v, dtype, reps):
    """CPU, one process per variant: JSON with time and ru_maxrss on the last stdout line."""
    import fspo_engine.kernels.logprobs  # noqa: F401  (every process imports the same modules: fair RSS)

    inputs = make_inputs(t, h, v, dtype, "cpu")
    if variant == "inputs":  # the baseline: a process that only built the inputs
        out = {"rss_mb": _maxrss_mb()}
    else:
        fn = build(variant, "cpu")
        if isinstance(fn, str):
            out = {"skipped": fn}
        else:
            try:
                out = {"time_ms": time_ms(fn, inputs, "cpu", reps), "rss_mb": _maxrss_mb()}
            except Exception as exc:  # noqa: BLE001 - e.g. torch.compile without a working C++ toolchain
                out = {
                    "skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
                }
    print(json.dumps(out))


def run_cpu(variant, t, h, v, dtype_name, reps, baseline_mb):
    """Two worker processes per variant: one timed with the allocator as users run it, one measuring peak
    RSS (one fwd+bwd) with glibc's mmap threshold fixed at 128 KiB. glibc keeps freed blocks of up to
    32 MiB in its heap (its threshold grows after each free), so RSS would count allocator caching, not live
    tensors; but the fixed threshold makes every large allocation a fresh mmap with page faults, which
    would slow the variants that allocate tiles in a loop: so it is used for memory only."""

    def worker_run(reps_, env):
        cmd = [sys.executable, "-m", "fspo_engine.benchmarks.bench_kernels", "--_worker", variant,
               "--tokens", str(t), "--hidden", str(h), "--vocab", str(v), "--dtype", dtype_name,
               "--reps", str(reps_)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            return {"skipped": f"worker failed: {proc.stderr.strip().splitlines()[-1:]}"}
        return json.loads(proc.stdout.strip().splitlines()[-1])

    mem = worker_run(1, {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    if variant == "inputs" or "skipped" in mem:
        return mem
    out = worker_run(reps, dict(os.environ))
    if "skipped" in out:
        return out
    out.pop("rss_mb", None)
    if baseline_mb is not None:
        out["peak_mb"] = mem["rss_mb"] - baseline_mb
    return out


def table(results, gpu):
    head = "| T | H | V | dtype | variant | fwd+bwd ms | x naive | peak extra MB | x naive mem |"
    sep = "|---|---|---|---|---|---|---|---|---|"
    if gpu:
        head += " x floor |"
        sep += "---|"
    lines = [head, sep]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['T']} | {r['H']} | {r['V']} | {r['dtype']} | {r['variant']} | skipped: "
                         f"{r['skipped']} | | | |" + (" |" if gpu else ""))  # fmt: skip
            continue
        fmt = lambda x, f: "" if x is None else format(x, f)  # noqa: E731
        row = (f"| {r['T']} | {r['H']} | {r['V']} | {r['dtype']} | {r['variant']} | {r['time_ms']:.1f} | "
               f"{fmt(r.get('x_naive_time'), '.2f')} | {fmt(r.get('peak_mb'), '.0f')} | "
               f"{fmt(r.get('x_naive_mem'), '.3f')} |")  # fmt: skip
        if gpu:
            row += f" {fmt(r.get('x_floor_time'), '.2f')} |"
        lines.append(row)
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fspo_engine.engine.metrics import save_figure

    shapes = sorted({(r["T"], r["H"], r["V"]) for r in results})
    variants = [v for v in VARIANTS if any(r["variant"] == v and "skipped" not in r for r in results)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(variants))
    for k, metric, label in ((0, "time_ms", "fwd+bwd time (ms)"), (1, "peak_mb", "peak extra memory (MB)")):
        ax = axes[k]
        values = [r[metric] for r in results if r.get(metric)]
        # Log scale only where the bars span decades (memory; times across several shapes).
        if values and max(values) > 20 * min(values):
            ax.set_yscale("log")
        for i, var in enumerate(variants):
            ys = []
            for shape in shapes:
                r = next(
                    (r for r in results if (r["T"], r["H"], r["V"]) == shape and r["variant"] == var), {}
                )
                ys.append(r.get(metric) or 0.0)
            ax.bar([j + i * width for j in range(len(shapes))], ys, width, label=var)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels([f"T={t}\nH={h}" for t, h, _ in shapes], fontsize=8)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"linear_logprob_sums vs alternatives (V={shapes[0][2] if shapes else '?'})")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None):
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_out/kernels")
    p.add_argument("--tokens", type=_ints, default=[4096, 16384, 32768] if gpu else [4096])
    p.add_argument("--hidden", type=_ints, default=[2048, 3072, 4096] if gpu else [256])
    p.add_argument("--vocab", type=int, default=128256 if gpu else 32000)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if gpu else "fp32")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--reps", type=int, default=5 if gpu else 3)
    p.add_argument("--profile", action="store_true", help="GPU: a torch.profiler table of ours per shape")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]

    if args._worker:
        return worker(args._worker, args.tokens[0], args.hidden[0], args.vocab, dtype, args.reps)

    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"--variants: unknown {v!r} (choose from {', '.join(VARIANTS)})")
    results = []
    for t in args.tokens:
        for h in args.hidden:
            base = None
            if not gpu:
                base = run_cpu("inputs", t, h, args.vocab, args.dtype, args.reps, None).get("rss_mb")
            for var in variants:
                if gpu:
                    prof = Path(args.out) / f"profile_ours_T{t}_H{h}.txt" if args.profile and var == "ours" else None
                    if prof is not None:
                        prof.parent.mkdir(parents=True, exist_ok=True)
                    r = run_gpu(var, t, h, args.vocab, dtype, args.reps, prof)
                else:
                    r = run_cpu(var, t, h, args.vocab, args.dtype, args.reps, base)
                r.update(T=t, H=h, V=args.vocab, dtype=args.dtype, variant=var,
                         device=torch.cuda.get_device_name() if gpu else "cpu")  # fmt: skip
                results.append(r)
                done = f"{r['time_ms']:.1f} ms, peak +{r.get('peak_mb', float('nan')):.0f} MB" if "time_ms" in r else ""
                print(f"T={t} H={h} {var}: " + (r["skipped"] if "skipped" in r else done),
                      file=sys.stderr, flush=True)  # fmt: skip
                _ratios([r for r in results if r["T"] == t and r["H"] == h and "skipped" not in r])
                write(results, gpu, Path(args.out))  # after every variant: a run cut short keeps what it measured

    print(table(results, gpu))
    return results


def _ratios(shape: list[dict]):
    """Each variant against naive (time, memory) and the floor (time), side by side within one shape."""
    naive = next((r for r in shape if r["variant"] == "naive"), None)
    floor = next((r for r in shape if r["variant"] == "floor"), None)
    for r in shape:
        if naive:
            r["x_naive_time"] = r["time_ms"] / naive["time_ms"]
            if r.get("peak_mb") is not None and naive.get("peak_mb"):
                r["x_naive_mem"] = r["peak_mb"] / naive["peak_mb"]
        if floor:
            r["x_floor_time"] = r["time_ms"] / floor["time_ms"]


def write(results, gpu, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if gpu else "cpu",
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    if gpu:
        meta.update(gpu_meta())
    write_text_atomic(out / "kernels.json", json.dumps({"meta": meta, "results": results}, indent=2))
    write_text_atomic(out / "kernels.md", f"{meta}\n\n{table(results, gpu)}\n")
    plot(results, out / "kernels.png")


if __name__ == "__main__":
    main()
