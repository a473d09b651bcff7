"""A minimal Llama, compatible with Hugging Face Llama checkpoints, that runs packed few-shot rows.

One flat file: config, RMSNorm, rotary embedding, attention, MLP, block, model, HF load/save. It runs past
the ~500 lines of the other modules on purpose (STYLE.md, "the whole model in one flat file"): the
architecture and the checkpoint format it reads and writes are read together, one screenful per class.
Parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...) so checkpoints load
with no renaming. The model is single-device; FSDP2, activation checkpointing and compile are applied to a
finished model by `engine/distributed.py`.

The forward takes ONE packed row (DESIGN.md "Packed row layout"): token ids plus per-token position,
document and branch ids, all [T]. It returns the final-normed hidden states [T, H]; the lm_head is applied
by the caller, through the fused log-prob op, to the few rows that predict response tokens.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fspo_engine.data_gen.atomic import atomic_path, write_bytes_atomic
from fspo_engine.engine.errors import FspoError
from fspo_engine.kernels.attention import prefix_shared_attention

# ----------------------------------------------------------------------------------------------------------
# Config


# transformers' LlamaConfig defaults, for keys a checkpoint's config.json leaves out (None: derived).
_HF_LLAMA_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
_INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings")  # fmt: skip


@dataclass
class LlamaConfig:
    """Shapes of a Llama model, named after the Hugging Face `config.json` keys."""

    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or {"rope_type": "linear"|"llama3", "factor": ..., ...} as in HF's `rope_scaling`.
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    # Not an HF key: which attention path to run ("auto": Triton on CUDA, plain torch elsewhere).
    attention_impl: str = "auto"

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise FspoError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.attention_impl not in ("auto", "triton", "torch"):
            raise FspoError(f"attention_impl must be auto, triton or torch, got {self.attention_impl!r}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "linear", "llama3"):
                raise FspoError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")

    @classmethod
    def from_name(cls, name: str, **overrides) -> LlamaConfig:
        if name not in NAMED_SIZES:
            raise FspoError(f"unknown model size {name!r}; known: {', '.join(NAMED_SIZES)}")
        return cls(**{**NAMED_SIZES[name], **overrides})

    @classmethod
    def from_hf_dict(cls, cfg: dict, where: str = "config.json") -> LlamaConfig:
        """Read an HF config dict: transformers 4.x (`rope_theta` + `rope_scaling`) or 5.x (`rope_parameters`).

        A key the file leaves out takes transformers' LlamaConfig default (not this dataclass's, which
        describes the from-scratch sizes), so a checkpoint means what it means in transformers."""
        model_type = cfg.get("model_type")
        archs = cfg.get("architectures") or []
        if model_type != "llama" or (archs and "LlamaForCausalLM" not in archs):
            raise FspoError(
                f"{where}: not a Llama model (model_type={model_type!r}, architectures={archs}); "
                "fspo-engine runs LlamaForCausalLM checkpoints"
            )
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise FspoError(f"{where}: attention_bias/mlp_bias Llama variants are not supported")
        if cfg.get("quantization_config"):
            method = cfg["quantization_config"].get("quant_method", "?") if isinstance(
                cfg["quantization_config"], dict) else "?"  # fmt: skip
            raise FspoError(f"{where}: quantized checkpoints ({method}) are not supported; use bf16/fp16/fp32 weights")
        if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
            raise FspoError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (Llama uses silu)")
        kwargs = {}
        for f in fields(cls):
            if f.name in ("rope_scaling", "rope_theta", "attention_impl"):
                continue
            kwargs[f.name] = cfg[f.name] if f.name in cfg else _HF_LLAMA_DEFAULTS.get(f.name)
        if kwargs["num_key_value_heads"] is None:  # transformers: one kv head per attention head
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        if kwargs["head_dim"] is None:
            kwargs["head_dim"] = 0  # derived in __post_init__
        for key in _INT_KEYS:
            value = kwargs[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "head_dim" else 1):
                raise FspoError(f"{where}: {key} must be a positive integer, got {value!r}")
        for key in ("rms_norm_eps",):
            if isinstance(kwargs[key], bool) or not isinstance(kwargs[key], (int, float)) or kwargs[key] <= 0:
                raise FspoError(f"{where}: {key} must be a positive number, got {kwargs[key]!r}")
        if not isinstance(kwargs["tie_word_embeddings"], bool):
            raise FspoError(f"{where}: tie_word_embeddings must be true or false, got {kwargs['tie_word_embeddings']!r}")
        rope = cfg.get("rope_parameters")
        if isinstance(rope, dict) and rope:  # transformers 5.x
            kwargs["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
            kind = rope.get("rope_type", "default")
            extra = {k: v for k, v in rope.items() if k not in ("rope_theta",)}
            kwargs["rope_scaling"] = None if kind == "default" else extra
        else:  # transformers 4.x
            kwargs["rope_theta"] = cfg.get("rope_theta", 10000.0)
            scaling = cfg.get("rope_scaling")
            if scaling:
                scaling = dict(scaling)
                scaling.setdefault("rope_type", scaling.get("type", "default"))
                scaling.pop("type", None)
                if scaling["rope_type"] == "default":
                    scaling = None
            kwargs["rope_scaling"] = scaling or None
        theta = kwargs["rope_theta"]
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
            raise FspoError(f"{where}: rope_theta must be a positive number, got {theta!r}")
        kwargs["rope_theta"] = float(theta)
        try:
            return cls(**kwargs)
        except (TypeError, FspoError) as exc:
            raise FspoError(f"{where}: {exc}") from None

    def to_hf_dict(self, dtype: torch.dtype = torch.float32) -> dict:
        """An HF config.json dict in the transformers 4.x layout, which 4.x and 5.x both read."""
        d = {k: v for k, v in asdict(self).items() if k != "attention_impl"}
        d.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
            mlp_bias=False,
            pretraining_tp=1,
            initializer_range=0.02,
            use_cache=True,
            torch_dtype=str(dtype).removeprefix("torch."),
        )
        return d

    @property
    def num_params(self) -> int:
        h, i, L, v = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + L * per_layer + h

    def flops_per_token(self, context: int) -> dict:
        """Forward FLOPs per token: matmuls (2 x weights touched) and attention at a mean causal context."""
        h, i, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        matmul = 2 * (L * (h * (q + 2 * kv) + q * h + 3 * h * i) + self.vocab_size * h)
        attention = 2 * 2 * L * q * (context / 2)  # QK^T and PV over half the context on average (causal)
        return {"matmul": matmul, "attention": int(attention), "forward": int(matmul + attention)}


def _llama3_rope(theta: float, factor: float, low: float, high: float, original: int):
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": original}


# Llama 3.2 1B/3B and 3.1 8B shapes; `tiny` trains from scratch on a CPU in minutes.
NAMED_SIZES: dict[str, dict] = {
    # Untied embeddings and full multi-head attention: on the quickstart data a tied, GQA 2:1 variant
    # stayed at chance after 1500 Pref-FT steps where this one reached acc@8 = 1.0 (see the issue notes).
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0, tie_word_embeddings=False,
                 max_position_embeddings=4096),
    "1B": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
               rope_scaling=_llama3_rope(500000.0, 32.0, 1.0, 4.0, 8192), tie_word_embeddings=True,
               max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001),
    "3B": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
               rope_scaling=_llama3_rope(500000.0, 32.0, 1.0, 4.0, 8192), tie_word_embeddings=True,
               max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001),
    "8B": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
               rope_scaling=_llama3_rope(500000.0, 8.0, 1.0, 4.0, 8192), tie_word_embeddings=False,
               max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001),
}


# ----------------------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 (fp64 stays fp64) and cast back before the weight, as HF Llama does (bf16 parity).
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def reset_parameters(self):
        nn.init.ones_(self.weight)


def rope_inv_freq(cfg: LlamaConfig, device=None, dtype=torch.float32) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in fp32 (or `dtype`), with linear or llama3 scaling."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=dtype, device=device) / d))
    s = cfg.rope_scaling
    if not s:
        return inv_freq
    kind = s.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / s["factor"]
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled)
    return inv_freq


def apply_rope(x, cos, sin):
    """x [T, heads, D]; cos/sin [T, 1, D]. Rotates the two halves of D (HF's `rotate_half` layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    # In x's dtype: under autocast q/k come out of the projections in bf16 while the tables follow the fp32
    # residual stream; promoting q/k to fp32 would leave them unlike v.
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)

    def forward(self, x, cos, sin, doc_ids, branch_ids):
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.n_heads, self.head_dim)  # (T, Hq, D)
        k = self.k_proj(x).view(T, self.n_kv, self.head_dim)  # (T, Hkv, D)
        v = self.v_proj(x).view(T, self.n_kv, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = prefix_shared_attention(q, k, v, doc_ids, branch_ids, scale=self.head_dim**-0.5,
                                    impl=self.cfg.attention_impl)
        return self.o_proj(y.reshape(T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, doc_ids, branch_ids):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, doc_ids, branch_ids)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """HF's `LlamaModel`: embeddings, blocks, final norm (named `model.*` in checkpoints)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = Transformer(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, H]: the output projection (the embedding matrix when tied)."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids, position_ids, doc_ids, branch_ids):
        """One packed row: all arguments [T] ints -> final-normed hidden states [T, H]."""
        x = self.model.embed_tokens(input_ids)  # (T, H)
        # RoPE tables from the row's own positions (both branches continue from the context length).
        rope_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32 as in HF; a float64 model's in fp64
        inv_freq = rope_inv_freq(self.config, device=input_ids.device, dtype=rope_dtype)  # (D/2,)
        freqs = position_ids.to(rope_dtype)[:, None] * inv_freq[None, :]  # (T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (T, 1, D)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, doc_ids, branch_ids)
        return self.model.norm(x)

    def logits(self, hidden):
        """Full logits for a few rows (generation, tests); training never calls this."""
        return hidden @ self.lm_head_weight.T

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02):
        """Fresh weights for training from scratch: N(0, std) linears/embeddings, ones for norms."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for name, p in sorted(self.named_parameters()):
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                # fp32 draws (a float64 model's in fp64: torch draws fp32 normals with vectorised code that
                # rounds differently on CPUs without AVX2, and the golden run must match on every CPU).
                w = torch.randn(p.shape, generator=gen, dtype=torch.promote_types(p.dtype, torch.float32)) * std
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    w /= math.sqrt(2 * self.config.num_hidden_layers)  # residual branches (GPT-2 scaling)
                p.copy_(w)


def build_model(cfg: LlamaConfig, dtype=torch.float32, device="cpu", seed: int = 0) -> Llama:
    """A freshly initialised model: built on the meta device, then materialised once in place."""
    with torch.device("meta"):
        model = Llama(cfg)
    # Initialised in fp32 (bf16 is cast after), a float64 model in fp64 (see init_weights).
    model = model.to_empty(device=device).to(torch.promote_types(dtype, torch.float32))
    model.init_weights(seed)
    return model.to(dtype)


# ----------------------------------------------------------------------------------------------------------
# Hugging Face directories

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json", "chat_template.jinja")


def read_config(model_dir: str | os.PathLike) -> LlamaConfig:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise FspoError(f"{model_dir}: not a model directory")
    if not path.is_file():
        raise FspoError(f"{path}: missing (a model directory needs config.json)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FspoError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise FspoError(f"{path}: expected a JSON object")
    return LlamaConfig.from_hf_dict(cfg, where=str(path))


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> file, from model.safetensors or a sharded index."""
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise FspoError(f"{index}: not a valid safetensors index ({exc})") from None
        return {name: model_dir / fname for name, fname in weight_map.items()}
    if single.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(single), framework="pt") as f:
                return {name: single for name in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise FspoError(f"{single}: not a readable safetensors file ({exc})") from None
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise FspoError(f"{model_dir}: only pickle weights (*.bin/*.pt) found; fspo-engine loads safetensors only")
    raise FspoError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def check_weights(model_dir: str | os.PathLike, cfg: LlamaConfig | None = None) -> dict[Path, list[str]]:
    """Check every tensor the config implies against the safetensors headers (names and shapes), reading no
    weights. Returns file -> tensor names to load."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    cfg = cfg or read_config(model_dir)
    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in Llama(cfg).named_parameters()}
    files = _weight_files(model_dir)
    missing = sorted(set(expected) - set(files))
    if missing:
        raise FspoError(f"{model_dir}: missing tensor(s) {', '.join(missing[:5])}"
                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for path, names in sorted(by_file.items()):
        if not path.is_file():
            raise FspoError(f"{path}: weight file named in the index is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise FspoError(f"{path}: tensor {name} is missing (the index names this file)")
                    sl = f.get_slice(name)
                    if sl.get_dtype() not in ("F32", "F16", "BF16", "F64"):  # fp8 / int codes need their scales
                        raise FspoError(f"{path}: tensor {name} is {sl.get_dtype()}; fspo-engine loads "
                                        "unquantized fp32/fp16/bf16 weights only")
                    shape = tuple(sl.get_shape())
                    if shape != expected[name]:
                        raise FspoError(f"{path}: tensor {name} has shape {shape}, "
                                        f"config.json implies {expected[name]}")
        except FspoError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise FspoError(f"{path}: not a readable safetensors file ({exc})") from None
    return by_file


def _untie(model_dir) -> bool:
    """True when config.json says tied but the files hold an lm_head.weight unlike embed_tokens: transformers
    then loads the two untied (and warns); so do we, rather than silently drop the lm_head."""
    from safetensors import safe_open

    files = _weight_files(Path(model_dir))
    names = ("lm_head.weight", "model.embed_tokens.weight")
    if not all(n in files for n in names):
        return False
    tensors = []
    for n in names:
        try:
            with safe_open(str(files[n]), framework="pt") as f:
                tensors.append(f.get_tensor(n))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise FspoError(f"{files[n]}: could not read {n} ({exc})") from None
    if tensors[0].shape == tensors[1].shape and torch.equal(tensors[0], tensors[1]):
        return False
    warnings.warn(f"{model_dir}: config.json ties the embeddings but lm_head.weight differs from "
                  "embed_tokens; loading them untied, as transformers does", stacklevel=3)  # fmt: skip
    return True


def meta_model(model_dir: str | os.PathLike, attention_impl: str = "auto") -> tuple[Llama, dict[Path, list[str]]]:
    """An HF Llama directory's model on the meta device (no storage), and file -> tensor names to fill it
    with; every name and shape already checked against the safetensors headers."""
    cfg = read_config(model_dir)
    cfg.attention_impl = attention_impl
    if cfg.tie_word_embeddings and _untie(model_dir):
        cfg.tie_word_embeddings = False
    by_file = check_weights(model_dir, cfg)
    with torch.device("meta"):
        model = Llama(cfg)
    return model, by_file


def load_model(model_dir: str | os.PathLike, dtype=torch.float32, device="cpu", attention_impl: str = "auto") -> Llama:
    """Load an HF Llama directory. Built on the meta device and materialised straight from the files,
    so weights are allocated once (an 8B model never exists twice in memory)."""
    from safetensors import safe_open

    model, by_file = meta_model(model_dir, attention_impl)
    state = {}
    for path, names in by_file.items():
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name in names:
                    state[name] = f.get_tensor(name).to(dtype)
        except Exception as exc:
            raise FspoError(f"{path}: could not read tensors ({exc})") from None
    model.load_state_dict(state, strict=True, assign=True)
    return model


_STORED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float32}


def stored_dtype(model_dir: str | os.PathLike) -> torch.dtype:
    """The dtype an HF Llama directory stores its weights in (its embedding's; fp64 counts as fp32)."""
    from safetensors import safe_open

    cfg = read_config(model_dir)
    for path, names in check_weights(model_dir, cfg).items():
        if "model.embed_tokens.weight" in names:
            with safe_open(str(path), framework="pt") as f:
                return _STORED_DTYPES[f.get_slice("model.embed_tokens.weight").get_dtype()]
    raise FspoError(f"{model_dir}: no model.embed_tokens.weight")  # check_weights has already refused this


def read_weights(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory's safetensors files, as stored, on the CPU."""
    from safetensors.torch import load_file

    state = {}
    for path in sorted(Path(model_dir).glob("model*.safetensors")):
        state.update(load_file(str(path)))
    return state


def save_model(model: Llama, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
               max_shard_bytes: int = 5 * 1024**3, dtype: torch.dtype | None = None):
    """Write an HF Llama directory: config.json, safetensors (sharded past `max_shard_bytes`), tokenizer files.

    Each file is written atomically (temp + rename), the index last; `transformers.AutoModelForCausalLM`
    loads the result.
    """
    save_state_dict(model.state_dict(), model.config, out_dir, tokenizer_dir, max_shard_bytes, dtype)


def save_state_dict(state: dict[str, torch.Tensor], config: LlamaConfig, out_dir: str | os.PathLike,
                    tokenizer_dir: str | os.PathLike | None = None, max_shard_bytes: int = 5 * 1024**3,
                    dtype: torch.dtype | None = None):
    """`save_model` for a full state dict (e.g. gathered from FSDP2 shards on rank 0)."""
    from safetensors.torch import save as st_save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach() for name, t in state.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    dtype = dtype or next(iter(state.values())).dtype
    state = {k: v.to(device="cpu", dtype=dtype).contiguous() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    for stale in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        write_bytes_atomic(out / "model.safetensors", st_save(shards[0], metadata={"format": "pt"}))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_bytes_atomic(out / fname, st_save(shard, metadata={"format": "pt"}))
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_bytes_atomic(out / "model.safetensors.index.json", json.dumps(index, indent=2).encode())
    cfg = config.to_hf_dict(dtype)
    write_bytes_atomic(out / "config.json", json.dumps(cfg, indent=2, sort_keys=True).encode())
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != out.resolve():
        for fname in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / fname
            if src.is_file():
                with atomic_path(out / fname) as tmp:
                    shutil.copyfile(src, tmp)


__all__ = ["LlamaConfig", "NAMED_SIZES", "Llama", "build_model", "meta_model", "load_model", "save_model", "save_state_dict", "read_config", "check_weights",
           "rope_inv_freq", "stored_dtype", "read_weights"]
