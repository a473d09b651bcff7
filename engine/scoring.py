"""Per-episode log-probs of packed rows: the number FSPO's losses (Pref-FT, IPO, DPO) are built from.

    hidden = model(row)                          # [T, H], one forward for every episode of the row
    h      = hidden[target_rows]                 # [N, H], only rows that predict a response token
    logp   = linear_logprob_sums(h, W, targets, segment_ids, S)   # [S] fp32, one per (episode, branch)

`linear_logprob_sums` never materialises [N, V] logits (Triton on CUDA, chunked plain torch elsewhere).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from fspo_engine.data_gen.atomic import write_text_atomic
from fspo_engine.engine.distributed import rank_rows
from fspo_engine.engine.packing import PackedBatch, pack_batches
from fspo_engine.kernels.logprobs import linear_logprob_sums


def segment_logprobs(model, packed: PackedBatch, impl: str = "auto") -> torch.Tensor:
    """Sum of log p(response token) for every segment (episode, branch) of a packed row -> fp32 [S] (fp64 for a
    float64 model).
    Differentiable (the trainer calls this under autograd)."""
    hidden = model(packed.input_ids, packed.position_ids, packed.doc_ids, packed.branch_ids)  # (T, H)
    h = hidden.index_select(0, packed.target_rows)  # (N, H): the last context row appears once per branch
    w = model.lm_head_weight
    if torch.is_autocast_enabled(h.device.type):
        # Autocast does not reach a custom op: give the fused kernel the autocast dtype (bf16 matmuls; it
        # accumulates the log-sum-exp in fp32 whatever the input dtype), as autocast would for a Linear.
        dt = torch.get_autocast_dtype(h.device.type)
        h, w = h.to(dt), w.to(dt)
    return linear_logprob_sums(h, w, packed.targets, packed.segment_ids, packed.num_segments, impl=impl)


def logprob_dtype(model) -> torch.dtype:
    """The log-probs' dtype: fp32 (the fused op's output whatever the weights' dtype), fp64 for a float64 model."""
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


class EpisodeLogprobs(NamedTuple):
    chosen: torch.Tensor  # [E] fp32 (fp64 for a float64 model): sum of log p over the chosen response tokens (eos included)
    rejected: torch.Tensor  # [E] fp32 (fp64)
    chosen_tokens: torch.Tensor  # [E] long
    rejected_tokens: torch.Tensor  # [E] long
    episodes: list[int]  # the episode index (into the list given to pack_batches) of each row of the above


def episode_logprobs(model, packed: PackedBatch, impl: str = "auto") -> EpisodeLogprobs:
    """(chosen, rejected) log-prob sums per episode of a packed row: episodes with exactly two responses, or
    with the chosen one only (Pref-FT on chosen responses: `rejected` is then empty)."""
    # Checked on host-side metadata: no device sync.
    k = packed.max_branches
    if k not in (1, 2) or packed.num_segments != k * len(packed.episodes):
        raise ValueError("episode_logprobs needs two responses per episode (or the chosen one only); "
                         "use segment_logprobs")  # fmt: skip
    seg = segment_logprobs(model, packed, impl)
    tokens = packed.seg_tokens.to(seg.device)
    if k == 1:
        return EpisodeLogprobs(seg, seg[:0], tokens, tokens[:0], list(packed.episodes))
    # Segments are numbered episode by episode, branches ascending: chosen = even, rejected = odd.
    return EpisodeLogprobs(seg[0::2], seg[1::2], tokens[0::2], tokens[1::2], list(packed.episodes))


# no_grad rather than inference_mode: inference tensors have no version counter, which the attention op's
# per-row id cache reads.
@torch.no_grad()
def score_episodes(
    model,
    episodes: Sequence,
    max_tokens: int,
    impl: str = "auto",
    device: str | torch.device = "cpu",
    on_row: Callable[[int], None] | None = None,
) -> EpisodeLogprobs:
    """Log-probs of many tokenized episodes, packed into rows of at most `max_tokens` (one forward each).

    Returns tensors on the CPU in the input order of `episodes`. `on_row(n)` is called after each row
    with the number of episodes it held (a progress bar hook).
    """
    return _score_rows(model, pack_batches(episodes, max_tokens), len(episodes), impl, device, on_row)


@torch.no_grad()
def score_share(
    model,
    episodes: Sequence,
    max_tokens: int,
    rank: int,
    world: int,
    impl: str = "auto",
    device: str | torch.device = "cpu",
    on_row: Callable[[int], None] | None = None,
) -> EpisodeLogprobs:
    """`score_episodes` of this rank's share, `episodes[rank::world]`, with a model sharded over the ranks
    (FSDP2). Every forward is a collective, so every rank runs as many as the busiest rank (`rank_rows`):
    the extra ones repeat a row and are discarded. Called by every rank."""
    share, rows = rank_rows(episodes, lambda eps: pack_batches(eps, max_tokens), rank, world)
    out = _score_rows(model, [r for r, real in rows if real], len(share), impl, device, on_row)
    for row, real in rows:
        if not real:
            episode_logprobs(model, row.to(device), impl)
    return out


def _score_rows(model, rows: list[PackedBatch], E: int, impl: str, device, on_row) -> EpisodeLogprobs:
    dtype = logprob_dtype(model)
    chosen = torch.zeros(E, dtype=dtype)
    rejected = torch.zeros(E, dtype=dtype)
    chosen_n = torch.zeros(E, dtype=torch.long)
    rejected_n = torch.zeros(E, dtype=torch.long)
    for row in rows:
        out = episode_logprobs(model, row.to(device), impl)
        idx = torch.tensor(out.episodes, dtype=torch.long)
        chosen[idx] = out.chosen.cpu()
        rejected[idx] = out.rejected.cpu()
        chosen_n[idx] = out.chosen_tokens.cpu()
        rejected_n[idx] = out.rejected_tokens.cpu()
        if on_row is not None:
            on_row(len(out.episodes))
    return EpisodeLogprobs(chosen, rejected, chosen_n, rejected_n, list(range(E)))


def write_jsonl_atomic(path: str | os.PathLike, records: Sequence[dict]):
    """One JSON object per line, written to a temp file beside `path` and renamed over it: a reader (or a
    kill) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, (json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))


__all__ = ["EpisodeLogprobs", "episode_logprobs", "score_episodes", "score_share", "segment_logprobs", "write_jsonl_atomic"]
