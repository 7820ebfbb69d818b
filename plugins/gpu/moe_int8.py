"""Triton kernels for jamba::moe_int8 (ExpertsInt8 mixture of experts).

The grouped pipeline (the launcher `moe_int8`; TensorRT's split lowering, one kernel per plugin):
1. `moe_route_align_kernel` (one program): router softmax in fp32, top-k without renormalisation
   -> topk_weights [T,k] fp32, topk_ids [T,k] int32; then groups the T*k assignments (a = t*k + j)
   by expert, each expert's list padded to a multiple of BLOCK_M: sorted_ids [n_blocks*BLOCK_M]
   (padding = T*k) and block_expert [n_blocks] (-1 past the end), n_blocks = cdiv(T*k + E*(BLOCK_M-1),
   BLOCK_M), an upper bound that needs no data.
2. `moe_gemm1_kernel`: grouped GEMM over w13 [E,2I,H] int8 — each BLOCK_M block of assignments
   belongs to one expert; gate and up tiles share the activation tile; int8 -> activation dtype
   in registers, fp32 accumulation, per-output-channel scales after the K loop, then
   act = silu(gate) * up in the activation dtype -> act [T*k, I]. Grid (n_blocks, cdiv(I, BLOCK_N)).
3. `moe_gemm2_kernel`: grouped GEMM over w2 [E,H,I] int8, scale after the K loop, times the
   routing weight -> out [T*k, H] fp32, in assignment order (no atomics). Grid (n_blocks, cdiv(H, BLOCK_N)).
4. `moe_combine_kernel`: y[t] = sum_j out[t*k + j] in the activation dtype. Grid (T, cdiv(H, BLOCK_H)).

`moe_int8_fused_kernel` does all of it in one launch, for TensorRT's single-node MoEInt8 plugin
(an AOT plugin launches exactly one kernel and gets no workspace): one program per (token block,
output-column block), routing in registers, looping over the experts its tokens chose. It
recomputes the gate/up GEMM for every output-column block, so it suits decode (few tokens, weight
tiles shared through L2) and is slow for long prefill: use the split lowering there.

Expert groups (`expert_offset`, see export/ops/moe_int8.py): routing always ranks all n_experts
columns of the router logits; the weights hold n_local experts starting at expert_offset. The
GEMM kernels skip blocks of other experts (gemm2 writes zeros for their rows, so every row of
`out` is defined) and the fused kernel loops over its own experts only: y is this group's part."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from jambatrt.plugins.gpu import (TL_TYPES, KernelSpec, Launch, cdiv, check_device, direct, fix_interpreter,
                                  interpreting, next_pow2)
from jambatrt.plugins.registry import implements

if interpreting():
    fix_interpreter()

# Tiles: the int8 weight tiles are dequantised in registers, and with 4 warps or BLOCK_K 64 the
# gate/up (two accumulators) and fused kernels hit the 255-register cap and spilled 100-1600 bytes
# per thread at Jamba's sizes (sm_80 and sm_90, bf16 and fp32). These tiles keep every variant under
# the cap with no stack (`tests/test_kernel_resources.py` compiles and checks them); one set serves
# both activation types. BLOCK_M of gemm1/gemm2 is the route kernel's alignment, which the TensorRT
# split plugins read from here.
DEFAULTS = {
    "route_align": dict(BLOCK_T=128, BLOCK_A=256, num_warps=4),
    "gemm1": dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=3),
    "gemm2": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
    "combine": dict(BLOCK_H=256, num_warps=4),
    "fused": dict(BLOCK_T=16, BLOCK_N=64, BLOCK_I=32, BLOCK_K=32, num_warps=8, num_stages=2),
}


def _stages(kind: str, dtype) -> int:
    # fp32 tiles are twice the bytes: one stage keeps shared memory under 48 KiB (TensorRT's AOT
    # launch does not opt kernels into more)
    return 1 if str(dtype).removeprefix("torch.") == "float32" else DEFAULTS[kind]["num_stages"]


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b; IEEE: exact fp32 products (fp32 activations) instead of TF32."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def moe_route_align_kernel(logits_ptr,
                           n_tokens, n_experts,
                           topk_w_ptr, topk_ids_ptr, sorted_ids_ptr, block_expert_ptr,
                           TOP_K: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr):
    cols = tl.arange(0, E_PAD)
    col_ok = cols < n_experts
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    # 1. routing: softmax (fp32) -> top-k, weights not renormalised
    for t0 in range(0, n_tokens, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < n_tokens
        lg = tl.load(logits_ptr + rows[:, None] * n_experts + cols[None, :],
                     mask=row_ok[:, None] & col_ok[None, :], other=float("-inf")).to(tl.float32)
        lg = tl.where(row_ok[:, None], lg, 0.0)                 # keep padded rows finite
        p = tl.exp(lg - tl.max(lg, axis=1)[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        p = tl.where(col_ok[None, :], p, -1.0)
        for j in tl.static_range(TOP_K):
            best = tl.argmax(p, axis=1)                         # first index on ties
            w = tl.max(p, axis=1)
            tl.store(topk_w_ptr + rows * TOP_K + j, w, mask=row_ok)
            tl.store(topk_ids_ptr + rows * TOP_K + j, best.to(tl.int32), mask=row_ok)
            hit = cols[None, :] == best[:, None]
            counts += tl.sum((hit & row_ok[:, None]).to(tl.int32), axis=0)
            p = tl.where(hit, -1.0, p)
    # 2. each expert's list padded to a multiple of BLOCK_M; exclusive prefix sum = its first slot
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    starts = tl.cumsum(padded, axis=0) - padded
    total = tl.sum(padded, axis=0)
    n_assign = n_tokens * TOP_K
    n_slots = (n_assign + n_experts * (BLOCK_M - 1) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    for s0 in range(0, n_slots, BLOCK_A):
        s = s0 + tl.arange(0, BLOCK_A)
        tl.store(sorted_ids_ptr + s, tl.zeros([BLOCK_A], dtype=tl.int32) + n_assign, mask=s < n_slots)
    tl.debug_barrier()   # the ids written above are read back below by other threads
    # 3. stable counting sort of the assignments by expert
    running = tl.zeros([E_PAD], dtype=tl.int32)
    for a0 in range(0, n_assign, BLOCK_A):
        a = a0 + tl.arange(0, BLOCK_A)
        a_ok = a < n_assign
        e = tl.load(topk_ids_ptr + a, mask=a_ok, other=-1)
        onehot = (cols[None, :] == e[:, None]) & a_ok[:, None]          # [BA,E]
        oh = onehot.to(tl.int32)
        rank = tl.sum(tl.where(onehot, tl.cumsum(oh, axis=0), 0), axis=1) - 1
        base = tl.sum(tl.where(onehot, (starts + running)[None, :], 0), axis=1)
        tl.store(sorted_ids_ptr + base + rank, a.to(tl.int32), mask=a_ok)
        running += tl.sum(oh, axis=0)
    # 4. the expert of every BLOCK_M block (-1 past the used slots)
    n_blocks = n_slots // BLOCK_M
    for b0 in range(0, n_blocks, BLOCK_A):
        blk = b0 + tl.arange(0, BLOCK_A)
        first = blk * BLOCK_M
        inside = (first[:, None] >= starts[None, :]) & (first[:, None] < (starts + padded)[None, :])
        owner = tl.sum(tl.where(inside, cols[None, :], 0), axis=1)
        owner = tl.where(first < total, owner, -1)
        tl.store(block_expert_ptr + blk, owner.to(tl.int32), mask=blk < n_blocks)


@triton.jit
def moe_gemm1_kernel(x_ptr, w13_ptr, s13_ptr, sorted_ids_ptr, block_expert_ptr,
                     n_assign, hidden, inter, expert_offset, n_local,
                     act_ptr,
                     TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m) - expert_offset                              # index in this group
    if (e >= 0) & (e < n_local):
        rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))       # assignment ids
        row_ok = rows < n_assign
        tok = rows // TOP_K
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                               # columns of I
        n_ok = offs_n < inter
        w_base = w13_ptr + e.to(tl.int64) * inter * 2 * hidden                        # int64: E*2I*H may pass 2^31
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < hidden
            a = tl.load(x_ptr + tok[:, None] * hidden + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            wmask = k_ok[:, None] & n_ok[None, :]
            wg = tl.load(w_base + offs_n[None, :] * hidden + offs_k[:, None], mask=wmask, other=0).to(a.dtype)
            wu = tl.load(w_base + (offs_n + inter)[None, :] * hidden + offs_k[:, None], mask=wmask, other=0).to(a.dtype)
            acc_g = _dot(a, wg, acc_g, IEEE)
            acc_u = _dot(a, wu, acc_u, IEEE)
        s_base = s13_ptr + e * 2 * inter
        g = acc_g * tl.load(s_base + offs_n, mask=n_ok, other=0.0)[None, :]
        u = acc_u * tl.load(s_base + inter + offs_n, mask=n_ok, other=0.0)[None, :]
        act = _silu(g) * u
        tl.store(act_ptr + rows[:, None] * inter + offs_n[None, :], act.to(act_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def moe_gemm2_kernel(act_ptr, w2_ptr, s2_ptr, sorted_ids_ptr, block_expert_ptr, topk_w_ptr,
                     n_assign, hidden, inter, expert_offset, n_local,
                     out_ptr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e_all = tl.load(block_expert_ptr + pid_m)
    if e_all >= 0:
        e = e_all - expert_offset                                                      # index in this group
        rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = rows < n_assign
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                               # columns of H
        n_ok = offs_n < hidden
        out = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)                           # other groups' rows: 0
        if (e >= 0) & (e < n_local):
            w_base = w2_ptr + e.to(tl.int64) * hidden * inter
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, inter, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < inter
                a = tl.load(act_ptr + rows[:, None] * inter + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                            other=0.0)
                w = tl.load(w_base + offs_n[None, :] * inter + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :],
                            other=0).to(a.dtype)
                acc = _dot(a, w, acc, IEEE)
            scale = tl.load(s2_ptr + e * hidden + offs_n, mask=n_ok, other=0.0)
            weight = tl.load(topk_w_ptr + rows, mask=row_ok, other=0.0)
            out = acc * scale[None, :] * weight[:, None]
        tl.store(out_ptr + rows[:, None] * hidden + offs_n[None, :], out, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def moe_combine_kernel(out_ptr,
                       n_tokens, hidden,
                       y_ptr,
                       TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs < hidden
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(out_ptr + (t * TOP_K + j) * hidden + offs, mask=ok, other=0.0)
    tl.store(y_ptr + t * hidden + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def moe_int8_fused_kernel(x_ptr, logits_ptr, w13_ptr, s13_ptr, w2_ptr, s2_ptr,
                          n_tokens, hidden, inter, n_experts, expert_offset, n_local,
                          y_ptr,
                          TOP_K: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_tokens
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    cols = tl.arange(0, E_PAD)
    col_ok = cols < n_experts
    # routing in registers: weight of expert e for token t, 0 where not chosen
    lg = tl.load(logits_ptr + rows[:, None] * n_experts + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                 other=float("-inf")).to(tl.float32)
    lg = tl.where(row_ok[:, None], lg, 0.0)
    p = tl.exp(lg - tl.max(lg, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    p = tl.where(col_ok[None, :], p, -1.0)
    chosen = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32)
    picked = tl.zeros([BLOCK_T, E_PAD], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(p, axis=1)
        hit = cols[None, :] == best[:, None]
        chosen = tl.where(hit, tl.max(p, axis=1)[:, None], chosen)
        picked = tl.where(hit & row_ok[:, None], 1, picked)
        p = tl.where(hit, -1.0, p)
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for e in range(0, n_local):                                                       # this group's experts
        sel = tl.sum(tl.where(cols[None, :] == e + expert_offset, picked, 0), axis=1) > 0     # [BT]
        if tl.sum(sel.to(tl.int32), axis=0) > 0:
            we = tl.sum(tl.where(cols[None, :] == e + expert_offset, chosen, 0.0), axis=1)
            e64 = tl.cast(e, tl.int64)   # the loop index is a plain int under the interpreter
            w13_base = w13_ptr + e64 * inter * 2 * hidden
            w2_base = w2_ptr + e64 * hidden * inter
            acc_e = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
            for i0 in range(0, inter, BLOCK_I):
                offs_i = i0 + tl.arange(0, BLOCK_I)
                i_ok = offs_i < inter
                g = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.float32)
                u = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.float32)
                for k0 in range(0, hidden, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    k_ok = offs_k < hidden
                    a = tl.load(x_ptr + rows[:, None] * hidden + offs_k[None, :], mask=sel[:, None] & k_ok[None, :],
                                other=0.0)
                    wmask = k_ok[:, None] & i_ok[None, :]
                    wg = tl.load(w13_base + offs_i[None, :] * hidden + offs_k[:, None], mask=wmask, other=0).to(a.dtype)
                    wu = tl.load(w13_base + (offs_i + inter)[None, :] * hidden + offs_k[:, None], mask=wmask,
                                 other=0).to(a.dtype)
                    g = _dot(a, wg, g, IEEE)
                    u = _dot(a, wu, u, IEEE)
                g = g * tl.load(s13_ptr + e * 2 * inter + offs_i, mask=i_ok, other=0.0)[None, :]
                u = u * tl.load(s13_ptr + e * 2 * inter + inter + offs_i, mask=i_ok, other=0.0)[None, :]
                act = (_silu(g) * u).to(y_ptr.dtype.element_ty)
                w2 = tl.load(w2_base + offs_n[None, :] * inter + offs_i[:, None], mask=i_ok[:, None] & n_ok[None, :],
                             other=0).to(act.dtype)
                acc_e = _dot(act, w2, acc_e, IEEE)
            s2 = tl.load(s2_ptr + e * hidden + offs_n, mask=n_ok, other=0.0)
            acc += acc_e * s2[None, :] * we[:, None]
    tl.store(y_ptr + rows[:, None] * hidden + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


# ---- launchers ---------------------------------------------------------------------------------
def n_blocks(n_tokens, top_k: int, n_experts: int, block_m: int, cdiv=cdiv):
    """Upper bound on the BLOCK_M blocks of the expert-grouped assignments (no data needed)."""
    return cdiv(n_tokens * top_k + n_experts * (block_m - 1), block_m)


def route_align_launch(T, E: int, top_k: int, block_m: int | None = None) -> Launch:
    """The launch of `moe_route_align_kernel` for router_logits [T,E] (E and top_k set constexprs)."""
    cfg = DEFAULTS["route_align"]
    return Launch("moe_route_align_kernel", (1, 1, 1), (T, E),
                  dict(TOP_K=top_k, E_PAD=next_pow2(E), BLOCK_M=block_m or DEFAULTS["gemm1"]["BLOCK_M"],
                       BLOCK_T=cfg["BLOCK_T"], BLOCK_A=cfg["BLOCK_A"]), cfg["num_warps"])


def grouped_up_launch(n_blocks, n_assign, H, I, expert_offset, G, *, top_k: int, dtype: str,
                      block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                      cdiv=cdiv) -> Launch:
    """The launch of `moe_gemm1_kernel`: n_blocks BLOCK_M blocks of the n_assign = T*k assignments,
    x [T,H], w13 [G,2I,H] of experts expert_offset.. (top_k and the activation dtype set constexprs)."""
    c = DEFAULTS["gemm1"]
    bn = block_n or c["BLOCK_N"]
    return Launch("moe_gemm1_kernel", (n_blocks, cdiv(I, bn), 1), (n_assign, H, I, expert_offset, G),
                  dict(TOP_K=top_k, BLOCK_M=block_m or c["BLOCK_M"], BLOCK_N=bn, BLOCK_K=block_k or c["BLOCK_K"],
                       IEEE=dtype == "float32"), c["num_warps"], _stages("gemm1", dtype))


def grouped_down_launch(n_blocks, n_assign, H, I, expert_offset, G, *, dtype: str, block_m: int | None = None,
                        block_n: int | None = None, block_k: int | None = None, cdiv=cdiv) -> Launch:
    """The launch of `moe_gemm2_kernel`: act [n_assign, I], w2 [G,H,I] of experts expert_offset.."""
    c = DEFAULTS["gemm2"]
    bn = block_n or c["BLOCK_N"]
    return Launch("moe_gemm2_kernel", (n_blocks, cdiv(H, bn), 1), (n_assign, H, I, expert_offset, G),
                  dict(BLOCK_M=block_m or c["BLOCK_M"], BLOCK_N=bn, BLOCK_K=block_k or c["BLOCK_K"],
                       IEEE=dtype == "float32"), c["num_warps"], _stages("gemm2", dtype))


def combine_launch(T, H, *, top_k: int, cdiv=cdiv) -> Launch:
    """The launch of `moe_combine_kernel`: out [T*k, H] fp32 -> y [T,H]."""
    c = DEFAULTS["combine"]
    return Launch("moe_combine_kernel", (T, cdiv(H, c["BLOCK_H"]), 1), (T, H),
                  dict(TOP_K=top_k, BLOCK_H=c["BLOCK_H"]), c["num_warps"])


def fused_launch(T, H, I, E: int, expert_offset, G, *, top_k: int, dtype: str, block_t: int | None = None,
                 block_n: int | None = None, block_i: int | None = None, block_k: int | None = None,
                 cdiv=cdiv) -> Launch:
    """The launch of `moe_int8_fused_kernel`: x [T,H], router_logits [T,E], w13 [G,2I,H], w2 [G,H,I]."""
    c = DEFAULTS["fused"]
    bt, bn = block_t or c["BLOCK_T"], block_n or c["BLOCK_N"]
    return Launch("moe_int8_fused_kernel", (cdiv(T, bt), cdiv(H, bn), 1), (T, H, I, E, expert_offset, G),
                  dict(TOP_K=top_k, E_PAD=next_pow2(E), BLOCK_T=bt, BLOCK_N=bn, BLOCK_I=block_i or c["BLOCK_I"],
                       BLOCK_K=block_k or c["BLOCK_K"], IEEE=dtype == "float32"),
                  c["num_warps"], _stages("fused", dtype))


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


# Every launcher below takes `launch`: how to launch a kernel -- `direct` (the default), or
# torch.library.wrap_triton for the traceable twin Inductor compiles.
def route_align(router_logits: torch.Tensor, top_k: int, block_m: int | None = None, *, launch=direct):
    """-> (topk_weights [T,k] fp32, topk_ids [T,k] int32, sorted_ids [n_blocks*BM] int32, block_expert [n_blocks])."""
    T, E = router_logits.shape
    plan = route_align_launch(T, E, top_k, block_m)
    bm = plan.constexprs["BLOCK_M"]
    nb = n_blocks(T, top_k, E, bm)
    dev = router_logits.device
    topk_w = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    topk_ids = torch.empty(T, top_k, dtype=torch.int32, device=dev)
    sorted_ids = torch.empty(nb * bm, dtype=torch.int32, device=dev)
    block_expert = torch.empty(nb, dtype=torch.int32, device=dev)
    launch(moe_route_align_kernel)[plan.grid](router_logits.contiguous(), *plan.extras, topk_w, topk_ids, sorted_ids,
                                              block_expert, **plan.options())
    return topk_w, topk_ids, sorted_ids, block_expert


def grouped_up(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, sorted_ids: torch.Tensor,
               block_expert: torch.Tensor, top_k: int, expert_offset: int = 0, *, block_m: int | None = None,
               block_n: int | None = None, block_k: int | None = None, launch=direct) -> torch.Tensor:
    """Gate/up grouped GEMM + SwiGLU (TensorRT plugin MoEInt8GroupedUp): act [T*k, I] in x.dtype;
    rows of experts outside [expert_offset, expert_offset + w13.shape[0]) are left unwritten."""
    T, H = x.shape
    G, I2, _ = w13.shape
    plan = grouped_up_launch(block_expert.numel(), T * top_k, H, I2 // 2, expert_offset, G, top_k=top_k,
                             dtype=_dtype(x), block_m=block_m, block_n=block_n, block_k=block_k)
    act = x.new_empty(T * top_k, I2 // 2)
    launch(moe_gemm1_kernel)[plan.grid](x.contiguous(), w13.contiguous(), w13_scale.float().contiguous(), sorted_ids,
                                        block_expert, *plan.extras, act, **plan.options())
    return act


def grouped_down(act: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, sorted_ids: torch.Tensor,
                 block_expert: torch.Tensor, topk_weights: torch.Tensor, expert_offset: int = 0, *,
                 block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                 launch=direct) -> torch.Tensor:
    """Down grouped GEMM x routing weight (TensorRT plugin MoEInt8GroupedDown): out [T*k, H] fp32
    in assignment order, zero in the rows of experts outside this group."""
    G, H, I = w2.shape
    plan = grouped_down_launch(block_expert.numel(), act.shape[0], H, I, expert_offset, G, dtype=_dtype(act),
                               block_m=block_m, block_n=block_n, block_k=block_k)
    out = torch.empty(act.shape[0], H, dtype=torch.float32, device=act.device)
    launch(moe_gemm2_kernel)[plan.grid](act.contiguous(), w2.contiguous(), w2_scale.float().contiguous(), sorted_ids,
                                        block_expert, topk_weights.contiguous(), *plan.extras, out, **plan.options())
    return out


def moe_int8(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
             w2: torch.Tensor, w2_scale: torch.Tensor, top_k: int, expert_offset: int = 0, *,
             block_m: int | None = None, block_n: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """Same signature and result as `moe_int8_ref`: x [T,H]; router_logits [T,E]; w13 [G,2I,H] int8;
    w13_scale [G,2I] fp32; w2 [G,H,I] int8; w2_scale [G,H] fp32 (experts expert_offset..+G-1)
    -> y [T,H] x.dtype (grouped pipeline: route/align, up, down, combine)."""
    check_device(x, router_logits, w13, w13_scale, w2, w2_scale)
    return grouped_pipeline(x, router_logits, w13, w13_scale, w2, w2_scale, top_k, expert_offset,
                            block_m=block_m, block_n=block_n, block_k=block_k)


def moe_int8_traceable(x, router_logits, w13, w13_scale, w2, w2_scale, top_k: int, expert_offset: int = 0):
    """`moe_int8` for the compiler: the grouped pipeline, its kernels launched through wrap_triton;
    no device check (no guard on a symbolic size)."""
    from torch.library import wrap_triton
    return grouped_pipeline(x, router_logits, w13, w13_scale, w2, w2_scale, int(top_k), int(expert_offset),
                            launch=wrap_triton)


def grouped_pipeline(x, router_logits, w13, w13_scale, w2, w2_scale, top_k: int, expert_offset: int = 0, *,
                     block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                     launch=direct) -> torch.Tensor:
    """route/align -> gate-up GEMM -> down GEMM -> combine; the buffers between the kernels are sized
    by bounds that need no data (so the traceable twin compiles with dynamic T)."""
    T, H = x.shape
    bm = block_m or DEFAULTS["gemm1"]["BLOCK_M"]
    tiles = dict(block_m=bm, block_n=block_n, block_k=block_k, launch=launch)
    topk_w, _, sorted_ids, block_expert = route_align(router_logits, top_k, bm, launch=launch)
    act = grouped_up(x, w13, w13_scale, sorted_ids, block_expert, top_k, expert_offset, **tiles)
    out = grouped_down(act, w2, w2_scale, sorted_ids, block_expert, topk_w, expert_offset, **tiles)
    y = torch.empty((T, H), dtype=x.dtype, device=x.device)
    plan = combine_launch(T, H, top_k=top_k)
    launch(moe_combine_kernel)[plan.grid](out, *plan.extras, y, **plan.options())
    return y


def moe_int8_fused(x, router_logits, w13, w13_scale, w2, w2_scale, top_k: int, expert_offset: int = 0, *,
                   block_t: int | None = None, block_n: int | None = None, block_i: int | None = None,
                   block_k: int | None = None):
    """`moe_int8` in one launch (TensorRT's MoEInt8 plugin kernel); same signature and result."""
    check_device(x, router_logits, w13, w13_scale, w2, w2_scale)
    T, H = x.shape
    G, I2, _ = w13.shape
    plan = fused_launch(T, H, I2 // 2, router_logits.shape[1], expert_offset, G, top_k=top_k, dtype=_dtype(x),
                        block_t=block_t, block_n=block_n, block_i=block_i, block_k=block_k)
    y = torch.empty_like(x)
    moe_int8_fused_kernel[plan.grid](
        x.contiguous(), router_logits.contiguous(), w13.contiguous(), w13_scale.float().contiguous(),
        w2.contiguous(), w2_scale.float().contiguous(), *plan.extras, y, **plan.options())
    return y


# ---- ahead-of-time description ---------------------------------------------------------------------
_KERNELS = {   # kernel -> (variant name, inputs, extras, outputs, grid, notes)
    "moe_route_align_kernel": (
        "moe_route_align", ("router_logits",), ("n_tokens", "n_experts"),
        ("topk_weights", "topk_ids", "sorted_ids", "block_expert"), "(1, 1, 1)",
        "one program; sorted_ids has cdiv(T*k + E*(BLOCK_M-1), BLOCK_M)*BLOCK_M entries"),
    "moe_gemm1_kernel": (
        "moe_gemm1", ("x", "w13", "w13_scale", "sorted_ids", "block_expert"),
        ("n_assign", "hidden", "inter", "expert_offset", "n_local"), ("act",),
        "(cdiv(n_assign + E*(BLOCK_M-1), BLOCK_M), cdiv(inter, BLOCK_N), 1)",
        "gate+up grouped GEMM, int8 dequantised in registers, SwiGLU"),
    "moe_gemm2_kernel": (
        "moe_gemm2", ("act", "w2", "w2_scale", "sorted_ids", "block_expert", "topk_weights"),
        ("n_assign", "hidden", "inter", "expert_offset", "n_local"), ("out",),
        "(cdiv(n_assign + E*(BLOCK_M-1), BLOCK_M), cdiv(hidden, BLOCK_N), 1)",
        "down grouped GEMM x routing weight, fp32 rows in assignment order"),
    "moe_combine_kernel": (
        "moe_combine", ("out",), ("n_tokens", "hidden"), ("y",), "(n_tokens, cdiv(hidden, BLOCK_H), 1)",
        "sum over the k slots of each token"),
    "moe_int8_fused_kernel": (
        "moe_int8_fused", ("x", "router_logits", "w13", "w13_scale", "w2", "w2_scale"),
        ("n_tokens", "hidden", "inter", "n_experts", "expert_offset", "n_local"), ("y",),
        "(cdiv(n_tokens, BLOCK_T), cdiv(hidden, BLOCK_N), 1)",
        "single launch (TensorRT MoEInt8 plugin); gate/up recomputed per output block"),
}
# pointer parameter -> its dtype: "act" the activation dtype, "logits" the router logits' dtype
_POINTERS = {"x_ptr": "act", "act_ptr": "act", "y_ptr": "act", "logits_ptr": "logits", "w13_ptr": "int8",
             "w2_ptr": "int8", "s13_ptr": "float32", "s2_ptr": "float32", "topk_w_ptr": "float32",
             "out_ptr": "float32", "topk_ids_ptr": "int32", "sorted_ids_ptr": "int32", "block_expert_ptr": "int32"}


def kernel_spec(plan: Launch, dtype: str, logits_dtype: str | None = None) -> KernelSpec:
    """The AOT variant of one launch: activations in `dtype`, router logits in `logits_dtype`
    (default: `dtype`); int8 weights, fp32 scales and routing weights, int32 ids."""
    name, inputs, extras, outputs, grid, notes = _KERNELS[plan.kernel]
    fn = globals()[plan.kernel]
    kinds = {"act": dtype, "logits": logits_dtype or dtype}
    signature = {}
    for p in fn.arg_names:
        if p in plan.constexprs:
            signature[p] = "constexpr"
        elif p in _POINTERS:
            signature[p] = "*" + TL_TYPES[kinds.get(_POINTERS[p], _POINTERS[p])]
        else:
            signature[p] = "i32"
    return KernelSpec(name=f"{name}.{dtype}", op="moe_int8", fn=fn, signature=signature, constexprs=plan.constexprs,
                      num_warps=plan.num_warps, num_stages=plan.num_stages or 1, grid=grid, inputs=inputs,
                      extras=extras, outputs=outputs, notes=notes)


def aot_kernels(dtypes=("bfloat16", "float32"), cfg=None, logits_dtype: str | None = None) -> list[KernelSpec]:
    """Every MoE kernel per dtype at the config's top-k of n experts (Jamba's top-2 of 16 without one)."""
    top_k, E = (cfg.num_experts_per_tok, cfg.num_experts) if cfg is not None else (2, 16)
    return [kernel_spec(plan, dtype, logits_dtype) for dtype in dtypes for plan in (
        route_align_launch(1, E, top_k), grouped_up_launch(1, 1, 1, 1, 0, 1, top_k=top_k, dtype=dtype),
        grouped_down_launch(1, 1, 1, 1, 0, 1, dtype=dtype), combine_launch(1, 1, top_k=top_k),
        fused_launch(1, 1, 1, E, 0, 1, top_k=top_k, dtype=dtype))]


# ---- registered implementations (plugins/registry.py) ------------------------------------------------
implements("moe_int8", "gpu", traceable=moe_int8_traceable,
           kernels=("moe_route_align_kernel", "moe_gemm1_kernel", "moe_gemm2_kernel", "moe_combine_kernel"),
           aot=aot_kernels)(moe_int8)
implements("moe_int8", "gpu", variant=True)(moe_int8_fused)
