"""Software prefetch with the non-temporal hint, for kernels that stream weights read once per step.

A decode step streams every weight once (~186 MB on the peer preset) through the caches, evicting
what the step runs between the kernels: ONNX Runtime's and Python's working set, the small
matrices and activations. `prefetch_rows_nta` asks for the rows a few ahead with PREFETCHNTA,
which keeps them out of the outer caches (on AMD Zen they skip L2, and so the L2-victim L3), so
the rest stays cached. Measured on the int8 peer preset, steps of two kernels interleaved in one
engine (idle machine, 2 cores): the decode step takes 0.93-0.95x the time without it, the GEMVs
alone run at the same rate; 2, 4, 8 or 16 rows ahead are alike."""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

LINE = 64            # bytes per cache line
AHEAD = 4            # rows prefetched ahead of the row being read


@intrinsic
def _prefetch_nta(typingctx, arr, offset):
    """PREFETCHNTA of the byte at `offset` from the start of C-contiguous `arr`'s data."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        addr = builder.gep(builder.bitcast(ary.data, i8p), [args[1]])
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        # (address, read, locality 0 = non-temporal, data cache)
        builder.call(fn, [addr, ir.Constant(i32, 0), ir.Constant(i32, 0), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(arr, types.intp), codegen


@njit(inline="always")
def prefetch_rows_nta(arr, start, nbytes):
    """Prefetch bytes [start, start + nbytes) of C-contiguous `arr`, one hint per cache line."""
    for off in range(start, start + nbytes, LINE):
        _prefetch_nta(arr, off)
