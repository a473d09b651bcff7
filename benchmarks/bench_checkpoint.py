"""What does it cost each rank of a torchrun job to get a checkpoint into FSDP2, and its optimizer out?

Each variant runs in its own torchrun launch; per rank: time, peak memory above the rank's baseline (host:
resident memory sampled every millisecond, which counts the mapped file pages a rank touched, shared between
ranks through the page cache; GPU: max allocated), and the bytes of the rank's own shards (the floor).

Loading an HF Llama directory into FSDP2 shards:
* load: whole-then-shard: every rank loads the whole model (`load_model`), then `fully_shard` cuts it. The
  common recipe; every rank holds the whole model for a moment (32 GB for an 8B model in fp32). On the CPU
  a tensor read in its stored dtype is a view of the mapped file, so the cost shows when the checkpoint's
  dtype is not the master weights' (the usual bf16 checkpoint trained with fp32 masters: the default here).
* load: sharded read (what `fspo-engine train` does): the model is built and sharded on the meta device,
  each rank allocates its shards and reads only its rows of each tensor (`engine.distributed.load_sharded`).

Saving the AdamW state (after one step) into a checkpoint:
* save optimizer: gathered on rank 0: the full state (`get_optimizer_state_dict(full_state_dict=True,
  cpu_offload=True)`) in rank 0's host memory, written by rank 0 alone (64 GB of moments for an 8B model).
* save optimizer: per-rank shards (what `fspo-engine train` does): each rank writes its own shard, in parallel.

    fspo-engine bench checkpoint [--size small|medium|1B] [--nproc 2] [--dtype float32|bfloat16]
                                 [--stored-dtype bfloat16|float32] [--model DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import torch

from fspo_engine.data_gen.atomic import write_text_atomic

SIZES = {  # HF config keys; random weights are written once per run unless --model is given
    "small": dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2),
    "medium": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=4),
    "1B": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64),
}
VARIANTS = ("load: sharded read", "load: whole-then-shard", "save optimizer: per-rank shards",
            "save optimizer: gathered on rank 0")
BASELINE = {"load": "load: whole-then-shard", "save optimizer": "save optimizer: gathered on rank 0"}


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
    """One rank of one variant: run it, measure, write this rank's JSON."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from fspo_engine.engine.distributed import (
        init_distributed,
        load_sharded,
        local_optimizer_state,
        parallelize,
    )
    from fspo_engine.engine.model import load_model

    cuda = torch.cuda.is_available()
    device = init_distributed("cuda" if cuda else "cpu")
    rank = dist.get_rank()
    model = optimizer = None
    if variant.startswith("save"):
        model = load_sharded(model_dir, dtype, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()  # the moments exist
        model.zero_grad(set_to_none=True)
    dist.barrier()
    host_base, device_base = _rss(), torch.cuda.memory_allocated(device) if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with _PeakSampler() as sampler:
        if variant == "load: sharded read":
            model = load_sharded(model_dir, dtype, device)
        elif variant == "load: whole-then-shard":
            model = parallelize(load_model(model_dir, dtype=dtype, device=device))
        elif variant == "save optimizer: per-rank shards":
            torch.save(local_optimizer_state(get_optimizer_state_dict(model, optimizer)), out / f"optim{rank}.pt")
        else:
            state = get_optimizer_state_dict(model, optimizer,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                torch.save(state, out / "optim.pt")
            del state
        if cuda:
            torch.cuda.synchronize(device)
        dist.barrier()  # a save is done when every rank's part is written
    seconds = time.perf_counter() - t0
    record = {"variant": variant, "rank": rank, "seconds": seconds, "host_peak_bytes": sampler.peak - host_base,
              "device_peak_bytes": torch.cuda.max_memory_allocated(device) - device_base if cuda else None,
              "shard_bytes": sum(p.to_local().nbytes for p in model.parameters()),
              "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    for name in (f"optim{rank}.pt", "optim.pt" if rank == 0 else ""):  # written to be timed, not kept
        if name:
            (out / name).unlink(missing_ok=True)
    write_text_atomic(out / f"rank{rank}.json", json.dumps(record))
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
    ap = argparse.ArgumentParser(prog="fspo-engine bench checkpoint", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="1B" if torch.cuda.is_available() else "medium")
    ap.add_argument("--model", help="an HF Llama directory to load instead of a random one of --size")
    ap.add_argument("--nproc", type=int, default=2, help="ranks (processes) per launch")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="master-weight dtype")
    ap.add_argument("--stored-dtype", choices=["float32", "bfloat16"], default="bfloat16",
                    help="the random checkpoint's dtype (released Llama checkpoints are bf16)")
    ap.add_argument("--out", default="bench_out/checkpoint")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(sys.argv[1:] if argv is None else list(argv))
    dtype = getattr(torch, args.dtype)
    if args.worker:
        worker(args.worker, args.model, dtype, Path(args.worker_out))
        return
    if args.nproc < 2:
        raise SystemExit("bench checkpoint: --nproc must be at least 2 (one rank has nothing to shard)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fspo-bench-checkpoint-") as tmp:
        model_dir = Path(args.model) if args.model else make_model_dir(args.size, Path(tmp),
                                                                       getattr(torch, args.stored_dtype))
        results = []
        for i, variant in enumerate(VARIANTS):
            parts = Path(tmp) / f"variant{i}"
            parts.mkdir()
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   "-m", "fspo_engine.benchmarks.bench_checkpoint", "--worker", variant, "--model", str(model_dir),
                   "--dtype", args.dtype, "--worker-out", str(parts)]
            res = subprocess.run(cmd, capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
            if res.returncode != 0:
                why = next((ln for ln in reversed(res.stderr.splitlines()) if "Error" in ln), "no output")[:200]
                print(f"variant {variant} failed: {why}", file=sys.stderr)
                results.append({"variant": variant, "failed": why})
                continue
            ranks = [json.loads(p.read_text()) for p in sorted(parts.glob("rank*.json"))]
            results.append({"variant": variant, "ranks": ranks, "seconds": max(r["seconds"] for r in ranks),
                            "host_peak_bytes": max(r["host_peak_bytes"] for r in ranks),
                            "device_peak_bytes": max(r["device_peak_bytes"] or 0 for r in ranks),
                            "shard_bytes": max(r["shard_bytes"] for r in ranks),
                            "model_bytes": ranks[0]["model_bytes"]})
    ok = [r for r in results if "failed" not in r]
    if not ok:
        raise SystemExit("bench checkpoint: every variant failed")
    by_name = {r["variant"]: r for r in ok}
    mib = 2**20
    where = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU"
    source = args.model or f"random {args.size} model stored in {args.stored_dtype}"
    cuda = torch.cuda.is_available()
    lines = [f"# bench checkpoint ({where}, {source}, {ok[0]['model_bytes'] / mib:.0f} MiB as {args.dtype}, "
             f"{args.nproc} ranks)", "",
             "| operation | variant | time (s) | host peak (MiB) | GPU peak (MiB) | own shards per rank (MiB) | "
             "time vs baseline | peak vs baseline |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    peak = "device_peak_bytes" if cuda else "host_peak_bytes"  # the memory the ratio compares
    for r in results:
        operation, name = r["variant"].split(": ")
        if "failed" in r:
            lines.append(f"| {operation} | {name} | failed: {r['failed']} | | | | | |")
            continue
        base = by_name.get(BASELINE[operation])
        ratios = [f"{r[k] / base[k]:.2f}x" if base and base[k] > 0 else "n/a" for k in ("seconds", peak)]
        gpu = f"{r['device_peak_bytes'] / mib:.0f}" if cuda else "-"
        lines.append(f"| {operation} | {name} | {r['seconds']:.2f} | {r['host_peak_bytes'] / mib:.0f} | {gpu} | "
                     f"{r['shard_bytes'] / mib:.0f} | {ratios[0]} | {ratios[1]} |")
    lines += ["", "Peaks are above each rank's baseline, the highest rank's. Host: resident memory sampled every "
              "millisecond (it counts the mapped file pages a rank touched). Ratios compare "
              + ("GPU peaks." if cuda else "host peaks.")]
    table = "\n".join(lines)
    print(table)
    write_text_atomic(out / "results.json", json.dumps({"args": vars(args), "results": results}, indent=2))
    write_text_atomic(out / "results.md", table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fspo_engine.engine.metrics import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    ours = {VARIANTS[0], VARIANTS[2]}
    labels = [textwrap.fill(r["variant"], 16) for r in ok]
    colors = ["tab:blue" if r["variant"] in ours else "grey" for r in ok]
    axes[0].bar(labels, [r["host_peak_bytes"] / mib for r in ok], color=colors)
    axes[0].axhline(ok[0]["model_bytes"] / mib, color="tab:red", linestyle="--", label="whole model")
    axes[0].set_ylabel("host peak MiB, highest rank")
    axes[0].legend(fontsize=8)
    axes[1].bar(labels, [r["seconds"] for r in ok], color=colors)
    axes[1].set_ylabel("seconds")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"checkpoints in and out of FSDP2 on {args.nproc} ranks (blue: fspo-engine)")
    fig.tight_layout()
    save_figure(fig, out / "checkpoint.png", dpi=110)


if __name__ == "__main__":
    main()
