"""Prefix-shared attention over packed few-shot episodes.

Mask (DESIGN.md "Packed row layout"): query q may attend key k iff doc(q) == doc(k), k is at or before
q in the row, and branch(k) in {0, branch(q)}. Branch 0 is the shared few-shot context; branches 1, 2, ...
are the responses, each of which sees the context but not its siblings.

Two paths with one mask:

- `prefix_shared_attention_torch`: exact attention one document at a time through SDPA; the dense mask
  is never larger than one document (and query chunks bound it further). The CPU path and the oracle's
  sibling in tests.
- The Triton path (flash-attention 2 style, forward + backward): online softmax with fp32 statistics,
  recompute in backward, grouped-query attention by mapping query head -> kv head inside the kernels.
  Tiles are classified once per call from per-block doc/branch ranges (`block_runs`): tiles that are
  provably fully masked are never visited, tiles that are provably fully visible skip the mask arithmetic,
  the rest evaluate the mask pointwise. Correctness holds for ANY ids; the packed layout (documents
  contiguous, context first, then each branch contiguously) only makes the skipping effective, so the
  work grows with the number of allowed (q, k) pairs instead of with T^2.
  The visited tiles of a block row are handed to the kernels as runs of consecutive blocks: on a packed
  row a query block sees at most a few (its context, its own branch, the boundary tiles), and each run is
  a dense inner loop whose addresses follow the loop counter, so the compiler's software pipeliner can
  prefetch several tiles ahead (an index list loaded inside the loop defeats it).

Layout: q [T, Hq, D], k/v [T, Hkv, D], one packed row per call (the model loops over rows).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency; the plain-torch path still works
    triton = None

from fspo_engine.kernels.interpret import INTERPRET, loop_bound

_IMPLS = ("auto", "triton", "torch")
_TRITON_HEAD_DIMS = (16, 32, 64, 128)  # tl.dot needs K >= 16; no d-masking inside the kernels


def _check_inputs(q, k, v, doc_ids, branch_ids):
    for name, t in (("q", q), ("k", k), ("v", v), ("doc_ids", doc_ids), ("branch_ids", branch_ids)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3:
        raise ValueError(f"q: expected [T, Hq, D], got shape {tuple(q.shape)}")
    if k.dim() != 3:
        raise ValueError(f"k: expected [T, Hkv, D], got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: shape {tuple(v.shape)} differs from k {tuple(k.shape)}")
    T, hq, d = q.shape
    if k.shape[0] != T or k.shape[2] != d:
        raise ValueError(f"k: shape {tuple(k.shape)} does not match q {tuple(q.shape)}")
    if k.shape[1] == 0 or hq % k.shape[1] != 0:
        raise ValueError(f"k: {k.shape[1]} kv heads do not divide {hq} query heads")
    if not q.is_floating_point():
        raise ValueError(f"q: expected a floating dtype, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} differs from q {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device}, q on {q.device}")
    for name, ids in (("doc_ids", doc_ids), ("branch_ids", branch_ids)):
        if ids.shape != (T,):
            raise ValueError(f"{name}: expected shape ({T},), got {tuple(ids.shape)}")
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: expected an int32/int64 tensor, got {ids.dtype}")
        if ids.device != q.device:
            raise ValueError(f"{name}: on {ids.device}, q on {q.device}")
    if T and not (ids_entry := _ids_entry(doc_ids, branch_ids))["checked"]:
        # One host sync for all four bounds, once per pair of id tensors (see _IDS_CACHE). Negative ids are reserved (the kernels pad with -1/-2);
        # ids must fit int32 because the kernels compare them as int32.
        lo_d, lo_b, hi_d, hi_b = torch.stack(
            [doc_ids.min(), branch_ids.min(), doc_ids.max(), branch_ids.max()]
        ).tolist()
        for name, lo, hi in (("doc_ids", lo_d, hi_d), ("branch_ids", lo_b, hi_b)):
            if lo < 0 or hi >= 2**31:
                raise ValueError(f"{name}: ids must be in [0, 2**31), got range [{lo}, {hi}]")
        ids_entry["checked"] = True


# ----------------------------------------------------------------------------------------------------
# Plain-torch path
# ----------------------------------------------------------------------------------------------------

# Bound on one query chunk's score matrix (Hq * chunk * keys elements), so a long document never
# materialises its whole [Hq, n, n] scores (8k tokens x 32 heads would be 8 GB in fp32).
_TORCH_CHUNK_ELEMS = 1 << 26


def prefix_shared_attention_torch(q, k, v, doc_ids, branch_ids, scale=None):
    """Plain-torch path: exact attention one document at a time.

    The dense mask is never larger than one document's [n, n] block, and long documents are split into
    query chunks that only see the keys before their end. Differentiable in q, k, v.
    q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D].
    """
    T, hq, d = q.shape
    hkv = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    if T == 0:
        return q.new_empty(q.shape) + 0 * (q.sum() + k.sum() + v.sum())  # keep the graph for T == 0
    order, inverse, counts, chunks = _torch_plan(doc_ids, branch_ids, hq)
    if order is not None:  # documents not contiguous in the row: group their rows first
        q, k, v = q.index_select(0, order), k.index_select(0, order), v.index_select(0, order)
    pieces = []
    # `split` views the grouped rows per document: its backward is one cat, O(T) in all, where indexing
    # each document out of the full row would allocate a [T, H, D] gradient per document.
    for qd, kd, vd, doc_chunks in zip(q.split(counts), k.split(counts), v.split(counts), chunks):
        qd = qd.transpose(0, 1).unsqueeze(0)  # (1, Hq, n, D)
        kd = kd.transpose(0, 1).unsqueeze(0)  # (1, Hkv, n, D)
        vd = vd.transpose(0, 1).unsqueeze(0)
        for s, e, mask in doc_chunks:
            # Queries [s, e) of this document see keys [0, e) at most (causal), so the rest is not loaded.
            od = F.scaled_dot_product_attention(
                qd[:, :, s:e], kd[:, :, :e], vd[:, :, :e], attn_mask=mask, scale=scale, enable_gqa=hkv != hq
            )
            pieces.append(od.squeeze(0).transpose(0, 1))  # (e - s, Hq, D)
    out = torch.cat(pieces, dim=0)
    return out if inverse is None else out.index_select(0, inverse)


def _torch_plan(doc_ids, branch_ids, hq):
    """Per call (cached per id tensors, so once per row for all layers): the grouping of rows by document
    and each document's query chunks with their [e - s, e] masks."""
    entry = _ids_entry(doc_ids, branch_ids)
    key = ("torch", hq)
    if key in entry["lists"]:
        return entry["lists"][key]
    T = doc_ids.numel()
    docs, inv = torch.unique(doc_ids, return_inverse=True)
    order = torch.argsort(inv, stable=True)  # row order kept inside a document
    counts = torch.bincount(inv, minlength=len(docs)).tolist()
    identity = bool((order == torch.arange(T, device=order.device)).all())
    br_sorted = branch_ids if identity else branch_ids.index_select(0, order)
    chunks = []
    for br in br_sorted.split(counts):
        n = br.numel()
        chunk = max(1, min(n, _TORCH_CHUNK_ELEMS // max(1, hq * n)))
        doc_chunks = []
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            rows = torch.arange(s, e, device=br.device)[:, None]
            cols = torch.arange(e, device=br.device)[None, :]
            bq, bk = br[s:e, None], br[None, :e]
            doc_chunks.append((s, e, (cols <= rows) & ((bk == 0) | (bk == bq))))  # (e - s, e)
        chunks.append(doc_chunks)
    if identity:
        plan = (None, None, counts, chunks)
    else:
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(T, device=order.device)
        plan = (order, inverse, counts, chunks)
    entry["lists"][key] = plan
    return plan


# ----------------------------------------------------------------------------------------------------
# Test oracle (tests only: not a path of the op)
# ----------------------------------------------------------------------------------------------------


def reference_attention(q, k, v, doc_ids, branch_ids, scale=None):
    """TESTS ONLY: the dense float64 oracle the tests compare both paths with (materialises [Hq, T, T]:
    small T only). Returns float64."""
    T, hq, d = q.shape
    g = hq // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    qf, kf, vf = (t.double().transpose(0, 1) for t in (q, k, v))  # (H, T, D)
    kf, vf = kf.repeat_interleave(g, 0), vf.repeat_interleave(g, 0)
    pos = torch.arange(T, device=q.device)
    mask = (
        (doc_ids[:, None] == doc_ids[None, :])
        & (pos[None, :] <= pos[:, None])
        & ((branch_ids[None, :] == 0) | (branch_ids[None, :] == branch_ids[:, None]))
    )
    s = (qf @ kf.transpose(1, 2)) * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return (p @ vf).transpose(0, 1)  # (T, Hq, D)


# ----------------------------------------------------------------------------------------------------
# Block metadata: which tiles to skip, which need the mask
# ----------------------------------------------------------------------------------------------------


@dataclass
class BlockRuns:
    """Tiles of one packed row for a (BLOCK_M queries x BLOCK_N keys) tiling, as runs of consecutive blocks.

    Row i's fully visible tiles (every (q, k) pair allowed) are the other-axis blocks
    [full_lo[i, r], full_hi[i, r]) for r < full_num[i], in increasing order; its partly visible tiles (mask
    evaluated per pair) likewise from part_*. Blocks in neither are provably fully masked and never
    visited. Rows are q-blocks (`by="q"`, forward and dq) or k-blocks (`by="k"`, dk/dv). Arrays are int32,
    [n_rows] and [n_rows, n_cols] (only the first `num` columns of a row are meaningful).
    Programs take rows in `order`, heaviest first, so the long tail of a packed row (the blocks at the end
    of long contexts do the most tiles) starts early instead of finishing last.
    """

    full_num: torch.Tensor
    full_lo: torch.Tensor
    full_hi: torch.Tensor
    part_num: torch.Tensor
    part_lo: torch.Tensor
    part_hi: torch.Tensor
    order: torch.Tensor  # [n_rows] int32: rows by decreasing tile count, the launch order

    def launch_args(self) -> dict:
        """The runs as the kernels take them (their FULL_*, PART_*, ORDER and stride_lists arguments)."""
        return {"FULL_NUM": self.full_num, "FULL_LO": self.full_lo, "FULL_HI": self.full_hi,
                "PART_NUM": self.part_num, "PART_LO": self.part_lo, "PART_HI": self.part_hi, "ORDER": self.order,
                "stride_lists": self.full_lo.stride(0)}  # fmt: skip

    def blocks(self, row: int, which: str = "full") -> list[int]:
        """The blocks of one row's runs, expanded (tests and debugging; one host sync per call)."""
        num, lo, hi = (getattr(self, f"{which}_{f}") for f in ("num", "lo", "hi"))
        n = int(num[row])
        return [b for a, z in zip(lo[row, :n].tolist(), hi[row, :n].tolist()) for b in range(a, z)]


def _block_stats(ids, block, fill_lo, fill_hi):
    """Per-block (min, max) of `ids` [T], ignoring the padding of the last block."""
    T = ids.numel()
    nb = _cdiv(T, block)
    pad = nb * block - T
    lo = F.pad(ids, (0, pad), value=fill_lo).view(nb, block).amin(1)
    hi = F.pad(ids, (0, pad), value=fill_hi).view(nb, block).amax(1)
    return lo, hi


def _cdiv(a, b):
    return (a + b - 1) // b


def block_tiles(doc_ids, branch_ids, block_m, block_n):
    """Classify every (q-block, k-block) tile: returns (visit, full), bool [n_q_blocks, n_k_blocks].

    visit=False only when the tile is provably fully masked, from per-block ranges:
      - the doc ranges of the two blocks do not overlap, or
      - every key comes after every query (causal), or
      - no key is in branch 0 and the keys' branch range does not overlap the queries' branch range
        (then no key's branch equals any query's branch).
    full=True only when every pair is provably allowed: one doc on both sides, all keys at or before the
    first query, every key on the row (no padding), and every key in branch 0 or in the single branch
    shared by all queries. Exact for any ids; effective when the ids follow the packed layout.
    """
    T = doc_ids.numel()
    big = 2**62
    doc = doc_ids.long()
    br = branch_ids.long()
    q_doc_lo, q_doc_hi = _block_stats(doc, block_m, big, -1)
    k_doc_lo, k_doc_hi = _block_stats(doc, block_n, big, -1)
    q_br_lo, q_br_hi = _block_stats(br, block_m, big, -1)
    k_br_lo, k_br_hi = _block_stats(br, block_n, big, -1)
    # Branch range of the keys outside branch 0 (empty range lo > hi when all keys are context).
    nz = br == 0
    k_nz_lo, _ = _block_stats(br.masked_fill(nz, big), block_n, big, -1)
    _, k_nz_hi = _block_stats(br.masked_fill(nz, -1), block_n, big, -1)
    k_has_ctx = k_br_lo == 0

    dev = doc_ids.device
    q_first = torch.arange(0, T, block_m, device=dev)  # first query row of each q-block
    q_last = (q_first + block_m).clamp(max=T) - 1
    k_first = torch.arange(0, T, block_n, device=dev)
    k_end = k_first + block_n  # one past the last key slot, padding included

    Q = lambda t: t[:, None]  # noqa: E731 - broadcast a q-block stat along k-blocks
    K = lambda t: t[None, :]  # noqa: E731
    doc_overlap = (Q(q_doc_lo) <= K(k_doc_hi)) & (K(k_doc_lo) <= Q(q_doc_hi))
    causal_any = K(k_first) <= Q(q_last)
    branch_any = K(k_has_ctx) | ((K(k_nz_lo) <= Q(q_br_hi)) & (Q(q_br_lo) <= K(k_nz_hi)))
    visit = doc_overlap & causal_any & branch_any

    one_doc = (Q(q_doc_lo) == Q(q_doc_hi)) & (K(k_doc_lo) == K(k_doc_hi)) & (Q(q_doc_lo) == K(k_doc_lo))
    # Every key slot at or before the first query; this also puts every slot on the row (k_end <= T).
    causal_all = K(k_end) - 1 <= Q(q_first)
    q_one_branch = Q(q_br_lo) == Q(q_br_hi)
    k_all_ctx = K(k_nz_lo) > K(k_nz_hi)
    branch_all = k_all_ctx | (q_one_branch & (K(k_nz_lo) == K(k_nz_hi)) & (K(k_nz_lo) == Q(q_br_lo)))
    full = one_doc & causal_all & branch_all
    return visit, full & visit


def _compact(sel):
    """bool [R, C] -> (num [R] int32, idx [R, C] int32 with the selected columns first, in order)."""
    num = sel.sum(1, dtype=torch.int32)
    idx = torch.sort((~sel).to(torch.int8), dim=1, stable=True).indices.to(torch.int32)
    return num, idx.contiguous()


def _runs(sel):
    """bool [R, C] -> (num [R], lo [R, C], hi [R, C]) int32: the maximal runs of consecutive selected
    columns of each row, in order; run r covers columns [lo[:, r], hi[:, r])."""
    off = torch.zeros_like(sel[:, :1])
    starts = sel & ~torch.cat([off, sel[:, :-1]], dim=1)  # selected, previous column not
    ends = sel & ~torch.cat([sel[:, 1:], off], dim=1)  # selected, next column not
    num, lo = _compact(starts)
    _, last = _compact(ends)
    return num, lo, last + 1


def block_runs(doc_ids, branch_ids, block_m, block_n, by="q"):
    """Tile runs for the kernels (see `BlockRuns`); a few small torch ops, no host sync."""
    visit, full = block_tiles(doc_ids, branch_ids, block_m, block_n)
    part = visit & ~full
    if by == "k":
        full, part = full.T, part.T
    tiles = full.sum(1, dtype=torch.int32) + part.sum(1, dtype=torch.int32)
    order = torch.sort(tiles, descending=True, stable=True).indices.to(torch.int32)
    return BlockRuns(*_runs(full), *_runs(part), order)


# The model calls the op once per layer with the same id tensors. Per pair of id tensors we remember that
# they passed the range check (which costs a host sync) and the tile runs of each tiling. Entries hold the
# tensors themselves, so `is` plus the version counter identify them: a freed tensor's address cannot be
# reused while we hold it, and an in-place write bumps the version.
_IDS_CACHE: dict = {}
_IDS_CACHE_SIZE = 4


def _ids_entry(doc_ids, branch_ids) -> dict:
    if doc_ids.is_inference() or branch_ids.is_inference():
        # Inference tensors have no version counter: nothing proves them unchanged, so no caching.
        return {"checked": False, "lists": {}}
    key = (id(doc_ids), id(branch_ids))
    version = (doc_ids._version, branch_ids._version)
    hit = _IDS_CACHE.get(key)
    if hit is not None and hit["doc"] is doc_ids and hit["br"] is branch_ids and hit["version"] == version:
        return hit
    if len(_IDS_CACHE) >= _IDS_CACHE_SIZE:
        _IDS_CACHE.pop(next(iter(_IDS_CACHE)))
    entry = {"doc": doc_ids, "br": branch_ids, "version": version, "checked": False, "lists": {}}
    _IDS_CACHE[key] = entry
    return entry


def _cached_block_runs(doc_ids, branch_ids, block_m, block_n, by):
    lists = _ids_entry(doc_ids, branch_ids)["lists"]
    key = (block_m, block_n, by)
    if key not in lists:
        lists[key] = block_runs(doc_ids, branch_ids, block_m, block_n, by)
    return lists[key]


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634  # 1/ln(2): the kernels use exp2, so scores are pre-scaled by scale*log2(e)

if triton is not None:

    @triton.jit
    def _allowed(offs_m, offs_n, q_doc, q_br, k_doc, k_br):
        # [BM, BN] pointwise mask of DESIGN.md; padding has doc -1 (queries) / -2 (keys), never equal.
        same_doc = q_doc[:, None] == k_doc[None, :]
        causal = offs_n[None, :] <= offs_m[:, None]
        branch = (k_br[None, :] == 0) | (k_br[None, :] == q_br[:, None])
        return same_doc & causal & branch

    @triton.jit
    def _fwd_tile(
        acc, l_i, m_i, q, q_doc, q_br, offs_m, kb, K, V, DOC, BR, T, stride_kt, stride_vt, qk_scale,
        MASKED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):  # fmt: skip
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        k_ptrs = K + offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = V + offs_n[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            n_ok = offs_n < T
            k = tl.load(k_ptrs, mask=n_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
        else:  # a full tile lies inside the row (block_tiles guarantees it)
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BM, BN], log2 units
        if MASKED:
            k_doc = tl.load(DOC + offs_n, mask=n_ok, other=-2)
            k_br = tl.load(BR + offs_n, mask=n_ok, other=-2)
            s = tl.where(_allowed(offs_m, offs_n, q_doc, q_br, k_doc, k_br), s, float("-inf"))
        # m_i starts finite (-1e30), so a row with no allowed key in this tile keeps alpha = 1, p = 0.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        return acc, l_i, m_new

    # The tile loops: for each run of consecutive blocks [lo, hi) of this block row (BlockRuns), a dense
    # `for` over the run. The run bounds are loaded once per run; inside a run every address follows the
    # loop counter, which is what lets the software pipeliner keep num_stages - 1 tiles in flight. The
    # interpreter runs the same statements (`loop_bound` gives it Python ints for the range()).
    @triton.jit
    def _fwd_runs(
        acc, l_i, m_i, q, q_doc, q_br, offs_m, NUM, LO, HI, row, stride_lists, K, V, DOC, BR, T,
        stride_kt, stride_vt, qk_scale,
        MASKED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):  # fmt: skip
        for r in range(0, loop_bound(tl.load(NUM + row), INTERPRET)):
            run = row * stride_lists + r
            # (The bounds go straight into range(): see loop_bound.)
            for kb in range(
                loop_bound(tl.load(LO + run), INTERPRET), loop_bound(tl.load(HI + run), INTERPRET)
            ):
                acc, l_i, m_i = _fwd_tile(
                    acc, l_i, m_i, q, q_doc, q_br, offs_m, kb, K, V, DOC, BR, T, stride_kt, stride_vt,
                    qk_scale, MASKED, PRECISION, BLOCK_N, HEAD_DIM,
                )  # fmt: skip
        return acc, l_i, m_i

    @triton.jit(do_not_specialize=["T", "stride_lists"])  # change with every packed row: no recompile each
    def _fwd_kernel(
        Q, K, V, O, LSE, DOC, BR,
        FULL_NUM, FULL_LO, FULL_HI, PART_NUM, PART_LO, PART_HI, ORDER, stride_lists,
        T, qk_scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    ):  # fmt: skip
        h = tl.program_id(0)
        qb = tl.load(ORDER + tl.program_id(1))
        K += (h // GROUP) * stride_kh  # grouped-query attention: the kv head of this query head
        V += (h // GROUP) * stride_vh
        offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        m_ok = offs_m < T
        q = tl.load(
            Q + offs_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=m_ok[:, None], other=0.0
        )
        q_doc = tl.load(DOC + offs_m, mask=m_ok, other=-1)
        q_br = tl.load(BR + offs_m, mask=m_ok, other=-1)

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # running max of the scores (log2 units)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        # Fully visible tiles first (no mask arithmetic), then the boundary tiles (doc/branch/diagonal).
        acc, l_i, m_i = _fwd_runs(
            acc, l_i, m_i, q, q_doc, q_br, offs_m, FULL_NUM, FULL_LO, FULL_HI, qb, stride_lists,
            K, V, DOC, BR, T, stride_kt, stride_vt, qk_scale, False, PRECISION, BLOCK_N, HEAD_DIM, INTERPRET,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_runs(
            acc, l_i, m_i, q, q_doc, q_br, offs_m, PART_NUM, PART_LO, PART_HI, qb, stride_lists,
            K, V, DOC, BR, T, stride_kt, stride_vt, qk_scale, True, PRECISION, BLOCK_N, HEAD_DIM, INTERPRET,
        )  # fmt: skip

        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # padding rows only: every real query sees itself
        o = acc / l_safe[:, None]
        tl.store(
            O + offs_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
            o.to(O.dtype.element_ty),
            mask=m_ok[:, None],
        )
        tl.store(LSE + h * T + offs_m, m_i + tl.math.log2(l_safe), mask=m_ok)  # log2-sum-exp2, fp32

    @triton.jit(do_not_specialize=["T"])
    def _bwd_delta_kernel(O, DO, DELTA, T, stride_ot, stride_oh, stride_dt, stride_dh,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
        # delta[h, t] = sum_d o[t, h, d] * do[t, h, d], the softmax-backward row term, fp32.
        pid = tl.program_id(0)
        h = tl.program_id(1)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        ok = offs_m < T
        o = tl.load(O + offs_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=ok[:, None])
        do = tl.load(DO + offs_m[:, None] * stride_dt + h * stride_dh + offs_d[None, :], mask=ok[:, None])
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + h * T + offs_m, delta, mask=ok)

    @triton.jit
    def _load_q_block(qb, h, Q, DO, LSE, DELTA, T, stride_qt, stride_qh, stride_dt, stride_dh,
                      BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):  # fmt: skip
        """Query block qb of head h for the backward: rows, their mask, q and do [BM, D], lse and delta [BM].
        Padding rows get q = do = 0 and lse = +inf, so their p and ds are exactly 0."""
        offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        m_ok = offs_m < T
        q = tl.load(
            Q + offs_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=m_ok[:, None], other=0.0
        )
        do = tl.load(
            DO + offs_m[:, None] * stride_dt + h * stride_dh + offs_d[None, :], mask=m_ok[:, None], other=0.0
        )
        lse = tl.load(LSE + h * T + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + h * T + offs_m, mask=m_ok, other=0.0)
        return offs_m, m_ok, q, do, lse, delta

    @triton.jit
    def _dkdv_tile(
        dk, dv, k, v, k_doc, k_br, offs_n, qb, h, Q, DO, LSE, DELTA, DOC, BR, T,
        stride_qt, stride_qh, stride_dt, stride_dh, qk_scale,
        MASKED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):  # fmt: skip
        offs_m, m_ok, q, do, lse, delta = _load_q_block(
            qb, h, Q, DO, LSE, DELTA, T, stride_qt, stride_qh, stride_dt, stride_dh, BLOCK_M, HEAD_DIM
        )
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BN, BM] = scores^T
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            q_doc = tl.load(DOC + offs_m, mask=m_ok, other=-1)
            q_br = tl.load(BR + offs_m, mask=m_ok, other=-1)
            # The mask transposed: [BN, BM].
            ok_t = (k_doc[:, None] == q_doc[None, :]) & (offs_n[:, None] <= offs_m[None, :])
            ok_t = ok_t & ((k_br[:, None] == 0) | (k_br[:, None] == q_br[None, :]))
            p_t = tl.where(ok_t, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BN, BM] = (do @ v^T)^T
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
        return dk, dv

    @triton.jit
    def _dkdv_runs(
        dk, dv, k, v, k_doc, k_br, offs_n, NUM, LO, HI, row, stride_lists, h, Q, DO, LSE, DELTA, DOC, BR, T,
        stride_qt, stride_qh, stride_dt, stride_dh, qk_scale,
        MASKED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):  # fmt: skip
        for r in range(0, loop_bound(tl.load(NUM + row), INTERPRET)):
            run = row * stride_lists + r
            # (The bounds go straight into range(): see loop_bound.)
            for qb in range(
                loop_bound(tl.load(LO + run), INTERPRET), loop_bound(tl.load(HI + run), INTERPRET)
            ):
                dk, dv = _dkdv_tile(
                    dk, dv, k, v, k_doc, k_br, offs_n, qb, h, Q, DO, LSE, DELTA, DOC, BR, T,
                    stride_qt, stride_qh, stride_dt, stride_dh, qk_scale, MASKED, PRECISION, BLOCK_M, HEAD_DIM,
                )  # fmt: skip
        return dk, dv

    @triton.jit(do_not_specialize=["T", "stride_lists"])  # change with every packed row: no recompile each
    def _dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, DOC, BR,
        FULL_NUM, FULL_LO, FULL_HI, PART_NUM, PART_LO, PART_HI, ORDER, stride_lists,
        T, qk_scale, sm_scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dt, stride_dh,
        stride_dkt, stride_dkh, stride_dvt, stride_dvh,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    ):  # fmt: skip
        hk = tl.program_id(0)
        kb = tl.load(ORDER + tl.program_id(1))
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        n_ok = offs_n < T
        k = tl.load(
            K + offs_n[:, None] * stride_kt + hk * stride_kh + offs_d[None, :], mask=n_ok[:, None], other=0.0
        )
        v = tl.load(
            V + offs_n[:, None] * stride_vt + hk * stride_vh + offs_d[None, :], mask=n_ok[:, None], other=0.0
        )
        k_doc = tl.load(DOC + offs_n, mask=n_ok, other=-2)
        k_br = tl.load(BR + offs_n, mask=n_ok, other=-2)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        # The GROUP query heads sharing this kv head accumulate here, in a fixed order: no atomics,
        # deterministic gradients.
        for g in range(0, GROUP):
            h = hk * GROUP + g
            dk, dv = _dkdv_runs(
                dk, dv, k, v, k_doc, k_br, offs_n, FULL_NUM, FULL_LO, FULL_HI, kb, stride_lists,
                h, Q, DO, LSE, DELTA, DOC, BR, T, stride_qt, stride_qh, stride_dt, stride_dh, qk_scale,
                False, PRECISION, BLOCK_M, HEAD_DIM, INTERPRET,
            )  # fmt: skip
            dk, dv = _dkdv_runs(
                dk, dv, k, v, k_doc, k_br, offs_n, PART_NUM, PART_LO, PART_HI, kb, stride_lists,
                h, Q, DO, LSE, DELTA, DOC, BR, T, stride_qt, stride_qh, stride_dt, stride_dh, qk_scale,
                True, PRECISION, BLOCK_M, HEAD_DIM, INTERPRET,
            )  # fmt: skip
        dk *= sm_scale  # d(scale * q.k)/dk = scale * q
        tl.store(
            DK + offs_n[:, None] * stride_dkt + hk * stride_dkh + offs_d[None, :],
            dk.to(DK.dtype.element_ty),
            mask=n_ok[:, None],
        )
        tl.store(
            DV + offs_n[:, None] * stride_dvt + hk * stride_dvh + offs_d[None, :],
            dv.to(DV.dtype.element_ty),
            mask=n_ok[:, None],
        )

    @triton.jit
    def _dq_tile(
        dq, q, do, lse, delta, q_doc, q_br, offs_m, kb, K, V, DOC, BR, T, stride_kt, stride_vt, qk_scale,
        MASKED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):  # fmt: skip
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        k_ptrs = K + offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = V + offs_n[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            n_ok = offs_n < T
            k = tl.load(k_ptrs, mask=n_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BM, BN]
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            k_doc = tl.load(DOC + offs_n, mask=n_ok, other=-2)
            k_br = tl.load(BR + offs_n, mask=n_ok, other=-2)
            p = tl.where(_allowed(offs_m, offs_n, q_doc, q_br, k_doc, k_br), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BM, BN]
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
        return dq

    @triton.jit
    def _dq_runs(
        dq, q, do, lse, delta, q_doc, q_br, offs_m, NUM, LO, HI, row, stride_lists, K, V, DOC, BR, T,
        stride_kt, stride_vt, qk_scale,
        MASKED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):  # fmt: skip
        for r in range(0, loop_bound(tl.load(NUM + row), INTERPRET)):
            run = row * stride_lists + r
            # (The bounds go straight into range(): see loop_bound.)
            for kb in range(
                loop_bound(tl.load(LO + run), INTERPRET), loop_bound(tl.load(HI + run), INTERPRET)
            ):
                dq = _dq_tile(
                    dq, q, do, lse, delta, q_doc, q_br, offs_m, kb, K, V, DOC, BR, T, stride_kt, stride_vt,
                    qk_scale, MASKED, PRECISION, BLOCK_N, HEAD_DIM,
                )  # fmt: skip
        return dq

    @triton.jit(do_not_specialize=["T", "stride_lists"])  # change with every packed row: no recompile each
    def _dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, DOC, BR,
        FULL_NUM, FULL_LO, FULL_HI, PART_NUM, PART_LO, PART_HI, ORDER, stride_lists,
        T, qk_scale, sm_scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dt, stride_dh,
        stride_dqt, stride_dqh,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    ):  # fmt: skip
        h = tl.program_id(0)
        qb = tl.load(ORDER + tl.program_id(1))
        K += (h // GROUP) * stride_kh
        V += (h // GROUP) * stride_vh
        offs_m, m_ok, q, do, lse, delta = _load_q_block(
            qb, h, Q, DO, LSE, DELTA, T, stride_qt, stride_qh, stride_dt, stride_dh, BLOCK_M, HEAD_DIM
        )
        offs_d = tl.arange(0, HEAD_DIM)
        q_doc = tl.load(DOC + offs_m, mask=m_ok, other=-1)
        q_br = tl.load(BR + offs_m, mask=m_ok, other=-1)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        dq = _dq_runs(
            dq, q, do, lse, delta, q_doc, q_br, offs_m, FULL_NUM, FULL_LO, FULL_HI, qb, stride_lists,
            K, V, DOC, BR, T, stride_kt, stride_vt, qk_scale, False, PRECISION, BLOCK_N, HEAD_DIM, INTERPRET,
        )  # fmt: skip
        dq = _dq_runs(
            dq, q, do, lse, delta, q_doc, q_br, offs_m, PART_NUM, PART_LO, PART_HI, qb, stride_lists,
            K, V, DOC, BR, T, stride_kt, stride_vt, qk_scale, True, PRECISION, BLOCK_N, HEAD_DIM, INTERPRET,
        )  # fmt: skip
        dq *= sm_scale
        tl.store(
            DQ + offs_m[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
            dq.to(DQ.dtype.element_ty),
            mask=m_ok[:, None],
        )


# ----------------------------------------------------------------------------------------------------
# Launch functions and tile-size tuning
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of one kernel: BLOCK_M query rows x BLOCK_N key rows per tile."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3


# Candidates per (kernel, head dim), tried on the first CUDA call for each (head dim, dtype, group,
# row-length bucket). Tile sizes decide the block runs, so they are tuned here rather than by
# @triton.autotune (whose configs cannot change the metadata computed before the launch). The first entry
# is the untuned default (FSPO_ATTN_AUTOTUNE=0 / FSPO_AUTOTUNE=0). Every entry, at bf16 and fp16, compiles
# for sm_90 without register spills, within the shared memory of one SM, with its main loops pipelined
# >= 3 deep (ptxas and Triton 3.6; `fspo-engine bench compile-report` lists them, and
# tests/kernels/test_attention.py checks every entry). Head dims below 64 take the 64 lists. The last
# entry of each list also fits fp32 inputs at D=128 in shared memory (it spills there: fp32 is the test
# dtype, not the training one). Left out, measured (compile report, D=128): fwd 128x128 (228 KiB of
# shared memory at 3 stages, spills at 2), any 4-warp tile of 128 rows (spills), dk/dv 64x128 (spills).
_CANDIDATES = {
    ("fwd", 64): [
        KernelConfig(128, 64, 8, 3),
        KernelConfig(128, 128, 8, 3),
        KernelConfig(128, 64, 8, 4),
        KernelConfig(64, 64, 4, 3),
        KernelConfig(64, 32, 4, 3),
    ],
    ("fwd", 128): [
        KernelConfig(128, 64, 8, 3),
        KernelConfig(128, 64, 8, 4),
        KernelConfig(128, 32, 8, 4),
        KernelConfig(64, 32, 4, 3),
    ],
    ("dkdv", 64): [
        KernelConfig(32, 128, 8, 3),
        KernelConfig(64, 128, 8, 3),
        KernelConfig(32, 64, 8, 3),
        KernelConfig(64, 64, 4, 3),
        KernelConfig(32, 32, 4, 4),
    ],
    ("dkdv", 128): [
        KernelConfig(32, 128, 8, 3),
        KernelConfig(16, 128, 8, 3),
        KernelConfig(32, 64, 8, 3),
        KernelConfig(64, 64, 8, 3),
        KernelConfig(32, 32, 4, 4),
    ],
    ("dq", 64): [
        KernelConfig(128, 64, 8, 3),
        KernelConfig(128, 64, 8, 4),
        KernelConfig(128, 32, 8, 3),
        KernelConfig(64, 64, 4, 3),
        KernelConfig(64, 32, 4, 3),
    ],
    ("dq", 128): [
        KernelConfig(128, 64, 8, 3),
        KernelConfig(128, 32, 8, 3),
        KernelConfig(64, 64, 8, 3),
        KernelConfig(64, 32, 4, 3),
    ],
}


def _candidates(kind: str, head_dim: int) -> list[KernelConfig]:
    return _CANDIDATES[(kind, 64 if head_dim <= 64 else 128)]


# Under TRITON_INTERPRET (tests on CPU) small tiles keep the interpreter fast.
_INTERPRET_CONFIG = KernelConfig(32, 32, 4, 1)
_TUNED: dict = {}
# Tests (and experiments) pin configs here: {"fwd": KernelConfig, "dkdv": ..., "dq": ...}.
_FORCE: dict = {}


def _pick_config(kind, q, k, run):
    """The config for `kind`: forced, interpreter default, cached, or chosen now among the candidates.

    `run(cfg)` launches the kernel once with cfg (it rewrites the same outputs, so trying is harmless).
    Timing picks the fastest candidate per (head dim, dtype, group, row-length bucket), once per process:
    timing noise can pick differently in another process or on another rank, which changes rounding (not
    results). With FSPO_AUTOTUNE=0 (or FSPO_ATTN_AUTOTUNE=0) nothing is timed: the first candidate that
    launches is taken, the same in every process, so outputs are bitwise repeatable across runs and ranks.
    """
    if kind in _FORCE:
        return _FORCE[kind]
    if INTERPRET or not q.is_cuda:
        return _INTERPRET_CONFIG
    tune = "0" not in (os.environ.get("FSPO_AUTOTUNE"), os.environ.get("FSPO_ATTN_AUTOTUNE"))
    T, hq, d = q.shape
    key = (kind, tune, d, q.dtype, hq // k.shape[1], 1 << max(0, T - 1).bit_length(), q.device.index)
    if key not in _TUNED:
        import triton.testing

        times, error = {}, None
        for cfg in _candidates(kind, d):
            try:  # e.g. OutOfResources: too much shared memory for this head dim / dtype
                if not tune:
                    run(cfg)
                    times[cfg] = 0.0
                    break
                times[cfg] = triton.testing.do_bench(lambda cfg=cfg: run(cfg), warmup=5, rep=25)  # ms
            except Exception as exc:  # noqa: BLE001 - the next candidate may fit; all failing re-raises
                error = exc
        if not times:
            raise error
        _TUNED[key] = min(times, key=times.get)
    return _TUNED[key]


def _precision(dtype):
    # fp32 inputs (tests) get exact fp32 products; 16-bit inputs ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_int32_offsets(**tensors):
    """The kernels address q, k, v, o and their gradients with int32 element offsets (row * stride + ...):
    every element must lie fewer than 2**31 - 1 elements past the tensor's start (for a contiguous q:
    T * Hq * D < 2**31), or its offset would wrap."""
    for name, t in tensors.items():
        extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) if t.numel() else 0
        if extent >= 2**31:
            raise ValueError(
                f"{name}: spans {extent} elements (shape {tuple(t.shape)}, strides {t.stride()}); the Triton "
                "attention kernels use int32 offsets (< 2**31): pack shorter rows or use impl='torch'"
            )


def _strides(**tensors) -> dict:
    """The row and head strides of [T, H, D] tensors as the kernels name them: q -> stride_qt, stride_qh
    (D has unit stride)."""
    return {f"stride_{name}{axis}": t.stride(i) for name, t in tensors.items() for i, axis in enumerate("th")}


def _meta(q, k, cfg: KernelConfig) -> dict:
    """The compile-time arguments every attention kernel takes, and the launch's warps and stages."""
    return {"GROUP": q.shape[1] // k.shape[1], "HEAD_DIM": q.shape[2], "BLOCK_M": cfg.block_m,
            "BLOCK_N": cfg.block_n, "PRECISION": _precision(q.dtype), "INTERPRET": INTERPRET,
            "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}  # fmt: skip


def _launch_fwd(q, k, v, doc_ids, branch_ids, scale, o, lse, cfg):
    T, hq, _ = q.shape
    runs = _cached_block_runs(doc_ids, branch_ids, cfg.block_m, cfg.block_n, "q")
    grid = (hq, triton.cdiv(T, cfg.block_m))  # axis 0 varies fastest: heavy rows of all heads first
    _fwd_kernel[grid](
        q, k, v, o, lse, doc_ids, branch_ids, **runs.launch_args(), T=T, qk_scale=scale * _LOG2E,
        **_strides(q=q, k=k, v=v, o=o), **_meta(q, k, cfg),
    )  # fmt: skip


def attention_forward(q, k, v, doc_ids, branch_ids, scale):
    """Triton forward. Returns o [T, Hq, D] (dtype of q) and lse [Hq, T] (fp32, log2 units)."""
    _check_int32_offsets(q=q, k=k, v=v)
    T, hq, _ = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((hq, T), device=q.device, dtype=torch.float32)
    if T == 0:
        return o, lse
    run = lambda cfg: _launch_fwd(q, k, v, doc_ids, branch_ids, scale, o, lse, cfg)  # noqa: E731
    run(_pick_config("fwd", q, k, run))
    return o, lse


def _launch_dkdv(q, k, v, do, lse, delta, doc_ids, branch_ids, scale, dk, dv, cfg):
    T = q.shape[0]
    runs = _cached_block_runs(doc_ids, branch_ids, cfg.block_m, cfg.block_n, "k")
    grid = (k.shape[1], triton.cdiv(T, cfg.block_n))
    _dkdv_kernel[grid](
        q, k, v, do, lse, delta, dk, dv, doc_ids, branch_ids, **runs.launch_args(),
        T=T, qk_scale=scale * _LOG2E, sm_scale=scale,
        **_strides(q=q, k=k, v=v, d=do, dk=dk, dv=dv), **_meta(q, k, cfg),
    )  # fmt: skip


def _launch_dq(q, k, v, do, lse, delta, doc_ids, branch_ids, scale, dq, cfg):
    T, hq, _ = q.shape
    runs = _cached_block_runs(doc_ids, branch_ids, cfg.block_m, cfg.block_n, "q")
    grid = (hq, triton.cdiv(T, cfg.block_m))  # axis 0 varies fastest: heavy rows of all heads first
    _dq_kernel[grid](
        q, k, v, do, lse, delta, dq, doc_ids, branch_ids, **runs.launch_args(),
        T=T, qk_scale=scale * _LOG2E, sm_scale=scale,
        **_strides(q=q, k=k, v=v, d=do, dq=dq), **_meta(q, k, cfg),
    )  # fmt: skip


def attention_backward(q, k, v, o, lse, do, doc_ids, branch_ids, scale):
    """Triton backward (recompute): returns dq, dk, dv shaped and typed like q, k, v."""
    _check_int32_offsets(q=q, k=k, v=v, o=o, do=do)
    T, hq, d = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if T == 0:
        return dq, dk, dv
    delta = torch.empty((hq, T), device=q.device, dtype=torch.float32)
    block = 64
    _bwd_delta_kernel[(triton.cdiv(T, block), hq)](o, do, delta, T=T, **_strides(o=o, d=do), HEAD_DIM=d, BLOCK_M=block)
    run = lambda cfg: _launch_dkdv(q, k, v, do, lse, delta, doc_ids, branch_ids, scale, dk, dv, cfg)  # noqa: E731
    run(_pick_config("dkdv", q, k, run))
    run = lambda cfg: _launch_dq(q, k, v, do, lse, delta, doc_ids, branch_ids, scale, dq, cfg)  # noqa: E731
    run(_pick_config("dq", q, k, run))
    return dq, dk, dv


class _PrefixSharedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_ids, branch_ids, scale):
        o, lse = attention_forward(q, k, v, doc_ids, branch_ids, scale)
        ctx.save_for_backward(q, k, v, o, lse, doc_ids, branch_ids)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, doc_ids, branch_ids = ctx.saved_tensors
        do = do if do.stride(-1) == 1 else do.contiguous()
        dq, dk, dv = attention_backward(q, k, v, o, lse, do, doc_ids, branch_ids, ctx.scale)
        return dq, dk, dv, None, None, None


def _triton_unsupported(q) -> str | None:
    """Why the Triton path cannot take these inputs (None when it can)."""
    if triton is None:
        return "triton is not installed"
    if not q.is_cuda and not INTERPRET:
        return f"the Triton path needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}"
    if q.shape[2] not in _TRITON_HEAD_DIMS:
        return f"the Triton path supports head dims {_TRITON_HEAD_DIMS}, got {q.shape[2]}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton path supports fp16/bf16/fp32, got {q.dtype}"
    return None


# Under torch.compile the op stays eager (one graph break): its id caches and launch logic are Python.
@torch.compiler.disable
def prefix_shared_attention(q, k, v, doc_ids, branch_ids, scale=None, *, impl="auto"):
    """Attention over a packed row with the doc/branch mask of DESIGN.md.

    q [T, Hq, D], k/v [T, Hkv, D] (Hq % Hkv == 0), doc_ids/branch_ids [T] int -> [T, Hq, D].
    scale defaults to D**-0.5. impl: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch"
    (per-document SDPA), or "auto" = Triton on CUDA when it supports the head dim and dtype, torch
    elsewhere. Differentiable in q, k, v. Bad arguments raise ValueError naming the argument.

    Triton tile sizes are timed on the first call per (head dim, dtype, GQA group, row-length bucket) in
    each process, so outputs are bitwise repeatable within a process; FSPO_AUTOTUNE=0 (or
    FSPO_ATTN_AUTOTUNE=0) takes the first candidate that launches instead: the same tiles, hence bitwise the
    same outputs, in every process and on every rank. The Triton kernels use int32 offsets: a row whose
    q (or k, v) spans 2**31 elements or more (T * Hq * D for a contiguous q) raises ValueError.
    Pass the same doc_ids/branch_ids tensors to every layer: their range check and tile runs are
    computed once and reused.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl: expected one of {_IMPLS}, got {impl!r}")
    _check_inputs(q, k, v, doc_ids, branch_ids)
    if scale is None:
        scale = q.shape[2] ** -0.5
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a positive finite number, got {scale!r}")
    why_not = _triton_unsupported(q)
    if impl == "triton" and why_not is not None:
        raise ValueError(f"q: {why_not}")
    if impl == "torch" or (impl == "auto" and (why_not is not None or not q.is_cuda)):
        return prefix_shared_attention_torch(q, k, v, doc_ids, branch_ids, scale)
    # The kernels need unit stride along D only; ids must be contiguous (kept as-is for the lists cache).
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    doc_ids, branch_ids = doc_ids.contiguous(), branch_ids.contiguous()
    return _PrefixSharedAttention.apply(q, k, v, doc_ids, branch_ids, float(scale))
