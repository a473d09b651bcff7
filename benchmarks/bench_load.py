"""How much memory does each rank of a torchrun job spend loading a checkpoint into FSDP2?

Two ways to get an HF Llama directory into FSDP2 shards, each in its own torchrun launch:

* whole-then-shard: every rank loads the whole model (`load_model`), then `fully_shard` cuts it. The
  common recipe; every rank holds the whole model for a moment (32 GB for an 8B model in fp32). On the CPU
  a tensor read in its stored dtype is a view of the mapped file, so the cost shows when the checkpoint's
  dtype is not the master weights' (the usual bf16 checkpoint trained with fp32 masters: the default here).
* sharded read (what `fspo-engine train` does): the model is built and sharded on the meta device, each rank
  allocates its shards and reads only its rows of each tensor from the safetensors files
  (`engine.distributed.load_sharded`).

Per rank: load time, peak memory above the rank's baseline (CUDA: max allocated; CPU: resident memory
sampled every millisecond, which counts the mapped file pages a rank touched: ranks share those through the
page cache, so on the CPU whole-then-shard costs less physical memory than N whole models), and the bytes of
the rank's own shards (the floor).

    fspo-engine bench load [--size small|medium|1B] [--nproc 2] [--dtype float32|bfloat16] [--model DIR]
                           [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

SIZES = {  # HF config keys; random weights are written once per run unless --model is given
    "small": dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2),
    "medium": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=4),
    "1B": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64),
}
VARIANTS = ("sharded read", "whole-then-shard")


def _rss() -> int:
    """This process's resident memory in bytes (Linux; 0 where /proc is not there). It counts the pages of
    the safetensors files it has mapped: on the CPU a loaded tensor may be those pages themselves."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _PeakSampler:
    """The highest RSS seen while running, sampled from a thread (torch releases the GIL in copies)."""

    def __init__(self, period_s: float = 0.001):
        self.peak, self._stop, self._period = _rss(), threading.Event(), period_s
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self._period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def worker(variant: str, model_dir: str, dtype: torch.dtype, out: Path):
    """One rank of one variant: load, measure, write this rank's JSON."""
    import torch.distributed as dist

    from fspo_engine.engine.distributed import init_distributed, load_sharded, parallelize
    from fspo_engine.engine.model import load_model

    cuda = torch.cuda.is_available()
    device = init_distributed("cuda" if cuda else "cpu")
    dist.barrier()
    base = torch.cuda.memory_allocated(device) if cuda else _rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with _PeakSampler() as sampler:
        if variant == "sharded read":
            model = load_sharded(model_dir, dtype, device)
        else:
            model = parallelize(load_model(model_dir, dtype=dtype, device=device))
        if cuda:
            torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) - base if cuda else sampler.peak - base
    shard_bytes = sum(p.to_local().nbytes for p in model.parameters())
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    record = {"variant": variant, "rank": dist.get_rank(), "load_s": seconds, "peak_bytes": peak,
              "peak_kind": "CUDA max allocated" if cuda else "CPU resident memory", "shard_bytes": shard_bytes,
              "model_bytes": full_bytes}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def make_model_dir(size: str, root: Path, stored: torch.dtype) -> Path:
    """A random Llama of `size` written as an HF directory (safetensors in `stored`, sharded past 1 GB)."""
    from fspo_engine.engine.model import LlamaConfig, build_model, save_model

    cfg = LlamaConfig.from_hf_dict({**SIZES[size], "model_type": "llama", "max_position_embeddings": 8192,
                                   "tie_word_embeddings": False})
    path = root / f"llama-{size}"
    save_model(build_model(cfg, seed=0), path, max_shard_bytes=1 << 30, dtype=stored)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(prog="fspo-engine bench load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="1B" if torch.cuda.is_available() else "medium")
    ap.add_argument("--model", help="an HF Llama directory to load instead of a random one of --size")
    ap.add_argument("--nproc", type=int, default=2, help="ranks (processes) per launch")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="master-weight dtype")
    ap.add_argument("--stored-dtype", choices=["float32", "bfloat16"], default="bfloat16",
                    help="the random checkpoint's dtype (released Llama checkpoints are bf16)")
    ap.add_argument("--out", default="bench_out/load")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(sys.argv[1:] if argv is None else list(argv))
    dtype = getattr(torch, args.dtype)
    if args.worker:
        worker(args.worker, args.model, dtype, Path(args.worker_out))
        return
    if args.nproc < 2:
        raise SystemExit("bench load: --nproc must be at least 2 (one rank has nothing to shard)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fspo-bench-load-") as tmp:
        model_dir = Path(args.model) if args.model else make_model_dir(args.size, Path(tmp), getattr(torch, args.stored_dtype))
        results = []
        for variant in VARIANTS:
            parts = Path(tmp) / variant.replace(" ", "_")
            parts.mkdir()
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   "-m", "fspo_engine.benchmarks.bench_load", "--worker", variant, "--model", str(model_dir),
                   "--dtype", args.dtype, "--worker-out", str(parts)]
            res = subprocess.run(cmd, capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
            if res.returncode != 0:
                why = next((ln for ln in reversed(res.stderr.splitlines()) if "Error" in ln), "no output")[:200]
                print(f"variant {variant} failed: {why}", file=sys.stderr)
                results.append({"variant": variant, "failed": why})
                continue
            ranks = [json.loads(p.read_text()) for p in sorted(parts.glob("rank*.json"))]
            results.append({"variant": variant, "ranks": ranks, "load_s": max(r["load_s"] for r in ranks),
                            "peak_bytes": max(r["peak_bytes"] for r in ranks),
                            "shard_bytes": max(r["shard_bytes"] for r in ranks),
                            "model_bytes": ranks[0]["model_bytes"], "peak_kind": ranks[0]["peak_kind"]})
    ok = [r for r in results if "failed" not in r]
    if not ok:
        raise SystemExit("bench load: every variant failed")
    base = next((r for r in ok if r["variant"] == "whole-then-shard"), None)
    mib = 2**20
    where = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU"
    source = args.model or f"random {args.size} model stored in {args.stored_dtype}"
    lines = [f"# bench load ({where}, {source}, {ok[0]['model_bytes'] / mib:.0f} MiB as {args.dtype}, "
             f"{args.nproc} ranks)", "",
             f"| variant | load (s) | peak per rank (MiB, {ok[0]['peak_kind']}) | own shards per rank (MiB) | "
             "peak vs whole-then-shard |", "|---|---:|---:|---:|---:|"]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['variant']} | failed: {r['failed']} | | | |")
            continue
        ratio = f"{r['peak_bytes'] / base['peak_bytes']:.2f}x" if base else "n/a"
        lines.append(f"| {r['variant']} | {r['load_s']:.2f} | {r['peak_bytes'] / mib:.0f} | "
                     f"{r['shard_bytes'] / mib:.0f} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    (out / "results.md").write_text(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = [r["variant"] for r in ok]
    ax.bar(names, [r["peak_bytes"] / mib for r in ok], color=["tab:blue" if n == VARIANTS[0] else "grey"
                                                               for n in names], label="peak")
    ax.bar(names, [r["shard_bytes"] / mib for r in ok], color="none", edgecolor="black", hatch="//",
           label="own shards")
    ax.axhline(ok[0]["model_bytes"] / mib, color="tab:red", linestyle="--", label="whole model")
    ax.set_ylabel("MiB per rank")
    ax.set_title(f"loading into FSDP2 on {args.nproc} ranks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "load.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
