"""linear_logprob_sums: both paths against a float64 reference, forward and both gradients.

The Triton path runs in the CPU interpreter here (tests/conftest.py sets TRITON_INTERPRET=1 without
CUDA), and for real in the `gpu` tests. Tolerances are relative to the reference's max magnitude and
come from measured error (3 seeds, N=37, H=48, V=1000; worst of both paths):
    fp32: out 6e-8, grads 6e-7          -> 1e-5 (10x under the issue's 1e-4)
    fp16: out 1e-7, grads 7e-4          -> out 1e-5, grads 2e-3  (4 x fp16 eps 4.9e-4)
    bf16: out 7e-8, grads 1.2e-2        -> out 1e-5, grads 1.6e-2 (4 x bf16 eps 3.9e-3)
The reference sees the same dtype-rounded inputs, so the error measured is the op's own: fp32 logits,
gradients rounded to the input dtype (and, on the Triton path, dlogits rounded to it for tl.dot). The
bf16 worst case is the interpreter's: it truncates fp32 -> bf16 casts where the GPU rounds to nearest.
"""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported; tests/conftest.py does the same
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fspo_engine.kernels import logprobs as L  # noqa: E402
from fspo_engine.kernels.logprobs import (  # noqa: E402
    _segment_sum,
    _segment_sum_sorted,
    _tile_shape,
    linear_logprob_sums,
    linear_logprob_sums_torch,
)

TOL = {  # dtype -> (forward, gradients), relative to the reference's max |value|
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-5, 2e-3),
    torch.bfloat16: (1e-5, 1.6e-2),
}
IMPLS = ["torch", "triton"]


def device_for(impl):
    """The Triton path runs on CUDA where there is one (compiled), else on CPU (interpreter)."""
    return "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"


def make_case(n, h, v, s, seed=0, ignore_every=4, no_segment_every=7, dtype=torch.float32, device="cpu"):
    """Random inputs, rounded to `dtype`, returned in float64 with the int ids."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype).double()
    weight = (torch.randn(v, h, generator=gen) * 0.5).to(dtype).double()  # logits of O(3): peaked softmax
    targets = torch.randint(0, v, (n,), generator=gen)
    segs = torch.randint(0, max(s, 1), (n,), generator=gen) if s else torch.full((n,), -1)
    if ignore_every:
        targets[::ignore_every] = -100
    if no_segment_every:
        segs[1::no_segment_every] = -1
    upstream = torch.randn(s, generator=gen, dtype=torch.float64)
    return [x.to(device) for x in (hidden, weight, targets, segs, upstream)]


def reference(hidden, weight, targets, segs, num_segments):
    """Naive float64: full logits, log_softmax, gather, index_add over counted rows."""
    logp = torch.log_softmax(hidden @ weight.T, dim=-1)
    keep = (targets != -100) & (segs >= 0)
    picked = logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1) * keep
    out = torch.zeros(num_segments, dtype=hidden.dtype, device=hidden.device)
    return out.index_add(0, segs.clamp(min=0), picked)


def run(fn, hidden, weight, targets, segs, num_segments, upstream, dtype):
    h = hidden.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    out = fn(h, w, targets, segs, num_segments)
    gh, gw = torch.autograd.grad((out.double() * upstream).sum(), (h, w), allow_unused=True)
    return out, gh, gw


def assert_close(got, want, tol, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = want.abs().max().item()
    err = (got.double() - want).abs().max().item()
    if scale == 0.0:
        assert err == 0.0, f"{what}: expected exact zeros, max |got| = {err:.3e}"
    else:
        assert err <= tol * scale, f"{what}: rel. error {err / scale:.3e} > {tol:.1e}"


def check_against_reference(impl, n, h, v, s, dtype=torch.float32, device=None, **kw):
    device = device or device_for(impl)
    hidden, weight, targets, segs, upstream = make_case(n, h, v, s, dtype=dtype, device=device, **kw)
    fn = lambda *a: linear_logprob_sums(*a, impl=impl)
    out, gh, gw = run(fn, hidden, weight, targets, segs, s, upstream, dtype)
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = reference(hr, wr, targets, segs, s)
    rgh, rgw = torch.autograd.grad((ref * upstream).sum(), (hr, wr), allow_unused=True)
    rgh = torch.zeros_like(hidden) if rgh is None else rgh
    rgw = torch.zeros_like(weight) if rgw is None else rgw
    assert out.dtype == torch.float32
    assert gh.dtype == dtype and gw.dtype == dtype
    fwd_tol, grad_tol = TOL[dtype]
    assert_close(out, ref.detach(), fwd_tol, "out")
    assert_close(gh, rgh, grad_tol, "grad hidden")
    assert_close(gw, rgw, grad_tol, "grad weight")
    return out


# ---------------------------------------------------------------------------------------------------
# Forward and both gradients against float64, odd shapes


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "n,h,v,s",
    [
        (1, 48, 1000, 1),  # T=1
        (37, 48, 1000, 5),  # T not a multiple of any block, V=1000 split in two on the Triton path
        (20, 16, 1, 3),  # V=1: every log-prob is 0, gradients 0
        (40, 48, 1000, 64),  # many segments, most of them empty
        (16, 33, 257, 2),  # H and V off every block size
    ],
)
def test_matches_reference_fp32(impl, n, h, v, s):
    check_against_reference(
        impl, n, h, v, s, ignore_every=4 if n > 1 else 0, no_segment_every=7 if n > 1 else 0
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_reference_low_precision(impl, dtype):
    check_against_reference(impl, 37, 48, 1000, 5, dtype=dtype)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_large_odd_vocab(impl):
    # V=32003: several forward vocab splits in the interpreter, the last one ragged. Tiny N, H: it is slow.
    if impl == "triton" and not torch.cuda.is_available():
        cols, nsplit = L._split_plan(32003, 5, L._num_sms(torch.device("cpu")))
        assert nsplit > 1 and (nsplit - 1) * cols < 32003 < nsplit * cols
    check_against_reference(impl, 5, 16, 32003, 3, ignore_every=0, no_segment_every=0)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the unscaled run's
@pytest.mark.parametrize("impl", IMPLS)
def test_fp16_under_a_grad_scaler(impl, monkeypatch):
    # A GradScaler multiplies the upstream gradient by 2**16: fp16 dlogits of that size overflow (65504)
    # unless scaled back into range. The gradients must be the reference's, times the scale, and finite.
    dev = device_for(impl)
    hidden, weight, targets, segs, upstream = make_case(37, 48, 1000, 5, dtype=torch.float16, device=dev)
    # Small activations and weights (as after a final norm, and a 0.02-std lm_head), so that the true
    # gradients fit fp16 while the upstream gradient, hence dlogits, does not.
    hidden, weight = ((x * 0.05).half().double() for x in (hidden, weight))
    upstream = upstream * 2.0**17
    assert upstream.abs().max() > 65504
    out, gh, gw = run(lambda *a: linear_logprob_sums(*a, impl=impl), hidden, weight, targets, segs, 5, upstream,
                      torch.float16)  # fmt: skip
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    rgh, rgw = torch.autograd.grad((reference(hr, wr, targets, segs, 5) * upstream).sum(), (hr, wr))
    assert max(rgh.abs().max(), rgw.abs().max()) < 30000  # the premise: the true gradients fit fp16
    assert_close(gh, rgh, TOL[torch.float16][1], "grad hidden")
    assert_close(gw, rgw, TOL[torch.float16][1], "grad weight")
    if impl == "triton":  # the check can fail: without the scaling the fp16 dlogits overflow
        monkeypatch.setattr(L, "_fp16_grad_scale", lambda g: torch.ones((), device=g.device))
        _, gh, gw = run(lambda *a: linear_logprob_sums(*a, impl=impl), hidden, weight, targets, segs, 5,
                        upstream, torch.float16)  # fmt: skip
        assert not (torch.isfinite(gh).all() and torch.isfinite(gw).all())


def test_fp16_grad_scale_is_a_power_of_two_in_range():
    for m in (1e-6, 0.37, 1.0, 3.0, 2.0**16, 1e9):
        g = torch.tensor([m, -m / 3, 0.0])
        s = L._fp16_grad_scale(g)
        e = torch.log2(s)
        assert e == torch.round(e) and 2.0**13 < m * s <= 2.0**14, (m, s)
    for g in (torch.zeros(3), torch.tensor([1.0, float("inf")]), torch.tensor([float("nan")])):
        assert L._fp16_grad_scale(g) == 1.0


# ---------------------------------------------------------------------------------------------------
# Launch geometry: the forward's vocab splits fill the SMs; wide backward tiles


def _greedy_makespan(row_blocks, widths, slots):
    """Brute force: programs in launch order (row blocks fastest), each to the slot that frees first."""
    free = [0.0] * slots
    for w in widths:
        for _ in range(row_blocks):
            i = min(range(slots), key=free.__getitem__)
            free[i] += w / 256
    return max(free)


def test_schedule_efficiency_matches_greedy_simulation():
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        rb, slots, cols = (int(torch.randint(1, hi, (1,), generator=gen)) for hi in (40, 20, 12))
        ns = int(torch.randint(1, 9, (1,), generator=gen))
        widths = [cols * 256] * (ns - 1) + [int(torch.randint(1, cols * 256 + 1, (1,), generator=gen))]
        want = rb * sum(widths) / 256 / (slots * _greedy_makespan(rb, widths, slots))
        assert abs(L._schedule_efficiency(rb, widths, slots) - want) < 1e-9


@pytest.mark.parametrize("n", [1, 300, 4096, 16384])
def test_forward_split_plan_fills_an_h200(n):
    # V = 128,256 on 132 SMs: every config's grid keeps the SMs >= 90% busy until the last program ends
    # (the old plan, 9 splits of 14,336 columns at n = 4096, left 26% idle with 128-row blocks).
    V, sms = 128256, 132
    cols, nsplit = L._split_plan(V, n, sms)
    assert cols % 256 == 0 and (nsplit - 1) * cols < V <= nsplit * cols
    widths = [cols] * (nsplit - 1) + [V - (nsplit - 1) * cols]
    for bn in sorted({c.kwargs["BLOCK_N"] for c in L._fwd_kernel.configs}):
        assert L._schedule_efficiency(-(-n // bn), widths, sms) >= 0.9, (bn, cols, nsplit)
    old = [14336] * 8 + [V - 8 * 14336]
    assert L._schedule_efficiency(4096 // 128, old, sms) < 0.75


def test_backward_tiles_stay_wide(monkeypatch):
    monkeypatch.setattr(L, "INTERPRET", False)
    assert L._dlogits_cols(4096, 128256, 2) == 4096  # the 32 MiB budget
    assert L._dlogits_cols(16384, 128256, 2) == L.MIN_DLOGITS_COLS == 4096  # not 1024
    assert L._dlogits_cols(100, 128256, 2) == 128256  # few rows: the whole vocab in one tile
    assert L._dlogits_cols(100, 5000, 4) == 5000


def test_pinned_configs(monkeypatch):
    configs = ["first", "second"]
    monkeypatch.setenv("FSPO_AUTOTUNE", "0")
    assert L._pinned(configs, {}) == ["first"]
    monkeypatch.setenv("FSPO_AUTOTUNE", "1")
    assert L._pinned(configs, {}) == configs


def test_grad_hidden_accumulation_is_reported():
    assert "fp32" in L.grad_hidden_accumulation("cpu")


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_segments_and_all_ignored(impl):
    # Every target ignored: zeros out, zero gradients (no row reaches a kernel).
    out = check_against_reference(impl, 9, 16, 100, 4, ignore_every=1)
    assert torch.equal(out.cpu(), torch.zeros(4))
    # Every segment id -1: same.
    dev = device_for(impl)
    hidden, weight, targets, _, upstream = make_case(9, 16, 100, 4, device=dev)
    segs = torch.full((9,), -1, device=dev)
    out, gh, gw = run(lambda *a: linear_logprob_sums(*a, impl=impl), hidden, weight, targets, segs, 4, upstream,
                      torch.float32)  # fmt: skip
    assert torch.equal(out.cpu(), torch.zeros(4)) and not gh.any() and not gw.any()
    # No rows at all, and no segments at all.
    empty = (
        torch.zeros(0, 16, device=dev),
        weight.float(),
        torch.zeros(0, dtype=torch.long, device=dev),
        torch.zeros(0, dtype=torch.long, device=dev),
    )
    assert torch.equal(linear_logprob_sums(*empty, 3, impl=impl).cpu(), torch.zeros(3))
    h0 = hidden.float()
    assert linear_logprob_sums(h0, weight.float(), targets, segs, 0, impl=impl).shape == (0,)


@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_rows_get_zero_gradient_and_do_not_matter(impl):
    hidden, weight, targets, segs, upstream = make_case(24, 16, 300, 3, device=device_for(impl))
    fn = lambda *a: linear_logprob_sums(*a, impl=impl)
    out, gh, _ = run(fn, hidden, weight, targets, segs, 3, upstream, torch.float32)
    dead = (targets == -100) | (segs < 0)
    assert not gh[dead].any() and gh[~dead].abs().sum() > 0
    # Garbage (even inf) in rows that do not count changes nothing.
    noisy = hidden.clone()
    noisy[dead] = float("inf")
    out2, _, _ = run(fn, noisy, weight, targets, segs, 3, upstream, torch.float32)
    assert torch.equal(out, out2)


@pytest.mark.parametrize("impl", IMPLS)
def test_one_input_requires_grad(impl):
    hidden, weight, targets, segs, _ = make_case(12, 16, 100, 2, device=device_for(impl))
    h = hidden.float().requires_grad_()
    linear_logprob_sums(h, weight.float(), targets, segs, 2, impl=impl).sum().backward()
    w = weight.float().requires_grad_()
    linear_logprob_sums(hidden.float(), w, targets, segs, 2, impl=impl).sum().backward()
    assert h.grad is not None and w.grad is not None and h.grad.any() and w.grad.any()


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_inputs_and_int32_ids(impl):
    hidden, weight, targets, segs, upstream = make_case(19, 24, 200, 3, device=device_for(impl))
    wide = torch.randn(19, 40, dtype=torch.float64, device=hidden.device)
    wide[:, 8:32] = hidden
    strided = wide[:, 8:32]  # row stride 40
    ref = reference(hidden, weight, targets, segs, 3)
    out = linear_logprob_sums(strided.float(), weight.float(), targets.int(), segs.int(), 3, impl=impl)
    assert_close(out, ref, TOL[torch.float32][0], "out")


def test_torch_path_tiling_and_gradcheck():
    hidden, weight, targets, segs, upstream = make_case(23, 8, 1000, 4)
    ref = reference(hidden, weight, targets, segs, 4)
    # 8 bytes per tile element: tiles of 1 x 256 (4 vocab tiles, the last 232 wide), 3 x 256, one tile.
    for cb, tile in ((8 * 256, (1, 256)), (8 * 1000, (3, 256)), (2**30, (2**27 // 1000, 1000))):
        assert _tile_shape(23, 1000, cb) == tile
        fn = partial(linear_logprob_sums_torch, chunk_bytes=cb)
        out, gh, gw = run(fn, hidden, weight, targets, segs, 4, upstream, torch.float32)
        hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        rgh, rgw = torch.autograd.grad((reference(hr, wr, targets, segs, 4) * upstream).sum(), (hr, wr))
        assert_close(out, ref, 1e-6, f"out, chunk_bytes={cb}")
        assert_close(gh, rgh, 1e-5, f"grad hidden, chunk_bytes={cb}")
        assert_close(gw, rgw, 1e-5, f"grad weight, chunk_bytes={cb}")
    # float64 through the same Function: gradcheck against finite differences.
    h = hidden[:10].clone().requires_grad_()
    w = weight[:20].clone().requires_grad_()
    t = targets[:10].clamp(max=19)
    fn = lambda a, b: linear_logprob_sums_torch(a, b, t, segs[:10], 4, chunk_bytes=8 * 20 * 3)
    assert torch.autograd.gradcheck(fn, (h, w))


def test_benchmark_loss_in_forward_variant_is_exact():
    """bench kernels' `loss_fwd` (gradients computed in the forward) must compute what it is timed
    against: the sum of the segment sums and both gradients, under several row chunks."""
    from fspo_engine.benchmarks.bench_kernels import _SumLossInForward

    hidden, weight, targets, segs, _ = make_case(37, 24, 301, 5, seed=4)
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = reference(hr, wr, targets, segs, 5).sum()
    rgh, rgw = torch.autograd.grad(ref * 2.5, (hr, wr))
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    out = _SumLossInForward.apply(h, w, targets, segs, 8 * 301 * 10)  # 10-row chunks: 4 of them
    (out * 2.5).backward()
    assert_close(out, ref.detach(), 1e-6, "out")
    assert_close(h.grad, rgh, 1e-5, "grad hidden")
    assert_close(w.grad, rgw, 1e-5, "grad weight")


# ---------------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("impl", IMPLS)
def test_bitwise_repeatable(impl):
    hidden, weight, targets, segs, upstream = make_case(45, 32, 700, 6, seed=3, device=device_for(impl))
    fn = lambda *a: linear_logprob_sums(*a, impl=impl)
    first = run(fn, hidden, weight, targets, segs, 6, upstream, torch.float32)
    for _ in range(2):
        again = run(fn, hidden, weight, targets, segs, 6, upstream, torch.float32)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_segment_sums_fixed_order_match_index_add():
    # The CUDA segment sum (sorted, padded, row sums) against the CPU one (index_add_), on CPU.
    gen = torch.Generator().manual_seed(5)
    for n, s in ((1, 1), (50, 7), (300, 200), (64, 1)):
        values = torch.randn(n, generator=gen)
        seg = torch.randint(0, s, (n,), generator=gen)
        want = torch.zeros(s, dtype=torch.float64).index_add_(0, seg, values.double())
        got = _segment_sum_sorted(values, seg, s)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
        assert torch.equal(_segment_sum(values, seg, s), want.float())


# ---------------------------------------------------------------------------------------------------
# Argument errors: ValueError naming the argument, before any launch


def _args():
    hidden, weight, targets, segs, _ = make_case(6, 8, 20, 2, ignore_every=0, no_segment_every=0)
    return [hidden.float(), weight.float(), targets, segs, 2]


@pytest.mark.parametrize("impl", ["auto", *IMPLS])
@pytest.mark.parametrize(
    "mutate,name",
    [
        (lambda a: a.__setitem__(0, a[0][0]), "hidden"),  # 1-D
        (lambda a: a.__setitem__(1, a[1][:, :5]), "weight"),  # H mismatch
        (lambda a: a.__setitem__(1, a[1].half()), "weight"),  # dtype mismatch
        (lambda a: a.__setitem__(0, a[0].int()), "hidden"),  # integer hidden
        (lambda a: a.__setitem__(2, a[2][:5]), "targets"),  # wrong length
        (lambda a: a.__setitem__(2, a[2].float()), "targets"),  # float ids
        (lambda a: a[2].__setitem__(3, 20), "targets"),  # == V
        (lambda a: a[2].__setitem__(3, -5), "targets"),  # negative, not -100
        (lambda a: a[3].__setitem__(2, 2), "segment_ids"),  # == num_segments
        (lambda a: a[3].__setitem__(2, -2), "segment_ids"),
        (lambda a: a.__setitem__(3, a[3][None]), "segment_ids"),  # 2-D
        (lambda a: a.__setitem__(4, -1), "num_segments"),
        (lambda a: a.__setitem__(4, 2.0), "num_segments"),
        (lambda a: a.__setitem__(4, True), "num_segments"),
    ],
)
def test_bad_arguments_raise_value_error(impl, mutate, name):
    args = _args()
    mutate(args)
    with pytest.raises(ValueError, match=name):
        linear_logprob_sums(*args, impl=impl)


def test_bad_impl_and_fp64_on_triton():
    args = _args()
    with pytest.raises(ValueError, match="impl"):
        linear_logprob_sums(*args, impl="cuda")
    args[0], args[1] = args[0].double(), args[1].double()
    with pytest.raises(ValueError, match="hidden"):
        linear_logprob_sums(*args, impl="triton")
    linear_logprob_sums(*args, impl="torch")  # the plain path takes float64 (gradcheck)


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile for an H100/H200 (sm_90) without a GPU: the interpreter never runs the real
# compiler, so this is where type errors or unsupported ops in the kernels would first show up.

# Every autotune config of both kernels (the shipped set) at H=4096, with the 16-divisibility a real launch
# specializes on; one JSON record per config (see benchmarks/bench_compile_report.py).
_AOT = """
import json, sys
from fspo_engine.benchmarks import bench_compile_report as R

for dt in sys.argv[1:]:
    for spec in R.specs(dt, "logprobs"):
        print(json.dumps(R.report_one(spec, dt)))
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90():
    import json

    from helpers import compile_for_sm90

    script = "import fspo_engine.kernels.logprobs as L; print(len(L._FWD_CONFIGS) + len(L._DLOGITS_CONFIGS))"
    (count,) = compile_for_sm90(script, [()])
    for out in compile_for_sm90(_AOT, [("bf16",), ("fp16",)]):  # one process per dtype, in parallel
        records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert len(records) == int(count), out[-2000:]
        for r in records:
            what = f"{r['kernel']} {r['config']} {r['dtype']}"
            assert r["spills"] == 0 and r["stack_bytes"] == 0, f"{what}: spills {r['spills']} B"
            assert r["fits_shared"] and r["pipeline_stages"] >= 3, f"{what}: {r}"


# ---------------------------------------------------------------------------------------------------
# GPU: the compiled Triton kernels (bf16 tl.dot for real), against float64 and the plain path


# One H (128) for most shapes: kernels compile per (H, dtype, config), and the device time is short.
@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)  # the plain path on CUDA: 16-bit cuBLAS GEMMs with fp32 outputs
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,h,v,s", [(1, 128, 1000, 1), (300, 128, 32003, 7), (1031, 128, 5000, 40)])
def test_gpu_matches_reference(impl, dtype, n, h, v, s):
    check_against_reference(impl, n, h, v, s, dtype=dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
def test_gpu_fp16_under_a_grad_scaler(impl):
    # fp16 dlogits on the CUDA paths (the cuBLAS plain path too), upstream beyond fp16's range.
    hidden, weight, targets, segs, upstream = make_case(300, 128, 32003, 7, dtype=torch.float16, device="cuda")
    hidden, weight = ((x * 0.05).half().double() for x in (hidden, weight))
    upstream = upstream * 2.0**17
    _, gh, gw = run(lambda *a: linear_logprob_sums(*a, impl=impl), hidden, weight, targets, segs, 7, upstream,
                    torch.float16)  # fmt: skip
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    rgh, rgw = torch.autograd.grad((reference(hr, wr, targets, segs, 7) * upstream).sum(), (hr, wr))
    assert_close(gh, rgh, TOL[torch.float16][1], "grad hidden")
    assert_close(gw, rgw, TOL[torch.float16][1], "grad weight")


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["fwd", "dlogits"])
def test_gpu_every_config(monkeypatch, which):
    # Autotuning may pick any config: each one compiled for real, bf16, against float64 (the other kernel
    # pinned to its first config).
    kernel = {"fwd": L._fwd_kernel, "dlogits": L._dlogits_kernel}[which]
    monkeypatch.setenv("FSPO_AUTOTUNE", "0")
    for cfg in kernel.configs:
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "configs", [cfg])
        check_against_reference("triton", 1031, 128, 5000, 40, dtype=torch.bfloat16, device="cuda")


@pytest.mark.gpu
def test_gpu_grad_hidden_accumulates_in_place():
    # torch >= 2.8 has addmm(out_dtype=float32): the fallback (twice the fp32 traffic) must not run.
    assert "in place" in L.grad_hidden_accumulation("cuda"), L.grad_hidden_accumulation("cuda")


@pytest.mark.gpu
def test_gpu_odd_hidden_size():
    check_against_reference("triton", 77, 200, 3001, 5, dtype=torch.bfloat16, device="cuda")


@pytest.mark.gpu
def test_gpu_bitwise_repeatable_and_agrees_with_torch_path():
    hidden, weight, targets, segs, upstream = make_case(2000, 128, 32003, 16, device="cuda")
    fn = lambda *a: linear_logprob_sums(*a, impl="triton")
    first = run(fn, hidden, weight, targets, segs, 16, upstream, torch.bfloat16)
    for _ in range(3):
        again = run(fn, hidden, weight, targets, segs, 16, upstream, torch.bfloat16)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    plain = run(linear_logprob_sums_torch, hidden, weight, targets, segs, 16, upstream, torch.bfloat16)
    for what, a, b in zip(("out", "grad hidden", "grad weight"), first, plain):
        assert_close(a, b.double(), TOL[torch.bfloat16][1], what)
