"""The one switch between the Triton interpreter (TRITON_INTERPRET=1, the CPU tests) and compiled kernels, and
what the interpreter needs to run the kernels' own loops.

`INTERPRET` is read once, at import, as `triton.jit` reads TRITON_INTERPRET when it decorates a kernel: the
kernels and the launch code around them (tile sizes, device checks) then always agree. Set the variable
before anything imports triton (tests/conftest.py does).

The kernels' loops have bounds that are only known on the device: a count or a run of tile indices loaded
from memory, a vocab range computed from the program id. Compiled, `for i in range(lo, hi)` takes such
scalars directly (and the software pipeliner needs that `for`: it does not pipeline `while` loops). The
interpreter keeps every scalar as a one-element numpy array, and `range()` asks it for `__index__`, which
numpy >= 2.3 refuses for arrays with a dimension. `loop_bound` hands the interpreter the Python int, and
the compiler the scalar itself, so both run the same loop statement and the same loop body. (Without it,
the kernels needed an interpreter-only `while` copy of every loop, and CI never ran the compiled one.)
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency; the plain-torch paths still work
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if triton is not None:

    @triton.jit
    def loop_bound(x, INTERPRET: tl.constexpr):
        """x (a scalar tensor) as a `range` bound: pass the result straight to range(). The branch is
        resolved at compile time: the compiler never sees its body (it is not Triton code), the interpreter
        runs it as plain Python. No assignment there or at the call site: the interpreter turns every
        assigned value back into a tensor."""
        if INTERPRET:
            return x.handle.data.item()
        return x

else:  # pragma: no cover
    loop_bound = None
