"""Generation: cached decoding against full recomputation and against transformers' `generate`; batched
against one prompt at a time; stop ids, stop strings, lengths, seeds and argument checks."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import random_hf_llama

from fspo_engine.engine.generate import (
    Generation,
    _plan_batches,
    _sample,
    generate,
    generate_batch,
    sample_next,
)
from fspo_engine.engine.model import LlamaConfig, build_model, load_model

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}  # fmt: skip
# Tied embeddings, GQA 4:1, llama3 rope scaling whose bands straddle the positions used (prompts up to 60).
TIED = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, rope_theta=10000.0,
            rope_scaling=LLAMA3_ROPE)
# Untied embeddings, GQA 2:1, plain rope.
UNTIED = dict(vocab_size=173, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0)


def make_hf_llama(path, spec: dict, seed: int = 0):
    """A random transformers Llama saved at `path`. Weights N(0, 0.15) and norms away from 1: logits are sharp,
    so an argmax near-tie cannot hide a bug (test_greedy_matches_transformers checks the margins)."""
    return random_hf_llama(path, seed=seed, std=0.15, **spec, max_position_embeddings=512, rms_norm_eps=1e-5,
                           bos_token_id=None, eos_token_id=None, pad_token_id=None)


def random_prompts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The engine's model on the TIED spec, fp32 on CPU."""
    path = tmp_path_factory.mktemp("gen") / "hf"
    make_hf_llama(path, TIED)
    return load_model(path).eval()


def decode(ids):
    """A stand-in tokenizer: two characters per token, so a stop string can end inside a token."""
    return "".join(chr(ord("a") + t % 26) + chr(ord("A") + t // 26 % 26) for t in ids)


def apply_stops(tokens, stop_ids, stop_strings, max_new_tokens):
    """The stop rules applied after the fact to an unstopped continuation (the oracle for stopping)."""
    for n in range(1, len(tokens) + 1):
        if tokens[n - 1] in stop_ids:
            return Generation(tokens[: n - 1], decode(tokens[: n - 1]), "eos")
        text = decode(tokens[:n])
        hits = [text.find(s) for s in stop_strings if s in text]
        if hits:
            return Generation(tokens[:n], text[: min(hits)], "stop")
        if n == max_new_tokens:
            return Generation(tokens[:n], text, "length")
    raise AssertionError("continuation shorter than max_new_tokens without a stop")


# ----------------------------------------------------------------------------------------------------------
# Correctness of the decoded tokens


def _greedy_full(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        ids = torch.tensor(seq)
        zeros = torch.zeros_like(ids)
        hidden = model(ids, torch.arange(len(seq)), zeros, zeros)
        seq.append(int(model.logits(hidden[-1:])[0].argmax()))
    return seq[len(prompt):]


def test_cached_greedy_matches_full_recompute():
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    model = build_model(cfg, seed=1).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init, so argmax ties cannot hide a bug
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(20)
    prompt = torch.randint(0, 97, (23,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        ref = _greedy_full(model, prompt, 12)
    assert generate(model, prompt, max_new_tokens=12) == ref
    # A stop id ends generation and is included.
    stop = ref[4]
    got = generate(model, prompt, max_new_tokens=12, stop_ids=(stop,))
    assert got == ref[: ref.index(stop) + 1]


@pytest.mark.parametrize("spec", [TIED, UNTIED], ids=["tied-gqa4-llama3rope", "untied-gqa2"])
def test_greedy_matches_transformers(tmp_path, spec):
    hf = make_hf_llama(tmp_path / "hf", spec)
    ours = load_model(tmp_path / "hf").eval()
    prompts = random_prompts([1, 6, 17, 60], spec["vocab_size"])
    n_new = 14

    def hf_greedy(prompt, eos):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=n_new, eos_token_id=eos, pad_token_id=0)  # fmt: skip
        return out[0, len(prompt):].tolist()

    free = [hf_greedy(p, None) for p in prompts]
    # Every greedy choice along the way wins by a clear margin (full forwards over the reference sequences),
    # so fp32 rounding cannot flip an argmax and the comparison below can only fail on a real difference.
    for p, f in zip(prompts, free):
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([p + f])).logits[0, len(p) - 1:-1]
        top2 = logits.topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-3
    assert [g.ids for g in generate_batch(ours, prompts, max_new_tokens=n_new)] == free
    # With an eos that ends some rows early (HF's output keeps the eos; ours drops it and says "eos").
    eos = free[2][5]
    got = generate_batch(ours, prompts, max_new_tokens=n_new, stop_ids=(eos,))
    ref = [hf_greedy(p, eos) for p in prompts]
    assert [g.ids + [eos] if g.finish_reason == "eos" else g.ids for g in got] == ref
    assert [g.finish_reason for g in got] == ["eos" if r[-1] == eos else "length" for r in ref]
    assert "eos" in {g.finish_reason for g in got} and "length" in {g.finish_reason for g in got}


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_batched_equals_one_by_one(tiny, temperature):
    """Prompts of very different lengths (1 to 90 tokens), stop ids in some rows, a stop string in another:
    one batch, several batches and one prompt at a time give the same tokens, texts and finish reasons, and
    these are what the stop rules give on the unstopped continuation."""
    prompts = random_prompts([1, 90, 7, 45, 3, 70, 20, 2], TIED["vocab_size"], seed=1)
    kw = dict(max_new_tokens=16, temperature=temperature, top_p=0.95, seed=7, decode=decode)
    free = generate_batch(tiny, prompts, **kw)
    assert all(g.finish_reason == "length" and len(g.ids) == 16 for g in free)
    if temperature > 0:  # sampling really samples: not the greedy continuation, and the seed matters
        greedy = generate_batch(tiny, prompts, **{**kw, "temperature": 0.0})
        assert sum(g.ids != f.ids for g, f in zip(greedy, free)) >= len(prompts) // 2
        other = generate_batch(tiny, prompts, **{**kw, "seed": 8})
        assert sum(o.ids != f.ids for o, f in zip(other, free)) >= len(prompts) // 2
    # Stops picked from the free run: an eos midway through row 1, a stop string ending inside row 3's
    # 7th token (its second character, which must be cut from the text).
    stop_ids = (free[1].ids[6], 0)
    stop_string = free[3].text[9:13]
    stops = dict(stop_ids=stop_ids, stop_strings=("<never>", stop_string))
    expected = [apply_stops(g.ids, stop_ids, stops["stop_strings"], 16) for g in free]
    reasons = [g.finish_reason for g in expected]
    assert {"eos", "stop", "length"} <= set(reasons), reasons
    assert expected[3].finish_reason == "stop" and not expected[3].text.endswith(stop_string[:-1])

    one_batch = generate_batch(tiny, prompts, **kw, **stops)
    assert one_batch == expected
    small = generate_batch(tiny, prompts, **kw, **stops, max_batch_tokens=3 * (70 + 16))
    assert small == expected
    # Alone, prompt i is reproduced with seed + i (its own generator's seed).
    alone = [generate_batch(tiny, [p], **{**kw, "seed": 7 + i}, **stops)[0] for i, p in enumerate(prompts)]
    assert alone == expected
    # Reversed order: each prompt keeps its own result when greedy (sampled: the seed follows the index).
    if temperature == 0:
        assert generate_batch(tiny, prompts[::-1], **kw, **stops) == expected[::-1]


def test_single_prompt_generate_is_generate_batch(tiny):
    prompt = random_prompts([30], TIED["vocab_size"], seed=4)[0]
    for temperature in (0.0, 0.8):
        free = generate_batch(tiny, [prompt], max_new_tokens=12, temperature=temperature, seed=3)[0]
        stop = free.ids[4]
        got = generate(tiny, prompt, max_new_tokens=12, temperature=temperature, seed=3, stop_ids=(stop,))
        assert got == free.ids[: free.ids.index(stop) + 1]  # the stop id included, as before
        assert generate(tiny, prompt, max_new_tokens=12, temperature=temperature, seed=3) == free.ids


# ----------------------------------------------------------------------------------------------------------
# Stops, lengths, batching, progress


def test_stop_string_text_and_finish_reasons(tiny):
    prompts = random_prompts([5, 12], TIED["vocab_size"], seed=2)
    free = generate_batch(tiny, prompts, max_new_tokens=10, decode=decode)
    assert [g.text for g in free] == [decode(g.ids) for g in free]
    assert all(g.finish_reason == "length" and len(g.ids) == 10 for g in free)
    # A stop string completed by the 4th token, ending on its first character.
    target = free[0].text[5:7]
    first = free[0].text.find(target)
    got = generate_batch(tiny, prompts[:1], max_new_tokens=10, decode=decode, stop_strings=(target,))[0]
    assert got.finish_reason == "stop"
    assert got.text == free[0].text[:first] and target not in got.text
    assert got.ids == free[0].ids[: (first + len(target) + 1) // 2]  # through the token that completed it
    # Two stop strings completed by the same token: the text is cut at the earlier match.
    k = 3
    late, early = free[1].text[2 * k + 2: 2 * k + 4], free[1].text[2 * k + 1: 2 * k + 3]  # token k+1; k/k+1
    both = (late, early)
    got = generate_batch(tiny, prompts[1:], max_new_tokens=10, decode=decode, stop_strings=both)[0]
    assert got == apply_stops(free[1].ids, (), both, 10)
    assert got.text == free[1].text[: min(free[1].text.find(late), free[1].text.find(early))]
    # Without decode there is no text; max_new_tokens is respected.
    short = generate_batch(tiny, prompts, max_new_tokens=3)
    assert [g.ids for g in short] == [g.ids[:3] for g in free] and all(g.text is None for g in short)


def test_bf16_model_decodes_in_bf16(tmp_path):
    make_hf_llama(tmp_path / "hf", UNTIED)
    ours32 = load_model(tmp_path / "hf").eval()
    ours16 = load_model(tmp_path / "hf", dtype=torch.bfloat16).eval()
    prompts = random_prompts([4, 33, 1], UNTIED["vocab_size"], seed=6)
    got = generate_batch(ours16, prompts, max_new_tokens=5, max_batch_tokens=80)
    ref = generate_batch(ours32, prompts, max_new_tokens=5)
    assert all(len(g.ids) == 5 for g in got)
    assert [g.ids[0] for g in got] == [r.ids[0] for r in ref]  # sharp logits: bf16 picks the same first token


def test_plan_batches_bounds_the_cache():
    lengths = [5, 300, 40, 41, 7, 100, 1, 39]
    batches = _plan_batches(lengths, 20, 250)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        cache = len(b) * (max(lengths[i] for i in b) + 20)
        assert cache <= 250 or len(b) == 1, (b, cache)
    assert batches[0] == [1]  # too long for the bound: alone, first
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)  # similar lengths share a batch
    assert _plan_batches(lengths, 20, None) == [sorted(range(8), key=lambda i: -lengths[i])]
    assert _plan_batches([], 20, 100) == []


def test_on_done_counts_every_prompt(tiny):
    prompts = random_prompts([3, 9, 4, 30, 2], TIED["vocab_size"], seed=5)
    calls = []
    out = generate_batch(tiny, prompts, max_new_tokens=6, max_batch_tokens=40, on_done=calls.append)
    assert len(out) == 5 and sum(calls) == 5 and len(calls) >= 2
    assert generate_batch(tiny, [], max_new_tokens=6) == []


@pytest.mark.parametrize("kwargs, name", [
    (dict(prompts=[[1, 2], []]), "prompts[1]"),
    (dict(prompts=[[1, 10_000]]), "prompts[0]"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(stop_strings=("\n",)), "stop_strings"),
    (dict(stop_strings=("",), decode=decode), "stop_strings"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_batch_tokens=0), "max_batch_tokens"),
    (dict(stop_ids=[1.5]), "stop_ids"),
    (dict(stop_ids=2), "stop_ids"),
    (dict(stop_strings="\n", decode=decode), "stop_strings"),
])  # fmt: skip
def test_bad_arguments_name_themselves(tiny, kwargs, name):
    kwargs = {"prompts": [[1, 2, 3]], **kwargs}
    with pytest.raises(ValueError, match="^" + re.escape(name) + ":"):
        generate_batch(tiny, **kwargs)


def test_single_prompt_bad_arguments(tiny):
    with pytest.raises(ValueError, match="^prompt_ids:"):
        generate(tiny, [])
    with pytest.raises(ValueError, match="^top_p:"):
        generate(tiny, [1], top_p=2.0)


# ----------------------------------------------------------------------------------------------------------
# Sampler


def test_sampling_is_seeded_and_top_p_keeps_the_head():
    logits = torch.tensor([3.0, 2.9, -5.0, -6.0])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = [sample_next(logits, 1.0, 0.9, g1) for _ in range(50)]
    b = [sample_next(logits, 1.0, 0.9, g2) for _ in range(50)]
    assert a == b and set(a) <= {0, 1} and len(set(a)) == 2
    assert sample_next(logits, 0.0, 1.0, None) == 0


@pytest.mark.parametrize("top_p", [1.0, 0.75])
def test_sampler_follows_the_nucleus_distribution(top_p):
    logits = torch.tensor([0.3, 2.0, -1.0, 1.2, 0.0, 1.9, -3.0])
    temperature = 0.7
    probs = torch.softmax(logits / temperature, -1).double()
    sorted_p, order = probs.sort(descending=True)
    keep = order[(sorted_p.cumsum(0) - sorted_p) < top_p]
    expected = torch.zeros_like(probs)
    expected[keep] = probs[keep] / probs[keep].sum()
    n = 4000
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample_next(logits, temperature, top_p, gen) for _ in range(n)]),
                            minlength=len(logits)).double()  # fmt: skip
    assert (counts[expected == 0] == 0).all()
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((counts / n - expected).abs() <= 4 * sigma + 1e-12).all(), (counts / n, expected)
    # Rows of a batch draw from their own generators: row r of a batched draw is sample_next on its own.
    batch = torch.randn(5, 50, generator=torch.Generator().manual_seed(1)) * 2
    gens = [torch.Generator().manual_seed(10 + r) for r in range(5)]
    alone = [sample_next(batch[r], temperature, top_p, torch.Generator().manual_seed(10 + r)) for r in range(5)]
    assert _sample(batch, temperature, top_p, gens).tolist() == alone


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampler_never_picks_a_token_without_mass(monkeypatch, top_p):
    # Underflowed probabilities first and last in the row; the extreme uniforms 0 and 1 (u * total rounding
    # up to the total) must still land on a token with mass.
    logits = torch.tensor([[-1e4, 0.0, 0.0, -1e4, -1e4]])
    assert float(torch.softmax(logits, -1)[0, 0]) == 0.0
    for u in (0.0, 1.0):
        monkeypatch.setattr(torch, "rand", lambda *a, u=u, **k: torch.tensor(u, dtype=torch.float64))
        assert _sample(logits, 1.0, top_p, [torch.Generator()]).item() in (1, 2)


def test_bench_generate_smoke(tmp_path):
    """`bench generate` runs its three variants on the same prompts (checking batched == one by one) and writes
    its JSON, table and plot."""
    from fspo_engine.benchmarks import bench_generate

    r = bench_generate.main(["--size", "tiny", "--prompts", "5", "--prompt-tokens", "3-40", "--new-tokens", "3",
                             "--hf-batch", "2", "--out", str(tmp_path)])
    assert set(r["variants"]) == {"batched", "one_by_one", "hf_batched"} and r["generated_tokens"] == 15
    assert all(v["seconds"] > 0 for v in r["variants"].values())
    assert json.loads((tmp_path / "generate.json").read_text())["variants"].keys() == r["variants"].keys()
    assert (tmp_path / "generate.png").stat().st_size > 0 and "| batched |" in (tmp_path / "generate.md").read_text()


def test_bench_generate_openai_smoke(tmp_path):
    """`bench generate --generator openai`: the remote path against a completions server decoding with the same
    weights, beside batched and one-by-one (its tokens checked equal to batched's), rows/s for each."""
    from fspo_engine.benchmarks import bench_generate

    r = bench_generate.main(["--size", "tiny", "--prompts", "4", "--prompt-tokens", "3-30", "--new-tokens", "3",
                             "--generator", "openai", "--concurrency", "2", "--out", str(tmp_path)])
    assert set(r["variants"]) == {"batched", "one_by_one", "openai"}
    assert all(v["rows_per_s"] > 0 for v in r["variants"].values())
    assert "| openai |" in (tmp_path / "generate.md").read_text()
