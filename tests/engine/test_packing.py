"""Prefix-shared packing: the layout, the bin packing, and the invariant that matters most —
packed prefix-shared log-probs equal transformers' LlamaForCausalLM run on each prompt + response alone."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import hf_model, hf_response_logprob, make_tiny_model_dir

from fspo_engine.engine.errors import FspoError
from fspo_engine.engine.packing import (
    PackItem,
    assign_rows,
    attention_pairs_official,
    attention_pairs_packed,
    concat_rows,
    official_tokens,
    pack_batches,
    packing_stats,
)
from fspo_engine.engine.scoring import episode_logprobs, score_episodes, segment_logprobs

V = 300


def random_items(n, seed, ctx=(1, 40), resp=(1, 12), branches=(2, 2), vocab=V):
    rng = random.Random(seed)
    items = []
    for i in range(n):
        P = rng.randint(*ctx)
        prompt = [1] + [rng.randrange(3, vocab) for _ in range(P - 1)]
        k = rng.randint(*branches)
        responses = [[rng.randrange(3, vocab) for _ in range(rng.randint(*resp) - 1)] + [2] for _ in range(k)]
        items.append(PackItem(prompt, responses, episode_id=f"ep{i}"))
    return items


# ----------------------------------------------------------------------------------------------------------
# Layout


def test_layout_of_one_episode_matches_the_contract():
    item = PackItem([1, 10, 11, 12], [[20, 21, 2], [30, 31, 32, 2]], "e")
    (row,) = pack_batches([item], max_tokens=64, first_doc_id=7)
    assert row.input_ids.tolist() == [1, 10, 11, 12, 20, 21, 2, 30, 31, 32, 2]
    assert row.branch_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert row.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7]
    assert row.doc_ids.tolist() == [7] * 11
    # The last context row (3) predicts the first token of both branches.
    assert row.target_rows.tolist() == [3, 4, 5, 3, 7, 8, 9]
    assert row.targets.tolist() == [20, 21, 2, 30, 31, 32, 2]
    assert row.segment_ids.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert row.num_segments == 2
    assert row.seg_branch.tolist() == [1, 2] and row.seg_tokens.tolist() == [3, 4]
    assert row.seg_episode.tolist() == [0, 0] and row.episodes == [0]
    assert row.by_episode(torch.tensor([-1.5, -2.5])).tolist() == [[-1.5, -2.5]]


def test_by_episode_maps_segments_back_with_uneven_branch_counts():
    items = [
        PackItem([1, 5], [[6, 2]]),
        PackItem([1, 7], [[8, 2], [9, 2], [10, 2]]),
        PackItem([1], [[3], [4]]),
    ]
    (row,) = pack_batches(items, max_tokens=64)
    vals = torch.arange(row.num_segments, dtype=torch.float32)
    got = row.by_episode(vals)
    assert got.shape == (3, 3) and row.max_branches == 3
    for s in range(row.num_segments):
        e, b = int(row.seg_episode[s]), int(row.seg_branch[s])
        assert float(got[row.episodes.index(e), b - 1]) == float(vals[s])
    assert torch.isnan(got[row.episodes.index(0), 1:]).all()


def test_every_target_row_is_the_previous_token_of_its_own_branch():
    items = random_items(30, seed=1, branches=(1, 4))
    rows = pack_batches(items, max_tokens=160)
    seen = []
    for row in rows:
        for n in range(row.num_targets):
            src, seg = int(row.target_rows[n]), int(row.segment_ids[n])
            e = int(row.seg_episode[seg])
            b = int(row.seg_branch[seg])
            assert int(row.doc_ids[src]) == e
            assert int(row.branch_ids[src]) in (0, b)
            # The source row sits one RoPE position before the token it predicts.
            tgt_pos = int(row.position_ids[src]) + 1
            if int(row.branch_ids[src]) == b:
                assert int(row.input_ids[src + 1]) == int(row.targets[n])
            assert tgt_pos >= len(items[e].prompt_ids)
        assert row.num_tokens <= 160
        seen += row.episodes
    assert sorted(seen) == list(range(30))  # every episode exactly once


def test_doc_ids_unique_across_rows_and_concat_is_self_contained():
    items = random_items(25, seed=2)
    rows = pack_batches(items, max_tokens=120)
    assert len(rows) > 2
    docs = [set(r.doc_ids.tolist()) for r in rows]
    assert all(a.isdisjoint(b) for i, a in enumerate(docs) for b in docs[i + 1 :])
    big = concat_rows(rows)
    assert big.num_tokens == sum(r.num_tokens for r in rows)
    assert big.num_segments == sum(r.num_segments for r in rows)
    assert int(big.segment_ids.max()) == big.num_segments - 1
    assert torch.equal(
        big.input_ids[big.target_rows + 0], torch.cat([r.input_ids[r.target_rows] for r in rows])
    )


def test_best_fit_decreasing_packs_tightly_and_never_overflows():
    rng = random.Random(3)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    rows = assign_rows(lengths, 256)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 256 for r in rows)
    lower_bound = -(-sum(lengths) // 256)
    assert len(rows) <= lower_bound + 2  # BFD is near-optimal on small items
    assert assign_rows([256, 256, 1], 256) == [[0], [1], [2]]
    assert assign_rows([], 10) == []


def test_episode_longer_than_the_row_is_an_error_naming_it():
    items = random_items(3, seed=4)
    items[1] = PackItem([1] * 50, [[5, 2], [6, 2]], "user7/e0/3")
    with pytest.raises(FspoError, match="user7/e0/3.*54 tokens"):
        pack_batches(items, max_tokens=53)


def test_official_layout_accounting():
    a = PackItem([1] * 10, [[5] * 3, [6] * 5])
    b = PackItem([1] * 4, [[5] * 2, [6] * 1])
    assert official_tokens([a, b], batch_size=1) == 2 * 15 + 2 * 6
    assert official_tokens([a, b], batch_size=2) == 4 * 15
    assert attention_pairs_packed(b) == 10 + (2 * 4 + 3) + (1 * 4 + 1)
    assert attention_pairs_official([b], 1) == 2 * (6 * 7 // 2)
    rows = pack_batches([a, b], 64)
    st = packing_stats([a, b], rows, 64, official_batch_size=1)
    assert st["packed_tokens"] == 18 + 7 and st["official_tokens"] == 42 and st["tokens_saved"] == 42 - 25
    assert st["lm_head_rows"] == 8 + 3 and st["rows"] == 1
    assert st["fill_ratio"] == pytest.approx(25 / 64)


# ----------------------------------------------------------------------------------------------------------
# The invariant: packed == separate transformers forwards


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    base = tmp_path_factory.mktemp("packing_models")
    return {
        "untied": make_tiny_model_dir(base / "untied", vocab_size=V, tie=False, seed=0, tokenizer=False),
        "tied": make_tiny_model_dir(base / "tied", vocab_size=V, tie=True, seed=1, tokenizer=False),
    }


def _check_against_hf(model_dir, items, max_tokens, impl="torch"):
    from fspo_engine.engine.model import load_model

    ours = load_model(model_dir, dtype=torch.float32, device="cpu")
    oracle = hf_model(model_dir)
    rows = pack_batches(items, max_tokens)
    assert any(len(r.episodes) > 1 for r in rows), "the test must pack several episodes per row"
    checked = 0
    with torch.no_grad():
        for row in rows:
            seg = segment_logprobs(ours, row, impl=impl)
            assert seg.dtype == torch.float32 and seg.shape == (row.num_segments,)
            for s in range(row.num_segments):
                ep = items[int(row.seg_episode[s])]
                resp = ep.responses[int(row.seg_branch[s]) - 1]
                assert int(row.seg_tokens[s]) == len(resp)
                want = hf_response_logprob(oracle, ep.prompt_ids, resp)
                got = float(seg[s])
                assert abs(got - want) <= 1e-4 * abs(want) + 1e-5, (s, got, want)
                checked += 1
    assert checked == sum(len(it.responses) for it in items)


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_packed_logprobs_equal_transformers_two_branches(tiny_models, which):
    items = random_items(10, seed=10, ctx=(1, 48), resp=(1, 16))
    _check_against_hf(tiny_models[which], items, max_tokens=150)


def test_packed_logprobs_equal_transformers_many_branches(tiny_models):
    # Rows with 1..5 responses per episode: each branch sees the context and only itself.
    items = random_items(8, seed=11, ctx=(2, 40), resp=(1, 10), branches=(1, 5))
    _check_against_hf(tiny_models["untied"], items, max_tokens=180)


def test_episode_logprobs_and_score_episodes_keep_episode_order(tiny_models):
    from fspo_engine.engine.model import load_model

    ours = load_model(tiny_models["untied"])
    items = random_items(9, seed=12, ctx=(1, 30), resp=(1, 9))
    rows = pack_batches(items, max_tokens=90)
    with torch.no_grad():
        per_row = [episode_logprobs(ours, r, impl="torch") for r in rows]
    scored = score_episodes(ours, items, max_tokens=90, impl="torch")
    for out in per_row:
        for j, e in enumerate(out.episodes):
            assert float(scored.chosen[e]) == pytest.approx(float(out.chosen[j]), rel=1e-6)
            assert float(scored.rejected[e]) == pytest.approx(float(out.rejected[j]), rel=1e-6)
            assert int(scored.chosen_tokens[e]) == len(items[e].responses[0])
            assert int(scored.rejected_tokens[e]) == len(items[e].responses[1])
    # Packing budget does not change the numbers (one episode per row vs several).
    alone = score_episodes(ours, items, max_tokens=200, impl="torch")
    torch.testing.assert_close(alone.chosen, scored.chosen, rtol=1e-5, atol=1e-5)


def test_segment_logprobs_is_differentiable(tiny_models):
    from fspo_engine.engine.model import load_model

    ours = load_model(tiny_models["tied"])
    (row,) = pack_batches(random_items(2, seed=13, ctx=(3, 10), resp=(2, 5)), max_tokens=64)
    seg = segment_logprobs(ours, row, impl="torch")
    seg.sum().backward()
    grads = [p.grad for p in ours.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_bench_packing_smoke(tmp_path):
    from fspo_engine.benchmarks.bench_packing import main

    results = main(["--episodes", "60", "--shots", "0,8", "--official-batch", "1", "--out", str(tmp_path)])
    eight = results[-1]
    assert eight["shots"] == 8 and 1.5 < eight["official"][1]["token_ratio"] < 2.5
    assert eight["official"][1]["attn_ratio"] > 1.5 and eight["fill_ratio"] > 0.5
    assert {p.name for p in tmp_path.iterdir()} == {"packing.json", "packing.md", "packing.png"}


@pytest.mark.gpu
def test_packed_logprobs_equal_transformers_on_cuda_triton_paths(tiny_models):
    """The same invariant through the Triton attention and log-prob kernels (the CUDA default path)."""
    from fspo_engine.engine.model import load_model

    ours = load_model(tiny_models["untied"], dtype=torch.float32, device="cuda")
    oracle = hf_model(tiny_models["untied"])  # CPU fp32, eager attention
    items = random_items(12, seed=14, ctx=(1, 300), resp=(1, 40), branches=(1, 4))
    with torch.no_grad():
        for row in pack_batches(items, max_tokens=700):
            seg = segment_logprobs(ours, row.to("cuda"), impl="auto").cpu()
            for s in range(row.num_segments):
                ep = items[int(row.seg_episode[s])]
                want = hf_response_logprob(oracle, ep.prompt_ids, ep.responses[int(row.seg_branch[s]) - 1])
                assert abs(float(seg[s]) - want) <= 1e-4 * abs(want) + 1e-5, (s, float(seg[s]), want)


def test_episode_logprobs_refuses_rows_without_two_responses_per_episode_or_chosen_only():
    for responses in ([[6, 2]], [[6, 2], [7, 2], [8, 2]]):
        (row,) = pack_batches([PackItem([1, 5], [[6, 2], [7, 2]]), PackItem([1, 5], responses)], 64)
        with pytest.raises(ValueError, match="two responses per episode"):
            episode_logprobs(None, row)  # checked before any forward
