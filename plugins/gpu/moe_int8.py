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

from jambatrt.plugins.gpu import TL_TYPES, KernelSpec, check_device, fix_interpreter, interpreting, next_pow2

if interpreting():
    fix_interpreter()

# Tiles: the int8 weight tiles are dequantised in registers, and with 4 warps or BLOCK_K 64 the
# gate/up (two accumulators) and fused kernels hit the 255-register cap and spilled 100-1600 bytes
# per thread at Jamba's sizes (sm_80 and sm_90, bf16 and fp32). These tiles keep every variant under
# the cap with no stack (`tests/test_kernel_resources.py` compiles and checks them); one set serves
# both activation types. BLOCK_M of gemm1/gemm2 is the route kernel's alignment and the TensorRT
# split plugins' (plugins/tensorrt/moe_int8.py BLOCK_M).
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
def n_blocks(n_tokens: int, top_k: int, n_experts: int, block_m: int) -> int:
    """Upper bound on the BLOCK_M blocks of the expert-grouped assignments (no data needed)."""
    return triton.cdiv(n_tokens * top_k + n_experts * (block_m - 1), block_m)


def _direct(kernel):
    return kernel


# Every launcher below takes `launch`: how to launch a kernel -- directly (the default), or
# torch.library.wrap_triton for the traceable twins Inductor compiles (plugins/gpu/torch_ops.py).
def route_align(router_logits: torch.Tensor, top_k: int, block_m: int | None = None, *, launch=_direct):
    """-> (topk_weights [T,k] fp32, topk_ids [T,k] int32, sorted_ids [n_blocks*BM] int32, block_expert [n_blocks])."""
    T, E = router_logits.shape
    cfg = DEFAULTS["route_align"]
    block_m = block_m or DEFAULTS["gemm1"]["BLOCK_M"]
    nb = n_blocks(T, top_k, E, block_m)
    dev = router_logits.device
    topk_w = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    topk_ids = torch.empty(T, top_k, dtype=torch.int32, device=dev)
    sorted_ids = torch.empty(nb * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(nb, dtype=torch.int32, device=dev)
    launch(moe_route_align_kernel)[(1, 1, 1)](router_logits.contiguous(), T, E, topk_w, topk_ids, sorted_ids, block_expert,
                                 TOP_K=top_k, E_PAD=next_pow2(E), BLOCK_M=block_m, BLOCK_T=cfg["BLOCK_T"],
                                 BLOCK_A=cfg["BLOCK_A"], num_warps=cfg["num_warps"])
    return topk_w, topk_ids, sorted_ids, block_expert


def grouped_up(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, sorted_ids: torch.Tensor,
               block_expert: torch.Tensor, top_k: int, expert_offset: int = 0, *, block_m: int | None = None,
               block_n: int | None = None, block_k: int | None = None, launch=_direct) -> torch.Tensor:
    """Gate/up grouped GEMM + SwiGLU (TensorRT plugin MoEInt8GroupedUp): act [T*k, I] in x.dtype;
    rows of experts outside [expert_offset, expert_offset + w13.shape[0]) are left unwritten."""
    c = DEFAULTS["gemm1"]
    T, H = x.shape
    G, I2, _ = w13.shape
    act = x.new_empty(T * top_k, I2 // 2)
    bn = block_n or c["BLOCK_N"]
    launch(moe_gemm1_kernel)[(block_expert.numel(), triton.cdiv(I2 // 2, bn), 1)](
        x.contiguous(), w13.contiguous(), w13_scale.float().contiguous(), sorted_ids, block_expert, T * top_k, H,
        I2 // 2, expert_offset, G, act, TOP_K=top_k, BLOCK_M=block_m or c["BLOCK_M"], BLOCK_N=bn,
        BLOCK_K=block_k or c["BLOCK_K"], IEEE=x.dtype == torch.float32, num_warps=c["num_warps"],
        num_stages=_stages("gemm1", x.dtype))
    return act


def grouped_down(act: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, sorted_ids: torch.Tensor,
                 block_expert: torch.Tensor, topk_weights: torch.Tensor, expert_offset: int = 0, *,
                 block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                 launch=_direct) -> torch.Tensor:
    """Down grouped GEMM x routing weight (TensorRT plugin MoEInt8GroupedDown): out [T*k, H] fp32
    in assignment order, zero in the rows of experts outside this group."""
    c = DEFAULTS["gemm2"]
    G, H, I = w2.shape
    out = torch.empty(act.shape[0], H, dtype=torch.float32, device=act.device)
    bn = block_n or c["BLOCK_N"]
    launch(moe_gemm2_kernel)[(block_expert.numel(), triton.cdiv(H, bn), 1)](
        act.contiguous(), w2.contiguous(), w2_scale.float().contiguous(), sorted_ids, block_expert,
        topk_weights.contiguous(), act.shape[0], H, I, expert_offset, G, out, BLOCK_M=block_m or c["BLOCK_M"],
        BLOCK_N=bn, BLOCK_K=block_k or c["BLOCK_K"], IEEE=act.dtype == torch.float32, num_warps=c["num_warps"],
        num_stages=_stages("gemm2", act.dtype))
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


def grouped_pipeline(x, router_logits, w13, w13_scale, w2, w2_scale, top_k: int, expert_offset: int = 0, *,
                     block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                     launch=_direct) -> torch.Tensor:
    """route/align -> gate-up GEMM -> down GEMM -> combine; the buffers between the kernels are sized
    by bounds that need no data (so the traceable twin compiles with dynamic T)."""
    T, H = x.shape
    cc = DEFAULTS["combine"]
    bm = block_m or DEFAULTS["gemm1"]["BLOCK_M"]
    tiles = dict(block_m=bm, block_n=block_n, block_k=block_k, launch=launch)
    topk_w, _, sorted_ids, block_expert = route_align(router_logits, top_k, bm, launch=launch)
    act = grouped_up(x, w13, w13_scale, sorted_ids, block_expert, top_k, expert_offset, **tiles)
    out = grouped_down(act, w2, w2_scale, sorted_ids, block_expert, topk_w, expert_offset, **tiles)
    y = torch.empty((T, H), dtype=x.dtype, device=x.device)
    launch(moe_combine_kernel)[(T, triton.cdiv(H, cc["BLOCK_H"]), 1)](out, T, H, y, TOP_K=top_k,
                                                                      BLOCK_H=cc["BLOCK_H"], num_warps=cc["num_warps"])
    return y


def moe_int8_fused(x, router_logits, w13, w13_scale, w2, w2_scale, top_k: int, expert_offset: int = 0, *,
                   block_t: int | None = None, block_n: int | None = None, block_i: int | None = None,
                   block_k: int | None = None):
    """`moe_int8` in one launch (TensorRT's MoEInt8 plugin kernel); same signature and result."""
    check_device(x, router_logits, w13, w13_scale, w2, w2_scale)
    T, H = x.shape
    G, I2, _ = w13.shape
    E = router_logits.shape[1]
    cfg = DEFAULTS["fused"]
    bt, bn = block_t or cfg["BLOCK_T"], block_n or cfg["BLOCK_N"]
    y = torch.empty_like(x)
    moe_int8_fused_kernel[(triton.cdiv(T, bt), triton.cdiv(H, bn))](
        x.contiguous(), router_logits.contiguous(), w13.contiguous(), w13_scale.float().contiguous(),
        w2.contiguous(), w2_scale.float().contiguous(), T, H, I2 // 2, E, expert_offset, G, y,
        TOP_K=top_k, E_PAD=next_pow2(E), BLOCK_T=bt, BLOCK_N=bn, BLOCK_I=block_i or cfg["BLOCK_I"],
        BLOCK_K=block_k or cfg["BLOCK_K"], IEEE=x.dtype == torch.float32, num_warps=cfg["num_warps"],
        num_stages=_stages("fused", x.dtype))
    return y


# ---- ahead-of-time description ---------------------------------------------------------------------
def aot_kernels(dtypes=("bfloat16", "float32"), top_k: int = 2, n_experts: int = 16,
                logits_dtype: str | None = None) -> list[KernelSpec]:
    out = []
    f32, i8, i32 = "*fp32", "*i8", "*i32"
    for dtype in dtypes:
        act = "*" + TL_TYPES[dtype]
        lg = "*" + TL_TYPES[logits_dtype or dtype]
        ieee = dtype == "float32"
        c = DEFAULTS["route_align"]
        bm = DEFAULTS["gemm1"]["BLOCK_M"]
        out.append(KernelSpec(
            name=f"moe_route_align.{dtype}", op="moe_int8", fn=moe_route_align_kernel,
            signature={"logits_ptr": lg, "n_tokens": "i32", "n_experts": "i32", "topk_w_ptr": f32,
                       "topk_ids_ptr": i32, "sorted_ids_ptr": i32, "block_expert_ptr": i32,
                       **{k: "constexpr" for k in ("TOP_K", "E_PAD", "BLOCK_M", "BLOCK_T", "BLOCK_A")}},
            constexprs=dict(TOP_K=top_k, E_PAD=next_pow2(n_experts), BLOCK_M=bm, BLOCK_T=c["BLOCK_T"],
                            BLOCK_A=c["BLOCK_A"]),
            num_warps=c["num_warps"], grid="(1, 1, 1)", inputs=("router_logits",), extras=("n_tokens", "n_experts"),
            outputs=("topk_weights", "topk_ids", "sorted_ids", "block_expert"),
            notes="one program; sorted_ids has cdiv(T*k + E*(BLOCK_M-1), BLOCK_M)*BLOCK_M entries"))
        c = DEFAULTS["gemm1"]
        out.append(KernelSpec(
            name=f"moe_gemm1.{dtype}", op="moe_int8", fn=moe_gemm1_kernel,
            signature={"x_ptr": act, "w13_ptr": i8, "s13_ptr": f32, "sorted_ids_ptr": i32, "block_expert_ptr": i32,
                       "n_assign": "i32", "hidden": "i32", "inter": "i32", "expert_offset": "i32", "n_local": "i32",
                       "act_ptr": act,
                       **{k: "constexpr" for k in ("TOP_K", "BLOCK_M", "BLOCK_N", "BLOCK_K", "IEEE")}},
            constexprs=dict(TOP_K=top_k, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], IEEE=ieee),
            num_warps=c["num_warps"], num_stages=_stages("gemm1", dtype),
            grid="(cdiv(n_assign + E*(BLOCK_M-1), BLOCK_M), cdiv(inter, BLOCK_N), 1)",
            inputs=("x", "w13", "w13_scale", "sorted_ids", "block_expert"),
            extras=("n_assign", "hidden", "inter", "expert_offset", "n_local"),
            outputs=("act",), notes="gate+up grouped GEMM, int8 dequantised in registers, SwiGLU"))
        c = DEFAULTS["gemm2"]
        out.append(KernelSpec(
            name=f"moe_gemm2.{dtype}", op="moe_int8", fn=moe_gemm2_kernel,
            signature={"act_ptr": act, "w2_ptr": i8, "s2_ptr": f32, "sorted_ids_ptr": i32, "block_expert_ptr": i32,
                       "topk_w_ptr": f32, "n_assign": "i32", "hidden": "i32", "inter": "i32", "expert_offset": "i32",
                       "n_local": "i32", "out_ptr": f32,
                       **{k: "constexpr" for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "IEEE")}},
            constexprs=dict(BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], IEEE=ieee),
            num_warps=c["num_warps"], num_stages=_stages("gemm2", dtype),
            grid="(cdiv(n_assign + E*(BLOCK_M-1), BLOCK_M), cdiv(hidden, BLOCK_N), 1)",
            inputs=("act", "w2", "w2_scale", "sorted_ids", "block_expert", "topk_weights"),
            extras=("n_assign", "hidden", "inter", "expert_offset", "n_local"), outputs=("out",),
            notes="down grouped GEMM x routing weight, fp32 rows in assignment order"))
        c = DEFAULTS["combine"]
        out.append(KernelSpec(
            name=f"moe_combine.{dtype}", op="moe_int8", fn=moe_combine_kernel,
            signature={"out_ptr": f32, "n_tokens": "i32", "hidden": "i32", "y_ptr": act,
                       "TOP_K": "constexpr", "BLOCK_H": "constexpr"},
            constexprs=dict(TOP_K=top_k, BLOCK_H=c["BLOCK_H"]), num_warps=c["num_warps"],
            grid="(n_tokens, cdiv(hidden, BLOCK_H), 1)", inputs=("out",), extras=("n_tokens", "hidden"),
            outputs=("y",), notes="sum over the k slots of each token"))
        c = DEFAULTS["fused"]
        out.append(KernelSpec(
            name=f"moe_int8_fused.{dtype}", op="moe_int8", fn=moe_int8_fused_kernel,
            signature={"x_ptr": act, "logits_ptr": lg, "w13_ptr": i8, "s13_ptr": f32, "w2_ptr": i8, "s2_ptr": f32,
                       "n_tokens": "i32", "hidden": "i32", "inter": "i32", "n_experts": "i32", "expert_offset": "i32",
                       "n_local": "i32", "y_ptr": act,
                       **{k: "constexpr" for k in ("TOP_K", "E_PAD", "BLOCK_T", "BLOCK_N", "BLOCK_I", "BLOCK_K",
                                                   "IEEE")}},
            constexprs=dict(TOP_K=top_k, E_PAD=next_pow2(n_experts), BLOCK_T=c["BLOCK_T"], BLOCK_N=c["BLOCK_N"],
                            BLOCK_I=c["BLOCK_I"], BLOCK_K=c["BLOCK_K"], IEEE=ieee),
            num_warps=c["num_warps"], num_stages=_stages("fused", dtype),
            grid="(cdiv(n_tokens, BLOCK_T), cdiv(hidden, BLOCK_N), 1)",
            inputs=("x", "router_logits", "w13", "w13_scale", "w2", "w2_scale"),
            extras=("n_tokens", "hidden", "inter", "n_experts", "expert_offset", "n_local"), outputs=("y",),
            notes="single launch (TensorRT MoEInt8 plugin); gate/up recomputed per output block"))
    return out
