"""Prefix-shared packing: tokenized episodes -> packed rows the model and the log-prob op run directly.

One episode becomes one block `[context | response 1 | response 2 | ...]` (DESIGN.md "Packed row layout"):

    tokens     bos  c1  c2  c3 | a1  a2  eos | r1  r2  r3  eos        (c = context, a = chosen, r = rejected)
    branch      0   0   0   0  | 1   1   1   | 2   2   2   2
    position    0   1   2   3  | 4   5   6   | 4   5   6   7         (both branches continue from the context)
    targets: a1 <- row of c3, a2 <- row of a1, eos <- row of a2; r1 <- row of c3, r2 <- row of r1, ...

The context is run once instead of once per response, and there is no padding: blocks are packed into rows
of at most `max_tokens` by best-fit decreasing. The attention mask (`kernels.prefix_shared_attention`) keeps
documents apart and keeps each response from seeing its siblings, so a packed row computes exactly what
separate `prompt + response` sequences compute.

Log-prob targets are compacted: one entry per predicted response token (`target_rows` into the row,
`targets`, `segment_ids`), so only those rows reach the lm_head. One segment per (episode, branch).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np
import torch

from fspo_engine.engine.errors import FspoError


class Packable(Protocol):
    """What packing needs of an episode (`TokenizedEpisode` is one): a context and its responses."""

    prompt_ids: list[int]

    @property
    def responses(self) -> list[list[int]]: ...


@dataclass
class PackItem:
    """A packable episode built by hand (tests, benchmarks, >2 responses)."""

    prompt_ids: list[int]
    responses: list[list[int]]
    episode_id: str = ""


def block_length(ep: Packable) -> int:
    """Tokens of an episode's packed block: the context once plus every response."""
    return len(ep.prompt_ids) + sum(len(r) for r in ep.responses)


@dataclass
class PackedBatch:
    """One packed row (or several concatenated with `concat_rows`), ready for the model and the loss.

    Per token [T]: input_ids, position_ids, doc_ids, branch_ids. Per predicted response token [N]:
    target_rows (index into [T]), targets (token id), segment_ids (0..num_segments-1). Per segment [S]:
    seg_episode (index into the episode list given to `pack_batches`), seg_branch (1 = chosen,
    2 = rejected, ...), seg_tokens (response tokens summed). `episodes`: episode indices in row order;
    segments are numbered episode by episode in that order, branches ascending.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor
    branch_ids: torch.Tensor
    target_rows: torch.Tensor
    targets: torch.Tensor
    segment_ids: torch.Tensor
    num_segments: int
    seg_episode: torch.Tensor
    seg_branch: torch.Tensor
    seg_tokens: torch.Tensor
    episodes: list[int]
    max_branches: int = 0  # the most responses any episode of the row has (host-side, for cheap checks)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_targets(self) -> int:
        return int(self.targets.numel())

    def to(self, device, non_blocking: bool = False) -> PackedBatch:
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return PackedBatch(**moved)

    def by_episode(self, seg_values: torch.Tensor, fill: float = float("nan")) -> torch.Tensor:
        """Per-segment values [S] -> [E, K]: row e is `self.episodes[e]`, column b-1 is branch b; branches an
        episode lacks are `fill`. With two responses per episode, [:, 0] is chosen and [:, 1] rejected."""
        E = len(self.episodes)
        K = self.max_branches
        out = seg_values.new_full((E, K), fill)
        # seg_episode holds global episode indices; map them to positions in this batch.
        pos = {g: i for i, g in enumerate(self.episodes)}
        rows = torch.tensor(
            [pos[int(g)] for g in self.seg_episode.tolist()], dtype=torch.long, device=seg_values.device
        )
        out[rows, self.seg_branch.to(seg_values.device) - 1] = seg_values
        return out


def _check_episode(ep: Packable, name: str, max_tokens: int):
    if len(ep.prompt_ids) < 1:
        raise ValueError(f"episode {name}: empty prompt (it needs at least bos to predict the first token)")
    if len(ep.responses) < 1 or any(len(r) < 1 for r in ep.responses):
        raise ValueError(f"episode {name}: needs at least one non-empty response")
    n = block_length(ep)
    if n > max_tokens:
        raise FspoError(f"episode {name}: its packed block has {n} tokens, more than max_tokens={max_tokens}")


def _build_row(episodes: Sequence[Packable], members: list[int], first_doc_id: int) -> PackedBatch:
    """Lay out the blocks of `members` (indices into `episodes`) one after another in one row."""
    ids, pos, doc, br = [], [], [], []
    t_rows, t_ids, t_seg = [], [], []
    seg_ep, seg_br, seg_n = [], [], []
    start = 0
    for e in members:
        ep = episodes[e]
        P = len(ep.prompt_ids)
        ids.append(np.asarray(ep.prompt_ids, dtype=np.int64))
        pos.append(np.arange(P, dtype=np.int64))
        doc.append(np.full(P, first_doc_id + e, dtype=np.int64))
        br.append(np.zeros(P, dtype=np.int64))
        last_ctx = start + P - 1  # predicts the first token of every branch
        cursor = start + P
        for b, resp in enumerate(ep.responses, start=1):
            L = len(resp)
            ids.append(np.asarray(resp, dtype=np.int64))
            pos.append(np.arange(P, P + L, dtype=np.int64))
            doc.append(np.full(L, first_doc_id + e, dtype=np.int64))
            br.append(np.full(L, b, dtype=np.int64))
            # Token j of this branch is predicted from token j-1 of the same branch (j = 0: last context token).
            t_rows.append(np.concatenate(([last_ctx], np.arange(cursor, cursor + L - 1, dtype=np.int64))))
            t_ids.append(np.asarray(resp, dtype=np.int64))
            t_seg.append(np.full(L, len(seg_ep), dtype=np.int64))
            seg_ep.append(e)
            seg_br.append(b)
            seg_n.append(L)
            cursor += L
        start = cursor

    def cat(parts):
        return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.long)

    return PackedBatch(
        input_ids=cat(ids),
        position_ids=cat(pos),
        doc_ids=cat(doc),
        branch_ids=cat(br),
        target_rows=cat(t_rows),
        targets=cat(t_ids),
        segment_ids=cat(t_seg),
        num_segments=len(seg_ep),
        seg_episode=torch.tensor(seg_ep, dtype=torch.long),
        seg_branch=torch.tensor(seg_br, dtype=torch.long),
        seg_tokens=torch.tensor(seg_n, dtype=torch.long),
        episodes=list(members),
        max_branches=max(seg_br, default=0),
    )


def assign_rows(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: item indices per row, each row's total <= max_tokens.

    Longest first; each goes to the open row with the least room that still fits it, else a new row.
    Within a row, items keep their input order. Deterministic (ties broken by index).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rooms: list[tuple[int, int]] = []  # (room left, row index), kept sorted
    rows: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > max_tokens:
            raise ValueError(f"item {i} has length {n} > max_tokens={max_tokens}")
        k = bisect.bisect_left(rooms, (n, -1))  # first row with room >= n: the tightest fit
        if k < len(rooms):
            room, r = rooms.pop(k)
        else:
            room, r = max_tokens, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(rooms, (room - n, r))
    return [sorted(r) for r in rows]


def pack_batches(episodes: Sequence[Packable], max_tokens: int, first_doc_id: int = 0) -> list[PackedBatch]:
    """Pack episodes into rows of at most `max_tokens` tokens, one block per episode (never split).

    Doc ids are `first_doc_id + episode index`, unique across all returned rows, so rows can be
    concatenated (`concat_rows`) into one forward. An episode longer than `max_tokens` is an FspoError.
    """
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    for i, ep in enumerate(episodes):
        _check_episode(ep, getattr(ep, "episode_id", "") or f"#{i}", max_tokens)
    rows = assign_rows([block_length(ep) for ep in episodes], max_tokens)
    return [_build_row(episodes, members, first_doc_id) for members in rows]


def concat_rows(rows: Sequence[PackedBatch]) -> PackedBatch:
    """Several packed rows as one (doc ids already keep their documents apart); target rows and segment
    ids are shifted so the result is self-contained."""
    if len(rows) == 1:
        return rows[0]
    t_off = np.cumsum([0] + [r.num_tokens for r in rows])[:-1].tolist()
    s_off = np.cumsum([0] + [r.num_segments for r in rows])[:-1].tolist()

    def cat(name, offsets=None):
        parts = [getattr(r, name) + (0 if offsets is None else offsets[i]) for i, r in enumerate(rows)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    return PackedBatch(
        input_ids=cat("input_ids"),
        position_ids=cat("position_ids"),
        doc_ids=cat("doc_ids"),
        branch_ids=cat("branch_ids"),
        target_rows=cat("target_rows", t_off),
        targets=cat("targets"),
        segment_ids=cat("segment_ids", s_off),
        num_segments=sum(r.num_segments for r in rows),
        seg_episode=cat("seg_episode"),
        seg_branch=cat("seg_branch"),
        seg_tokens=cat("seg_tokens"),
        episodes=[e for r in rows for e in r.episodes],
        max_branches=max(r.max_branches for r in rows),
    )


# ----------------------------------------------------------------------------------------------------------
# What packing saves, against the official layout


def official_tokens(episodes: Sequence[Packable], batch_size: int = 1) -> int:
    """Tokens the official path processes: each response carries the full context, and every sequence of
    a batch (2 per pair) is padded to the batch's longest. Batches are consecutive `batch_size` episodes."""
    total = 0
    for s in range(0, len(episodes), batch_size):
        chunk = episodes[s : s + batch_size]
        longest = max(len(ep.prompt_ids) + len(r) for ep in chunk for r in ep.responses)
        total += longest * sum(len(ep.responses) for ep in chunk)
    return total


def attention_pairs_packed(ep: Packable) -> int:
    """(query, key) pairs the prefix-shared mask computes for one block: the causal context once, then each
    response against the context and causally against itself."""
    P = len(ep.prompt_ids)
    return P * (P + 1) // 2 + sum(len(r) * P + len(r) * (len(r) + 1) // 2 for r in ep.responses)


def attention_pairs_official(episodes: Sequence[Packable], batch_size: int = 1) -> int:
    """(query, key) pairs of causal attention over the official padded sequences (padding included, as a
    dense padded batch computes it)."""
    total = 0
    for s in range(0, len(episodes), batch_size):
        chunk = episodes[s : s + batch_size]
        longest = max(len(ep.prompt_ids) + len(r) for ep in chunk for r in ep.responses)
        total += longest * (longest + 1) // 2 * sum(len(ep.responses) for ep in chunk)
    return total


def packing_stats(
    episodes: Sequence[Packable], rows: Sequence[PackedBatch], max_tokens: int, official_batch_size: int = 1
) -> dict:
    """Fill ratio, tokens per episode and the saving against the official layout."""
    E = max(len(episodes), 1)
    packed = sum(r.num_tokens for r in rows)
    official = official_tokens(episodes, official_batch_size)
    official_unpadded = sum(
        len(ep.prompt_ids) * len(ep.responses) + sum(len(x) for x in ep.responses) for ep in episodes
    )
    lm_head_rows = sum(r.num_targets for r in rows)
    return {
        "episodes": len(episodes),
        "rows": len(rows),
        "max_tokens": max_tokens,
        "packed_tokens": packed,
        "fill_ratio": packed / max(len(rows) * max_tokens, 1),
        "tokens_per_episode": packed / E,
        "official_tokens": official,
        "official_tokens_per_episode": official / E,
        "official_batch_size": official_batch_size,
        "official_tokens_unpadded": official_unpadded,
        "tokens_saved": official - packed,
        "token_ratio": official / max(packed, 1),
        "lm_head_rows": lm_head_rows,
        "official_lm_head_rows": official,  # the official path computes logits for every position
    }


__all__ = [
    "PackItem",
    "PackedBatch",
    "assign_rows",
    "attention_pairs_official",
    "attention_pairs_packed",
    "block_length",
    "concat_rows",
    "official_tokens",
    "pack_batches",
    "packing_stats",
]
