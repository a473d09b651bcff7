"""The engine's Llama against transformers' LlamaForCausalLM, HF directory round trips, packed rows."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from helpers import cli, random_hf_llama
from safetensors.torch import load_file, save_file

from fspo_engine.engine.errors import FspoError
from fspo_engine.engine.model import LlamaConfig, build_model, load_model, save_model

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False, rope_theta=10000.0)
# Llama-3.2-style: tied embeddings, llama3 rope scaling (bands straddling the original length), GQA 4:1,
# vocab not a multiple of 64.
LLAMA32 = dict(vocab_size=1003, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True,
               rope_theta=500000.0,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64})


def make_hf_model(tmp_path, spec: dict, seed: int = 0):
    """A random transformers Llama saved at tmp_path/hf (helpers.random_hf_llama) -> (model, its directory)."""
    return random_hf_llama(tmp_path / "hf", seed=seed, **spec), tmp_path / "hf"


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def single_doc(ids, start=0):
    T = ids.numel()
    pos = torch.arange(start, start + T)
    zeros = torch.zeros(T, dtype=torch.long)
    return ids, pos, zeros, zeros.clone()


@pytest.mark.parametrize("spec", [TINY, LLAMA32], ids=["tiny", "llama3.2-style"])
def test_logits_match_transformers(tmp_path, spec):
    hf, path = make_hf_model(tmp_path, spec)
    ours = load_model(path).eval()
    torch.manual_seed(1)
    for T, start in ((1, 0), (37, 0), (53, 190)):  # 190: positions past the original rope length
        ids = torch.randint(0, spec["vocab_size"], (T,))
        with torch.no_grad():
            ref = hf(input_ids=ids[None], position_ids=torch.arange(start, start + T)[None]).logits[0]
            got = ours.logits(ours(*single_doc(ids, start)))
        assert got.shape == ref.shape
        assert rel_err(got, ref) < 1e-5, (T, start, rel_err(got, ref))


def test_config_reads_transformers5_rope_parameters(tmp_path):
    _, path = make_hf_model(tmp_path, LLAMA32)
    raw = json.loads((path / "config.json").read_text())
    legacy = LlamaConfig.from_hf_dict(
        {**{k: v for k, v in raw.items() if k not in ("rope_parameters",)},
         "rope_theta": 500000.0, "rope_scaling": {**LLAMA32["rope_scaling"], "type": "llama3"}})
    modern = LlamaConfig.from_hf_dict(
        {**{k: v for k, v in raw.items() if k not in ("rope_theta", "rope_scaling")},
         "rope_parameters": {"rope_theta": 500000.0, **LLAMA32["rope_scaling"]}})
    assert legacy.rope_theta == modern.rope_theta == 500000.0
    assert legacy.rope_scaling["rope_type"] == modern.rope_scaling["rope_type"] == "llama3"
    assert legacy.rope_scaling["factor"] == modern.rope_scaling["factor"] == 8.0


@pytest.mark.parametrize("shard", [False, True], ids=["single-file", "sharded"])
def test_save_loads_in_transformers_and_back(tmp_path, shard):
    cfg = LlamaConfig(**LLAMA32)
    ours = build_model(cfg, seed=3).eval()
    with torch.no_grad():  # norms away from 1 so a dropped norm weight would show
        for layer in ours.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    out = tmp_path / "saved"
    save_model(ours, out, max_shard_bytes=40_000 if shard else 5 * 1024**3)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert (len(files) > 1) == shard, files
    assert (out / "model.safetensors.index.json").exists() == shard
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    again = load_model(out).eval()
    ids = torch.randint(0, cfg.vocab_size, (29,))
    with torch.no_grad():
        ref = hf(input_ids=ids[None]).logits[0]
        assert rel_err(ours.logits(ours(*single_doc(ids))), ref) < 1e-5
        assert rel_err(again.logits(again(*single_doc(ids))), ref) < 1e-5


def test_bf16_load_and_forward(tmp_path):
    _, path = make_hf_model(tmp_path, TINY)
    ours32 = load_model(path).eval()
    ours16 = load_model(path, dtype=torch.bfloat16).eval()
    assert ours16.lm_head_weight.dtype == torch.bfloat16
    ids = torch.randint(0, TINY["vocab_size"], (40,))
    with torch.no_grad():
        ref = ours32.logits(ours32(*single_doc(ids)))
        got = ours16.logits(ours16(*single_doc(ids))).float()
    assert rel_err(got, ref) < 5e-2


def packed_row(lengths, vocab, seed=0):
    """Random packed row: per document a context and several branches; returns the row and the separate runs."""
    g = torch.Generator().manual_seed(seed)
    ids, pos, doc, br = [], [], [], []
    runs = []  # (row indices, token ids of context + own branch)
    cursor = 0
    for d, (ctx, branches) in enumerate(lengths):
        ctx_ids = torch.randint(0, vocab, (ctx,), generator=g)
        ctx_rows = list(range(cursor, cursor + ctx))
        ids.append(ctx_ids), pos.append(torch.arange(ctx)), doc.append(torch.full((ctx,), d))
        br.append(torch.zeros(ctx, dtype=torch.long))
        cursor += ctx
        for b, n in enumerate(branches, start=1):
            b_ids = torch.randint(0, vocab, (n,), generator=g)
            ids.append(b_ids), pos.append(torch.arange(ctx, ctx + n)), doc.append(torch.full((n,), d))
            br.append(torch.full((n,), b))
            runs.append((ctx_rows + list(range(cursor, cursor + n)), torch.cat([ctx_ids, b_ids])))
            cursor += n
    return (torch.cat(ids), torch.cat(pos), torch.cat(doc), torch.cat(br)), runs


def test_packed_prefix_shared_row_matches_separate_runs(tmp_path):
    _, path = make_hf_model(tmp_path, TINY)
    model = load_model(path).eval()
    # Several documents, 2-4 branches, a one-token context, a one-token branch.
    row, runs = packed_row([(9, [4, 7]), (1, [3, 1, 5]), (17, [6, 2, 9, 4]), (5, [11, 3])], TINY["vocab_size"])
    with torch.no_grad():
        packed = model(*row)
        for rows, seq in runs:
            alone = model(*single_doc(seq))
            assert rel_err(packed[rows], alone) < 1e-5


def test_named_sizes_param_counts():
    # Published sizes: Llama 3.2 1B = 1.236 B, 3B = 3.213 B, Llama 3.1 8B = 8.030 B parameters.
    for name, expected in (("1B", 1.236e9), ("3B", 3.213e9), ("8B", 8.030e9)):
        n = LlamaConfig.from_name(name).num_params
        assert abs(n - expected) / expected < 2e-3, (name, n)
    with torch.device("meta"):
        from fspo_engine.engine.model import Llama

        m = Llama(LlamaConfig.from_name("1B"))
    assert sum(p.numel() for p in m.parameters()) == LlamaConfig.from_name("1B").num_params


def test_bad_config_raises():
    with pytest.raises(FspoError, match="not a Llama"):
        LlamaConfig.from_hf_dict({"model_type": "mistral", "vocab_size": 3, "hidden_size": 4,
                                  "num_hidden_layers": 1, "num_attention_heads": 1})
    with pytest.raises(FspoError, match="unknown model size"):
        LlamaConfig.from_name("70B")


def test_missing_config_keys_take_transformers_defaults_and_odd_values_are_refused(tmp_path):
    """A config.json that leaves keys out means what transformers makes of it (untied, eps 1e-6, one kv head
    per head); values the engine would run wrongly (gelu, quantized weights, a string size) are refused."""
    hf, path = make_hf_model(tmp_path, TINY)
    cfg = json.loads((path / "config.json").read_text())
    for key in ("tie_word_embeddings", "rms_norm_eps"):
        cfg.pop(key, None)
    (path / "config.json").write_text(json.dumps(cfg))
    ref = transformers.LlamaForCausalLM.from_pretrained(path).float().eval()
    ours = load_model(path).eval()
    assert not ours.config.tie_word_embeddings and ours.config.rms_norm_eps == ref.config.rms_norm_eps == 1e-6
    ids, pos, doc, br = single_doc(torch.randint(0, 300, (19,), generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
        got = ours.logits(ours(ids, pos, doc, br))
    assert rel_err(got, want) < 1e-5

    base = {"model_type": "llama", "vocab_size": 8, "hidden_size": 4, "num_hidden_layers": 1,
            "num_attention_heads": 2}
    assert LlamaConfig.from_hf_dict({**base, "num_key_value_heads": None}).num_key_value_heads == 2
    for extra, needle in (({"hidden_act": "gelu"}, "hidden_act"),
                          ({"quantization_config": {"quant_method": "fbgemm_fp8"}}, "quantized"),
                          ({"vocab_size": "400"}, "vocab_size must be a positive integer"),
                          ({"hidden_size": 64.0}, "hidden_size must be a positive integer"),
                          ({"num_hidden_layers": -1}, "num_hidden_layers"),
                          ({"num_key_value_heads": 3, "num_attention_heads": 4, "hidden_size": 8}, "multiple"),
                          ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope")):  # fmt: skip
        with pytest.raises(FspoError, match=needle) as info:
            LlamaConfig.from_hf_dict({**base, **extra}, where="x/config.json")
        assert str(info.value).startswith("x/config.json: ")


def test_tied_config_with_a_different_lm_head_loads_untied_like_transformers(tmp_path):
    hf, path = make_hf_model(tmp_path, TINY)  # untied weights on disk
    cfg = json.loads((path / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="untied"):
        ours = load_model(path).eval()
    ids, pos, doc, br = single_doc(torch.randint(0, 300, (11,), generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        want = hf(ids[None]).logits[0]  # the model that wrote the files: untied
        got = ours.logits(ours(ids, pos, doc, br))
    assert rel_err(got, want) < 1e-5


def _assert_one_line_error(res, *needles):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_model_info_and_bad_model_dirs(tmp_path):
    _, path = make_hf_model(tmp_path, TINY)
    res = cli("model-info", str(path))
    assert res.returncode == 0, res.stderr
    assert "parameters:" in res.stdout and "FLOPs/token" in res.stdout

    # missing config
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_one_line_error(cli("model-info", str(empty)), "config.json")
    # non-Llama architecture
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    _assert_one_line_error(cli("model-info", str(other)), "config.json", "not a Llama")
    # broken JSON
    (other / "config.json").write_text("{not json")
    _assert_one_line_error(cli("model-info", str(other)), "config.json", "JSON")
    # missing tensor
    weights = path / "model.safetensors"
    state = load_file(weights)
    good = dict(state)
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, weights, metadata={"format": "pt"})
    _assert_one_line_error(cli("model-info", str(path)), "missing tensor", "model.layers.1.mlp.up_proj.weight")
    # wrong shape
    state = dict(good)
    state["model.norm.weight"] = torch.ones(7)
    save_file(state, weights, metadata={"format": "pt"})
    _assert_one_line_error(cli("model-info", str(path)), "model.safetensors", "model.norm.weight", "shape")
    # quantized codes (fp8) where weights should be
    state = dict(good)
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)
    save_file(state, weights, metadata={"format": "pt"})
    _assert_one_line_error(cli("model-info", str(path)), "model.safetensors", "up_proj", "F8_E4M3")
    # corrupt file
    weights.write_bytes(b"\x00garbage")
    _assert_one_line_error(cli("model-info", str(path)), "model.safetensors")
    # not a directory
    _assert_one_line_error(cli("model-info", str(tmp_path / "nope")))


def test_autocast_bf16_forward_and_logprobs(tmp_path):
    """Under autocast (what the trainer uses on GPU, here on CPU) q, k and v keep one dtype and the fused
    log-prob op gets bf16 operands; the result stays close to fp32."""
    from fspo_engine.engine.packing import PackItem, pack_batches
    from fspo_engine.engine.scoring import segment_logprobs

    _, path = make_hf_model(tmp_path, TINY)
    model = load_model(path).eval()
    g = torch.Generator().manual_seed(0)
    items = [PackItem(torch.randint(0, 300, (n,), generator=g).tolist(),
                      [torch.randint(0, 300, (m,), generator=g).tolist() for m in (5, 7)]) for n in (11, 4)]
    (row,) = pack_batches(items, 64)
    with torch.no_grad():
        ref = segment_logprobs(model, row, impl="torch")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = segment_logprobs(model, row, impl="torch")
    assert got.dtype == torch.float32
    assert rel_err(got, ref) < 5e-2, (got, ref)
