"""Activation checkpointing and torch.compile applied to a finished model: same gradients, same names."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from fspo_engine.engine.distributed import apply_ac_and_compile
from fspo_engine.engine.model import LlamaConfig, build_model
from fspo_engine.engine.packing import PackItem, pack_batches
from fspo_engine.engine.scoring import segment_logprobs

CFG = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def _rows(seed, contexts=(9, 13, 1)):
    g = torch.Generator().manual_seed(seed)
    items = [PackItem(torch.randint(0, 101, (n,), generator=g).tolist(),
                      [torch.randint(0, 101, (m,), generator=g).tolist() for m in (4, 6)]) for n in contexts]
    return pack_batches(items, 128)


def _grads(model, row):
    model.zero_grad(set_to_none=True)
    out = segment_logprobs(model, row, impl="torch")
    out.sum().backward()
    # named_parameters shows the wrappers' own prefixes; state_dict (what checkpoints hold) does not.
    strip = lambda n: n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
    return out.detach(), {strip(n): p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_keeps_gradients_and_names():
    (row,) = _rows(0)
    plain = build_model(CFG, seed=4)
    _, ref = _grads(plain, row)
    names = list(plain.state_dict())
    wrapped = apply_ac_and_compile(build_model(CFG, seed=4), activation_checkpointing=True, compile=False)
    assert all(type(b).__name__ == "CheckpointWrapper" for b in wrapped.model.layers)
    assert list(wrapped.state_dict()) == names  # checkpoints keep Hugging Face names
    _, got = _grads(wrapped, row)
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.slow
def test_compiled_blocks_match_eager_on_rows_of_changing_length():
    """Per-block torch.compile (inductor; on CPU it needs a C++ compiler): same log-probs and gradients as
    eager on two packed rows of different lengths and layouts, with activation checkpointing on top."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    plain = build_model(CFG, seed=4)
    names = list(plain.state_dict())
    compiled = apply_ac_and_compile(build_model(CFG, seed=4), activation_checkpointing=True, compile=True)
    assert list(compiled.state_dict()) == names
    for row in (*_rows(1), *_rows(2, contexts=(30, 5, 17, 2))):
        want, ref = _grads(plain, row)
        got_out, got = _grads(compiled, row)
        torch.testing.assert_close(got_out, want, rtol=1e-5, atol=1e-5)
        assert got.keys() == ref.keys()
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)
