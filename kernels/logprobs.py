"""Fused linear log-prob sums: lm_head matmul + log-softmax + target gather + per-segment sum.

    out[s] = sum over rows n with segment_ids[n] == s and targets[n] != -100 of
             log_softmax(hidden[n] @ weight.T)[targets[n]]

The lm_head is the largest memory cost of preference training (Llama 3 vocab 128,256: an 8k-token
pair holds ~21 GB of fp32 logits on the plain path). Neither path here ever holds an [N, V] tensor:

* plain torch (CPU, reference, fallback): tiles of vocab x rows, each tile's logits in fp32 (on CUDA
  from 16-bit operands through cuBLAS with fp32 outputs), and a backward that recomputes each tile from
  the saved per-row log-sum-exp (a custom autograd Function). Its GEMMs are deterministic too.
* Triton (CUDA): tiles over rows and vocab, online log-sum-exp in fp32 registers; the backward recomputes
  the logits tile by tile in a Triton kernel that writes dlogits (in the input dtype) for one vocab tile of
  all rows, and the two gradient GEMMs of that tile run on cuBLAS. Fixed order, no atomics:
  bitwise-deterministic outputs and gradients.

No loss-in-forward variant (the loss's gradients computed inside the forward): IPO/DPO cannot use it (a
pair's gradient needs both branch sums first), and for SFT it measured no faster (benchmarks/RESULTS.md,
"Design notes: kernels").

Only rows with a target (!= -100) AND a segment (!= -1) count; they are compacted first, so the other
rows cost no matmul work. Segment sums accumulate in fp64 in a fixed order on every device (not
`index_add_`/`scatter_add_`, which use atomics on CUDA).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency; the plain-torch path still works
    triton = None

from fspo_engine.kernels.interpret import INTERPRET, loop_bound

IGNORE_INDEX = -100
# Plain path: bytes of one fp32 logits tile plus one temporary of the same size. CPU, 16 MiB: tiles of
# 1024 rows x 2048 vocab, large enough for efficient matmuls, small beside any [N, V] logits. CUDA,
# 128 MiB: at 4k rows, tiles of all rows x 4096 vocab, so that a tile's GEMMs (~0.2 ms at H=4096 on an
# H100-class GPU) outweigh the ~10 elementwise launches around them.
DEFAULT_CHUNK_BYTES = 16 * 2**20
DEFAULT_CHUNK_BYTES_CUDA = 128 * 2**20
_MAX_ROWS_CUDA = 8192

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------
# Input checks (shared by both paths; everything is checked before any launch)


def _check_inputs(hidden, weight, targets, segment_ids, num_segments, *, allow_fp64: bool):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden: expected a [N, H] tensor, got {_describe(hidden)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight: expected a [V, H] tensor, got {_describe(weight)}")
    dtypes = _FLOAT_DTYPES + ((torch.float64,) if allow_fp64 else ())
    if hidden.dtype not in dtypes:
        raise ValueError(f"hidden: dtype {hidden.dtype} not supported (expected one of {dtypes})")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}")
    n, h = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != h:
        raise ValueError(f"weight: shape {tuple(weight.shape)} does not match hidden size H={h}")
    if v == 0 or h == 0:
        raise ValueError(f"weight: needs V >= 1 and H >= 1, got shape {tuple(weight.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"weight: on {weight.device}, hidden on {hidden.device}")
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 0:
        raise ValueError(f"num_segments: expected an int >= 0, got {num_segments!r}")
    for name, ids in (("targets", targets), ("segment_ids", segment_ids)):
        if not isinstance(ids, torch.Tensor) or ids.shape != (n,):
            raise ValueError(f"{name}: expected shape ({n},) to match hidden, got {_describe(ids)}")
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: expected an int32/int64 tensor, got {ids.dtype}")
        if ids.device != hidden.device:
            raise ValueError(f"{name}: on {ids.device}, hidden on {hidden.device}")
    if n == 0:
        return
    # One host sync (on CUDA) for both range checks.
    bad_t = ((targets < 0) & (targets != IGNORE_INDEX)) | (targets >= v)
    bad_s = (segment_ids < -1) | (segment_ids >= num_segments)
    flags = torch.stack([bad_t.any(), bad_s.any()]).tolist()
    if flags[0]:
        i = int(bad_t.nonzero()[0, 0])
        raise ValueError(f"targets: id {int(targets[i])} at row {i} outside [0, {v}) and not {IGNORE_INDEX}")
    if flags[1]:
        i = int(bad_s.nonzero()[0, 0])
        raise ValueError(f"segment_ids: id {int(segment_ids[i])} at row {i} outside [-1, {num_segments})")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)}"
    return type(x).__name__


def _compact(targets, segment_ids):
    """Indices of the rows that count (a target and a segment), in row order. [n_valid] int64."""
    keep = (targets != IGNORE_INDEX) & (segment_ids >= 0)
    return keep.nonzero().squeeze(1)


def _segment_sum(values, seg, num_segments):
    """Sum of `values` [n] per segment id `seg` [n] (ids in [0, num_segments)) -> [num_segments], fp32
    (fp64 for fp64 values); accumulated in fp64, deterministic on every device.

    CPU: index_add_ (a sequential loop). Elsewhere `_segment_sum_sorted`: index_add_/scatter_add_ and
    even float cumsum use atomics or unordered scans on CUDA, whose order varies run to run.
    """
    out_dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    if values.numel() == 0 or num_segments == 0:
        return values.new_zeros(num_segments, dtype=out_dtype)
    if values.device.type == "cpu":
        out = values.new_zeros(num_segments, dtype=torch.float64)
        return out.index_add_(0, seg, values.double()).to(out_dtype)
    return _segment_sum_sorted(values, seg, num_segments).to(out_dtype)


def _segment_sum_sorted(values, seg, num_segments):
    """Fixed-order segment sum: stable sort by segment, scatter into a padded [S, longest] matrix (unique
    indices: no accumulation), sum each row. Extra memory S x longest segment, small for FSPO (segments
    are responses). -> fp64 [num_segments]."""
    seg_sorted, order = torch.sort(seg, stable=True)
    counts = torch.bincount(seg_sorted, minlength=num_segments)  # integer counts: exact in any order
    starts = torch.cumsum(counts, 0) - counts  # integer scan: exact
    pos = torch.arange(seg.numel(), device=seg.device) - starts[seg_sorted]  # rank within the segment
    padded = values.new_zeros(num_segments, int(counts.max()), dtype=torch.float64)
    padded[seg_sorted, pos] = values[order].double()
    return padded.sum(dim=1)


# ----------------------------------------------------------------------------------------------------
# Plain-torch path: tiles of vocab x rows, recompute in backward
#
# A tile is [rows, cols] of fp32 logits. The loops run vocab tiles outside, row chunks inside:
# * each weight tile is read (and, on CPU, upcast) once per pass, not once per row chunk: W is the big
#   operand ([V, H] against the [n, H] response rows);
# * grad-weight for a vocab tile is accumulated over the row chunks in an fp32 scratch [cols, H] and
#   rounded once into grad_weight: no fp32 [V, H] buffer, no bf16 rounding per chunk;
# * grad-hidden is accumulated over vocab tiles in an fp32 [n, H] (n = response rows: small).
# On CUDA, bf16/fp16 operands go through cuBLAS with fp32 outputs (`torch.mm(..., out_dtype=)`), so the
# logits are never rounded to 16 bits; dlogits are rounded to the input dtype for the two gradient GEMMs
# (as the Triton grad-weight kernel does). On CPU there is no such GEMM: tiles are upcast to fp32.


def _tile_shape(n: int, v: int, chunk_bytes: int, max_rows: int = 1024) -> tuple[int, int]:
    """(rows, cols) of a logits tile: 8 bytes per element (the fp32 tile plus one temporary).

    max_rows: 1024 on CPU (tiles that stay in cache); on CUDA up to all rows, so that a vocab tile's
    grad-weight is one GEMM over every row (no fp32 [cols, H] accumulation across row chunks)."""
    elems = max(1, chunk_bytes // 8)
    cols = min(v, max(256, elems // max(1, min(n, max_rows))))
    return max(1, elems // cols), cols


def _gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the tiles' GEMM operands take: the input's own on CUDA (fp32 out), else fp32/fp64."""
    if x.dtype == torch.float64:
        return torch.float64
    return x.dtype if x.is_cuda else torch.float32


def _mm_acc(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b, or out += a @ b, with an fp32 (fp64 for fp64) result.

    16-bit operands on CUDA go through cuBLAS with fp32 accumulation and an fp32 output (no upcast copies,
    no 16-bit rounding of the result); on CPU, which has no such GEMM, they are upcast. `out +=` is one
    in-place GEMM (`torch.addmm(out_dtype=float32)`, torch >= 2.8) where this torch has a working one,
    else a GEMM into a temporary plus an add: twice the fp32 traffic of `out` (see
    `grad_hidden_accumulation`)."""
    if a.dtype in (torch.bfloat16, torch.float16):
        if not a.is_cuda:
            a, b = a.float(), b.float()
        elif out is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        elif _addmm_fp32_works(a.device):
            return torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            return out.add_(torch.mm(a, b, out_dtype=torch.float32))
    return a @ b if out is None else out.addmm_(a, b)


_ADDMM_FP32: dict = {}  # device -> whether the in-place fp32-output addmm works there (probed once)


def _addmm_fp32_works(device: torch.device) -> bool:
    """Probe, once per device, `torch.addmm(c, a, b, out_dtype=float32, out=c)` on 16-bit a, b: present
    in this torch, and right (c + a @ b). If not, say once that the slower fallback runs."""
    key = str(device)
    if key not in _ADDMM_FP32:
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(64, 48, device=device, generator=g).to(torch.bfloat16)
        b = torch.randn(48, 32, device=device, generator=g).to(torch.bfloat16)
        c = torch.randn(64, 32, device=device, generator=g)
        want = c + a.float() @ b.float()
        try:
            torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
            ok = bool(torch.allclose(c, want, rtol=1e-4, atol=1e-4))
        except (RuntimeError, TypeError, NotImplementedError):  # a torch without the overload
            ok = False
        _ADDMM_FP32[key] = ok
        if not ok:
            warnings.warn(
                f"linear_logprob_sums: torch {torch.__version__} has no working in-place "
                "torch.addmm(..., out_dtype=torch.float32) on this device; the fp32 grad-hidden accumulation "
                "falls back to mm + add_ (twice its memory traffic per vocab tile)",
                stacklevel=2,
            )
    return _ADDMM_FP32[key]


def grad_hidden_accumulation(device) -> str:
    """Which GEMM accumulates grad-hidden over vocab tiles on `device` (benchmarks record it)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "fp32 operands, addmm_ (no 16-bit GEMM with fp32 output on this device)"
    if _addmm_fp32_works(device):
        return "torch.addmm(out_dtype=float32), in place"
    return "torch.mm(out_dtype=float32) + add_ (fallback: twice the [n, H] fp32 traffic)"


def _fp16_grad_scale(g: torch.Tensor) -> torch.Tensor:
    """A power of two s (0-d fp32 tensor, on g's device, no host sync) for fp16 dlogits.

    dlogits = g * (onehot - softmax) is stored in fp16 for the gradient GEMMs, and |dlogits| <= max |g|.
    Under a GradScaler, g is the loss gradient times the scale (2**16 by default), which overflows fp16's
    65504. Storing s * dlogits, with max |g| * s in (2**13, 2**14], cannot overflow and keeps the small
    entries (tiny probabilities) as far above fp16's underflow as its range allows; the GEMMs' fp32 results
    are divided by s, exactly (a power of two). g of zero or not finite keeps s = 1."""
    e = torch.floor(torch.log2(2.0**14 / g.abs().amax().float()))
    return torch.exp2(torch.where(torch.isfinite(e), e, 0.0).clamp(-60.0, 60.0))


class _TorchLinearLogprobSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, segment_ids, num_segments, chunk_bytes):
        rows = _compact(targets, segment_ids)
        h = hidden.index_select(0, rows)  # [n, H]
        t = targets.index_select(0, rows).long()  # [n]
        s = segment_ids.index_select(0, rows).long()  # [n]
        n, V = rows.numel(), weight.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        step_n, step_v = _tile_shape(n, V, chunk_bytes, _MAX_ROWS_CUDA if hidden.is_cuda else 1024)
        h_g = h.to(_gemm_dtype(h))  # a copy only on CPU for 16-bit inputs: [n, H], small
        lse = torch.full((n,), float("-inf"), dtype=acc, device=hidden.device)
        t_logit = torch.zeros(n, dtype=acc, device=hidden.device)
        for j in range(0, V, step_v):
            w_t = weight[j : j + step_v].to(h_g.dtype).T  # [H, cols]
            for i in range(0, n, step_n):
                logits = _mm_acc(h_g[i : i + step_n], w_t)  # [c, cols] fp32
                # Running log-sum-exp over the vocab tiles, combined in a fixed order.
                lse[i : i + step_n] = torch.logaddexp(lse[i : i + step_n], torch.logsumexp(logits, dim=1))
                t_c = t[i : i + step_n]
                inside = (t_c >= j) & (t_c < j + logits.shape[1])
                picked = logits.gather(1, (t_c - j).clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)
                t_logit[i : i + step_n] += torch.where(inside, picked, 0.0)
                del logits
        ctx.save_for_backward(h, weight, t, s, rows, lse)
        ctx.num_rows = hidden.shape[0]
        ctx.chunk_bytes = chunk_bytes
        return _segment_sum(t_logit - lse, s, num_segments)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, t, s, rows, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = lse.dtype
        n, H = h.shape
        V = weight.shape[0]
        grad_hidden = grad_weight = None
        if need_h:
            grad_hidden = torch.zeros(ctx.num_rows, H, dtype=h.dtype, device=h.device)
        if need_w:
            grad_weight = torch.zeros_like(weight)
        if not n or not (need_h or need_w):
            return grad_hidden, grad_weight, None, None, None, None
        g = grad_out.to(acc).index_select(0, s)  # [n] upstream gradient of each row's segment
        h_g = h.to(_gemm_dtype(h))
        # fp16 dlogits (CUDA only: on CPU the tiles are fp32) are scaled into range: see _fp16_grad_scale.
        scale = _fp16_grad_scale(g) if h_g.dtype == torch.float16 else None
        if scale is not None:
            g = g * scale
        step_n, step_v = _tile_shape(n, V, ctx.chunk_bytes, _MAX_ROWS_CUDA if h.is_cuda else 1024)
        gh = torch.zeros(n, H, dtype=acc, device=h.device) if need_h else None  # fp32 accumulator
        for j in range(0, V, step_v):
            w_g = weight[j : j + step_v].to(h_g.dtype)  # [cols, H]
            cols = w_g.shape[0]
            gw = None
            for i in range(0, n, step_n):
                h_c, t_c, g_c = h_g[i : i + step_n], t[i : i + step_n], g[i : i + step_n, None]
                # d logp / d logits = onehot(target) - softmax, scaled by the row's upstream gradient.
                d = _mm_acc(h_c, w_g.T).sub_(lse[i : i + step_n, None]).exp_().mul_(-g_c)  # [c, cols]
                inside = ((t_c >= j) & (t_c < j + cols)).nonzero().squeeze(1)
                d[inside, t_c[inside] - j] += g_c[inside, 0]  # one target per row: no duplicates
                d = d.to(h_g.dtype)  # the GEMM operand dtype (a no-op in fp32)
                if need_h:
                    _mm_acc(d, w_g, out=gh[i : i + step_n])
                if need_w:
                    gw = _mm_acc(d.T, h_c, out=gw)  # [cols, H] fp32, this vocab tile's rows in order
                del d
            if need_w:
                grad_weight[j : j + cols] = gw if scale is None else gw.div_(scale)
        if need_h:
            grad_hidden[rows] = (gh if scale is None else gh.div_(scale)).to(h.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_logprob_sums_torch(hidden, weight, targets, segment_ids, num_segments: int, *,
                              chunk_bytes: int | None = None):
    """Plain-torch path of `linear_logprob_sums` (CPU, reference, fallback); also accepts float64.

    chunk_bytes: memory for one logits tile (and its temporary); default 16 MiB on CPU, 128 MiB on CUDA.
    """
    _check_inputs(hidden, weight, targets, segment_ids, num_segments, allow_fp64=True)
    if chunk_bytes is None:
        chunk_bytes = DEFAULT_CHUNK_BYTES_CUDA if hidden.is_cuda else DEFAULT_CHUNK_BYTES
    return _TorchLinearLogprobSums.apply(hidden, weight, targets, segment_ids, num_segments, chunk_bytes)


# ----------------------------------------------------------------------------------------------------
# Triton path
#
# Notation: n compacted rows, V vocab, H hidden. Both kernels compute a logits tile [BLOCK_N, BLOCK_V] in
# fp32 from an H loop of tl.dot; the logits never leave registers.
#   forward   grid (row blocks, vocab splits): online log-sum-exp over the split's vocab range, written as
#             one partial lse per (split, row) plus the target logit; torch combines the splits (fixed order).
#   dlogits   per vocab tile of all n rows, grid (row blocks, column blocks): recompute, g * (onehot -
#             softmax), stored in the input dtype into a reused [n, cols] buffer; then two cuBLAS GEMMs:
#             dh += dlogits @ W[tile] (fp32 accumulator), dW[tile] = dlogits^T @ h (K = n, written once).
# Each output element is reduced in a fixed order, with no atomics: deterministic.
# Cost: 4 GEMM-sized passes of n x V x H (forward; recompute; the two gradient GEMMs) against the plain
# path's 3, plus one 16-bit write and two reads of each dlogits tile; extra memory O(n x H) fp32 plus one
# tile, never O(n x V) or an fp32 [V, H]. (Why the gradient GEMMs are not fused into Triton:
# benchmarks/RESULTS.md, "Design notes: kernels".)


def _check_triton_device(hidden):
    if triton is None:
        raise ValueError("hidden: the triton path needs the `triton` package; use impl='torch'")
    if hidden.is_cuda == INTERPRET:
        need = "CPU tensors (TRITON_INTERPRET=1 was set at import)" if INTERPRET else "CUDA tensors"
        raise ValueError(f"hidden: the triton path here runs on {need}, got {hidden.device}")


if triton is not None:

    def _pinned(configs, named_args, **kwargs):
        # FSPO_AUTOTUNE=0: no timing, the first config (the same in every process: bitwise-repeatable
        # results across runs and ranks; timed choices can differ between processes and change rounding).
        return configs[:1] if os.environ.get("FSPO_AUTOTUNE", "1") == "0" else configs

    def _autotune(configs, key, reset_to_zero=None):
        # The interpreter runs one small config: benchmarking configs there would take minutes.
        if INTERPRET:
            configs = [triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16}, num_warps=1)]
        return triton.autotune(configs=configs, key=key, reset_to_zero=reset_to_zero,
                               prune_configs_by={"early_config_prune": _pinned})  # fmt: skip

    def _configs(choices, block_h=64):
        """(BLOCK_N, BLOCK_V, num_warps, num_stages) choices. Few on purpose: each compiles per H."""
        return [
            triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": block_h}, num_warps=w, num_stages=st)
            for bn, bv, w, st in choices
        ]

    @triton.jit
    def _dot(a, b, acc, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
        if DOT_FP32:  # the interpreter's bf16 dot is wrong: upcast operands there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:  # fp32 inputs: true fp32 products, not tf32 (1e-4 relative accuracy)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        return acc

    @triton.jit
    def _logits_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H: tl.constexpr, stride_h, stride_w,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                     DOT_FP32: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
        """fp32 logits tile [BLOCK_N, BLOCK_V] = h[rows, :] @ W[cols, :]^T. rows/cols are int64."""
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_mask = ks < H
            a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
            b = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :],
                        mask=col_mask[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
            acc = _dot(a, tl.trans(b), acc, DOT_FP32, IEEE)
        return acc

    @triton.jit
    def _dlogits_tile(logits, lse, g, tgt, cols, col_mask):
        """d out / d logits = g * (onehot(target) - softmax), zero outside the vocab. fp32 [BN, BV]."""
        p = tl.exp(logits - lse[:, None])
        d = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - p
        return tl.where(col_mask[None, :], d * g[:, None], 0.0)

    @triton.jit
    def _fwd_tile(h_ptr, w_ptr, rows, row_mask, tgt, m, s, t_logit, c0, V, H: tl.constexpr, stride_h, stride_w,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                  DOT_FP32: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
        """Online log-sum-exp update (m, s) and target logit for the vocab tile starting at c0."""
        cols = c0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        logits = _logits_tile(h_ptr, w_ptr, rows, cols.to(tl.int64), row_mask, col_mask, H, stride_h, stride_w,
                              BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32, IEEE)  # fmt: skip
        logits = tl.where(col_mask[None, :], logits, float("-inf"))
        # A split's first tile has >= 1 real column, so m is finite from then on and exp(-inf - m) = 0.
        m_new = tl.maximum(m, tl.max(logits, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
        t_logit += tl.sum(tl.where(cols[None, :] == tgt[:, None], logits, 0.0), 1)
        return m_new, s, t_logit

    # Loop bounds that vary per call (rows, split width) stay runtime values so that a new row count
    # does not recompile (`loop_bound` lets the interpreter run the same loop). Only H, fixed per model, is
    # a compile-time constant.
    # Configs: (BLOCK_N rows, BLOCK_V vocab, warps, stages); the first is the pinned default. Each compiles
    # for sm_90 without spills, its H loop pipelined 3-4 deep (`fspo-engine bench compile-report`;
    # tests/kernels/test_logprobs.py compiles them all). 128x256 and 256x128 are Hopper's widest GEMM
    # tiles for 8 warps holding the fp32 logits tile.
    _FWD_CONFIGS = ((128, 128, 8, 3), (128, 256, 8, 3), (256, 128, 8, 3), (64, 256, 8, 3), (128, 64, 4, 4),
                    (64, 128, 4, 4))  # fmt: skip
    # 256x128 spills 16 bytes in the dlogits kernel (its epilogue holds more live values): left out.
    _DLOGITS_CONFIGS = tuple(c for c in _FWD_CONFIGS if c[:2] != (256, 128))

    @_autotune(_configs(_FWD_CONFIGS), key=["N_BUCKET", "V", "H"])
    @triton.jit(do_not_specialize=["n", "V_PER_SPLIT", "N_BUCKET"])  # per-call ints: no recompile per value
    def _fwd_kernel(h_ptr, w_ptr, t_ptr, plse_ptr, tlogit_ptr, n, V, H: tl.constexpr, V_PER_SPLIT,
                    stride_h, stride_w, N_BUCKET, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_H: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
                    INTERPRET: tl.constexpr):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n
        rows = rows.to(tl.int64)
        tgt = tl.load(t_ptr + rows, mask=row_mask, other=-1)
        v_lo = pid_s * V_PER_SPLIT
        v_hi = tl.minimum(v_lo + V_PER_SPLIT, V)
        m = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max
        s = tl.zeros((BLOCK_N,), tl.float32)  # running sum of exp(logit - m)
        t_logit = tl.zeros((BLOCK_N,), tl.float32)
        for c0 in range(loop_bound(v_lo, INTERPRET), loop_bound(v_hi, INTERPRET), BLOCK_V):
            m, s, t_logit = _fwd_tile(h_ptr, w_ptr, rows, row_mask, tgt, m, s, t_logit, c0, v_hi, H,
                                      stride_h, stride_w, BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32, IEEE)  # fmt: skip
        tl.store(plse_ptr + pid_s * n + rows, m + tl.log(s), mask=row_mask)
        # Exactly one split holds each row's target: a plain store, no race.
        tl.store(tlogit_ptr + rows, t_logit, mask=row_mask & (tgt >= v_lo) & (tgt < v_hi))

    # Backward, part 1 of 2: dlogits tile by tile. Recompute the logits from the saved lse, turn them into
    # g * (onehot - softmax) in registers and store that in the input dtype; the two gradient GEMMs (part
    # 2, `_triton_backward`) then run on cuBLAS. The GEMMs have H on both ends (dh = dlogits @ W,
    # dW = dlogits^T @ h), so a fused kernel must either accumulate [rows, H] / [cols, H] fp32 partials
    # through global memory once per tile (memory-bound: ~2x the GEMMs' time at H=4096) or use atomics.
    @_autotune(_configs(_DLOGITS_CONFIGS), key=["N_BUCKET", "V", "H"])
    @triton.jit(do_not_specialize=["n", "c0", "cols", "stride_d", "N_BUCKET"])  # per-call ints: no recompile
    def _dlogits_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, g_ptr, d_ptr, n, c0, cols, V, H: tl.constexpr,
                        stride_h, stride_w, stride_d, N_BUCKET, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_H: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
        """d[rows, j] = dlogits[rows, c0 + j] for j < cols (one vocab tile), in d's dtype."""
        pid_n = tl.program_id(0)
        pid_v = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n
        rows = rows.to(tl.int64)
        local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column within the tile
        col_mask = local < cols
        vocab = (c0 + local).to(tl.int64)
        tgt = tl.load(t_ptr + rows, mask=row_mask, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)  # masked rows: zero gradient
        logits = _logits_tile(h_ptr, w_ptr, rows, vocab, row_mask, col_mask, H, stride_h, stride_w,
                              BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32, IEEE)  # fmt: skip
        d = _dlogits_tile(logits, lse, g, tgt, vocab, col_mask)
        tl.store(d_ptr + rows[:, None] * stride_d + local[None, :], d.to(d_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & col_mask[None, :])  # fmt: skip


def _num_sms(device: torch.device) -> int:
    # The interpreter: a few "SMs", so that the tests' small shapes still split the vocab.
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_SPLIT_UNIT = 256  # vocab columns: split widths are multiples of every BLOCK_V
_PROGRAM_OVERHEAD = 0.05  # a program's fixed cost (launch, target loads, stores), in 256-column tiles


def _schedule_efficiency(row_blocks: int, widths: list[int], slots: int, overhead: float = 0.0) -> float:
    """Busy share of `slots` program slots until the last of the forward's programs ends.

    The grid is (row_blocks, len(widths)), axis 0 fastest; program (r, s) takes time proportional to its
    split's vocab width (plus `overhead`, in 256-column tiles); a slot that frees takes the next program
    in launch order, as the hardware block scheduler does. All splits but the last have equal width, so
    their programs fill the slots in round-robin waves; the last split's programs go greedily after."""
    import heapq

    w_full = widths[0] / _SPLIT_UNIT + overhead
    q, rem = divmod(row_blocks * (len(widths) - 1), slots)
    free = [(q + 1) * w_full] * rem + [q * w_full] * (slots - rem)  # when each slot frees
    heapq.heapify(free)
    w_last = widths[-1] / _SPLIT_UNIT + overhead
    for _ in range(row_blocks):
        heapq.heappush(free, heapq.heappop(free) + w_last)
    useful = row_blocks * sum(widths) / _SPLIT_UNIT
    return useful / (slots * max(free))


@functools.lru_cache(maxsize=1024)
def _split_plan_cached(v: int, row_blocks: tuple[int, ...], slots: int) -> tuple[int, int]:
    n_units = _cdiv(v, _SPLIT_UNIT)
    max_splits = min(n_units, max(1, 16 * slots // min(row_blocks)))  # beyond ~16 waves the tail is small
    best, best_cost, seen = (_cdiv(v, _SPLIT_UNIT) * _SPLIT_UNIT, 1), float("inf"), set()
    for want in range(1, max_splits + 1):
        cols = _cdiv(n_units, want) * _SPLIT_UNIT
        nsplit = _cdiv(v, cols)
        if cols in seen:
            continue
        seen.add(cols)
        widths = [cols] * (nsplit - 1) + [v - (nsplit - 1) * cols]
        # Mean over the configs' row tilings of the time over its ideal (fixed program costs included).
        cost = sum(1.0 / _schedule_efficiency(rb, widths, slots, _PROGRAM_OVERHEAD) for rb in row_blocks)
        if cost < best_cost * (1 - 1e-3):  # fewer splits win ties
            best, best_cost = (cols, nsplit), cost
    return best


def _split_plan(v: int, n: int, slots: int) -> tuple[int, int]:
    """(columns per split, number of splits) of the forward's vocab for n rows on `slots` program slots.

    The forward's programs are (row block, vocab split) pairs of equal cost but for the last split, and a
    program runs on one SM at a time (its 8-warp configs fit one block per SM: `bench compile-report`).
    Too few programs for the SMs, or a last wave that fills only some of them, leaves SMs idle (288
    programs of 9 even splits on 132 SMs took 3 waves for 2.18 waves of work). So the split width is
    chosen, in 256-column units, to minimise the predicted time (`_schedule_efficiency`) for the row
    tilings of all the forward's configs (autotuning may pick any), counting a small fixed cost per program.
    Splits are cheap otherwise: each program reloads its rows' hidden states per vocab tile anyway, and a
    split adds one fp32 partial log-sum-exp per row."""
    block_ns = sorted({c.kwargs["BLOCK_N"] for c in _fwd_kernel.configs})
    return _split_plan_cached(v, tuple(_cdiv(max(n, 1), bn) for bn in block_ns), slots)


def _dot_flags(h) -> dict:
    """The kernels' tl.dot flags for inputs of h's dtype: the interpreter's bf16 tl.dot is wrong, so it
    upcasts there (DOT_FP32); fp32 inputs get IEEE fp32 products."""
    dot_fp32 = INTERPRET and h.dtype == torch.bfloat16
    return {"DOT_FP32": dot_fp32, "IEEE": h.dtype == torch.float32 or dot_fp32}


def _triton_forward(h, w, t):
    """h [n, H], w [V, H] (row-major), t int32 [n] -> per-row (target logit - lse) and lse, fp32 [n]."""
    n, H = h.shape
    V = w.shape[0]
    v_per_split, nsplit = _split_plan(V, n, _num_sms(h.device))
    plse = torch.empty(nsplit, n, dtype=torch.float32, device=h.device)
    tlogit = torch.zeros(n, dtype=torch.float32, device=h.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), nsplit)
    _fwd_kernel[grid](
        h, w, t, plse, tlogit,  # in: rows, weight, targets; out: partial lse per split, target logits
        n=n, V=V, H=H, V_PER_SPLIT=v_per_split, stride_h=h.stride(0), stride_w=w.stride(0),
        N_BUCKET=triton.next_power_of_2(n), INTERPRET=INTERPRET, **_dot_flags(h),
    )  # fmt: skip
    lse = torch.logsumexp(plse, dim=0)  # combines the splits in a fixed order
    return tlogit - lse, lse


# Backward memory: one dlogits tile [n, cols] in the input dtype, 32 MiB, but never narrower than
# MIN_DLOGITS_COLS columns. Each vocab tile adds its dh GEMM into the fp32 [n, H] accumulator: a read and a
# write of 8 * n * H bytes against 2 * n * cols * H FLOP, so the traffic's share of that GEMM's time is
# ~ (8 / 4.8 TB/s) / (2 * cols / 650 TFLOP/s) = 540 / cols on an H200 whatever n is: 53% at the 1024
# columns a fixed 32 MiB gave at 16k rows (~64 GB per backward at V = 128k, H = 4096), 13% at 4096.
# At n = 4096 bf16 the two agree (4096 columns); at 16k rows the tile is 128 MiB, half the fp32
# accumulator's 256 MiB at H = 4096.
DLOGITS_TILE_BYTES = 32 * 2**20
MIN_DLOGITS_COLS = 4096


def _dlogits_cols(n: int, v: int, element_size: int) -> int:
    """Vocab columns of one backward tile (see DLOGITS_TILE_BYTES)."""
    if INTERPRET:
        return min(v, 384)  # several tiles even for the tests' small shapes
    return min(v, max(MIN_DLOGITS_COLS, DLOGITS_TILE_BYTES // (element_size * max(n, 1)) // 128 * 128))


def _triton_backward(h, w, t, lse, g, *, need_h: bool, need_w: bool):
    """Gradients of sum_n g[n] * logp[n] w.r.t. h [n, H] (fp32) and w [V, H] (w's dtype), or None.

    Vocab tiles of all n rows: dlogits from `_dlogits_kernel`, then dh += dlogits @ W[tile] (fp32
    accumulator) and dW[tile] = dlogits^T @ h, one GEMM over all rows, each element written once. cuBLAS
    GEMMs and a fixed tile order: deterministic, no atomics. fp16 dlogits are scaled into fp16's range
    (`_fp16_grad_scale`) and the GEMM results scaled back in fp32."""
    n, H = h.shape
    V = w.shape[0]
    cols = _dlogits_cols(n, V, h.element_size())
    scale = _fp16_grad_scale(g) if h.dtype == torch.float16 else None
    if scale is not None:
        g = g * scale
    d = torch.empty(n, cols, dtype=h.dtype, device=h.device)
    dh = torch.zeros(n, H, dtype=torch.float32, device=h.device) if need_h else None
    dw = torch.empty(V, H, dtype=w.dtype, device=h.device) if need_w else None
    flags = _dot_flags(h)
    for c0 in range(0, V, cols):
        width = min(cols, V - c0)
        tile = d[:, :width]
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(width, meta["BLOCK_V"]))  # noqa: B023
        _dlogits_kernel[grid](
            h, w, t, lse, g, tile,  # in: rows, weight, targets, lse, upstream gradients; out: this tile
            n=n, c0=c0, cols=width, V=V, H=H, stride_h=h.stride(0), stride_w=w.stride(0), stride_d=d.stride(0),
            N_BUCKET=triton.next_power_of_2(n), **flags,
        )  # fmt: skip
        if need_h:
            _mm_acc(tile, w[c0 : c0 + width], out=dh)
        if need_w and scale is None:
            torch.mm(tile.T, h, out=dw[c0 : c0 + width])  # K = n: one GEMM, fp32 accumulate, rounded once
        elif need_w:  # fp32 result, unscaled, then rounded once
            torch.mul(_mm_acc(tile.T, h), 1.0 / scale, out=dw[c0 : c0 + width])
    if dh is not None and scale is not None:
        dh.div_(scale)
    return dh, dw


class _TritonLinearLogprobSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, segment_ids, num_segments):
        rows = _compact(targets, segment_ids)
        h = hidden.index_select(0, rows)  # [n, H], contiguous
        t = targets.index_select(0, rows).to(torch.int32)
        s = segment_ids.index_select(0, rows).long()
        w = weight if weight.stride(1) == 1 else weight.contiguous()
        if rows.numel():
            logp, lse = _triton_forward(h, w, t)
        else:
            logp = lse = torch.zeros(0, dtype=torch.float32, device=hidden.device)
        ctx.save_for_backward(h, w, t, s, rows, lse)
        ctx.num_rows = hidden.shape[0]
        return _segment_sum(logp, s, num_segments)

    @staticmethod
    def backward(ctx, grad_out):
        h, w, t, s, rows, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = dw = None
        if rows.numel() and (need_h or need_w):
            g = grad_out.float().index_select(0, s).contiguous()  # [n] upstream gradient per row
            dh, dw = _triton_backward(h, w, t, lse, g, need_h=need_h, need_w=need_w)
        grad_hidden = grad_weight = None
        if need_h:
            grad_hidden = torch.zeros(ctx.num_rows, h.shape[1], dtype=h.dtype, device=h.device)
            if dh is not None:
                grad_hidden[rows] = dh.to(h.dtype)
        if need_w:
            grad_weight = dw if dw is not None else torch.zeros_like(w)
        return grad_hidden, grad_weight, None, None, None


# ----------------------------------------------------------------------------------------------------
# Public API


def linear_logprob_sums(hidden, weight, targets, segment_ids, num_segments: int, *, impl: str = "auto"):
    """Per-segment sums of target log-probs under the lm_head, without materialising the logits.

    hidden [N, H] (the gathered target rows), weight [V, H] (lm_head), targets [N] int (-100 = no
    target), segment_ids [N] int (-1 = none) -> fp32 [num_segments] where

        out[s] = sum_{n: segment_ids[n] == s, targets[n] != -100} log_softmax(hidden[n] @ weight.T)[targets[n]]

    A row counts only if it has both a target and a segment; other rows do no matmul work and get a
    zero gradient. Empty segments are 0. Differentiable in hidden and weight; deterministic (bitwise
    the same outputs and gradients for the same inputs). hidden/weight: fp32, bf16 or fp16 (same dtype;
    the logits are always computed and reduced in fp32). The Triton path times its tile configs once
    per process (autotuning), so "bitwise the same" holds within a process; FSPO_AUTOTUNE=0 pins the
    first config of each kernel, the same in every process and on every rank.

    impl: "auto" (Triton on CUDA, plain torch elsewhere), "triton" (runs on CPU tensors instead when
    TRITON_INTERPRET=1 was set before import: the tests) or "torch". Bad arguments raise ValueError
    naming the argument, before any kernel launch.
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl: expected 'auto', 'triton' or 'torch', got {impl!r}")
    if impl == "auto":
        on_cuda = isinstance(hidden, torch.Tensor) and hidden.is_cuda
        impl = "triton" if on_cuda and triton is not None and not INTERPRET else "torch"
    if impl == "torch":
        return linear_logprob_sums_torch(hidden, weight, targets, segment_ids, num_segments)
    _check_inputs(hidden, weight, targets, segment_ids, num_segments, allow_fp64=False)
    _check_triton_device(hidden)
    return _TritonLinearLogprobSums.apply(hidden, weight, targets, segment_ids, num_segments)
