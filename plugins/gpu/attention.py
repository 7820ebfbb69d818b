"""Triton kernel for jamba::attention: causal grouped-query flash attention with a past KV cache.

`attention_fwd_kernel`: one program per (block of BLOCK_M queries, sequence x query head). Query i
sits at absolute position P + i and sees every past key (0 .. P-1) and the new keys 0 .. i; the
program streams key/value blocks with an online softmax (fp32, exp2) and never forms an L x L or
L x (P+L) matrix. The programs of the first query head of each KV group also write present_k/v =
cat(past, new) (each copies its own block of new rows and a strided share of the past rows), so
the op is one launch — what TensorRT's AOT plugin needs.

Parameters in TensorRT's order: inputs (q, k, v, past_k, past_v), int32 extras (seqlen, past,
n_heads, n_kv_heads), outputs (o, present_k, present_v). Layout [B, L, H, d] row-major.
Grid: (cdiv(seqlen, BLOCK_M), batch * n_heads).

On TensorRT the native attention layer (ONNX Attention opset 23 -> IAttention, TensorRT >= 10.14)
takes no past KV and returns one output, so chunked prefill and decode (P > 0) need this kernel;
see plugins/tensorrt/attention.py."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from jambatrt.plugins.gpu import (KernelSpec, Launch, cdiv, check_device, direct, fix_interpreter, interpreting,
                                  named_signature, next_pow2, pointer_types)
from jambatrt.plugins.registry import implements

if interpreting():
    fix_interpreter()

INPUTS = ("q", "k", "v", "past_k", "past_v")
EXTRAS = ("seqlen", "past", "n_heads", "n_kv_heads")
OUTPUTS = ("o", "present_k", "present_v")
# Tiles at head_dim 128 (Jamba): bigger query blocks or 4 warps run out of registers and spill
# (sm_80 and sm_90; `tests/test_kernel_resources.py` compiles and checks every kernel). fp32 tiles
# are twice the bytes and its IEEE dot takes more registers: smaller blocks, and shared memory
# stays under 48 KiB (the most a kernel gets without opting in, which TensorRT's AOT launch
# does not do).
DEFAULTS = dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2)
DEFAULTS_FP32 = dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1)


@triton.jit
def attention_fwd_kernel(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr,
                         seqlen, past, n_heads, n_kv_heads,
                         o_ptr, ok_ptr, ov_ptr,
                         HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    group = n_heads // n_kv_heads
    hk = h // group
    total = past + seqlen
    # Addresses: one scalar base per (tensor, sequence, head) and int32 offsets row * stride + d
    # inside it. Computing the full index per element ((b*L + i)*H + h)*d kept a 64-bit address
    # per element live and spilled at head_dim 128 (hundreds of bytes of stack on sm_80/sm_90).
    q_stride = n_heads * HEAD_DIM                                    # elements between rows of one head
    kv_stride = n_kv_heads * HEAD_DIM
    q_base = (b * seqlen * n_heads + h).to(tl.int64) * HEAD_DIM
    new_base = (b * seqlen * n_kv_heads + hk).to(tl.int64) * HEAD_DIM
    past_base = (b * past * n_kv_heads + hk).to(tl.int64) * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                 # query index within the chunk
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < seqlen
    q = tl.load(q_ptr + q_base + offs_m[:, None] * q_stride + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    qk_scale = 1.4426950408889634 / tl.sqrt(tl.full([], HEAD_DIM, tl.float32))   # d^-0.5, in base 2
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)

    # past keys: all visible to every query of the chunk
    for n0 in range(0, past, BLOCK_N):
        kn = n0 + offs_n
        kn_ok = kn < past
        kt = tl.load(pk_ptr + past_base + kn[None, :] * kv_stride + offs_d[:, None],
                     mask=d_ok[:, None] & kn_ok[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = tl.where(kn_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(pv_ptr + past_base + kn[:, None] * kv_stride + offs_d[None, :],
                    mask=kn_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    # new keys: causal, key j visible to query i when j <= i
    hi = tl.minimum(seqlen, (pid_m + 1) * BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        kn = n0 + offs_n
        kn_ok = kn < seqlen
        kt = tl.load(k_ptr + new_base + kn[None, :] * kv_stride + offs_d[:, None],
                     mask=d_ok[:, None] & kn_ok[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        visible = kn_ok[None, :] & (kn[None, :] <= offs_m[:, None])
        s = tl.where(visible, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + new_base + kn[:, None] * kv_stride + offs_d[None, :],
                    mask=kn_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    o = acc / l_i[:, None]
    tl.store(o_ptr + q_base + offs_m[:, None] * q_stride + offs_d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])

    if h % group == 0:   # one program per KV head writes present = cat(past, new)
        total_base = (b * total * n_kv_heads + hk).to(tl.int64) * HEAD_DIM
        md = m_ok[:, None] & d_ok[None, :]
        rows = offs_m[:, None] * kv_stride + offs_d[None, :]
        dst = total_base + past * kv_stride + rows
        tl.store(ok_ptr + dst, tl.load(k_ptr + new_base + rows, mask=md, other=0.0).to(ok_ptr.dtype.element_ty),
                 mask=md)
        tl.store(ov_ptr + dst, tl.load(v_ptr + new_base + rows, mask=md, other=0.0).to(ov_ptr.dtype.element_ty),
                 mask=md)
        stride = tl.num_programs(0) * BLOCK_M
        for r0 in range(pid_m * BLOCK_M, past, stride):
            r = r0 + tl.arange(0, BLOCK_M)
            mr = (r < past)[:, None] & d_ok[None, :]
            rows = r[:, None] * kv_stride + offs_d[None, :]
            tl.store(ok_ptr + total_base + rows,
                     tl.load(pk_ptr + past_base + rows, mask=mr, other=0.0).to(ok_ptr.dtype.element_ty), mask=mr)
            tl.store(ov_ptr + total_base + rows,
                     tl.load(pv_ptr + past_base + rows, mask=mr, other=0.0).to(ov_ptr.dtype.element_ty), mask=mr)


# ---- launcher ----------------------------------------------------------------------------------
def attention_launch(B, L, Hq, Hkv, d: int, P, *, dtype: str, block_m: int | None = None, block_n: int | None = None,
                     num_warps: int | None = None, cdiv=cdiv) -> Launch:
    """The launch of `attention_fwd_kernel` for q [B,L,Hq,d], k/v [B,L,Hkv,d] after P past tokens, in
    `dtype` (head_dim d sets constexprs: an int; the others may be shape expressions)."""
    cfg = DEFAULTS_FP32 if dtype == "float32" else DEFAULTS
    bm, bn = block_m or cfg["BLOCK_M"], block_n or cfg["BLOCK_N"]
    return Launch("attention_fwd_kernel", (cdiv(L, bm), B * Hq, 1), (L, P, Hq, Hkv),
                  dict(HEAD_DIM=d, D_PAD=max(16, next_pow2(d)), BLOCK_M=bm, BLOCK_N=bn, IEEE=dtype == "float32"),
                  num_warps or cfg["num_warps"], cfg["num_stages"])


def _attention(q, k, v, past_k=None, past_v=None, *, block_m=None, block_n=None, num_warps=None, launch=direct):
    """The one launcher: `launch` is `direct` (eager) or wrap_triton (traceable)."""
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
    plan = attention_launch(B, L, Hq, Hkv, d, P, dtype=str(q.dtype).removeprefix("torch."), block_m=block_m,
                            block_n=block_n, num_warps=num_warps)
    launch(attention_fwd_kernel)[plan.grid](q, k, v, past_k, past_v, *plan.extras, o, present_k, present_v,
                                            **plan.options())
    return o, present_k, present_v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: Optional[torch.Tensor] = None,
              past_v: Optional[torch.Tensor] = None, *, block_m: int | None = None, block_n: int | None = None,
              num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same signature and result as `attention_ref`: q [B,L,Hq,d]; k, v [B,L,Hkv,d]; past_k, past_v
    [B,P,Hkv,d] or None -> (o [B,L,Hq,d] q.dtype, present_k, present_v [B,P+L,Hkv,d])."""
    check_device(q, k, v, past_k, past_v)
    return _attention(q, k, v, past_k, past_v, block_m=block_m, block_n=block_n, num_warps=num_warps)


def attention_traceable(q, k, v, past_k=None, past_v=None):
    """`attention` for the compiler, through wrap_triton; no device check (no guard on a symbolic
    size). Also writes present = cat(past, new)."""
    from torch.library import wrap_triton
    return _attention(q, k, v, past_k, past_v, launch=wrap_triton)


# ---- ahead-of-time description ---------------------------------------------------------------------
def kernel_spec(plan: Launch, dtype: str) -> KernelSpec:
    """The AOT variant of one launch, every I/O in `dtype`."""
    types = (pointer_types(INPUTS, {n: dtype for n in INPUTS}) + ["i32"] * len(EXTRAS)
             + pointer_types(OUTPUTS, {n: dtype for n in OUTPUTS}) + ["constexpr"] * len(plan.constexprs))
    return KernelSpec(
        name=f"attention_fwd.{dtype}", op="attention", fn=attention_fwd_kernel,
        signature=named_signature(attention_fwd_kernel, types), constexprs=plan.constexprs,
        num_warps=plan.num_warps, num_stages=plan.num_stages, grid="(cdiv(seqlen, BLOCK_M), batch * n_heads, 1)",
        inputs=INPUTS, extras=EXTRAS, outputs=OUTPUTS,
        notes="causal GQA flash attention, past KV offset; also writes present = cat(past, new)")


def aot_kernels(dtypes=("bfloat16", "float32"), cfg=None) -> list[KernelSpec]:
    """One variant per dtype at the config's head_dim (Jamba's 128 without one)."""
    head_dim = cfg.head_dim if cfg is not None else 128
    return [kernel_spec(attention_launch(1, 1, 1, 1, head_dim, 0, dtype=dtype), dtype) for dtype in dtypes]


# ---- registered implementations (plugins/registry.py) ------------------------------------------------
implements("attention", "gpu", traceable=attention_traceable, kernels=("attention_fwd_kernel",),
           aot=aot_kernels)(attention)
