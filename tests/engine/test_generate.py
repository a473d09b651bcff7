"""Decoding with the K/V cache equals greedy decoding by full recomputation with the training forward."""

from __future__ import annotations

import torch

from fspo_engine.engine.generate import generate, sample_next
from fspo_engine.engine.model import LlamaConfig, build_model


def _greedy_full(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        ids = torch.tensor(seq)
        zeros = torch.zeros_like(ids)
        hidden = model(ids, torch.arange(len(seq)), zeros, zeros)
        seq.append(int(model.logits(hidden[-1:])[0].argmax()))
    return seq[len(prompt):]


def test_cached_greedy_matches_full_recompute():
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False,
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


def test_sampling_is_seeded_and_top_p_keeps_the_head():
    logits = torch.tensor([3.0, 2.9, -5.0, -6.0])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = [sample_next(logits, 1.0, 0.9, g1) for _ in range(50)]
    b = [sample_next(logits, 1.0, 0.9, g2) for _ in range(50)]
    assert a == b and set(a) <= {0, 1} and len(set(a)) == 2
    assert sample_next(logits, 0.0, 1.0, None) == 0
