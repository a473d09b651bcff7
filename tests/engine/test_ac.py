"""Activation checkpointing applied to a finished model: same gradients, same parameter names."""

from __future__ import annotations

import torch

from fspo_engine.engine.distributed import apply_ac_and_compile
from fspo_engine.engine.model import LlamaConfig, build_model
from fspo_engine.engine.packing import PackItem, pack_batches
from fspo_engine.engine.scoring import segment_logprobs


def test_activation_checkpointing_keeps_gradients_and_names():
    cfg = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    g = torch.Generator().manual_seed(0)
    items = [PackItem(torch.randint(0, 101, (n,), generator=g).tolist(),
                      [torch.randint(0, 101, (m,), generator=g).tolist() for m in (4, 6)]) for n in (9, 13, 1)]
    (row,) = pack_batches(items, 128)

    def grads(model):
        model.zero_grad(set_to_none=True)
        segment_logprobs(model, row, impl="torch").sum().backward()
        # named_parameters shows the wrapper's own prefix; state_dict (what checkpoints hold) does not.
        return {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()}

    plain = build_model(cfg, seed=4)
    ref = grads(plain)
    names = list(plain.state_dict())
    wrapped = apply_ac_and_compile(build_model(cfg, seed=4), activation_checkpointing=True, compile=False)
    assert all(type(b).__name__ == "CheckpointWrapper" for b in wrapped.model.layers)
    assert list(wrapped.state_dict()) == names  # checkpoints keep Hugging Face names
    got = grads(wrapped)
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-7, msg=n)
