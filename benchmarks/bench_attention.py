"""How fast is prefix-shared attention on FSPO rows, against the alternatives?

One packed row holds several episodes `[context | chosen | rejected]` (contexts 2k-8k tokens, responses
50-400 tokens, rows of 16k-32k on GPU). For each row, forward + backward of:

- ours        `prefix_shared_attention` (Triton on GPU, the per-document torch path on CPU);
- flex        `flex_attention` compiled, same mask (a BlockMask built from the same ids);
- official    the official code's layout: every response carries its own copy of the context, the
              2 * episodes sequences are padded to the longest and run dense causal through SDPA
              (flash backend on GPU);
- plain       ours on one plain causal document of the same length (the 60% useful-throughput bar).

"Useful" FLOPs count only the allowed (q, k) pairs of the FSPO mask, the same for every variant, with
the FlashAttention convention fwd = 4 * pairs * D * Hq and bwd = 2.5 * fwd. Peak memory: on GPU
`torch.cuda.max_memory_allocated` over the call, inputs in that variant's layout included; on CPU each
variant runs in its own process and reports ru_maxrss minus that of a process that only built the inputs.

    python -m fspo_engine.benchmarks.bench_attention [--out DIR] [--rows 16384,32768] [--model 8B]
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

MODELS = {  # (query heads, kv heads, head dim) of the Llama sizes the engine trains
    "1B": (32, 8, 64),
    "3B": (24, 8, 128),
    "8B": (32, 8, 128),
    "tiny": (4, 1, 64),
}
# The headline comparisons first (the targets: >= flex, >= 1.6x official); flex compiles for a minute.
VARIANTS = ("ours", "official", "flex", "plain")


# ---------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------


def fspo_row(target_len, ctx_range, resp_range, seed):
    """Episodes (context, chosen, rejected) lengths packed until the next one would overflow the row."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    episodes, total = [], 0
    while total < target_len:
        c, a, b = rand(*ctx_range), rand(*resp_range), rand(*resp_range)
        c = min(c, target_len - total - a - b)  # the last episode's context fills the row (no padding)
        if c < 1:
            break
        episodes.append((c, a, b))
        total += c + a + b
    return episodes


def row_ids(episodes):
    doc, br = [], []
    for i, (c, a, b) in enumerate(episodes):
        doc += [i] * (c + a + b)
        br += [0] * c + [1] * a + [2] * b
    return torch.tensor(doc), torch.tensor(br)


def useful_pairs(episodes):
    """Allowed (q, k) pairs of the FSPO mask: each branch sees the context and its own causal prefix."""
    tri = lambda n: n * (n + 1) // 2  # noqa: E731
    return sum(tri(c) + a * c + tri(a) + b * c + tri(b) for c, a, b in episodes)


def fwd_bwd_flops(pairs, hq, d):
    return 3.5 * 4 * pairs * d * hq


# ---------------------------------------------------------------------------------------------------
# Variants: each returns a closure running forward + backward once
# ---------------------------------------------------------------------------------------------------


def build_variant(name, episodes, hq, hkv, d, dtype, device):
    from fspo_engine.kernels.attention import prefix_shared_attention

    T = sum(map(sum, episodes))
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    impl = "triton" if device == "cuda" else "torch"

    if name in ("ours", "plain"):
        doc, br = row_ids(episodes)
        if name == "plain":
            doc, br = torch.zeros_like(doc), torch.zeros_like(br)
        doc, br = doc.to(device), br.to(device)
        q, k, v, do = rnd(T, hq, d), rnd(T, hkv, d), rnd(T, hkv, d), rnd(T, hq, d)
        for t in (q, k, v):
            t.requires_grad_()

        def step():
            out = prefix_shared_attention(q, k, v, doc, br, impl=impl)
            torch.autograd.grad(out, (q, k, v), do)

        return step

    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc, br = (t.to(device) for t in row_ids(episodes))

        def mask_mod(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (ki <= qi) & ((br[ki] == 0) | (br[ki] == br[qi]))

        # Once per batch, like our tile lists. _compile=True: the eager build materialises [T, T] gathers.
        block_mask = create_block_mask(mask_mod, 1, 1, T, T, device=device, _compile=device == "cuda")
        flex = torch.compile(flex_attention, dynamic=False)
        q, k, v, do = rnd(1, hq, T, d), rnd(1, hkv, T, d), rnd(1, hkv, T, d), rnd(1, hq, T, d)
        for t in (q, k, v):
            t.requires_grad_()

        def step():
            out = flex(q, k, v, block_mask=block_mask, enable_gqa=hkv != hq)
            torch.autograd.grad(out, (q, k, v), do)

        return step

    if name == "official":
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        seqs = [c + r for c, a, b in episodes for r in (a, b)]
        B, L = len(seqs), max(seqs)  # right-padded batch: padding only changes padding rows
        q, k, v, do = rnd(B, hq, L, d), rnd(B, hkv, L, d), rnd(B, hkv, L, d), rnd(B, hq, L, d)
        for t in (q, k, v):
            t.requires_grad_()
        backends = (
            [SDPBackend.FLASH_ATTENTION]
            if device == "cuda"
            else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
        )

        def step():
            with sdpa_kernel(backends):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hkv != hq)
            torch.autograd.grad(out, (q, k, v), do)

        return step

    raise ValueError(f"variant: unknown {name!r}")


# ---------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------


def time_gpu(step, warmup, reps):
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_gpu_variant(name, episodes, hq, hkv, d, dtype, warmup, reps, profile_out=None):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    step = build_variant(name, episodes, hq, hkv, d, dtype, "cuda")
    step()  # compile / autotune outside the measurements
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = time_gpu(step, warmup, reps)
    if profile_out is not None:
        write_text_atomic(profile_out, _profile_table(step))
    del step
    return ms, peak / 2**20


def _profile_table(step, rows=10) -> str:
    """torch.profiler's CUDA time per kernel over one (warm) fwd+bwd."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)
    except Exception as exc:  # noqa: BLE001 - the profile is extra; the timing stands without it
        return f"profiler failed: {type(exc).__name__}: {exc}"


def _tuned() -> dict:
    """The attention tiles chosen so far, per (kernel, autotuned?, head dim, dtype, group, row bucket)."""
    from fspo_engine.kernels.attention import _TUNED

    return {f"{k[0]} D={k[2]} {str(k[3]).replace('torch.', '')} g{k[4]} T<={k[5]}": f"{c.block_m}x{c.block_n} "
            f"w{c.num_warps} s{c.num_stages}" for k, c in _TUNED.items()}  # fmt: skip


def run_cpu_child(name, episodes, hq, hkv, d, warmup, reps):
    """Runs in a fresh process: time the variant and report this process's peak RSS."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if name == "inputs":  # baseline: imports + inputs, no attention
        build_variant("ours", episodes, hq, hkv, d, torch.float32, "cpu")
        return 0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step = build_variant(name, episodes, hq, hkv, d, torch.float32, "cpu")
    for _ in range(max(1, warmup)):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB


def run_cpu_variant(name, episodes, hq, hkv, d, warmup, reps, timeout):
    case = json.dumps(
        {"name": name, "episodes": episodes, "hq": hq, "hkv": hkv, "d": d, "warmup": warmup, "reps": reps}
    )
    cmd = [sys.executable, "-m", "fspo_engine.benchmarks.bench_attention", "--child", case]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "child failed")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return res["ms"], res["rss_mib"]


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def markdown(results, meta):
    lines = [
        f"## prefix-shared attention, fwd+bwd ({meta['device']}, {meta['dtype']}, "
        f"Hq={meta['hq']} Hkv={meta['hkv']} D={meta['d']})",
        "",
        "| row | T | episodes | variant | ms | useful TFLOP/s | peak MiB | time / ours |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        ours = next((x for x in results if x["row"] == r["row"] and x["variant"] == "ours"), None)
        rel = f"{r['ms'] / ours['ms']:.2f}x" if ours and r.get("ms") and ours.get("ms") else "-"
        if r.get("error"):
            lines.append(
                f"| {r['row']} | {r['T']} | {r['episodes']} | {r['variant']} | error: {r['error']} | | | |"
            )
            continue
        lines.append(
            f"| {r['row']} | {r['T']} | {r['episodes']} | {r['variant']} | {r['ms']:.2f} | "
            f"{r['tflops']:.3g} | {r['peak_mib']:.0f} | {rel} |"
        )
    lines += ["", "Targets (H200): ours <= flex; official / ours >= 1.6; ours TFLOP/s >= 0.6 x plain.", ""]
    for row in dict.fromkeys(r["row"] for r in results):
        by = {r["variant"]: r for r in results if r["row"] == row and not r.get("error")}
        if "ours" not in by:
            continue
        parts = []
        if "official" in by:
            parts.append(f"official/ours = {by['official']['ms'] / by['ours']['ms']:.2f}x")
        if "flex" in by:
            parts.append(f"flex/ours = {by['flex']['ms'] / by['ours']['ms']:.2f}x")
        if "plain" in by:
            parts.append(f"ours useful TFLOP/s / plain = {by['ours']['tflops'] / by['plain']['tflops']:.2f}")
        lines.append(f"- {row}: " + ", ".join(parts))
    if meta.get("lists_ms") is not None:
        lines.append(f"- block runs (once per batch, fwd tiling): {meta['lists_ms']:.3f} ms")
    if meta.get("tuned"):
        lines.append(f"- tiles (autotune={meta['autotune']}): " + "; ".join(f"{k}: {v}" for k, v in meta["tuned"].items()))
    return "\n".join(lines) + "\n"


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fspo_engine.engine.metrics import save_figure

    rows = list(dict.fromkeys(r["row"] for r in results))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in results)]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(rows), 4))
    width = 0.8 / max(1, len(variants))
    for i, var in enumerate(variants):
        ys = [
            next((r.get("ms") or 0 for r in results if r["row"] == row and r["variant"] == var), 0)
            for row in rows
        ]
        ax.bar([j + i * width for j in range(len(rows))], ys, width, label=var)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], rows)
    ax.set_ylabel("fwd+bwd time (ms)")
    ax.set_title("prefix-shared attention on FSPO rows")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out/attention")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--model", choices=sorted(MODELS), default=None, help="head shapes (default 8B on GPU)")
    p.add_argument("--rows", default=None, help="comma-separated row lengths (default 16384,32768 on GPU)")
    p.add_argument("--ctx", default=None, help="context length range LO,HI (default 2048,8192 on GPU)")
    p.add_argument("--resp", default=None, help="response length range LO,HI (default 50,400 on GPU)")
    p.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="GPU dtype (CPU runs fp32)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="GPU: a torch.profiler table of ours per row")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one CPU measurement
    args = p.parse_args(argv)

    if args.child:
        c = json.loads(args.child)
        eps = [tuple(e) for e in c["episodes"]]
        ms, rss = run_cpu_child(c["name"], eps, c["hq"], c["hkv"], c["d"], c["warmup"], c["reps"])
        print(json.dumps({"ms": ms, "rss_mib": rss}))
        return

    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    pair = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    if cuda:
        model = args.model or "8B"
        rows = pair(args.rows or "16384,32768")
        ctx, resp = pair(args.ctx or "2048,8192"), pair(args.resp or "50,400")
        warmup, reps = args.warmup if args.warmup is not None else 3, args.reps or 10
    else:  # tiny shapes: the CPU path is a correctness fallback, this only shows the layout's effect
        model = args.model or "tiny"
        rows = pair(args.rows or "1536,3072")
        ctx, resp = pair(args.ctx or "200,600"), pair(args.resp or "10,50")
        warmup, reps = args.warmup if args.warmup is not None else 1, args.reps or 3
    hq, hkv, d = MODELS[model]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype] if cuda else torch.float32
    # FlexAttention has no CPU backward (torch 2.11-2.13): GPU only unless asked for.
    variants = [
        v
        for v in (args.variants or ",".join(VARIANTS if cuda else ("ours", "official", "plain"))).split(",")
        if v
    ]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"--variants: unknown {v!r} (choose from {', '.join(VARIANTS)})")

    results = []
    lists_ms = None
    for i, target in enumerate(rows):
        episodes = fspo_row(target, ctx, resp, args.seed + i)
        T = sum(map(sum, episodes))
        pairs = useful_pairs(episodes)
        for var in variants:
            rec = {"row": f"{target / 1024:g}k" if target >= 1024 else str(target), "T": T}
            rec.update(episodes=len(episodes), variant=var)
            n_pairs = T * (T + 1) // 2 if var == "plain" else pairs
            rec["useful_pairs"] = n_pairs
            try:
                if cuda:
                    prof = None
                    if args.profile and var == "ours":
                        Path(args.out).mkdir(parents=True, exist_ok=True)
                        prof = Path(args.out) / f"profile_ours_{rec['row']}.txt"
                    ms, peak = run_gpu_variant(var, episodes, hq, hkv, d, dtype, warmup, reps, prof)
                else:
                    ms, rss = run_cpu_variant(var, episodes, hq, hkv, d, warmup, reps, timeout=600)
                    _, base = run_cpu_variant("inputs", episodes, hq, hkv, d, 0, 0, timeout=600)
                    peak = max(0.0, rss - base)
                rec.update(ms=ms, peak_mib=peak, tflops=fwd_bwd_flops(n_pairs, hq, d) / (ms * 1e-3) / 1e12)
            except Exception as exc:  # noqa: BLE001 - a missing backend is reported, not fatal
                rec.update(ms=None, peak_mib=None, tflops=None, error=f"{type(exc).__name__}: {exc}"[:160])
            results.append(rec)
            print(json.dumps(rec), flush=True)
            _write_all(results, _meta(cuda, dtype, model, hq, hkv, d, ctx, resp, warmup, reps, lists_ms),
                       Path(args.out), quiet=True)  # after every record: a run cut short keeps what it measured
        if cuda and lists_ms is None:
            from fspo_engine.kernels.attention import block_runs

            doc, br = (t.cuda() for t in row_ids(episodes))
            lists_ms = time_gpu(lambda doc=doc, br=br: block_runs(doc, br, 128, 64), 3, 20)

    _write_all(results, _meta(cuda, dtype, model, hq, hkv, d, ctx, resp, warmup, reps, lists_ms), Path(args.out))
    return results


def _meta(cuda, dtype, model, hq, hkv, d, ctx, resp, warmup, reps, lists_ms) -> dict:
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "model": model,
        "hq": hq,
        "hkv": hkv,
        "d": d,
        "ctx_range": ctx,
        "resp_range": resp,
        "warmup": warmup,
        "reps": reps,
        "lists_ms": lists_ms,
        "autotune": "0" if "0" in (os.environ.get("FSPO_AUTOTUNE"), os.environ.get("FSPO_ATTN_AUTOTUNE")) else "1",
        "tuned": _tuned() if cuda else {},
        "torch": torch.__version__,
        "flops_convention": "fwd+bwd = 3.5 * 4 * useful_pairs * D * Hq",
    }


def _write_all(results: list, meta: dict, out: Path, quiet: bool = False):
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(results, meta)
    if not quiet:
        print(md)
    write_text_atomic(out / "attention.json", json.dumps({"meta": meta, "results": results}, indent=2))
    write_text_atomic(out / "attention.md", md)
    plot(results, out / "attention.png")


if __name__ == "__main__":
    main()
