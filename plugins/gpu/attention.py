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

from jambatrt.plugins.gpu import (KernelSpec, check_device, fix_interpreter, interpreting, named_signature, next_pow2,
                                  pointer_types)

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
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: Optional[torch.Tensor] = None,
              past_v: Optional[torch.Tensor] = None, *, block_m: int | None = None, block_n: int | None = None,
              num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same signature and result as `attention_ref`: q [B,L,Hq,d]; k, v [B,L,Hkv,d]; past_k, past_v
    [B,P,Hkv,d] or None -> (o [B,L,Hq,d] q.dtype, present_k, present_v [B,P+L,Hkv,d])."""
    check_device(q, k, v, past_k, past_v)
    B, L, Hq, d = q.shape
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not a multiple of KV heads {Hkv}")
    if past_k is None:
        past_k = k.new_empty(B, 0, Hkv, d)
        past_v = v.new_empty(B, 0, Hkv, d)
    P = past_k.shape[1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    past_k, past_v = past_k.to(k.dtype).contiguous(), past_v.to(v.dtype).contiguous()
    o = torch.empty_like(q)
    present_k = k.new_empty(B, P + L, Hkv, d)
    present_v = v.new_empty(B, P + L, Hkv, d)
    cfg = DEFAULTS_FP32 if q.dtype == torch.float32 else DEFAULTS
    bm, bn = block_m or cfg["BLOCK_M"], block_n or cfg["BLOCK_N"]
    grid = (triton.cdiv(L, bm), B * Hq)
    attention_fwd_kernel[grid](q, k, v, past_k, past_v, L, P, Hq, Hkv, o, present_k, present_v,
                               HEAD_DIM=d, D_PAD=max(16, next_pow2(d)), BLOCK_M=bm, BLOCK_N=bn,
                               IEEE=q.dtype == torch.float32, num_warps=num_warps or cfg["num_warps"],
                               num_stages=cfg["num_stages"])
    return o, present_k, present_v


# ---- ahead-of-time description ---------------------------------------------------------------------
def signature(dtype: str) -> dict[str, str]:
    types = (pointer_types(INPUTS, {n: dtype for n in INPUTS}) + ["i32"] * len(EXTRAS)
             + pointer_types(OUTPUTS, {n: dtype for n in OUTPUTS}) + ["constexpr"] * 5)
    return named_signature(attention_fwd_kernel, types)


def aot_kernels(dtypes=("bfloat16", "float32"), head_dim: int = 128) -> list[KernelSpec]:
    cfg = lambda dtype: DEFAULTS_FP32 if dtype == "float32" else DEFAULTS   # noqa: E731
    return [KernelSpec(
        name=f"attention_fwd.{dtype}", op="attention", fn=attention_fwd_kernel, signature=signature(dtype),
        constexprs=dict(HEAD_DIM=head_dim, D_PAD=max(16, next_pow2(head_dim)), BLOCK_M=cfg(dtype)["BLOCK_M"],
                        BLOCK_N=cfg(dtype)["BLOCK_N"], IEEE=dtype == "float32"),
        num_warps=cfg(dtype)["num_warps"], num_stages=cfg(dtype)["num_stages"],
        grid="(cdiv(seqlen, BLOCK_M), batch * n_heads, 1)", inputs=INPUTS, extras=EXTRAS, outputs=OUTPUTS,
        notes="causal GQA flash attention, past KV offset; also writes present = cat(past, new)")
        for dtype in dtypes]
