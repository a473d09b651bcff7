"""How much work does prefix-shared packing save against the official FSPO layout?

The official path (a general DPO codebase) runs chosen and rejected as two sequences, each carrying the full
few-shot context, padded to the longest sequence of the batch, and computes logits at every position.
Ours runs `[context | chosen | rejected]` once per episode, packed into rows with no padding, and sends only
response tokens to the lm_head. This script counts, per episode, on FSPO-shaped synthetic lengths:

* tokens through the transformer body,
* attention FLOPs (causal; padding counted for the padded layout, as a dense padded batch computes it),
* lm_head rows (logit rows),

and times `pack_batches` itself. Counts are exact arithmetic on the layouts, so no model or GPU is needed.

    fspo-engine bench packing [--episodes 2000] [--shots 0,2,4,8] [--max-tokens 16384] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fspo_engine.data_gen.atomic import write_text_atomic
from fspo_engine.engine.packing import (
    PackItem,
    attention_pairs_official,
    attention_pairs_packed,
    pack_batches,
    packing_stats,
)

# Fixed text around each shot and the target, in tokens (Llama 3 tokenizer on the official format):
# "# Example i\n## Question \n...\n## Preferred Response \n...\n## Dispreferred Response \n...\n\n" ~ 20 tokens;
# "# Task\n<task line>\n## Question \n" ~ 25; each target response starts with "## Preferred Response \n" ~ 5.
SHOT_OVERHEAD, TASK_OVERHEAD, RESPONSE_OVERHEAD = 20, 25, 5


def synthetic_episodes(
    n: int, shots: int, seed: int, question=(20, 120), response=(50, 400)
) -> list[PackItem]:
    """FSPO-shaped episodes. Users have a style: each episode draws its user's typical response length m in
    `response`, and every response (shots and target) is within +-25% of m, clipped to `response`; questions
    are uniform in `question`. At 8 shots that spreads contexts over ~1k-8k tokens (concise users to verbose
    ones), as in the FSPO datasets. Token ids are irrelevant here: the ids are views of one zero buffer."""
    rng = np.random.default_rng(seed)
    buf = np.zeros(1 << 16, dtype=np.int64)
    lo, hi = response

    def resp_len(m):
        return int(np.clip(round(m * rng.uniform(0.75, 1.25)), lo, hi))

    items = []
    for i in range(n):
        m = rng.uniform(lo, hi)
        ctx = 1 + TASK_OVERHEAD + int(rng.integers(*question, endpoint=True))  # bos + task + target question
        for _ in range(shots):
            ctx += SHOT_OVERHEAD + int(rng.integers(*question, endpoint=True)) + resp_len(m) + resp_len(m)
        resp = [RESPONSE_OVERHEAD + resp_len(m) + 1 for _ in range(2)]  # + eos
        items.append(PackItem(buf[:ctx], [buf[:r] for r in resp], episode_id=f"synthetic/{i}"))
    return items


def measure(
    items: list[PackItem], max_tokens: int, batch_sizes: list[int], attn_flops_per_pair: float
) -> dict:
    t0 = time.perf_counter()
    rows = pack_batches(items, max_tokens)
    pack_s = time.perf_counter() - t0
    E = len(items)
    ours_pairs = sum(attention_pairs_packed(ep) for ep in items)
    st = packing_stats(items, rows, max_tokens, official_batch_size=batch_sizes[0])
    res = {
        "episodes": E,
        "mean_context": float(np.mean([len(ep.prompt_ids) for ep in items])),
        "min_context": int(min(len(ep.prompt_ids) for ep in items)),
        "max_context": int(max(len(ep.prompt_ids) for ep in items)),
        "mean_response": float(np.mean([len(r) for ep in items for r in ep.responses])),
        "rows": st["rows"],
        "fill_ratio": st["fill_ratio"],
        "pack_ms_per_1k_episodes": 1000 * pack_s / E * 1000,
        "ours_tokens_per_episode": st["packed_tokens"] / E,
        "ours_attn_gflop_per_episode": ours_pairs * attn_flops_per_pair / E / 1e9,
        "ours_lm_head_rows_per_episode": st["lm_head_rows"] / E,
        "official": {},
    }
    for b in batch_sizes:
        tokens = packing_stats(items, rows, max_tokens, official_batch_size=b)["official_tokens"]
        pairs = attention_pairs_official(items, b)
        res["official"][b] = {
            "tokens_per_episode": tokens / E,
            "attn_gflop_per_episode": pairs * attn_flops_per_pair / E / 1e9,
            "lm_head_rows_per_episode": tokens / E,
            "token_ratio": tokens / st["packed_tokens"],
            "attn_ratio": pairs / ours_pairs,
            "lm_head_ratio": tokens / st["lm_head_rows"],
        }
    return res


def markdown(results: list[dict], args) -> str:
    lines = [
        f"Packing vs the official padded layout: {args.episodes} synthetic episodes per row of the table, "
        f"questions {args.question} tokens, responses {args.response} tokens, rows of {args.max_tokens} tokens; "
        f"attention FLOPs for {args.layers} layers x {args.q_dim} query dims (Llama 3.1 8B by default).",
        "",
        "| shots | official batch | context (mean, min-max) | tokens/ep official | tokens/ep ours | tokens ratio "
        "| attn GFLOP/ep official | attn GFLOP/ep ours | attn ratio | lm_head rows ratio | fill | pack ms/1k ep |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for b, o in r["official"].items():
            lines.append(
                f"| {r['shots']} | {b} | {r['mean_context']:.0f} ({r['min_context']}-{r['max_context']}) "
                f"| {o['tokens_per_episode']:.0f} | {r['ours_tokens_per_episode']:.0f} | **{o['token_ratio']:.2f}x** "
                f"| {o['attn_gflop_per_episode']:.1f} | {r['ours_attn_gflop_per_episode']:.1f} | "
                f"**{o['attn_ratio']:.2f}x** | {o['lm_head_ratio']:.1f}x | {r['fill_ratio']:.3f} "
                f"| {r['pack_ms_per_1k_episodes']:.1f} |"
            )
    return "\n".join(lines)


def plot(results: list[dict], batch: int, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fspo_engine.engine.metrics import save_figure

    shots = [r["shots"] for r in results]
    x = np.arange(len(shots))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key_off, key_ours, title in (
        (axes[0], "tokens_per_episode", "ours_tokens_per_episode", "tokens per episode"),
        (axes[1], "attn_gflop_per_episode", "ours_attn_gflop_per_episode", "attention GFLOP per episode"),
    ):
        off = [r["official"][batch][key_off] for r in results]
        ours = [r[key_ours] for r in results]
        ax.bar(x - 0.2, off, 0.4, label=f"official (padded, batch {batch})")
        ax.bar(x + 0.2, ours, 0.4, label="prefix-shared packed")
        for i, (a, b) in enumerate(zip(off, ours)):
            ax.text(i, max(a, b) * 1.02, f"{a / b:.2f}x", ha="center", fontsize=9)
        ax.set_xticks(x, [str(s) for s in shots])
        ax.set_xlabel("shots")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def _range(text: str) -> tuple[int, int]:
    lo, hi = (int(v) for v in text.split("-"))
    return lo, hi


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="fspo-engine bench packing", description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=2000)
    p.add_argument("--shots", default="0,2,4,8", help="comma-separated shot counts")
    p.add_argument("--question", type=_range, default=(20, 120), help="question tokens, LO-HI")
    p.add_argument("--response", type=_range, default=(50, 400), help="response tokens, LO-HI")
    p.add_argument("--max-tokens", type=int, default=16384, help="packed row budget")
    p.add_argument("--official-batch", default="1,4", help="official per-device batch sizes, comma-separated")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--q-dim", type=int, default=4096, help="query heads x head dim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_out/packing")
    args = p.parse_args(argv)
    args.question, args.response = tuple(args.question), tuple(args.response)

    # Per (query, key) pair and layer: QK^T and PV are each 2 FLOPs per multiply-add over q_dim.
    flops_per_pair = 4 * args.q_dim * args.layers
    batches = [int(b) for b in args.official_batch.split(",")]
    results = []
    for shots in [int(s) for s in args.shots.split(",")]:
        items = synthetic_episodes(args.episodes, shots, args.seed, args.question, args.response)
        r = measure(items, args.max_tokens, batches, flops_per_pair)
        r["shots"] = shots
        results.append(r)
    table = markdown(results, args)
    print(table)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "packing.json", json.dumps({"args": vars(args), "results": results}, indent=2))
    write_text_atomic(out / "packing.md", table + "\n")
    plot(results, batches[0], out / "packing.png")
    print(f"\nwrote {out / 'packing.json'}, {out / 'packing.md'}, {out / 'packing.png'}")
    return results


if __name__ == "__main__":
    main()
