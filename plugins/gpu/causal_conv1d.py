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

from jambatrt.plugins.gpu import (KernelSpec, Launch, cdiv, check_device, direct, fix_interpreter, interpreting,
                                  named_signature, next_pow2, pointer_types)
from jambatrt.plugins.registry import implements

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
def causal_conv1d_launch(B, D, L, K: int, *, has_state: bool = True, block_d: int | None = None,
                         block_l: int | None = None, num_warps: int | None = None, cdiv=cdiv) -> Launch:
    """The launch of `causal_conv1d_kernel` for x [B,D,L], weight [D,K] (K sets constexprs: an int;
    B, D, L may be shape expressions with their `cdiv`)."""
    cfg = DEFAULTS["prefill"]
    block_d, block_l = block_d or cfg["BLOCK_D"], block_l or cfg["BLOCK_L"]
    return Launch("causal_conv1d_kernel", (cdiv(L, block_l), cdiv(D, block_d), B), (D, L),
                  dict(K=K, S_PAD=next_pow2(K - 1), BLOCK_D=block_d, BLOCK_L=block_l, HAS_STATE=has_state),
                  num_warps or cfg["num_warps"])


def causal_conv1d_update_launch(B, D, K: int, *, block_d: int | None = None, num_warps: int | None = None,
                                cdiv=cdiv) -> Launch:
    """The launch of `causal_conv1d_update_kernel` for x [B,D] (one token), weight [D,K]."""
    cfg = DEFAULTS["update"]
    block_d = block_d or cfg["BLOCK_D"]
    return Launch("causal_conv1d_update_kernel", (cdiv(D, block_d), B, 1), (D,),
                  dict(K=K, S_PAD=next_pow2(K - 1), BLOCK_D=block_d), num_warps or cfg["num_warps"])


def _causal_conv1d(x, weight, bias, state=None, *, block_d=None, block_l=None, num_warps=None, launch=direct):
    """The one launcher of the prefill kernel: `launch` is `direct` (eager) or wrap_triton (traceable)."""
    B, D, L = x.shape
    K = weight.shape[1]
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    y = torch.empty((B, D, L), dtype=x.dtype, device=x.device)
    state_out = torch.empty((B, D, K - 1), dtype=x.dtype, device=x.device)
    if K == 1:   # static: a per-channel scale, no state to carry
        return _width_one(x, weight, bias), state_out
    plan = causal_conv1d_launch(B, D, L, K, has_state=state is not None, block_d=block_d, block_l=block_l,
                                num_warps=num_warps)
    # an absent state gets a never-read stand-in (HAS_STATE is False) that is never an output
    launch(causal_conv1d_kernel)[plan.grid](x, weight, bias, weight if state is None else state.contiguous(),
                                            *plan.extras, y, state_out, **plan.options())
    return y, state_out


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, state: Optional[torch.Tensor] = None,
                  *, block_d: int | None = None, block_l: int | None = None, num_warps: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature and result as `causal_conv1d_ref`: x [B,D,L], weight [D,K], bias [D],
    state [B,D,K-1] or None -> (y [B,D,L], state [B,D,K-1]), both x.dtype."""
    check_device(x, weight, bias, state)
    return _causal_conv1d(x, weight, bias, state, block_d=block_d, block_l=block_l, num_warps=num_warps)


def causal_conv1d_traceable(x, weight, bias, state=None):
    """`causal_conv1d` for the compiler: the prefill kernel (every length, K static) through
    wrap_triton; no device check (no guard on a symbolic size)."""
    from torch.library import wrap_triton
    return _causal_conv1d(x, weight, bias, state, launch=wrap_triton)


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
    plan = causal_conv1d_update_launch(B, D, K, block_d=block_d, num_warps=num_warps)
    y = torch.empty_like(x)
    state_out = x.new_empty(B, D, K - 1)
    causal_conv1d_update_kernel[plan.grid](x.contiguous(), weight.contiguous(), bias.contiguous(), state.contiguous(),
                                           *plan.extras, y, state_out, **plan.options())
    return y, state_out


# ---- ahead-of-time description ---------------------------------------------------------------------
def kernel_spec(plan: Launch, dtype: str, weight_dtype: str | None = None) -> KernelSpec:
    """The AOT variant of one launch (every I/O in `dtype`; weight and bias in `weight_dtype`)."""
    dt = {n: dtype for n in ("x", "state", "y", "state_out")}
    dt.update({"weight": weight_dtype or dtype, "bias": weight_dtype or dtype})
    if plan.kernel == "causal_conv1d_kernel":
        fn, name, extras = causal_conv1d_kernel, f"causal_conv1d.{dtype}", EXTRAS
        grid, notes = "(cdiv(seqlen, BLOCK_L), cdiv(dim, BLOCK_D), batch)", "the programs of the first L-block also write state_out"
    else:
        fn, name, extras = causal_conv1d_update_kernel, f"causal_conv1d_update.{dtype}", ("dim",)
        grid, notes = "(cdiv(dim, BLOCK_D), batch, 1)", "decode: one token, x [B,D]"
    types = (pointer_types(INPUTS, dt) + ["i32"] * len(extras) + pointer_types(OUTPUTS, dt)
             + ["constexpr"] * len(plan.constexprs))
    return KernelSpec(name=name, op="causal_conv1d", fn=fn, signature=named_signature(fn, types),
                      constexprs=plan.constexprs, num_warps=plan.num_warps, grid=grid, inputs=INPUTS, extras=extras,
                      outputs=OUTPUTS, notes=notes)


def aot_kernels(dtypes=("bfloat16", "float32"), cfg=None) -> list[KernelSpec]:
    """Prefill and decode variants at the config's conv width (Jamba's 4 without one)."""
    width = cfg.mamba_d_conv if cfg is not None else 4
    return [kernel_spec(plan, dtype) for dtype in dtypes
            for plan in (causal_conv1d_launch(1, 1, 1, width), causal_conv1d_update_launch(1, 1, width))]


# ---- registered implementations (plugins/registry.py) ------------------------------------------------
implements("causal_conv1d", "gpu", traceable=causal_conv1d_traceable, kernels=("causal_conv1d_kernel",),
           aot=aot_kernels)(causal_conv1d)
implements("causal_conv1d", "gpu", variant=True)(causal_conv1d_update)
