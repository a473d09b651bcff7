"""bench compile-report's readings of a compiled kernel: occupancy arithmetic and the TTGIR pipeline depth.

The compiles themselves run in tests/kernels/test_{attention,logprobs}.py (marked slow)."""

from fspo_engine.benchmarks.bench_compile_report import markdown, occupancy, pipeline_depth


def test_occupancy_on_sm90():
    # 238 registers x 32 threads -> 7680 per warp (30 units of 256): 8 warps per SM, one 8-warp block.
    assert occupancy(238, 8, 99332) == (1, "registers")
    # 128 registers, 4 warps: 16 warps by registers, 4 blocks; 60 KiB of shared memory allows 3.
    assert occupancy(128, 4, 60 * 1024) == (3, "shared")
    assert occupancy(32, 1, 0) == (32, "blocks")  # one-warp blocks of few registers: the block cap
    assert occupancy(255, 8, 240 * 1024)[0] == 0  # more shared memory than an SM has


_TTGIR = """
  tt.func public @k() {
    %q = ttg.local_alloc %x : (tensor<128x128xbf16, #blocked>) -> !ttg.memdesc<128x128xbf16, #shared, #smem>
    %0:2 = scf.for %r = %c0 to %n step %c1 iter_args(%a = %z) -> (tensor<128x128xf32, #mma>) {
      %k = ttg.local_alloc : () -> !ttg.memdesc<3x64x128xbf16, #shared, #smem, mutable>
      %d = ttg.local_alloc : () -> !ttg.memdesc<2x64xi64, #shared2, #smem, mutable>
      %1:3 = scf.for %i = %lo to %hi step %c1 iter_args(%b = %a) -> (tensor<128x128xf32, #mma>) {
        %w = ttg.async_wait %k {num = 2 : i32}
        %s = ttng.warp_group_dot %q, %w, %b {isAsync = true}
        scf.yield %s
      }
      %2 = ttg.async_wait {num = 0 : i32}
      scf.yield %1
    }
    %e = scf.for %j = %c0 to %m step %c1 iter_args(%c = %z) -> (tensor<64xf32>) {
      %t = arith.addf %c, %c
      scf.yield %t
    }
    tt.return
  }
"""


def test_pipeline_depth_reads_the_inner_dot_loop():
    got = pipeline_depth(_TTGIR)
    # The outer loop (no product of its own) and the loop without a product do not count; the wait after
    # the inner loop belongs to the outer one.
    assert got == {"pipeline_stages": 3, "loop_stages": [3], "async_wait": [2]}
    assert pipeline_depth("tt.func @k() { tt.return }")["pipeline_stages"] is None


def test_markdown_lists_errors_and_records():
    rec = {"kernel": "attn_fwd", "shape": "D=128", "config": "128x64 w8 s3", "registers": 199, "spills": 0,
           "shared_bytes": 133120, "pipeline_stages": 3, "async_wait": [2, 4], "blocks_per_sm": 1,
           "occupancy_limit": "registers"}  # fmt: skip
    bad = {"kernel": "attn_dq", "shape": "D=64", "config": "x", "error": "OutOfResources"}
    md = markdown([rec, bad], [], {"dtype": "bf16", "triton": "3.6.0", "date": "today"})
    assert "| attn_fwd | D=128 | 128x64 w8 s3 | 199 | 0 | 130.0 | 3 | 2,4 | 1 (registers) |" in md
    assert "error: OutOfResources" in md
