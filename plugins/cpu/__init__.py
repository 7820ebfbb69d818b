"""CPU kernels for the jamba:: ops, one file per op (numpy in, numpy out, float32 compute):
selective_scan.py and causal_conv1d.py (numba), moe_int8.py (torch GEMMs / numba int8 GEMV),
attention.py (torch's CPU flash attention). Each op file registers (plugins/registry.py) its
torch-level kernel (target "cpu") and its ONNX Runtime op body (target "ort"), and beside them the
ORT engine's own session ops (`session_op`: linear_int8.py's LinearInt8, the weight-mapped MoE and
linear forms, the in-place KV-cache attention); ort_ops.py declares them all as ONNX Runtime custom
ops.

`register_torch_kernels()` makes the registered kernels the CPU implementation of torch.ops.jamba.*.
The `<op>_ref` oracles in jambatrt.export.ops are plain functions and are never affected."""

from __future__ import annotations

import types

import torch

from jambatrt.export.ops import DOMAIN, SPECS
from jambatrt.plugins.registry import has_file, implementation


def np32(t: torch.Tensor | None):
    """Tensor -> float32 C-contiguous numpy array (a zero-copy view when it already is one)."""
    return None if t is None else t.detach().to(torch.float32).contiguous().numpy()


def serial_twin(kernel, **options):
    """`kernel` (a parallel=True numba dispatcher) compiled to run on the calling thread (prange
    as range), for calls too small to wake numba's threads. Compiled from a copy of its Python
    function under its own name: numba's on-disk cache keys a function by its qualified name and
    signature, not by `parallel`, so a twin of the same function object overwrites, or is loaded as,
    the parallel kernel (numba 0.68: the kernel compiled second ran single-threaded, with no warning)."""
    f = kernel.py_func
    twin = types.FunctionType(f.__code__, f.__globals__, f"{f.__name__}_serial", f.__defaults__, f.__closure__)
    twin.__qualname__, twin.__doc__ = f"{f.__qualname__}_serial", f.__doc__
    from numba import njit
    return njit(**options)(twin)


def _loaded_on_first_call(name: str):
    """The op's registered CPU kernel, its file imported on the op's first call: `import jambatrt`
    registers every op without importing numba (seconds) until a kernel runs."""
    kernel = None

    def run(*args, **kwargs):
        nonlocal kernel
        if kernel is None:
            kernel = implementation("cpu", name).fn
        return kernel(*args, **kwargs)
    run.__name__ = run.__qualname__ = f"{name}_cpu"
    return run


def register_torch_kernels() -> None:
    """Register each op's CPU kernel as the "cpu" implementation of torch.ops.jamba.<op>. Idempotent
    (a second call replaces the same functions). Tensors of any float dtype go in; bfloat16 is
    computed in float32 and cast back, outputs are fresh tensors (never aliases of the inputs)."""
    missing = [name for name in SPECS if not has_file("cpu", name)]
    if missing:
        raise RuntimeError(f"jamba ops without a CPU kernel file (plugins/cpu/<op>.py): {missing}")
    for name in SPECS:
        torch.library.register_kernel(f"{DOMAIN}::{name}", "cpu", _loaded_on_first_call(name))
