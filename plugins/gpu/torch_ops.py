"""The Triton kernels as the CUDA implementation of torch.ops.jamba.*, visible to the compiler.

`register_cuda_kernels()` installs two things per op, and nothing else changes (the schemas, fake
implementations and `<op>_ref` oracles in jambatrt.export.ops, and the CPU implementations):

- eager: `torch.library.register_kernel(op, "cuda", launcher)`, the launcher plugins/gpu/<op>.py
  registers as the op's "gpu" implementation (plugins/registry.py), so `torch.ops.jamba.<op>` on CUDA tensors runs the Triton kernels;
- compiler: a FunctionalTensorMode rule, the mechanism `torch.library.triton_op` installs for its
  own ops. When AOTAutograd functionalises a graph for Inductor (torch.compile,
  `torch._inductor.aoti_compile_and_package`) and the op's tensors are on CUDA, the op is replaced
  by its registered `traceable=` twin `<op>_traceable`: the same kernels launched through `torch.library.wrap_triton`, so Inductor
  sees `triton_kernel_wrapper_functional` nodes and compiles the kernels into its output (an
  AOTInductor package holds their cubins and needs no Python at run time). torch.export leaves the
  op opaque (torch turns `decompose_custom_triton_ops` off while exporting), so program.pt2 and
  model.onnx keep the `jamba::` nodes.

`triton_op` itself is not used because it defines a new op: ours already exist, with the schemas
the ONNX and TensorRT layers share.

The traceable twins take the `<op>_ref` signature and must trace with symbolic shapes: no Python
branch on a sequence, batch or past length (a guard would specialise the compiled program), only on
static sizes (channels, state size, conv width, experts) and on which optional inputs are present.
So each op uses one kernel for every length (the chunked scan, the prefill convolution, the
grouped MoE, the flash attention): each handles L = 1 correctly. Under TRITON_INTERPRET=1 they
also run eagerly on CPU tensors (wrap_triton hands back the interpreted kernel), which is how the
CPU tests check their argument plumbing against `<op>_ref`."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from jambatrt.export.ops import DOMAIN, SPECS

_REGISTERED = False
# device types whose ops the compiler rule replaces by the Triton kernels (see trace_cpu_ops_too)
_TRACE_DEVICES = frozenset({"cuda"})


def traced_kernels() -> dict[str, tuple[str, ...]]:
    """op -> the Triton kernels it compiles to through its traceable twin (AOT packages are checked
    for them): `kernels=` of its registered GPU implementation (plugins/registry.py)."""
    from jambatrt.plugins.registry import implementations
    return {op: tuple(impl.extra["kernels"]) for op, (impl, *_) in implementations("gpu").items()}


# ---- the compiler rule -----------------------------------------------------------------------------
def _decomposition_enabled() -> bool:
    """False while torch.export traces (the op must stay opaque in the ExportedProgram)."""
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:    # older torch: read the flag it toggles
        return bool(getattr(torch._functorch.config, "decompose_custom_triton_ops", True))
    return not custom_triton_ops_decomposition_disabled()


def _functional_rule(traceable):
    def rule(mode, func, types, args, kwargs):
        from torch._subclasses.fake_tensor import FakeTensor
        from torch._subclasses.functional_tensor import FunctionalTensor

        if any(not issubclass(t, (FakeTensor, FunctionalTensor)) and t is not torch.Tensor for t in types):
            return NotImplemented          # a tensor subclass we do not know: let it handle the op
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if not _decomposition_enabled() or not tensors or any(t.device.type not in _TRACE_DEVICES for t in tensors):
            return mode.__torch_dispatch__(func, types, args, kwargs)     # opaque, as without this rule
        with mode:
            return traceable(*args, **kwargs)
    return rule


@contextlib.contextmanager
def trace_cpu_ops_too() -> Iterator[None]:
    """Within this block the compiler rule also replaces ops on CPU tensors by their Triton kernels.
    For checks on a CPU-only host: a CPU build of torch cannot functionalise fake CUDA tensors, so
    the step program is traced on CPU to see what Inductor would get on CUDA (inspect it; it cannot
    be compiled for CPU)."""
    global _TRACE_DEVICES
    saved = _TRACE_DEVICES
    _TRACE_DEVICES = saved | {"cpu"}
    try:
        yield
    finally:
        _TRACE_DEVICES = saved


def cuda_unavailable_reason(require_gpu: bool = True) -> str | None:
    """Why the Triton kernels cannot be registered here, or None when they can."""
    from jambatrt.plugins.gpu import interpreting

    if require_gpu and not torch.cuda.is_available():
        return f"no CUDA GPU visible (torch {torch.__version__})"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'jambatrt[gpu]')"
    if interpreting():
        return "TRITON_INTERPRET=1 is set: interpreted kernels cannot be compiled by Inductor"
    return None


def register_cuda_kernels(require_gpu: bool = True) -> bool:
    """Make the Triton kernels the CUDA implementation of every jamba:: op (eager launchers +
    the compiler rule above). Returns True when they are registered; a no-op returning False where
    there is no CUDA GPU (unless require_gpu=False: tests on CPU trace fake CUDA tensors), no triton,
    or TRITON_INTERPRET=1. Idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return True
    if cuda_unavailable_reason(require_gpu) is not None:
        return False
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    from jambatrt.plugins.registry import implementation
    for name in SPECS:       # LookupError names an op without a GPU implementation
        impl = implementation("gpu", name)
        qualname = f"{DOMAIN}::{name}"
        torch.library.register_kernel(qualname, "cuda", impl.fn)
        torch.library.register_torch_dispatch(qualname, FunctionalTensorMode, _functional_rule(impl.extra["traceable"]))
    _REGISTERED = True
    return True
