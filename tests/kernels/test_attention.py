"""prefix_shared_attention: Triton path (interpreter on CPU) and torch path against a float64 oracle."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first triton import (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fspo_engine.kernels import attention as A  # noqa: E402
from fspo_engine.kernels.attention import prefix_shared_attention  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


# fp32 inputs: DESIGN.md asks < 1e-4 relative; measured max abs error ~1e-6 on O(1) values.
ATOL, RTOL = 2e-5, 1e-4


def packed_layout(rng, n_docs, ctx_range=(1, 20), n_branches=(2, 4), branch_range=(1, 12)):
    """Random packed row: per doc a context (branch 0) then each branch's tokens contiguously."""
    doc, br = [], []
    for d in range(n_docs):
        ctx = int(torch.randint(ctx_range[0], ctx_range[1] + 1, (1,), generator=rng))
        nb = int(torch.randint(n_branches[0], n_branches[1] + 1, (1,), generator=rng))
        doc += [d] * ctx
        br += [0] * ctx
        for b in range(1, nb + 1):
            n = int(torch.randint(branch_range[0], branch_range[1] + 1, (1,), generator=rng))
            doc += [d] * n
            br += [b] * n
    return torch.tensor(doc, device=DEV), torch.tensor(br, device=DEV)


def make_inputs(T, hq, hkv, d, seed, dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v, do = (
        torch.randn(T, h, d, generator=g).to(DEV, dtype) for h in (hq, hkv, hkv, hq)
    )  # fmt: skip
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def check_against_reference(q, k, v, do, doc, br, impl, scale=None, atol=ATOL, rtol=RTOL, max_rel=None):
    """Output and dq, dk, dv against the float64 oracle: elementwise (atol, rtol), or with `max_rel` the
    16-bit criterion of DESIGN.md, max |error| / max |reference| per tensor."""
    out = prefix_shared_attention(q, k, v, doc, br, scale=scale, impl=impl)
    assert out.shape == q.shape and out.dtype == q.dtype
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref = A.reference_attention(q, k, v, doc, br, scale=scale)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert torch.isfinite(got).all(), name
        if max_rel is not None:
            rel = ((got.double() - want).abs().max() / want.abs().max()).item()
            assert rel < max_rel, f"{name}: max relative error {rel:.2e} >= {max_rel}"
        else:
            torch.testing.assert_close(
                got.double(), want.double(), atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}"
            )


# ---------------------------------------------------------------------------------------------------
# Triton path (TRITON_INTERPRET=1 on CPU, compiled on GPU)
# ---------------------------------------------------------------------------------------------------

SMALL = A.KernelConfig(16, 16, 4, 1)
SKEWED = {"fwd": A.KernelConfig(32, 16), "dkdv": A.KernelConfig(16, 32), "dq": A.KernelConfig(32, 16)}


@pytest.mark.parametrize(
    "hq,hkv,d,n_docs,seed",
    [
        (2, 2, 16, 5, 0),  # GQA ratio 1
        (4, 1, 16, 3, 1),  # ratio 4
        (8, 1, 16, 2, 2),  # ratio 8
        (4, 2, 32, 4, 3),  # D = 32
        (8, 2, 64, 3, 4),  # the GPU head dims, still cheap enough for the interpreter
        (4, 1, 128, 2, 5),
    ],
)
def test_triton_packed_rows(hq, hkv, d, n_docs, seed):
    rng = torch.Generator().manual_seed(seed)
    doc, br = packed_layout(rng, n_docs)
    q, k, v, do = make_inputs(doc.numel(), hq, hkv, d, seed)
    check_against_reference(q, k, v, do, doc, br, "triton")


@pytest.mark.parametrize(
    "configs", [{"fwd": SMALL, "dkdv": SMALL, "dq": SMALL}, SKEWED], ids=["16x16", "skewed"]
)
def test_triton_tile_sizes(monkeypatch, configs):
    # Rows longer than several tiles in both directions, T not a multiple of any block.
    for kind, cfg in configs.items():
        monkeypatch.setitem(A._FORCE, kind, cfg)
    rng = torch.Generator().manual_seed(7)
    doc, br = packed_layout(rng, 4, ctx_range=(1, 40), branch_range=(1, 20))
    assert doc.numel() % 16 != 0
    q, k, v, do = make_inputs(doc.numel(), 4, 2, 16, 7)
    check_against_reference(q, k, v, do, doc, br, "triton", scale=0.37)


def test_triton_fp16():
    # 16-bit operands through the kernels' casts (p, ds -> fp16); bf16 dots are wrong in the interpreter.
    # Measured max abs error ~8e-3 on |dv| ~ 9 (fp16 rounding of p and ds).
    rng = torch.Generator().manual_seed(3)
    doc, br = packed_layout(rng, 4)
    q, k, v, do = make_inputs(doc.numel(), 4, 2, 32, 0, torch.float16)
    check_against_reference(q, k, v, do, doc, br, "triton", atol=1e-2, rtol=1e-2)


def test_triton_edge_layouts():
    # One-token contexts, one-token branches, four branches, a lone one-token document at the end.
    doc = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 3], device=DEV)
    br = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 0, 0, 1, 0], device=DEV)
    q, k, v, do = make_inputs(doc.numel(), 2, 1, 16, 11)
    check_against_reference(q, k, v, do, doc, br, "triton")
    one = torch.zeros(1, dtype=torch.long, device=DEV)  # T = 1
    q, k, v, do = make_inputs(1, 2, 2, 16, 12)
    check_against_reference(q, k, v, do, one, one, "triton")


@pytest.mark.parametrize("seed", [0, 1])
def test_triton_arbitrary_ids(monkeypatch, seed):
    # The mask is pointwise: ids that break every packing assumption (documents interleaved, branches
    # before their context, non-consecutive values) must still give exact attention.
    monkeypatch.setitem(A._FORCE, "fwd", SMALL)
    monkeypatch.setitem(A._FORCE, "dkdv", SMALL)
    monkeypatch.setitem(A._FORCE, "dq", SMALL)
    rng = torch.Generator().manual_seed(seed)
    doc, br = packed_layout(rng, 4)
    perm = torch.randperm(doc.numel(), generator=rng).to(DEV)
    if seed == 0:  # shuffled packed ids
        doc, br = doc[perm], br[perm]
    else:  # random ids with sparse values
        doc = torch.randint(0, 3, doc.shape, generator=rng).to(DEV) * 1000
        br = torch.randint(0, 4, doc.shape, generator=rng).to(DEV) * 7
    q, k, v, do = make_inputs(doc.numel(), 2, 1, 16, seed)
    check_against_reference(q, k, v, do, doc, br, "triton")


def test_triton_int32_ids_and_strided_inputs():
    rng = torch.Generator().manual_seed(5)
    doc, br = packed_layout(rng, 3)
    T = doc.numel()
    q, k, v, do = make_inputs(T, 4, 2, 16, 5)
    # q as a view of a wider fused projection (row stride != Hq * D), as a model may produce it.
    qkv = torch.cat([q.detach().reshape(T, -1), torch.randn(T, 8, device=DEV)], 1)
    q2 = qkv[:, : 4 * 16].view(T, 4, 16).requires_grad_()
    assert not q2.is_contiguous()
    check_against_reference(q2, k, v, do, doc.int(), br.int(), "triton")


def test_triton_deterministic():
    rng = torch.Generator().manual_seed(9)
    doc, br = packed_layout(rng, 3)
    q, k, v, do = make_inputs(doc.numel(), 4, 1, 16, 9)
    runs = []
    for _ in range(2):
        out = prefix_shared_attention(q, k, v, doc, br, impl="triton")
        runs.append((out, *torch.autograd.grad(out, (q, k, v), do)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# Block lists: skipping is sound for any ids, and effective on packed rows
# ---------------------------------------------------------------------------------------------------


def exact_tiles(doc, br, bm, bn):
    """Brute force: (any pair allowed, all pairs allowed) per tile, padding keys count as masked."""
    T = doc.numel()
    pos = torch.arange(T, device=doc.device)
    allowed = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    allowed &= (br[None, :] == 0) | (br[None, :] == br[:, None])
    nq, nk = -(-T // bm), -(-T // bn)
    pad = torch.zeros(nq * bm, nk * bn, dtype=torch.bool, device=doc.device)
    pad[:T, :T] = allowed
    tiles = pad.view(nq, bm, nk, bn).permute(0, 2, 1, 3)
    valid = torch.zeros_like(pad)
    valid[:T, :] = True  # padding query rows do not matter; padding keys do
    valid_t = valid.view(nq, bm, nk, bn).permute(0, 2, 1, 3)
    key_real = (torch.arange(nk * bn, device=doc.device) < T).view(nk, bn)
    any_ = tiles.flatten(2).any(-1)
    all_ = (tiles | ~valid_t).flatten(2).all(-1) & key_real.all(-1)[None, :]
    return any_, all_


@pytest.mark.parametrize("seed", range(6))
def test_block_tiles_sound(seed):
    rng = torch.Generator().manual_seed(seed)
    doc, br = packed_layout(rng, 5)
    if seed % 2:
        perm = torch.randperm(doc.numel(), generator=rng).to(DEV)
        doc, br = doc[perm], br[perm]
    bm, bn = (16, 32) if seed < 3 else (32, 16)
    visit, full = A.block_tiles(doc, br, bm, bn)
    any_, all_ = exact_tiles(doc, br, bm, bn)
    assert not (any_ & ~visit).any(), "a tile with allowed pairs would be skipped"
    assert not (full & ~all_).any(), "a tile with masked pairs would run without the mask"


def test_block_tiles_effective_on_aligned_layout():
    # Segments aligned to 16 tokens: per-block ranges are exact, so the classification must be exact.
    b = 16
    segs = [(0, 0, 3), (0, 1, 1), (0, 2, 2), (1, 0, 4), (1, 1, 1), (1, 2, 1), (1, 3, 1), (2, 0, 2), (2, 1, 2)]
    doc = torch.tensor([d for d, _, n in segs for _ in range(n * b)], device=DEV)
    br = torch.tensor([x for _, x, n in segs for _ in range(n * b)], device=DEV)
    visit, full = A.block_tiles(doc, br, b, b)
    any_, all_ = exact_tiles(doc, br, b, b)
    assert torch.equal(visit, any_)
    assert torch.equal(full, all_)
    # The work is the useful pairs, not T^2: 54 of the causal triangle's 153 tiles here.
    n = visit.shape[0]
    assert int(visit.sum()) == 54 and n * (n + 1) // 2 == 153
    # The runs hand the kernels exactly these tiles, in increasing order, as few maximal runs.
    runs = A.block_runs(doc, br, b, b, by="k")
    for kb in range(n):
        assert runs.blocks(kb, "full") == torch.nonzero(full[:, kb]).flatten().tolist()
        assert runs.blocks(kb, "part") == torch.nonzero((visit & ~full)[:, kb]).flatten().tolist()
        for which in ("full", "part"):
            num, lo, hi = (getattr(runs, f"{which}_{f}") for f in ("num", "lo", "hi"))
            m = int(num[kb])  # runs non-empty, increasing, and maximal (a gap between consecutive runs)
            assert bool((lo[kb, :m] < hi[kb, :m]).all()) and bool((hi[kb, : max(m - 1, 0)] < lo[kb, 1:m]).all())
    # Launch order: every k-block once, heaviest first.
    work = (full.sum(0) + (visit & ~full).sum(0))[runs.order.long()]
    assert sorted(runs.order.tolist()) == list(range(n)) and bool((work[:-1] >= work[1:]).all())


def test_branch_rule_skips_sibling_tiles():
    # A long chosen branch never visits the rejected branch's tiles (and vice versa).
    b = 16
    doc = torch.zeros(6 * b, dtype=torch.long, device=DEV)
    br = torch.tensor([0] * (2 * b) + [1] * (2 * b) + [2] * (2 * b), device=DEV)
    visit, full = A.block_tiles(doc, br, b, b)
    assert not visit[4:, 2:4].any()  # rejected queries x chosen keys
    assert full[4:, :2].all() and full[2:4, :2].all()  # both branches see the whole context unmasked
    # As runs: the second rejected block sees two dense runs (the context, its branch's first block) and
    # one masked run (its diagonal block); the chosen branch's context and prefix are contiguous: one run.
    runs = A.block_runs(doc, br, b, b)
    assert int(runs.full_num[5]) == 2 and runs.blocks(5, "full") == [0, 1, 4]
    assert int(runs.part_num[5]) == 1 and runs.blocks(5, "part") == [5]
    assert int(runs.full_num[3]) == 1 and runs.blocks(3, "full") == [0, 1, 2]


def test_ids_cache_sees_in_place_writes():
    # Same id tensors across calls reuse the checked ranges and tile lists; an in-place write must not.
    rng = torch.Generator().manual_seed(8)
    doc, br = packed_layout(rng, 3)
    q, k, v, do = make_inputs(doc.numel(), 2, 1, 16, 8)
    check_against_reference(q, k, v, do, doc, br, "triton")
    br[: doc.numel() // 2] = 0  # one long context: different tiles
    check_against_reference(q, k, v, do, doc, br, "triton")
    doc[3] = -1
    with pytest.raises(ValueError, match="^doc_ids:"):
        prefix_shared_attention(q, k, v, doc, br, impl="triton")


def test_inference_mode():
    # Inference tensors have no version counter; the op must still run (and check) under inference_mode.
    rng = torch.Generator().manual_seed(10)
    doc, br = packed_layout(rng, 2)
    q, k, v, _ = make_inputs(doc.numel(), 2, 1, 16, 10)
    want = A.reference_attention(q, k, v, doc, br)
    with torch.inference_mode():
        doc_i, br_i = doc.clone(), br.clone()
        for impl in ("triton", "torch"):
            out = prefix_shared_attention(q, k, v, doc_i, br_i, impl=impl)
            torch.testing.assert_close(out.double(), want.detach(), atol=ATOL, rtol=RTOL)
        doc_i[0] = -1
        with pytest.raises(ValueError, match="^doc_ids:"):
            prefix_shared_attention(q, k, v, doc_i, br_i, impl="triton")


def test_bench_useful_pairs_match_the_mask():
    # The benchmark's "useful TFLOP/s" counts allowed pairs analytically; check against the dense mask.
    from fspo_engine.benchmarks.bench_attention import fspo_row, row_ids, useful_pairs

    episodes = fspo_row(700, (20, 150), (1, 40), seed=3)
    doc, br = row_ids(episodes)
    assert doc.numel() <= 700 and len(episodes) > 2
    any_, _ = exact_tiles(doc, br, 1, 1)  # 1x1 tiles: the mask itself
    assert useful_pairs(episodes) == int(any_.sum())


def test_untimed_config_is_first_that_launches(monkeypatch):
    # FSPO_ATTN_AUTOTUNE=0: no timing, the first candidate that launches (e.g. fp32 at D=128 does not fit
    # the first fwd tiles in shared memory), cached per shape key.
    from types import SimpleNamespace

    monkeypatch.setattr(A, "INTERPRET", False)
    monkeypatch.setattr(A, "_TUNED", {})
    q = SimpleNamespace(
        shape=(100, 4, 128), dtype=torch.float32, is_cuda=True, device=SimpleNamespace(index=0)
    )
    k = SimpleNamespace(shape=(100, 1, 128))
    tried = []

    def run(cfg):
        tried.append(cfg)
        if len(tried) == 1:
            raise RuntimeError("out of resources")

    cfg = A._pick_config("fwd", q, k, run)
    assert cfg == A._candidates("fwd", 128)[1] and tried == A._candidates("fwd", 128)[:2]
    assert A._pick_config("fwd", q, k, run) == cfg and len(tried) == 2  # cached


# ---------------------------------------------------------------------------------------------------
# Torch path
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hq,hkv,seed", [(2, 2, 0), (4, 1, 1), (8, 1, 2)])
def test_torch_packed_rows(hq, hkv, seed):
    rng = torch.Generator().manual_seed(seed)
    doc, br = packed_layout(rng, 6)
    q, k, v, do = make_inputs(doc.numel(), hq, hkv, 16, seed)
    check_against_reference(q, k, v, do, doc, br, "torch", scale=0.5 if seed else None)


def test_torch_chunked_and_shuffled(monkeypatch):
    monkeypatch.setattr(A, "_TORCH_CHUNK_ELEMS", 4 * 16 * 3)  # queries in chunks of a few rows
    rng = torch.Generator().manual_seed(3)
    doc, br = packed_layout(rng, 3)
    perm = torch.randperm(doc.numel(), generator=rng).to(DEV)
    q, k, v, do = make_inputs(doc.numel(), 4, 2, 16, 3)
    check_against_reference(q, k, v, do, doc, br, "torch")
    check_against_reference(q, k, v, do, doc[perm], br[perm], "torch")


def test_auto_matches_reference():
    rng = torch.Generator().manual_seed(4)
    doc, br = packed_layout(rng, 2)
    q, k, v, do = make_inputs(doc.numel(), 2, 1, 16, 4)
    check_against_reference(q, k, v, do, doc, br, "auto")


def test_int32_offset_guard():
    # T * Hq * D >= 2**31: the kernels' int32 offsets would wrap. Meta tensors: shapes, no memory.
    q = torch.empty(2**20, 32, 64, device="meta", dtype=torch.bfloat16)  # 2**31 elements
    k = torch.empty(2**20, 8, 64, device="meta", dtype=torch.bfloat16)
    ids = torch.empty(2**20, device="meta", dtype=torch.long)
    with pytest.raises(ValueError, match="^q: .*int32"):
        A.attention_forward(q, k, k, ids, ids, 0.125)
    with pytest.raises(ValueError, match="^do: .*int32"):  # a strided view: its span counts, not its size
        small = q[: 2**10]
        do = torch.empty(2**21, 32, 64, device="meta", dtype=torch.bfloat16)[:: 2**11]  # row stride 2**22
        A.attention_backward(small, k[: 2**10], k[: 2**10], small, None, do, ids, ids, 0.125)
    A._check_int32_offsets(q=q[: 2**20 - 1], do=do[:511])  # 2**31 - 2048 elements, a span < 2**31: fine


def test_empty_row():
    q = torch.zeros(0, 2, 16, device=DEV)
    k = torch.zeros(0, 1, 16, device=DEV)
    ids = torch.zeros(0, dtype=torch.long, device=DEV)
    for impl in ("torch", "triton"):
        assert prefix_shared_attention(q, k, k, ids, ids, impl=impl).shape == (0, 2, 16)


# ---------------------------------------------------------------------------------------------------
# Argument errors: ValueError naming the argument, before any launch
# ---------------------------------------------------------------------------------------------------


def _good():
    q, k, v = torch.randn(5, 4, 16), torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    ids = torch.zeros(5, dtype=torch.long)
    return dict(q=q, k=k, v=v, doc_ids=ids, branch_ids=ids.clone())


@pytest.mark.parametrize(
    "change,name",
    [
        (lambda a: a.update(q=a["q"][0]), "q"),
        (lambda a: a.update(q=a["q"].long()), "q"),
        (lambda a: a.update(k=torch.randn(5, 3, 16), v=torch.randn(5, 3, 16)), "k"),
        (lambda a: a.update(k=torch.randn(6, 2, 16), v=torch.randn(6, 2, 16)), "k"),
        (lambda a: a.update(k=torch.randn(5, 2, 8), v=torch.randn(5, 2, 8)), "k"),
        (lambda a: a.update(k=a["k"].double()), "k"),
        (lambda a: a.update(v=torch.randn(5, 2, 8)), "v"),
        (lambda a: a.update(v=a["v"].half()), "v"),
        (lambda a: a.update(doc_ids=torch.zeros(4, dtype=torch.long)), "doc_ids"),
        (lambda a: a.update(doc_ids=torch.zeros(5)), "doc_ids"),
        (lambda a: a.update(doc_ids=torch.tensor([0, 0, -1, 1, 1])), "doc_ids"),
        (lambda a: a.update(branch_ids=torch.zeros(5, dtype=torch.int16)), "branch_ids"),
        (lambda a: a.update(branch_ids=torch.tensor([0, 1, 2, -3, 0])), "branch_ids"),
        (lambda a: a.update(branch_ids=torch.full((5,), 2**31)), "branch_ids"),
        (lambda a: a.update(branch_ids=[0, 0, 0, 0, 0]), "branch_ids"),
        (lambda a: a.update(scale=float("nan")), "scale"),
        (lambda a: a.update(impl="cuda"), "impl"),
    ],
)
def test_bad_arguments(change, name):
    args = _good()
    change(args)
    with pytest.raises(ValueError, match=rf"^{name}:"):
        prefix_shared_attention(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs CUDA")
def test_bad_device():
    args = _good()
    args["doc_ids"] = args["doc_ids"].cuda()
    with pytest.raises(ValueError, match="^doc_ids:"):
        prefix_shared_attention(**args)


def test_triton_rejects_unsupported_head_dim():
    args = {name: t.to(DEV) for name, t in _good().items()}
    args.update(q=torch.randn(5, 4, 24, device=DEV), k=torch.randn(5, 2, 24, device=DEV))
    args.update(v=torch.randn(5, 2, 24, device=DEV))
    with pytest.raises(ValueError, match="^q:.*head dims"):
        prefix_shared_attention(**args, impl="triton")
    assert prefix_shared_attention(**args, impl="auto").shape == (5, 4, 24)  # auto falls back to torch


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile for an H100/H200 (sm_90) without a GPU: the interpreter never runs the real
# compiler, so type errors, unsupported ops or shared-memory overflows in the kernels would first show here.
# ---------------------------------------------------------------------------------------------------

# argv: dtype, doc/branch id dtype, GQA group. Every candidate config of every kernel (the shipped set:
# autotuning may pick any), head dims 64 and 128, with the constexprs and 16-divisibility a real CUDA launch
# of 16-bit inputs specializes on; one JSON record per config (see benchmarks/bench_compile_report.py).
_AOT = """
import json, sys
from fspo_engine.benchmarks import bench_compile_report as R

dt, ids, group = sys.argv[1], sys.argv[2], int(sys.argv[3])
for spec in R.specs(dt, "attention", group=group):
    print(json.dumps(R.report_one(spec, dt, ids_dtype=ids)))
"""


@pytest.mark.slow
def test_triton_attention_kernels_compile_for_sm90():
    import json

    from helpers import compile_for_sm90

    n_configs = sum(len(c) for c in A._CANDIDATES.values()) + 2  # + the delta kernel at D=64 and 128
    # Two processes, one per dtype (~40 s each cold, 2 cores); they also cover both id dtypes and a
    # GQA group of 4 (Llama-3 8B) and 1 (MHA, a one-trip head loop in dk/dv).
    for out in compile_for_sm90(_AOT, [("bf16", "i64", "4"), ("fp16", "i32", "1")]):
        records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert len(records) == n_configs, out[-2000:]
        for r in records:
            what = f"{r['kernel']} {r['shape']} {r['config']} {r['dtype']}"
            # Shipped configs: no register spills, within one SM's shared memory, and the attention
            # tile loops software-pipelined at least 3 deep (the runs of BlockRuns make them dense).
            assert r["spills"] == 0 and r["stack_bytes"] == 0, f"{what}: spills {r['spills']} B"
            assert r["fits_shared"] and r["blocks_per_sm"] >= 1, f"{what}: {r['shared_bytes']} B shared"
            if r["kernel"] != "attn_bwd_delta":
                assert r["pipeline_stages"] >= 3, f"{what}: pipelined {r['loop_stages']} deep"


# ---------------------------------------------------------------------------------------------------
# GPU: real compilation, 16-bit inputs, FSPO-like sizes (run by benchmarks/gpu_check.sh)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 64), (8, 1, 128), (4, 4, 128)])
def test_gpu_16bit(dtype, hq, hkv, d):
    rng = torch.Generator().manual_seed(hq * d)
    doc, br = packed_layout(rng, 5, ctx_range=(1, 500), branch_range=(1, 150))  # T <= 5k: dense oracle
    q, k, v, do = make_inputs(doc.numel(), hq, hkv, d, 0, dtype)
    check_against_reference(q, k, v, do, doc, br, "triton", max_rel=2e-2)  # DESIGN.md's bf16 bar


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("d", [64])  # fp32 at D=128 compiles ~40 s of candidates: 16-bit D=128 is above
def test_gpu_fp32_default_configs(d):
    # GPU tile sizes (not the test ones), T not a multiple of any block, fp32 at the 1e-4 bar.
    rng = torch.Generator().manual_seed(d)
    doc, br = packed_layout(rng, 4, ctx_range=(100, 900), branch_range=(1, 300))
    q, k, v, do = make_inputs(doc.numel(), 4, 1, d, 1)
    check_against_reference(q, k, v, do, doc, br, "triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shuffle", [False, True])
def test_gpu_gqa8_edge_rows(shuffle):
    # Compiled kernels on what the interpreter tests cover: GQA 8, one-token contexts and branches,
    # ids that break the packing assumptions.
    rng = torch.Generator().manual_seed(21)
    doc, br = packed_layout(rng, 40, ctx_range=(1, 60), branch_range=(1, 30))
    if shuffle:
        perm = torch.randperm(doc.numel(), generator=rng).to(DEV)
        doc, br = doc[perm], br[perm]
    q, k, v, do = make_inputs(doc.numel(), 8, 1, 64, 3)
    check_against_reference(q, k, v, do, doc, br, "triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_autotuned(monkeypatch):
    monkeypatch.setenv("FSPO_ATTN_AUTOTUNE", "1")
    monkeypatch.setenv("FSPO_AUTOTUNE", "1")  # gpu_check.sh pins configs for the tests; this one times them
    rng = torch.Generator().manual_seed(0)
    doc, br = packed_layout(rng, 3, ctx_range=(500, 1500), branch_range=(50, 400), n_branches=(2, 2))
    q, k, v, do = make_inputs(doc.numel(), 8, 2, 128, 2, torch.bfloat16)
    check_against_reference(q, k, v, do, doc, br, "triton", max_rel=2e-2)
    assert any(key[0] == "fwd" and key[1] for key in A._TUNED)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_every_candidate(monkeypatch, d):
    # Autotuning may pick any candidate: each one (the i-th of every kernel's list together) compiled for
    # real, bf16, against the float64 oracle on a row that is not a multiple of any tile.
    rng = torch.Generator().manual_seed(d + 1)
    doc, br = packed_layout(rng, 3, ctx_range=(50, 400), branch_range=(1, 120))
    q, k, v, do = make_inputs(doc.numel(), 8, 2, d, 4, torch.bfloat16)
    n = max(len(A._candidates(kind, d)) for kind in ("fwd", "dkdv", "dq"))
    for i in range(n):
        for kind in ("fwd", "dkdv", "dq"):
            cands = A._candidates(kind, d)
            monkeypatch.setitem(A._FORCE, kind, cands[min(i, len(cands) - 1)])
        check_against_reference(q, k, v, do, doc, br, "triton", max_rel=2e-2)
