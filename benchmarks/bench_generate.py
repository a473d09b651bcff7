"""How much does batched generation save over answering one prompt at a time, and how does it compare with
transformers' `generate` on the same weights?

`eval --winrate` and `generate --out` answer every (user, question) of a split: hundreds of prompts of
different lengths (few-shot contexts of 0-8 shots), each answer a few dozen tokens. Three ways to do it, side
by side in one run, on one random Llama and the same prompts:

* `batched`: `engine.generate.generate_batch`, all prompts at once (packed prefill, a per-row K/V cache, rows
  leaving the batch as they finish);
* `one_by_one`: `generate_batch` of one prompt per call (what a loop over `generate` does);
* `hf_batched`: `transformers` `LlamaForCausalLM.generate` on left-padded batches of `--hf-batch` prompts,
  greedy, with its K/V cache (the usual way to do this without fspo-engine).

Greedy everywhere, no stop ids, exactly `--new-tokens` tokens per prompt, so every variant does the same
work; the outputs of `batched` and `one_by_one` are checked equal token for token.

`--generator openai` puts the remote path (engine/remote.py, what `generate --generator openai` runs) beside
`batched` and `one_by_one` instead of transformers: each prompt goes as token ids through LLMClient to a
FakeOpenAI /v1/completions server on 127.0.0.1, in this process, whose `complete` hook decodes it with the
same weights, one request at a time (the test server of tests/engine/test_remote.py); its tokens are checked
equal to `batched`'s. On a CPU this measures the price of the HTTP path around an unbatched decoder, not a
serving engine: vLLM's continuous batching and paged attention on a GPU are where a server pays off.

    fspo-engine bench generate [--prompts 64] [--prompt-tokens 20-300] [--new-tokens 32] [--size small]
    fspo-engine bench generate --generator openai [--concurrency 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fspo_engine.data_gen.atomic import write_text_atomic

SIZES = {
    # ~the quickstart's model, and a model whose matmuls dominate the per-token overheads on a CPU.
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4),
}


def _range(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split("-"))
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"need 1 <= LO <= HI, got {text!r}")
    return lo, hi


def make_prompts(n: int, lengths: tuple[int, int], vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (s,), generator=g).tolist() for s in sizes]


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(args) -> dict:
    import transformers

    from fspo_engine.engine.generate import generate_batch
    from fspo_engine.engine.model import LlamaConfig, build_model, load_model, save_model

    spec = SIZES[args.size]
    prompts = make_prompts(args.prompts, args.prompt_tokens, spec["vocab_size"], args.seed)
    new = args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        # One set of weights for both libraries: built by the engine, saved as an HF directory, read by each.
        save_model(build_model(LlamaConfig(**spec, tie_word_embeddings=False), seed=args.seed), tmp)
        ours = load_model(tmp).eval()
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32).eval()
    hf.generation_config.pad_token_id = 0

    results = {}
    with torch.inference_mode():
        generate_batch(ours, prompts[:2], max_new_tokens=2)  # warm-up: first-call allocations
        batched, t = _timed(lambda: generate_batch(ours, prompts, max_new_tokens=new))
        results["batched"] = t
        one, t = _timed(lambda: [generate_batch(ours, [p], max_new_tokens=new)[0] for p in prompts])
        results["one_by_one"] = t
        if [g.ids for g in batched] != [g.ids for g in one]:
            raise SystemExit("batched and one-by-one generations differ: the benchmark compares unequal work")
    if args.generator == "openai":
        remote, results["openai"] = _remote(ours, prompts, new, args.concurrency)
        if remote != [g.ids for g in batched]:
            raise SystemExit("the server's generations differ from batched ones: the benchmark compares unequal work")
        return _report(args, prompts, new, results)
    with torch.inference_mode():
        def hf_all():
            for i in range(0, len(prompts), args.hf_batch):
                chunk = prompts[i:i + args.hf_batch]
                width = max(map(len, chunk))
                ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
                hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                            do_sample=False)

        _, results["hf_batched"] = _timed(hf_all)
    return _report(args, prompts, new, results)


def _remote(model, prompts: list[list[int]], new: int, concurrency: int) -> tuple[list[list[int]], float]:
    """`prompts` through engine/remote.py to a FakeOpenAI whose hook decodes with `model`, one request at a time:
    (the ids it generated, in order; seconds)."""
    from fspo_engine.benchmarks.fake_openai import FakeOpenAI
    from fspo_engine.engine.generate import generate_batch
    from fspo_engine.engine.personalize import Prompt
    from fspo_engine.engine.remote import RemoteGenerator, Server

    def complete(body):  # the server: one prompt's greedy continuation, its ids as the text
        (g,) = generate_batch(model, [body["prompt"]], max_new_tokens=body["max_tokens"])
        return {"text": " ".join(map(str, g.ids)), "completion_tokens": len(g.ids)}

    with FakeOpenAI(complete=complete, record=False) as server:
        gen = RemoteGenerator(None, None, (), max_new_tokens=new,
                              server=Server(server.base_url, "bench", concurrency=concurrency))
        out, seconds = _timed(lambda: gen._run([Prompt("", p) for p in prompts], new))
    return [[int(t) for t in g.text.split()] for g in out], seconds


def _report(args, prompts, new: int, results: dict) -> dict:
    tokens = len(prompts) * new
    return {"args": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()},
            "torch": torch.__version__, "threads": torch.get_num_threads(), "generated_tokens": tokens,
            "prompt_tokens": sum(map(len, prompts)),
            "variants": {k: {"seconds": s, "tokens_per_s": tokens / s, "rows_per_s": len(prompts) / s,
                             "speedup_vs_batched": results["batched"] / s} for k, s in results.items()}}


def markdown(r: dict) -> str:
    a = r["args"]
    lines = [f"{a['prompts']} prompts of {a['prompt_tokens'][0]}-{a['prompt_tokens'][1]} tokens "
             f"({r['prompt_tokens']} in all), {a['new_tokens']} new tokens each, `{a['size']}` model, "
             f"{r['threads']} threads, torch {r['torch']}", "",
             "| variant | seconds | rows/s | generated tokens/s | time vs batched |", "|---|---:|---:|---:|---:|"]
    for name, v in r["variants"].items():
        lines.append(f"| {name} | {v['seconds']:.2f} | {v['rows_per_s']:.1f} | {v['tokens_per_s']:.0f} | "
                     f"{1 / v['speedup_vs_batched']:.2f}x |")
    return "\n".join(lines)


def plot(r: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fspo_engine.engine.metrics import save_figure

    names = list(r["variants"])
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.bar(names, [r["variants"][n]["rows_per_s"] for n in names], color=["tab:blue", "tab:gray", "tab:orange"])
    ax.set_ylabel("rows (prompts answered) / s")
    ax.set_title(f"generation, {r['args']['prompts']} prompts, {r['args']['size']} model")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="fspo-engine bench generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-tokens", type=_range, default=(20, 300), help="prompt lengths, LO-HI")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--hf-batch", type=int, default=16, help="prompts per transformers generate call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generator", choices=["local", "openai"], default="local",
                   help="openai: the remote path against a test completions server in place of transformers")
    p.add_argument("--concurrency", type=int, default=16, help="--generator openai: requests in flight")
    p.add_argument("--out", default="bench_out/generate")
    args = p.parse_args(argv)
    if args.prompts < 2 or args.new_tokens < 1 or args.hf_batch < 1 or args.concurrency < 1:
        p.error("--prompts >= 2, --new-tokens >= 1, --hf-batch >= 1 and --concurrency >= 1")
    r = run(args)
    table = markdown(r)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "generate.json", json.dumps(r, indent=2))
    write_text_atomic(out / "generate.md", table + "\n")
    plot(r, out / "generate.png")
    print(f"\nwrote {out / 'generate.json'}, {out / 'generate.md'}, {out / 'generate.png'}")
    return r


if __name__ == "__main__":
    main()
