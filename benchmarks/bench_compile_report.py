"""What does every Triton kernel compile to on an H100/H200, at the tile configs we ship? (No GPU needed.)

Each kernel of `fspo_engine.kernels` is compiled ahead of time for sm_90 at every config it can run with
(attention: every candidate of `_CANDIDATES` for head dims 64 and 128; log-probs: every `@triton.autotune`
config at H=4096), through Triton's own pipeline and the ptxas Triton ships. Per kernel and config:

- registers  per thread, and spill bytes (stores + loads), from `ptxas -v` on the kernel's PTX;
- shared_bytes  the dynamic shared memory the launch asks for (Triton's metadata);
- pipeline_stages  the software-pipeline depth of the kernel's main loops, read off the TTGIR: the number of
  shared-memory slots of the tiles loaded in the loops that hold a matrix product (the smallest over those
  loops; 1 = loads not multi-buffered). `async_wait` lists the `num` of the waits inside those loops: 0
  means every iteration waits for all of its copies;
- blocks_per_sm  how many programs fit on one SM at once (sm_90: 64K registers in 256-register units per
  warp, 64 warps, 228 KiB of shared memory with 1 KiB reserved per block), and what limits it.

The log-prob forward's grid is reported too: for FSPO-sized row counts at V=128,256 on 132 SMs, the number of
programs the launcher makes (row blocks x vocab splits), the waves they take at the config's blocks/SM, and
the share of SM time the last wave leaves idle (equal programs; the ragged last split is counted exactly).

Writes bench_out/compile-report.json (a list of records: kernel, config, registers, spills, shared_bytes,
pipeline_stages, blocks_per_sm, ...) and compile-report.md. The compiles run in worker processes without
TRITON_INTERPRET (the kernels read it at import), two at a time by default.

    fspo-engine bench compile-report [--out bench_out] [--jobs 2] [--dtype bf16] [--only attention|logprobs]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fspo_engine.data_gen.atomic import write_text_atomic

# sm_90 (H100 / H200) limits per SM.
REGS_PER_SM = 65536
REG_UNIT = 256  # registers are allocated per warp in units of 256
MAX_WARPS = 64
MAX_BLOCKS = 32
SMEM_PER_SM = 233472  # 228 KiB
SMEM_PER_BLOCK = 232448  # 227 KiB: the most one block may opt into
SMEM_RESERVED = 1024  # per block, taken by the system
H200_SMS = 132

ATTN_HEAD_DIMS = (64, 128)
LOGPROB_H = 4096
LOGPROB_V = 128256
GRID_ROWS = (1024, 4096, 16384)


# ---------------------------------------------------------------------------------------------------
# Kernel specs: what to compile
# ---------------------------------------------------------------------------------------------------


def _attention_specs(dtype, group=4):
    import fspo_engine.kernels.attention as A

    kernels = {"attn_fwd": A._fwd_kernel, "attn_dkdv": A._dkdv_kernel, "attn_dq": A._dq_kernel}
    kinds = {"attn_fwd": "fwd", "attn_dkdv": "dkdv", "attn_dq": "dq"}
    torch_dtype = _torch_dtype(dtype)
    for d in ATTN_HEAD_DIMS:
        yield {"kernel": "attn_bwd_delta", "module": "attention", "shape": f"D={d}", "config": "BM64 w4 s3",
               "consts": {"HEAD_DIM": d, "BLOCK_M": 64}, "num_warps": 4, "num_stages": 3}  # fmt: skip
        for name, kernel in kernels.items():
            for cfg in A._candidates(kinds[name], d):
                consts = {"GROUP": group, "HEAD_DIM": d, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                          "PRECISION": A._precision(torch_dtype)}  # fmt: skip
                if "INTERPRET" in kernel.arg_names:
                    consts["INTERPRET"] = False
                yield {"kernel": name, "module": "attention", "shape": f"D={d}",
                       "config": f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}",
                       "consts": consts, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}  # fmt: skip


def _logprob_specs(dtype):
    import fspo_engine.kernels.logprobs as L

    for name, kernel in (("logprob_fwd", L._fwd_kernel), ("logprob_dlogits", L._dlogits_kernel)):
        for cfg in kernel.configs:
            kw = cfg.kwargs
            consts = {"H": LOGPROB_H, "DOT_FP32": False, "IEEE": dtype == "fp32", **kw}
            if "INTERPRET" in kernel.fn.arg_names:
                consts["INTERPRET"] = False
            yield {"kernel": name, "module": "logprobs", "shape": f"H={LOGPROB_H}",
                   "config": f"{kw['BLOCK_N']}x{kw['BLOCK_V']}x{kw['BLOCK_H']} w{cfg.num_warps} s{cfg.num_stages}",
                   "consts": consts, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                   "block_n": kw["BLOCK_N"]}  # fmt: skip


def specs(dtype, only=None, group=4):
    """Every (kernel, shape, config) to compile. group: the attention GQA group (4: Llama 3 8B)."""
    out = []
    if only in (None, "attention"):
        out += list(_attention_specs(dtype, group))
    if only in (None, "logprobs"):
        out += list(_logprob_specs(dtype))
    return out


def _torch_dtype(dtype):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def _jit_fn(spec):
    import fspo_engine.kernels.attention as A
    import fspo_engine.kernels.logprobs as L

    names = {"attn_fwd": A._fwd_kernel, "attn_dkdv": A._dkdv_kernel, "attn_dq": A._dq_kernel,
             "attn_bwd_delta": A._bwd_delta_kernel, "logprob_fwd": L._fwd_kernel.fn,
             "logprob_dlogits": L._dlogits_kernel.fn}  # fmt: skip
    return names[spec["kernel"]]


# Argument types, by name, as a real launch passes them: 16-bit activations, int64 ids (torch's default),
# int32 tile metadata, fp32 statistics.
_ATTN_FP32_PTRS = ("LSE", "DELTA")
_LOGPROB_PTRS = {"h_ptr": "dt", "w_ptr": "dt", "d_ptr": "dt", "t_ptr": "i32", "plse_ptr": "fp32",
                 "tlogit_ptr": "fp32", "lse_ptr": "fp32", "g_ptr": "fp32"}  # fmt: skip
# Scalars a launch does not specialise as multiples of 16 (they vary per call or are listed in
# do_not_specialize): the rest (strides, V) are, as torch's allocations make them.
_UNALIGNED = ("T", "stride_lists", "n", "c0", "cols", "N_BUCKET", "V_PER_SPLIT", "SPLIT_TILES")


def _arg_type(module, name, dtype, ids_dtype):
    if module == "logprobs":
        if name in _LOGPROB_PTRS:
            t = _LOGPROB_PTRS[name]
            return "*" + (dtype if t == "dt" else t)
        return "i32"
    if name in ("qk_scale", "sm_scale"):
        return "fp32"
    if name == "T" or name.startswith("stride"):
        return "i32"
    if name in ("DOC", "BR"):
        return "*" + ids_dtype
    if name in _ATTN_FP32_PTRS:
        return "*fp32"
    if name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
        return "*" + dtype
    return "*i32"  # tile metadata: counts, indices, run bounds, launch order


def compile_spec(spec, dtype="bf16", ids_dtype="i64"):
    """Compile one spec for sm_90; returns the CompiledKernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    fn = _jit_fn(spec)
    names = fn.arg_names
    consts = spec["consts"]
    sig = {a: "constexpr" if a in consts else _arg_type(spec["module"], a, dtype, ids_dtype) for a in names}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names
             if sig[a].startswith("*") or (sig[a] == "i32" and a not in _UNALIGNED)}  # fmt: skip
    src = ASTSource(fn, sig, constexprs={(names.index(a),): v for a, v in consts.items()}, attrs=attrs)
    opts = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
    return compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


# ---------------------------------------------------------------------------------------------------
# Reading the compiled kernel
# ---------------------------------------------------------------------------------------------------


def ptxas_usage(ptx: str) -> dict:
    """Registers, spill and stack bytes of `ptx` by `ptxas -v` for sm_90a (what Triton builds for cc 9.0)."""
    import triton

    ptxas = triton.knobs.nvidia.ptxas.path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", str(src), "-o", str(Path(tmp) / "k.o")],
                              capture_output=True, text=True, check=True)  # fmt: skip
    log = proc.stderr + proc.stdout
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(regs.group(1)), "stack_bytes": int(frame.group(1)),
            "spill_store_bytes": int(frame.group(2)), "spill_load_bytes": int(frame.group(3))}  # fmt: skip


_ALLOC = re.compile(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x(\d+)x(\d+)x")
_WAIT = re.compile(r"ttg\.async_wait.*\{num = (\d+)")
_DOT = re.compile(r"ttng\.warp_group_dot |tt\.dot |ttng\.tc_gen5_mma")


def pipeline_depth(ttgir: str) -> dict:
    """Software-pipeline depth of the main loops, from the TTGIR.

    Triton's pipeliner gives each tile a loop loads a ring of shared-memory slots (a mutable
    `local_alloc` of shape [slots, rows, cols]) allocated before the loop. For every `scf.for` whose own
    body (not a nested loop's) holds a matrix product, the slots are those of the 3-D allocs between the
    previous `scf.for` and it; a loop with none is not multi-buffered (1). Returns the smallest over those
    loops, the per-loop list, and the `num` of the async waits inside them."""
    lines = ttgir.splitlines()
    loops, stack, pending = [], [], []
    for line in lines:
        s = line.strip()
        m = _ALLOC.search(s)
        if m:
            pending.append(int(m.group(1)))
        if re.search(r"= scf\.for |^scf\.for ", s):
            loop = {"slots": max(pending, default=1), "dot": False, "waits": []}
            pending = []
            loops.append(loop)
            stack.append((loop, _indent(line)))
            continue
        while stack and s.startswith("}") and _indent(line) <= stack[-1][1]:
            stack.pop()
        if stack:
            if _DOT.search(s):
                stack[-1][0]["dot"] = True
            w = _WAIT.search(s)
            if w:
                stack[-1][0]["waits"].append(int(w.group(1)))
    main = [lp for lp in loops if lp["dot"]]
    return {"pipeline_stages": min((lp["slots"] for lp in main), default=None),
            "loop_stages": [lp["slots"] for lp in main],
            "async_wait": sorted({w for lp in main for w in lp["waits"]})}  # fmt: skip


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def occupancy(registers: int, num_warps: int, shared_bytes: int) -> tuple[int, str]:
    """(blocks per SM on sm_90, the limiting resource)."""
    per_warp = -(-registers * 32 // REG_UNIT) * REG_UNIT
    limits = {
        "registers": (REGS_PER_SM // per_warp) // num_warps,
        "shared": SMEM_PER_SM // (shared_bytes + SMEM_RESERVED),
        "warps": MAX_WARPS // num_warps,
        "blocks": MAX_BLOCKS,
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def report_one(spec, dtype, ids_dtype="i64"):
    t0 = time.perf_counter()
    c = compile_spec(spec, dtype, ids_dtype)
    usage = ptxas_usage(c.asm["ptx"])
    pipe = pipeline_depth(c.asm["ttgir"])
    shared = int(c.metadata.shared)
    blocks, limiter = occupancy(usage["registers"], spec["num_warps"], shared)
    rec = {"kernel": spec["kernel"], "config": spec["config"], "shape": spec["shape"], "dtype": dtype,
           "registers": usage["registers"], "spills": usage["spill_store_bytes"] + usage["spill_load_bytes"],
           "spill_store_bytes": usage["spill_store_bytes"], "spill_load_bytes": usage["spill_load_bytes"],
           "stack_bytes": usage["stack_bytes"], "shared_bytes": shared,
           "fits_shared": shared <= SMEM_PER_BLOCK, **pipe, "blocks_per_sm": blocks,
           "occupancy_limit": limiter, "num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
           "compile_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
    if "block_n" in spec:
        rec["block_n"] = spec["block_n"]
    return rec


# ---------------------------------------------------------------------------------------------------
# The log-prob forward's grid on an H200
# ---------------------------------------------------------------------------------------------------


def forward_grid(records, sms=H200_SMS, vocab=LOGPROB_V, rows=GRID_ROWS):
    """Programs of the log-prob forward per (rows, config) and how they fill `sms` SMs.

    Uses the launcher's own split choice (`logprobs._split_plan`, which plans for one block per SM).
    Program cost is taken proportional to its vocab columns; waves = programs / (SMs x blocks per SM);
    idle = the share of SM-time the tail leaves unused under in-order greedy scheduling (what the hardware
    block scheduler does; `logprobs._schedule_efficiency`)."""
    import fspo_engine.kernels.logprobs as L

    out = []
    for rec in records:
        if rec["kernel"] != "logprob_fwd":
            continue
        slots = sms * rec["blocks_per_sm"]
        for n in rows:
            row_blocks = -(-n // rec["block_n"])
            cols, nsplit = L._split_plan(vocab, n, sms)
            widths = [min(cols, vocab - s * cols) for s in range(nsplit)]
            busy = L._schedule_efficiency(row_blocks, widths, slots)
            programs = row_blocks * nsplit
            out.append({"config": rec["config"], "rows": n, "vocab": vocab, "sms": sms,
                        "blocks_per_sm": rec["blocks_per_sm"], "row_blocks": row_blocks, "splits": nsplit,
                        "split_cols": cols, "programs": programs, "programs_per_sm": programs / sms,
                        "waves": programs / slots, "idle": 1.0 - busy})  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def markdown(records, grid, meta) -> str:
    lines = [f"# Compile report: sm_90, {meta['dtype']}, triton {meta['triton']} ({meta['date']})", "",
             "| kernel | shape | config (tile w warps s stages) | registers | spills (B) | shared (KiB) | "
             "pipeline stages | async_wait | blocks/SM (limit) |",
             "|---|---|---|---:|---:|---:|---:|---|---|"]  # fmt: skip
    for r in records:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['shape']} | {r['config']} | error: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['config']} | {r['registers']} | {r['spills']} | "
                     f"{r['shared_bytes'] / 1024:.1f} | {r['pipeline_stages']} | "
                     f"{','.join(map(str, r['async_wait'])) or '-'} | {r['blocks_per_sm']} ({r['occupancy_limit']}) |")  # fmt: skip
    if grid:
        lines += ["", f"## Log-prob forward grid on {grid[0]['sms']} SMs, V={grid[0]['vocab']}", "",
                  "| config | rows | row blocks | splits x cols | programs | programs/SM | waves | tail idle |",
                  "|---|---:|---:|---|---:|---:|---:|---:|"]  # fmt: skip
        for g in grid:
            lines.append(f"| {g['config']} | {g['rows']} | {g['row_blocks']} | {g['splits']} x {g['split_cols']} | "
                         f"{g['programs']} | {g['programs_per_sm']:.2f} | {g['waves']:.2f} | {g['idle']:.1%} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _worker(index: int, count: int, dtype: str, only: str | None):
    """One process's share of the compiles: JSON records on stdout, one per line."""
    for spec in specs(dtype, only)[index::count]:
        try:
            rec = report_one(spec, dtype)
        except Exception as exc:  # noqa: BLE001 - a failing config is reported, the others still compile
            rec = {"kernel": spec["kernel"], "config": spec["config"], "shape": spec["shape"], "dtype": dtype,
                   "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc) else ''}"}  # fmt: skip
        print(json.dumps(rec), flush=True)


def run(dtype="bf16", only=None, jobs=2) -> list[dict]:
    """All records, compiled in `jobs` worker processes (TRITON_INTERPRET removed from their env)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fspo_engine.benchmarks.bench_compile_report", "--dtype", dtype]
    if only:
        cmd += ["--only", only]
    procs = [subprocess.Popen([*cmd, "--_worker", f"{i}/{jobs}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(jobs)]  # fmt: skip
    outs = [p.communicate() for p in procs]
    records = []
    for p, (out, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"compile worker failed: {err.strip()[-2000:]}")
        records += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    order = {(s["kernel"], s["shape"], s["config"]): i for i, s in enumerate(specs(dtype, only))}
    return sorted(records, key=lambda r: order.get((r["kernel"], r["shape"], r["config"]), 1 << 30))


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="fspo-engine bench compile-report", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_out", help="folder for compile-report.json / .md")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--only", choices=("attention", "logprobs"), default=None)
    p.add_argument("--jobs", type=int, default=2, help="compile worker processes")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        i, n = (int(x) for x in args._worker.split("/"))
        return _worker(i, n, args.dtype, args.only)

    # The grid section imports the kernels here: with TRITON_INTERPRET set they would show the
    # interpreter's configs instead of the shipped ones.
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    t0 = time.perf_counter()
    records = run(args.dtype, args.only, max(1, args.jobs))
    grid = forward_grid([r for r in records if "error" not in r]) if args.only in (None, "logprobs") else []
    meta = {"dtype": args.dtype, "target": "sm_90 (cuda 9.0), ptxas sm_90a", "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "seconds": round(time.perf_counter() - t0)}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(records, grid, meta)
    write_text_atomic(out / "compile-report.json", json.dumps(records, indent=1))
    write_text_atomic(out / "compile-report-grid.json", json.dumps({"meta": meta, "grid": grid}, indent=1))
    write_text_atomic(out / "compile-report.md", md)
    print(md)
    bad = [r for r in records if "error" in r or r.get("spills") or not r.get("fits_shared", True)]
    if bad:
        print(f"{len(bad)} configs fail to compile, spill or overflow shared memory", file=sys.stderr)
    return records


if __name__ == "__main__":
    main()
