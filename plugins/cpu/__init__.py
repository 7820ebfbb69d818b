"""CPU kernels for the jamba:: ops, one file per op (numpy in, numpy out, float32 compute):
selective_scan.py and causal_conv1d.py (numba), moe_int8.py (torch GEMMs / numba int8 GEMV),
attention.py (torch's CPU flash attention); the last two also have a tensor-level `<op>_torch`.
`register_torch_kernels()` makes them the CPU implementation of torch.ops.jamba.*; ort_ops.py
declares them as ONNX Runtime custom ops.

The `<op>_ref` oracles in jambatrt.export.ops are plain functions and are never affected."""

from __future__ import annotations

import torch

from jambatrt.export.ops import DOMAIN, SPECS


def _np32(t: torch.Tensor | None):
    """Tensor -> float32 C-contiguous numpy array (a zero-copy view when it already is one)."""
    return None if t is None else t.detach().to(torch.float32).contiguous().numpy()


def _selective_scan(u, delta, A, Bm, Cm, Dskip, z=None, delta_bias=None, state=None):
    from jambatrt.plugins.cpu.selective_scan import selective_scan
    y, h = selective_scan(*map(_np32, (u, delta, A, Bm, Cm, Dskip, z, delta_bias, state)))
    return torch.from_numpy(y).to(u.dtype), torch.from_numpy(h)


def _causal_conv1d(x, weight, bias, state=None):
    from jambatrt.plugins.cpu.causal_conv1d import causal_conv1d
    if state is not None:
        state = state.to(x.dtype)          # as the ref: the carried inputs live in x's dtype
    y, s = causal_conv1d(_np32(x), _np32(weight), _np32(bias), _np32(state))
    return torch.from_numpy(y).to(x.dtype), torch.from_numpy(s).to(x.dtype)


def _moe_int8(x, router_logits, w13, w13_scale, w2, w2_scale, top_k, expert_offset=0):
    from jambatrt.plugins.cpu.moe_int8 import moe_int8_torch
    return moe_int8_torch(x, router_logits, w13, w13_scale, w2, w2_scale, int(top_k), int(expert_offset))


def _attention(q, k, v, past_k=None, past_v=None):
    from jambatrt.plugins.cpu.attention import attention_torch
    return attention_torch(q, k, v, past_k, past_v)


TORCH_KERNELS = {"selective_scan": _selective_scan, "causal_conv1d": _causal_conv1d,
                 "moe_int8": _moe_int8, "attention": _attention}


def register_torch_kernels() -> None:
    """Register each kernel as the "cpu" implementation of torch.ops.jamba.<op>. Idempotent (a
    second call replaces the same functions). Tensors of any float dtype go in; bfloat16 is computed
    in float32 and cast back, outputs are fresh tensors (never aliases of the inputs)."""
    if set(TORCH_KERNELS) != set(SPECS):
        raise RuntimeError(f"CPU kernels {sorted(TORCH_KERNELS)} do not match the jamba ops {sorted(SPECS)}")
    for name, fn in TORCH_KERNELS.items():
        torch.library.register_kernel(f"{DOMAIN}::{name}", "cpu", fn)
