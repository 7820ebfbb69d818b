"""The Triton kernels as the CUDA implementation of torch.ops.jamba.*, visible to the compiler.

`register_cuda_kernels()` installs two things per op, and nothing else changes (the schemas, fake
implementations and `<op>_ref` oracles in jambatrt.export.ops, and the CPU implementations):

- eager: `torch.library.register_kernel(op, "cuda", launcher)`, the launchers of
  plugins/gpu/<op>.py, so `torch.ops.jamba.<op>` on CUDA tensors runs the Triton kernels;
- compiler: a FunctionalTensorMode rule, the mechanism `torch.library.triton_op` installs for its
  own ops. When AOTAutograd functionalises a graph for Inductor (torch.compile,
  `torch._inductor.aoti_compile_and_package`) and the op's tensors are on CUDA, the op is replaced
  by `<op>_traceable`: the same kernels launched through `torch.library.wrap_triton`, so Inductor
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
from typing import Iterator, Optional

import torch

from jambatrt.export.ops import DOMAIN, SPECS

_REGISTERED = False
# device types whose ops the compiler rule replaces by the Triton kernels (see trace_cpu_ops_too)
_TRACE_DEVICES = frozenset({"cuda"})


# ---- traceable twins of the launchers ------------------------------------------------------------
def selective_scan_traceable(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor,
                             Cm: torch.Tensor, Dskip: torch.Tensor, z: Optional[torch.Tensor] = None,
                             delta_bias: Optional[torch.Tensor] = None, state: Optional[torch.Tensor] = None,
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """`selective_scan_ref`'s contract through `selective_scan_chunked_kernel`."""
    import triton
    from torch.library import wrap_triton

    from jambatrt.plugins.gpu import next_pow2
    from jambatrt.plugins.gpu import selective_scan as k

    Bsz, D, L = u.shape
    N = A.shape[1]
    u, delta, A, Bm, Cm, Dskip = (t.contiguous() for t in (u, delta, A, Bm, Cm, Dskip))
    z, delta_bias, state = (None if t is None else t.contiguous() for t in (z, delta_bias, state))
    y = torch.empty((Bsz, D, L), dtype=u.dtype, device=u.device)
    state_out = torch.empty((Bsz, D, N), dtype=torch.float32, device=u.device)
    cfg = k.DEFAULTS["chunked"]
    # absent optional inputs get a never-read stand-in (HAS_* is False): never an output, so the
    # functionalised kernel call has no input aliasing an output
    wrap_triton(k.selective_scan_chunked_kernel)[(triton.cdiv(D, cfg["BLOCK_D"]), Bsz, 1)](
        u, delta, A, Bm, Cm, Dskip, u if z is None else z, Dskip if delta_bias is None else delta_bias,
        A if state is None else state, D, L, N, y, state_out,
        N_PAD=next_pow2(N), BLOCK_D=cfg["BLOCK_D"], CHUNK=cfg["CHUNK"], HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, HAS_STATE=state is not None, num_warps=cfg["num_warps"])
    return y, state_out


def causal_conv1d_traceable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            state: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`causal_conv1d_ref`'s contract through `causal_conv1d_kernel`."""
    import triton
    from torch.library import wrap_triton

    from jambatrt.plugins.gpu import causal_conv1d as k
    from jambatrt.plugins.gpu import next_pow2

    B, D, L = x.shape
    K = weight.shape[1]
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    y = torch.empty((B, D, L), dtype=x.dtype, device=x.device)
    state_out = torch.empty((B, D, K - 1), dtype=x.dtype, device=x.device)
    if K == 1:   # static: a per-channel scale, no state to carry
        return k._width_one(x, weight, bias), state_out
    cfg = k.DEFAULTS["prefill"]
    grid = (triton.cdiv(L, cfg["BLOCK_L"]), triton.cdiv(D, cfg["BLOCK_D"]), B)
    wrap_triton(k.causal_conv1d_kernel)[grid](
        x, weight, bias, weight if state is None else state.contiguous(), D, L, y, state_out,
        K=K, S_PAD=next_pow2(K - 1), BLOCK_D=cfg["BLOCK_D"], BLOCK_L=cfg["BLOCK_L"], HAS_STATE=state is not None,
        num_warps=cfg["num_warps"])
    return y, state_out


def attention_traceable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: Optional[torch.Tensor] = None,
                        past_v: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`attention_ref`'s contract through `attention_fwd_kernel` (also writes present = cat(past, new))."""
    import triton
    from torch.library import wrap_triton

    from jambatrt.plugins.gpu import attention as a
    from jambatrt.plugins.gpu import next_pow2

    B, L, Hq, d = q.shape
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not a multiple of KV heads {Hkv}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if past_k is None:
        past_k, past_v = k.new_empty((B, 0, Hkv, d)), v.new_empty((B, 0, Hkv, d))
    past_k, past_v = past_k.to(k.dtype).contiguous(), past_v.to(v.dtype).contiguous()
    P = past_k.shape[1]
    o = torch.empty((B, L, Hq, d), dtype=q.dtype, device=q.device)
    present_k = torch.empty((B, P + L, Hkv, d), dtype=k.dtype, device=k.device)
    present_v = torch.empty((B, P + L, Hkv, d), dtype=v.dtype, device=v.device)
    cfg = a.DEFAULTS_FP32 if q.dtype == torch.float32 else a.DEFAULTS
    grid = (triton.cdiv(L, cfg["BLOCK_M"]), B * Hq, 1)
    wrap_triton(a.attention_fwd_kernel)[grid](
        q, k, v, past_k, past_v, L, P, Hq, Hkv, o, present_k, present_v,
        HEAD_DIM=d, D_PAD=max(16, next_pow2(d)), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        IEEE=q.dtype == torch.float32, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return o, present_k, present_v


def moe_int8_traceable(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
                       w2: torch.Tensor, w2_scale: torch.Tensor, top_k: int, expert_offset: int = 0) -> torch.Tensor:
    """`moe_int8_ref`'s contract through the grouped pipeline (route/align, gate-up GEMM, down GEMM,
    combine): the launcher's own pipeline, its kernels launched through wrap_triton."""
    from torch.library import wrap_triton

    from jambatrt.plugins.gpu import moe_int8 as m
    return m.grouped_pipeline(x, router_logits, w13, w13_scale, w2, w2_scale, int(top_k), int(expert_offset),
                              launch=wrap_triton)


TRACEABLE = {"selective_scan": selective_scan_traceable, "causal_conv1d": causal_conv1d_traceable,
             "moe_int8": moe_int8_traceable, "attention": attention_traceable}
# the Triton kernels each op compiles to through its traceable twin (AOT packages are checked for them)
KERNELS = {"selective_scan": ("selective_scan_chunked_kernel",), "causal_conv1d": ("causal_conv1d_kernel",),
           "attention": ("attention_fwd_kernel",),
           "moe_int8": ("moe_route_align_kernel", "moe_gemm1_kernel", "moe_gemm2_kernel", "moe_combine_kernel")}


def _launchers() -> dict:
    from jambatrt.plugins.gpu import attention, causal_conv1d, moe_int8, selective_scan
    return {"selective_scan": selective_scan.selective_scan, "causal_conv1d": causal_conv1d.causal_conv1d,
            "moe_int8": moe_int8.moe_int8, "attention": attention.attention}


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

    launchers = _launchers()
    if set(launchers) != set(SPECS) or set(TRACEABLE) != set(SPECS):
        raise RuntimeError(f"GPU kernels {sorted(TRACEABLE)} do not match the jamba ops {sorted(SPECS)}")
    for name in SPECS:
        qualname = f"{DOMAIN}::{name}"
        torch.library.register_kernel(qualname, "cuda", launchers[name])
        torch.library.register_torch_dispatch(qualname, FunctionalTensorMode, _functional_rule(TRACEABLE[name]))
    _REGISTERED = True
    return True
