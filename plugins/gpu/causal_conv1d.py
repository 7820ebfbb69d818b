"""Triton kernels for jamba::causal_conv1d: depthwise causal convolution + bias + SiLU, carrying
the last K-1 inputs as state.

`causal_conv1d_kernel` (prefill): one program per (block of BLOCK_L steps, block of BLOCK_D
channels, sequence). Input position p = t + k - (K-1) reads x when p >= 0 and the incoming state
(the K-1 inputs before x) when p < 0. The programs of the first L-block also write the new state,
the last K-1 entries of cat(state, x). Grid: (cdiv(seqlen, BLOCK_L), cdiv(dim, BLOCK_D), batch).

`causal_conv1d_update_kernel` (decode): one token per sequence; x [B,D], state [B,D,K-1].
Grid: (cdiv(dim, BLOCK_D), batch).

fp32 accumulation; y and the new state in x's dtype (as the reference: the state is cast to x's
dtype before the convolution). Parameters in TensorRT's order: inputs (x, weight, bias, state),
int32 extras (dim, seqlen), outputs (y, state_out)."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from jambatrt.plugins.gpu import (KernelSpec, check_device, fix_interpreter, interpreting, named_signature, next_pow2,
                                  pointer_types)

if interpreting():
    fix_interpreter()

INPUTS = ("x", "weight", "bias", "state")
EXTRAS = ("dim", "seqlen")
OUTPUTS = ("y", "state_out")
DEFAULTS = {"prefill": dict(BLOCK_D=32, BLOCK_L=32, num_warps=4), "update": dict(BLOCK_D=128, num_warps=4)}


@triton.jit
def causal_conv1d_kernel(x_ptr, w_ptr, bias_ptr, state_ptr,
                         dim, seqlen,
                         y_ptr, state_out_ptr,
                         K: tl.constexpr, S_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
                         HAS_STATE: tl.constexpr):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)                  # [BD]
    offs_t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)                  # [BL]
    mask_d = offs_d < dim
    row_x = b * dim * seqlen + offs_d[:, None] * seqlen                # [BD,1]
    row_s = b * dim * (K - 1) + offs_d[:, None] * (K - 1)              # [BD,1]
    acc = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(K):
        p = offs_t + (k - (K - 1))                                     # input position of tap k
        xv = tl.load(x_ptr + row_x + p[None, :], mask=mask_d[:, None] & ((p >= 0) & (p < seqlen))[None, :],
                     other=0.0).to(tl.float32)
        if HAS_STATE:
            sv = tl.load(state_ptr + row_s + (p + (K - 1))[None, :],
                         mask=mask_d[:, None] & ((p < 0) & (p + (K - 1) >= 0))[None, :], other=0.0)
            xv += sv.to(x_ptr.dtype.element_ty).to(tl.float32)
        wk = tl.load(w_ptr + offs_d * K + k, mask=mask_d, other=0.0).to(tl.float32)
        acc += wk[:, None] * xv
    y = acc * tl.sigmoid(acc)
    tl.store(y_ptr + row_x + offs_t[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask_d[:, None] & (offs_t < seqlen)[None, :])
    if pid_l == 0:
        # new state j = cat(state, x)[seqlen + j], j < K-1
        j = tl.arange(0, S_PAD)
        src = seqlen + j
        from_x = src >= K - 1
        mj = mask_d[:, None] & (j < K - 1)[None, :]
        sx = tl.load(x_ptr + row_x + (src - (K - 1))[None, :], mask=mj & from_x[None, :], other=0.0)
        if HAS_STATE:
            ss = tl.load(state_ptr + row_s + src[None, :], mask=mj & (~from_x)[None, :], other=0.0)
            sx = tl.where(from_x[None, :], sx, ss.to(x_ptr.dtype.element_ty))
        tl.store(state_out_ptr + row_s + j[None, :], sx.to(state_out_ptr.dtype.element_ty), mask=mj)


@triton.jit
def causal_conv1d_update_kernel(x_ptr, w_ptr, bias_ptr, state_ptr,
                                dim,
                                y_ptr, state_out_ptr,
                                K: tl.constexpr, S_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    j = tl.arange(0, S_PAD)
    mj = mask_d[:, None] & (j < K - 1)[None, :]
    row_s = b * dim * (K - 1) + offs_d[:, None] * (K - 1)
    x = tl.load(x_ptr + b * dim + offs_d, mask=mask_d, other=0.0)                         # [BD]
    s = tl.load(state_ptr + row_s + j[None, :], mask=mj, other=0.0).to(x_ptr.dtype.element_ty)   # [BD,S]
    w = tl.load(w_ptr + offs_d[:, None] * K + j[None, :], mask=mj, other=0.0).to(tl.float32)
    w_last = tl.load(w_ptr + offs_d * K + (K - 1), mask=mask_d, other=0.0).to(tl.float32)
    acc = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    acc += tl.sum(w * s.to(tl.float32), axis=1) + w_last * x.to(tl.float32)
    tl.store(y_ptr + b * dim + offs_d, (acc * tl.sigmoid(acc)).to(y_ptr.dtype.element_ty), mask=mask_d)
    # shift left by one: state_out[j] = state[j+1] (j < K-2), x (j = K-2)
    nxt = tl.load(state_ptr + row_s + (j + 1)[None, :], mask=mj & ((j + 1) < K - 1)[None, :], other=0.0)
    nxt = tl.where((j == K - 2)[None, :], x[:, None], nxt.to(x_ptr.dtype.element_ty))
    tl.store(state_out_ptr + row_s + j[None, :], nxt.to(state_out_ptr.dtype.element_ty), mask=mj)


# ---- launchers ---------------------------------------------------------------------------------
def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, state: Optional[torch.Tensor] = None,
                  *, block_d: int | None = None, block_l: int | None = None, num_warps: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature and result as `causal_conv1d_ref`: x [B,D,L], weight [D,K], bias [D],
    state [B,D,K-1] or None -> (y [B,D,L], state [B,D,K-1]), both x.dtype."""
    check_device(x, weight, bias, state)
    B, D, L = x.shape
    K = weight.shape[1]
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    y = torch.empty_like(x)
    state_out = x.new_empty(B, D, K - 1)
    cfg = DEFAULTS["prefill"]
    block_d, block_l = block_d or cfg["BLOCK_D"], block_l or cfg["BLOCK_L"]
    if K == 1:   # no state to carry
        return _width_one(x, weight, bias), state_out
    grid = (triton.cdiv(L, block_l), triton.cdiv(D, block_d), B)
    causal_conv1d_kernel[grid](x, weight, bias, state_out if state is None else state.contiguous(), D, L,
                               y, state_out, K=K, S_PAD=next_pow2(K - 1), BLOCK_D=block_d, BLOCK_L=block_l,
                               HAS_STATE=state is not None, num_warps=num_warps or cfg["num_warps"])
    return y, state_out


def _width_one(x, weight, bias):
    # width-1 "convolution" is a per-channel scale: no kernel needed
    y = x.float() * weight.float()[None, :, :1] + bias.float()[None, :, None]
    return (y * torch.sigmoid(y)).to(x.dtype)


def causal_conv1d_update(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, state: torch.Tensor,
                         *, block_d: int | None = None, num_warps: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode: x [B,D] (one token), weight [D,K], bias [D], state [B,D,K-1] -> (y [B,D], new state
    [B,D,K-1]) in x.dtype. Equals causal_conv1d_ref at L = 1."""
    check_device(x, weight, bias, state)
    B, D = x.shape
    K = weight.shape[1]
    if K < 2:
        raise ValueError("causal_conv1d_update needs a kernel width K >= 2 (a state to carry)")
    cfg = DEFAULTS["update"]
    block_d = block_d or cfg["BLOCK_D"]
    y = torch.empty_like(x)
    state_out = x.new_empty(B, D, K - 1)
    causal_conv1d_update_kernel[(triton.cdiv(D, block_d), B)](
        x.contiguous(), weight.contiguous(), bias.contiguous(), state.contiguous(), D, y, state_out,
        K=K, S_PAD=next_pow2(K - 1), BLOCK_D=block_d, num_warps=num_warps or cfg["num_warps"])
    return y, state_out


# ---- ahead-of-time description ---------------------------------------------------------------------
def signature(dtype: str, weight_dtype: str | None = None, kernel: str = "prefill") -> dict[str, str]:
    dt = {n: dtype for n in ("x", "state", "y", "state_out")}
    dt.update({"weight": weight_dtype or dtype, "bias": weight_dtype or dtype})
    if kernel == "prefill":
        types = pointer_types(INPUTS, dt) + ["i32"] * 2 + pointer_types(OUTPUTS, dt) + ["constexpr"] * 5
        return named_signature(causal_conv1d_kernel, types)
    types = pointer_types(INPUTS, dt) + ["i32"] + pointer_types(OUTPUTS, dt) + ["constexpr"] * 3
    return named_signature(causal_conv1d_update_kernel, types)


def aot_kernels(dtypes=("bfloat16", "float32"), width: int = 4) -> list[KernelSpec]:
    out = []
    for dtype in dtypes:
        cfg = DEFAULTS["prefill"]
        out.append(KernelSpec(
            name=f"causal_conv1d.{dtype}", op="causal_conv1d", fn=causal_conv1d_kernel,
            signature=signature(dtype), num_warps=cfg["num_warps"],
            constexprs=dict(K=width, S_PAD=next_pow2(width - 1), BLOCK_D=cfg["BLOCK_D"], BLOCK_L=cfg["BLOCK_L"],
                            HAS_STATE=True),
            grid="(cdiv(seqlen, BLOCK_L), cdiv(dim, BLOCK_D), batch)", inputs=INPUTS, extras=EXTRAS,
            outputs=OUTPUTS, notes="the programs of the first L-block also write state_out"))
        cfg = DEFAULTS["update"]
        out.append(KernelSpec(
            name=f"causal_conv1d_update.{dtype}", op="causal_conv1d", fn=causal_conv1d_update_kernel,
            signature=signature(dtype, kernel="update"), num_warps=cfg["num_warps"],
            constexprs=dict(K=width, S_PAD=next_pow2(width - 1), BLOCK_D=cfg["BLOCK_D"]),
            grid="(cdiv(dim, BLOCK_D), batch, 1)", inputs=INPUTS, extras=("dim",), outputs=OUTPUTS,
            notes="decode: one token, x [B,D]"))
    return out
