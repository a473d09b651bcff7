"""The hf backend's plumbing (LLMClient's local-model transport) with a tiny random Llama saved by transformers (its replies are gibberish)."""

from __future__ import annotations

import asyncio

import pytest

from fspo_engine.data_gen import generate_dataset
from fspo_engine.data_gen.client import LLMClient, MalformedReply
from fspo_engine.data_gen.errors import DataGenError


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    words = [
        "<unk>",
        "<s>",
        "</s>",
        "{",
        "}",
        '"',
        ":",
        "response",
        "views",
        "preferred",
        "A",
        "B",
        "tie",
        "the",
    ]
    words += [f"w{i}" for i in range(50)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    hf_tok.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_hf_transport_generates_deterministically_and_rejects_gibberish(tiny_llama, tmp_path):
    async def go():
        c = LLMClient(model=str(tiny_llama), hf_model_dir=tiny_llama, cache_dir=None, malformed_retries=1)
        messages = [{"role": "user", "content": "Task: views\nQuestion: the w1 w2"}]
        try:
            r1 = await c.chat(messages, stage="views", max_tokens=6, temperature=0.8)
            r2 = await c.chat(messages, stage="views", max_tokens=6, temperature=0.8)  # no cache: same seed
            with pytest.raises(MalformedReply, match=r"^views: .*tiny-llama"):
                await c.chat_json(messages, stage="views", schema={"type": "object"}, schema_name="views",
                                  max_tokens=6)
        finally:
            await c.aclose()
        return c, r1, r2

    c, r1, r2 = asyncio.run(go())
    assert r1.text == r2.text and 0 < r1.completion_tokens <= 6 and r1.prompt_tokens > 0
    assert c.stats()["stages"]["views"]["malformed"] == 2


def test_hf_pipeline_fails_clearly_when_no_reply_parses(tiny_llama, tmp_path):
    with pytest.raises(DataGenError, match="no preferences were generated; first problem: views: "):
        generate_dataset(
            tmp_path / "out",
            backend="hf",
            model=str(tiny_llama),
            personas="template",
            questions="template",
            users=2,
            prefs_per_user=1,
            max_tokens=4,
            progress=False,
        )
    # Every unit was done and none gave a pair: the state is dropped so that the advised re-run (with the
    # cause fixed) starts afresh instead of finding all units done and failing the same way.
    assert not (tmp_path / "out" / ".gen-state").exists()
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_hf_transport_rejects_a_non_model_directory(tmp_path):
    with pytest.raises(DataGenError, match="not a Hugging Face model directory"):
        LLMClient(model=str(tmp_path), hf_model_dir=tmp_path)


@pytest.mark.parametrize("damage", ["corrupt weights", "no tokenizer"])
def test_hf_load_errors_are_one_line_and_leave_nothing(tiny_llama, tmp_path, damage):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    if damage == "corrupt weights":
        (model / "model.safetensors").write_bytes(b"\xff" * 64)  # a header length far past the file
    else:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (model / name).unlink(missing_ok=True)
    with pytest.raises(DataGenError, match=rf"^{model}: cannot load the model \(") as info:
        generate_dataset(tmp_path / "out", backend="hf", model=str(model), users=2, progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # the model is loaded before anything is created
