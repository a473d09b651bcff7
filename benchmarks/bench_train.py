"""How fast is one FSPO preference-training step in fspo-engine against the official layout?

Both variants train the same random Llama on the same episodes (IPO loss, fwd + bwd, optimiser step):

* official: the FSPO reference code's path (a general DPO codebase on Hugging Face transformers):
  chosen and rejected are two sequences that each carry the whole few-shot context, padded to the longest
  of its micro-batch; full [B, L, V] logits go through log_softmax and gather; the reference model runs a
  forward every step. Run here with `transformers.LlamaForCausalLM` (SDPA attention), one episode (two
  sequences) per micro-batch by default with gradient accumulation, as a per-device batch of 1-2 must be at
  8k-token contexts (a whole 8-episode batch of 1B activations would not fit in 141 GB).
* fspo-engine: `[context | chosen | rejected]` packed rows with prefix-shared attention, only response
  rows reach the fused lm_head log-prob op, reference log-probs precomputed (a table lookup).

Each variant runs in its own subprocess so that peak memory (CUDA max allocated, or CPU max RSS) is its own.

    fspo-engine bench train [--episodes 8] [--shots 8] [--size small|1B] [--steps 3] [--official-micro-batch 1]
                            [--out DIR]

A variant that fails (e.g. out of memory) is reported as failed; the other still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from fspo_engine.data_gen.atomic import write_text_atomic

SIZES = {
    # CPU-friendly: runs in seconds on 2 cores.
    "small": dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32768),
    "1B": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072),
}


def make_episodes(n, shots, ctx_per_shot, resp, vocab, seed):
    """Token-id episodes: context = shots * ctx_per_shot (+-30%), responses resp (+-50%)."""
    g = torch.Generator().manual_seed(seed)
    eps = []
    for _ in range(n):
        ctx = max(8, int(shots * ctx_per_shot * (0.7 + 0.6 * torch.rand(1, generator=g).item())))
        lens = [max(4, int(resp * (0.5 + torch.rand(1, generator=g).item()))) for _ in range(2)]
        eps.append((torch.randint(3, vocab, (ctx,), generator=g).tolist(),
                    [torch.randint(3, vocab, (n_,), generator=g).tolist() for n_ in lens]))
    return eps


def _padded(eps, dev):
    """The official layout of some episodes: chosen and rejected as two sequences, each carrying the whole
    context, right-padded to the longest; labels only on the responses."""
    seqs = [p + r for p, rs in eps for r in rs]  # chosen, rejected, chosen, ... each with its context
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    labels = torch.full((len(seqs), L), -100)
    for i, ((p, _), s) in enumerate(zip([e for e in eps for _ in range(2)], seqs)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, len(p):len(s)] = torch.tensor(s[len(p):])
    return ids.to(dev), mask.to(dev), labels.to(dev)


def run_variant(variant, args) -> dict:
    import transformers

    from fspo_engine.engine.losses import ipo_loss
    from fspo_engine.engine.model import LlamaConfig, build_model
    from fspo_engine.engine.packing import PackItem, pack_batches
    from fspo_engine.engine.scoring import episode_logprobs

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = SIZES[args.size]
    eps = make_episodes(args.episodes, args.shots, args.ctx_per_shot, args.response, spec["vocab_size"], 0)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    if variant == "official":
        cfg = transformers.LlamaConfig(**spec, tie_word_embeddings=False, attn_implementation="sdpa")
        with torch.device(dev):  # initialised on the device: two 1B models on a CPU take minutes
            policy = transformers.LlamaForCausalLM(cfg).to(dtype).train()
            ref = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
        micro = args.official_micro_batch or len(eps)
        batches = [_padded(eps[i:i + micro], dev) for i in range(0, len(eps), micro)]
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
        tokens = sum(ids.numel() for ids, _, _ in batches)

        def seq_logps(model, ids, mask, labels):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # [B, L-1, V] fp32
            tgt = labels[:, 1:]
            lp = torch.gather(logits.log_softmax(-1), 2, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            return (lp * (tgt != -100)).sum(-1)

        def step():
            for ids, mask, labels in batches:  # gradient accumulation over micro-batches
                with torch.no_grad():
                    r = seq_logps(ref, ids, mask, labels)
                p = seq_logps(policy, ids, mask, labels)
                loss = ipo_loss(p[0::2], p[1::2], r[0::2], r[1::2], 0.1) * (ids.shape[0] // 2) / len(eps)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        cfg = LlamaConfig(**spec, tie_word_embeddings=False)
        policy = build_model(cfg, dtype=dtype, device=dev).train()
        items = [PackItem(p, rs) for p, rs in eps]
        rows = [r.to(dev) for r in pack_batches(items, args.max_tokens)]
        ref_table = torch.randn(len(items), 2, device=dev)  # precomputed once per epoch in training
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
        tokens = sum(r.num_tokens for r in rows)

        def step():
            for row in rows:
                out = episode_logprobs(policy, row)
                ref = ref_table[torch.tensor(row.episodes, device=dev)]
                loss = ipo_loss(out.chosen, out.rejected, ref[:, 0], ref[:, 1], 0.1) * len(row.episodes) / len(items)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # warm-up (allocator, Triton compile)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "step_s": min(times), "tokens_processed": tokens,
            "episodes_per_s": args.episodes / min(times), "peak_bytes": peak,
            "peak_kind": "cuda max allocated" if dev.type == "cuda" else "process max RSS"}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="fspo-engine bench train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="1B" if torch.cuda.is_available() else "small")
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--ctx-per-shot", type=int, default=None, help="context tokens per shot")
    ap.add_argument("--response", type=int, default=None, help="mean response tokens")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--official-micro-batch", type=int, default=1,
                    help="episodes per micro-batch of the official layout (0 = the whole batch at once)")
    ap.add_argument("--out", default="bench_out/train")
    ap.add_argument("--variant", choices=["official", "fspo-engine"], help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)  # the variant subprocesses get the same options
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    args.ctx_per_shot = args.ctx_per_shot or (500 if gpu else 60)
    args.response = args.response or (200 if gpu else 24)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return
    results = []
    for variant in ("fspo-engine", "official"):  # ours first: a step timeout cuts the baseline, not ours
        cmd = [sys.executable, "-m", "fspo_engine.benchmarks.bench_train", *argv, "--variant", variant]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if res.returncode != 0:
            why = (res.stderr.strip().splitlines() or ["no output"])[-1][:200]
            print(f"variant {variant} failed: {why}", file=sys.stderr)
            results.append({"variant": variant, "failed": why})
            continue
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))
    base = next((r for r in results if r["variant"] == "official" and "failed" not in r), None)
    lines = [f"# bench train ({'GPU ' + torch.cuda.get_device_name() if gpu else 'CPU'}, size {args.size}, "
             f"{args.episodes} episodes x {args.shots} shots, official micro-batch "
             f"{args.official_micro_batch or args.episodes} episodes)", "",
             "| variant | step (s) | episodes/s | tokens through the body | peak memory (MiB) | speed-up |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['variant']} | failed: {r['failed']} | | | | |")
            continue
        speedup = f"{base['step_s'] / r['step_s']:.2f}x" if base else "n/a"
        lines.append(f"| {r['variant']} | {r['step_s']:.3f} | {r['episodes_per_s']:.2f} | {r['tokens_processed']} | "
                     f"{r['peak_bytes'] / 2**20:.0f} ({r['peak_kind']}) | {speedup} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps({"args": {k: v for k, v in vars(args).items() if k != "variant"},
                                                  "results": results}, indent=2))
    write_text_atomic(out / "results.md", table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fspo_engine.engine.metrics import save_figure

    results = [r for r in results if "failed" not in r]
    if not results:
        raise SystemExit("bench train: every variant failed")
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    names = [r["variant"] for r in results]
    colors = ["grey" if n == "official" else "tab:blue" for n in names]
    axes[0].bar(names, [r["episodes_per_s"] for r in results], color=colors)
    axes[0].set_ylabel("episodes / s")
    axes[1].bar(names, [r["peak_bytes"] / 2**20 for r in results], color=colors)
    axes[1].set_ylabel(f"peak MiB ({results[0]['peak_kind']})")
    fig.suptitle("one IPO training step")
    fig.tight_layout()
    save_figure(fig, out / "train.png", dpi=110)


if __name__ == "__main__":
    main()
