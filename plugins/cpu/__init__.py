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

import torch

from jambatrt.export.ops import DOMAIN, SPECS
from jambatrt.plugins.registry import has_file, implementation


def np32(t: torch.Tensor | None):
    """Tensor -> float32 C-contiguous numpy array (a zero-copy view when it already is one)."""
    return None if t is None else t.detach().to(torch.float32).contiguous().numpy()


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
