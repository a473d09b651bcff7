"""Sampling from a trained model: a user's few-shot context in, a personalised response out.

Plain functions over the finished model (gpt-fast style): one prefill over the prompt that fills a per-layer
K/V cache, then one token at a time against the cache. The model file stays a training model; decoding
reuses its modules (projections, norms, MLP) and its RoPE helpers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fspo_engine.engine.model import Llama, apply_rope, rope_inv_freq


def _rope(model: Llama, positions: torch.Tensor, dtype):
    inv_freq = rope_inv_freq(model.config, device=positions.device)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (T, 1, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _forward_cached(model: Llama, ids: torch.Tensor, start: int, cache: list) -> torch.Tensor:
    """Run tokens `ids` [T] at positions start..start+T-1 against (and into) the K/V cache; -> hidden [T, H]."""
    x = model.model.embed_tokens(ids)
    cos, sin = _rope(model, torch.arange(start, start + ids.numel(), device=ids.device), x.dtype)
    T = ids.numel()
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = apply_rope(attn.q_proj(h).view(T, attn.n_heads, attn.head_dim), cos, sin)
        k = apply_rope(attn.k_proj(h).view(T, attn.n_kv, attn.head_dim), cos, sin)
        v = attn.v_proj(h).view(T, attn.n_kv, attn.head_dim)
        if cache[i] is not None:
            k = torch.cat([cache[i][0], k])
            v = torch.cat([cache[i][1], v])
        cache[i] = (k, v)
        # Queries are the last T positions of the cache: causal within them, everything before visible.
        S = k.shape[0]
        mask = torch.ones(T, S, dtype=torch.bool, device=ids.device).tril_(diagonal=S - T)
        y = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                           attn_mask=mask, scale=attn.head_dim**-0.5,
                                           enable_gqa=attn.n_kv != attn.n_heads)  # (1, Hq, T, D)
        x = x + attn.o_proj(y[0].transpose(0, 1).reshape(T, attn.n_heads * attn.head_dim))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.model.norm(x)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0, else nucleus sampling. logits [V]."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(model: Llama, prompt_ids: list[int], max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, stop_ids: tuple[int, ...] = (), seed: int = 0) -> list[int]:
    """Token ids continuing `prompt_ids` until a stop id (included) or `max_new_tokens`."""
    if not prompt_ids:
        raise ValueError("prompt_ids: need at least one token (bos)")
    device = model.lm_head_weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    cache: list = [None] * len(model.model.layers)
    ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    hidden = _forward_cached(model, ids, 0, cache)[-1:]
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = sample_next(model.logits(hidden)[0], temperature, top_p, generator)
        out.append(token)
        if token in stop_ids:
            break
        pos = len(prompt_ids) + len(out) - 1
        hidden = _forward_cached(model, torch.tensor([token], device=device), pos, cache)
    return out
