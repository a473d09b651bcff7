"""Sampling from a trained model: few-shot prompts in, personalised responses out, many prompts at once.

Plain functions over the finished model (gpt-fast style). The model file stays a training model; decoding
reuses its modules (projections, norms, MLP), its RoPE helpers and its attention kernel.

How a batch runs (`generate_batch`):

- Batches. Prompts are sorted by length (longest first, so the first batch is the peak) and cut into
  batches whose K/V cache, rows x (longest prompt + max_new_tokens) token slots, fits `max_batch_tokens`;
  results come back in the caller's order.
- Cache. Per layer a pre-allocated K and V of [B, S, Hkv, D] in the model's dtype, S = longest prompt +
  max_new_tokens, zero-filled (masked slots must hold finite numbers: 0 x NaN would leak through the
  attention's weighted sum). Row b holds valid entries in [0, lens[b]); each row's RoPE positions start
  at 0, so no row is shifted by another row's padding.
- Prefill is packed, not padded: all prompts of the batch form one packed row, prompt b being document b
  (DESIGN.md "Packed row layout", one branch), positions 0..len_b-1, run through the training attention
  kernel (`prefix_shared_attention`: per-document SDPA on CPU, Triton on CUDA). The work is the sum of the
  prompt lengths, never rows x longest, which matters for long few-shot contexts; each layer's K/V are
  scattered into the cache at [document, position].
- Decode: one token per active row per step; the new K/V are written at [row, lens[row]] and attention
  sees the cache up to the longest active row, masked to each row's own length. A row that finishes leaves
  the batch at once (the cache is compacted to the rows still running), so one long answer does not make
  every row pay.
- Sampling: greedy is argmax (temperature 0). Otherwise nucleus sampling by inverse CDF: prompt i draws one
  uniform per step from its own `torch.Generator().manual_seed(seed + i)` (CPU), so its output does not
  depend on which prompts share its batch, its row in it, `max_batch_tokens` or the device's RNG:
  `generate_batch([p_i], seed=seed + i)` reproduces entry i of `generate_batch(prompts, seed=seed)`.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from fspo_engine.engine.model import Llama, apply_rope, rope_inv_freq
from fspo_engine.kernels.attention import prefix_shared_attention


def turn_stop_ids(model_dir, eos_id: int, config_eos) -> tuple[int, ...]:
    """Every id that ends a turn, for `stop_ids`: the tokenizer's eos, config.json's eos_token_id
    (`config_eos`) and generation_config.json's (Llama 3 instruct models end turns with <|eot_id|>, listed
    there beside <|end_of_text|>)."""
    ids = [eos_id]
    sources = [config_eos]
    gen_cfg = Path(model_dir) / "generation_config.json"
    if gen_cfg.is_file():
        try:
            sources.append(json.loads(gen_cfg.read_text(encoding="utf-8")).get("eos_token_id"))
        except (ValueError, UnicodeDecodeError, AttributeError):
            pass  # a broken generation_config.json only loses its extra stop ids
    for src in sources:
        for i in src if isinstance(src, list) else [src]:
            if isinstance(i, int) and not isinstance(i, bool) and i not in ids:
                ids.append(i)
    return tuple(ids)


@dataclass
class Generation:
    """One prompt's continuation."""

    # Generated ids. A stop id that ended the row is not included; for a stop string, the ids up to and
    # including the token that completed it.
    ids: list[int]
    # decode(ids) when a decode function was given (else None), a matched stop string and what follows cut off.
    text: str | None
    finish_reason: str  # "eos" (a stop id), "stop" (a stop string), "length" (max_new_tokens)


@torch.inference_mode()
def generate_batch(model: Llama, prompts: list[list[int]], *, max_new_tokens: int = 256, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] = (),
                   stop_strings: Sequence[str] = (), decode: Callable[[list[int]], str] | None = None,
                   max_batch_tokens: int | None = None,
                   on_done: Callable[[int], object] | None = None) -> list[Generation]:
    """Continue every prompt (token ids, bos included) until a stop id, a stop string or `max_new_tokens`.

    temperature 0 is greedy; above 0, nucleus sampling with `top_p` in (0, 1], prompt i seeded with
    `seed + i` (see the module docstring). `stop_ids` end a row and are left out of its ids. `stop_strings`
    need `decode` (ids -> text): a row stops at the token whose decoded text first contains one, and the
    text is cut at the match. `max_batch_tokens` bounds each batch's K/V cache and packed prefill at
    rows x (longest prompt + max_new_tokens) tokens (None: one batch); a prompt that alone exceeds it runs
    in a batch of one. `on_done(n)` is called with the number of prompts that just finished (fits
    `tqdm.update`). Returns one Generation per prompt, in order.
    """
    return [row.result(decode) for row in _generate_rows(
        model, prompts, "prompts", max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
        stop_ids=stop_ids, stop_strings=stop_strings, decode=decode, max_batch_tokens=max_batch_tokens,
        on_done=on_done)]  # fmt: skip


@torch.inference_mode()
def generate(model: Llama, prompt_ids: list[int], max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, stop_ids: tuple[int, ...] = (), seed: int = 0) -> list[int]:
    """Token ids continuing one prompt until a stop id (included) or `max_new_tokens`: `generate_batch`
    of one prompt, sampled with `torch.Generator().manual_seed(seed)`."""
    if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
        raise ValueError("prompt_ids: need at least one token (bos)")
    (row,) = _generate_rows(model, [list(prompt_ids)], "prompt_ids", max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, seed=seed, stop_ids=stop_ids)
    return row.tokens


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0, else nucleus sampling (one uniform from `generator`). logits [V]."""
    gen = generator if generator is not None else torch.default_generator
    return int(_sample(logits[None], temperature, top_p, [gen])[0])


# ----------------------------------------------------------------------------------------------------------
# Internals


@dataclass
class _Row:
    index: int  # position in the caller's prompt list
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)  # every sampled id, the stop id that ended it included
    finish_reason: str | None = None
    text: str | None = None  # set when a stop string matched: decoded text cut at the match

    def result(self, decode) -> Generation:
        ids = self.tokens[:-1] if self.finish_reason == "eos" else list(self.tokens)
        text = self.text if self.text is not None else (decode(ids) if decode is not None else None)
        return Generation(ids=ids, text=text, finish_reason=self.finish_reason)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_args(model, prompts, prompts_name, max_new_tokens, temperature, top_p, seed, stop_ids, stop_strings,
                decode, max_batch_tokens):
    vocab = model.config.vocab_size
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"{prompts_name}: expected a list of token id lists, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        where = prompts_name if prompts_name == "prompt_ids" else f"{prompts_name}[{i}]"
        if not isinstance(p, (list, tuple)) or not p:
            raise ValueError(f"{where}: need a non-empty list of token ids (at least bos)")
        for t in p:
            if not _is_int(t) or not 0 <= t < vocab:
                raise ValueError(f"{where}: token ids must be ints in [0, {vocab}), got {t!r}")
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an integer >= 1, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature: expected a finite number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    if not _is_int(seed):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    if not isinstance(stop_ids, (list, tuple, set, frozenset)) or not all(_is_int(t) for t in stop_ids):
        raise ValueError(f"stop_ids: expected a sequence of token ids, got {stop_ids!r}")
    if not isinstance(stop_strings, (list, tuple)) or not all(isinstance(s, str) and s for s in stop_strings):
        raise ValueError(f"stop_strings: expected a sequence of non-empty strings, got {stop_strings!r}")
    if stop_strings and decode is None:
        raise ValueError("stop_strings: need a decode function (ids -> text) to match them")
    if decode is not None and not callable(decode):
        raise ValueError(f"decode: expected a callable ids -> text, got {type(decode).__name__}")
    if max_batch_tokens is not None and (not _is_int(max_batch_tokens) or max_batch_tokens < 1):
        raise ValueError(f"max_batch_tokens: expected a positive int or None, got {max_batch_tokens!r}")


def _generate_rows(model: Llama, prompts, prompts_name: str, *, max_new_tokens: int, temperature: float,
                   top_p: float, seed: int, stop_ids=(), stop_strings=(), decode=None,
                   max_batch_tokens: int | None = None, on_done=None) -> list[_Row]:
    """The one decoding implementation behind `generate_batch` and `generate`."""
    _check_args(model, prompts, prompts_name, max_new_tokens, temperature, top_p, seed, stop_ids, stop_strings,
                decode, max_batch_tokens)
    rows = [_Row(i, list(p)) for i, p in enumerate(prompts)]
    # One CPU generator per prompt, keyed by its index alone: batching never changes what a prompt draws.
    gens = [torch.Generator().manual_seed(int(seed) + i) for i in range(len(rows))] if temperature > 0 else None
    stops = _Stops(frozenset(int(t) for t in stop_ids), tuple(stop_strings), decode, max_new_tokens)
    for batch in _plan_batches([len(r.prompt) for r in rows], max_new_tokens, max_batch_tokens):
        _run_batch(model, [rows[i] for i in batch], None if gens is None else [gens[i] for i in batch],
                   temperature, top_p, stops, on_done)
    return rows


def _plan_batches(lengths: list[int], max_new_tokens: int, max_batch_tokens: int | None) -> list[list[int]]:
    """Prompt indices grouped into batches, longest prompts first (similar lengths share a batch, so little
    cache is padding). A batch's cache, rows x (its longest prompt + max_new_tokens), stays within
    `max_batch_tokens`; a prompt too long for it alone gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if max_batch_tokens is None:
        return [order] if order else []
    batches: list[list[int]] = []
    for i in order:
        # Sorted longest first: the batch's first prompt sets its cache width.
        if batches and (len(batches[-1]) + 1) * (lengths[batches[-1][0]] + max_new_tokens) <= max_batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@dataclass(frozen=True)
class _Stops:
    ids: frozenset[int]
    strings: tuple[str, ...]
    decode: Callable[[list[int]], str] | None
    max_new_tokens: int

    def check(self, row: _Row) -> bool:
        """After a token was appended to `row.tokens`: set the finish reason if it ends the row."""
        if row.tokens[-1] in self.ids:
            row.finish_reason = "eos"
        elif self.strings:
            # Decode the whole continuation each step: a token's text can depend on its neighbours
            # (leading spaces, bytes of one character split over tokens), so no incremental shortcut.
            text = self.decode(row.tokens)
            hits = [i for i in (text.find(s) for s in self.strings) if i >= 0]
            if hits:
                row.finish_reason, row.text = "stop", text[: min(hits)]
        if row.finish_reason is None and len(row.tokens) >= self.max_new_tokens:
            row.finish_reason = "length"
        return row.finish_reason is not None


def _rope(inv_freq: torch.Tensor, positions: torch.Tensor, dtype):
    """cos/sin [T, 1, D] for positions [T], computed as the training forward computes them."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2), fp32 as in HF
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (T, 1, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _prefill(model: Llama, prompts: list[list[int]], inv_freq, cache) -> torch.Tensor:
    """All prompts as one packed row (prompt b = document b, positions from 0): fills cache[layer] at
    [b, position]; returns the final-normed hidden state of each prompt's last token [B, H]."""
    device = cache[0][0].device
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.tensor([t for p in prompts for t in p], device=device)  # (T,)
    T = ids.numel()
    # Built outside inference mode: the attention op caches its per-row plan (mask chunks, Triton tile lists)
    # on ordinary tensors only, so the plan is computed once for all layers instead of once per layer.
    with torch.inference_mode(False):
        doc = torch.repeat_interleave(torch.arange(len(prompts)), lengths).to(device)  # (T,)
        branch = torch.zeros_like(doc)
    starts = torch.cumsum(lengths, 0) - lengths
    pos = (torch.arange(T) - torch.repeat_interleave(starts, lengths)).to(device)  # (T,) restarts at 0 per prompt
    x = model.model.embed_tokens(ids)  # (T, H)
    cos, sin = _rope(inv_freq, pos, x.dtype)
    for layer, (k_cache, v_cache) in zip(model.model.layers, cache):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = apply_rope(attn.q_proj(h).view(T, attn.n_heads, attn.head_dim), cos, sin)  # (T, Hq, D)
        k = apply_rope(attn.k_proj(h).view(T, attn.n_kv, attn.head_dim), cos, sin)  # (T, Hkv, D)
        v = attn.v_proj(h).view(T, attn.n_kv, attn.head_dim)
        k_cache[doc, pos] = k
        v_cache[doc, pos] = v
        y = prefix_shared_attention(q, k, v, doc, branch, scale=attn.head_dim**-0.5,
                                    impl=model.config.attention_impl)  # (T, Hq, D)
        x = x + attn.o_proj(y.reshape(T, attn.n_heads * attn.head_dim))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    last = (torch.cumsum(lengths, 0) - 1).to(device)  # (B,) each prompt's last token in the row
    return model.model.norm(x[last])


def _decode_step(model: Llama, tokens: torch.Tensor, lens: torch.Tensor, width: int, inv_freq,
                 cache) -> torch.Tensor:
    """One new token per row: tokens [B] at positions lens [B] (= entries already cached) -> hidden [B, H].
    Attention reads cache slots [0, width), width > every row's position, masked to each row's own length."""
    B = tokens.numel()
    x = model.model.embed_tokens(tokens)  # (B, H)
    cos, sin = _rope(inv_freq, lens, x.dtype)  # (B, 1, D)
    rows = torch.arange(B, device=tokens.device)
    # Additive mask, built once for all layers (a bool mask is converted on every call): row b sees its own
    # cache entries [0, lens[b]] (the new token included), -inf on the rest (padding, or nothing yet).
    hidden_slot = torch.arange(width, device=tokens.device)[None, :] > lens[:, None]  # (B, width)
    mask = torch.zeros(B, 1, 1, width, dtype=x.dtype, device=x.device)  # broadcast over kv heads, query heads
    mask.masked_fill_(hidden_slot[:, None, None, :], float("-inf"))
    for layer, (k_cache, v_cache) in zip(model.model.layers, cache):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = apply_rope(attn.q_proj(h).view(B, attn.n_heads, attn.head_dim), cos, sin)  # (B, Hq, D)
        k = apply_rope(attn.k_proj(h).view(B, attn.n_kv, attn.head_dim), cos, sin)  # (B, Hkv, D)
        k_cache[rows, lens] = k
        v_cache[rows, lens] = attn.v_proj(h).view(B, attn.n_kv, attn.head_dim)
        # GQA: the G query heads sharing a kv head are G queries of that head (head h reads kv head h // G),
        # so the cache is read once, never repeated G times (and SDPA's enable_gqa with a mask is ~30x slower
        # on CPU).
        y = F.scaled_dot_product_attention(
            q.view(B, attn.n_kv, attn.n_heads // attn.n_kv, attn.head_dim),  # (B, Hkv, G, D)
            k_cache[:, :width].transpose(1, 2), v_cache[:, :width].transpose(1, 2),  # (B, Hkv, width, D)
            attn_mask=mask, scale=attn.head_dim**-0.5,
        )  # (B, Hkv, G, D)
        x = x + attn.o_proj(y.reshape(B, attn.n_heads * attn.head_dim))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.model.norm(x)


def _run_batch(model: Llama, rows: list[_Row], gens: list[torch.Generator] | None, temperature: float,
               top_p: float, stops: _Stops, on_done):
    """Prefill `rows` together, then decode until every row has finished (each leaves as it finishes)."""
    cfg = model.config
    weight = model.model.embed_tokens.weight
    device, dtype = weight.device, weight.dtype
    lengths = [len(r.prompt) for r in rows]
    width_max = max(lengths) + stops.max_new_tokens
    cache = [tuple(torch.zeros(len(rows), width_max, cfg.num_key_value_heads, cfg.head_dim, dtype=dtype,
                               device=device) for _ in range(2)) for _ in model.model.layers]  # fmt: skip
    inv_freq = rope_inv_freq(cfg, device=device)
    hidden = _prefill(model, [r.prompt for r in rows], inv_freq, cache)  # (B, H)
    lens = torch.tensor(lengths, device=device)  # (B,) valid cache entries per row
    active = list(range(len(rows)))  # batch row -> index into `rows`
    while True:
        row_gens = None if gens is None else [gens[a] for a in active]
        tokens = _sample(model.logits(hidden), temperature, top_p, row_gens)  # (b,)
        keep = []  # batch rows still running
        for j, (a, t) in enumerate(zip(active, tokens.tolist())):
            rows[a].tokens.append(t)
            if not stops.check(rows[a]):
                keep.append(j)
        if on_done is not None and len(keep) < len(active):
            on_done(len(active) - len(keep))
        if not keep:
            return
        if len(keep) < len(active):  # finished rows leave the batch
            idx = torch.tensor(keep, device=device)
            cache = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in cache]
            tokens, lens, active = tokens[idx], lens[idx], [active[j] for j in keep]
        width = max(len(rows[a].prompt) + len(rows[a].tokens) for a in active)  # longest row incl. this token
        hidden = _decode_step(model, tokens, lens, width, inv_freq, cache)
        lens = lens + 1


def _sample(logits: torch.Tensor, temperature: float, top_p: float,
            gens: list[torch.Generator] | None) -> torch.Tensor:
    """Next token per row: logits [B, V] -> ids [B] (long, on logits' device).

    Greedy at temperature <= 0. Otherwise inverse-CDF sampling from softmax(logits / temperature) restricted
    to the smallest head of tokens whose probability reaches top_p (the most likely token always kept),
    with one uniform per row from that row's generator: the draw is a host-side number, so a row's samples
    depend only on its generator, never on its batch or the device."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
        probs = probs * ((probs.cumsum(dim=-1) - probs) < top_p)  # mass before a token < top_p: keep it
    cdf = probs.double().cumsum(dim=-1)  # (B, V); fp64 so that a 128k-token sum stays exact enough
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64, device=g.device) for g in gens])
    u = u.to(cdf.device)  # (B,) in [0, 1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]  # first cdf > u * total: p > 0
    # u * total can round up to total: take the last token with mass (first index of the cdf's maximum).
    idx = torch.where(idx >= cdf.shape[1], cdf.argmax(dim=-1), idx)
    return idx if order is None else order.gather(1, idx[:, None])[:, 0]


__all__ = ["Generation", "generate_batch", "generate", "sample_next"]
