"""Triton kernels for jamba::selective_scan (prefill) and the one-token state update (decode).

`selective_scan_chunked_kernel`: one program per (block of BLOCK_D channels, sequence); it walks
the sequence in chunks of CHUNK steps. Inside a chunk every (channel, state) pair runs a parallel
prefix scan over time of the affine maps h -> a_t h + b_t (a_t = exp(dt_t A), b_t = dt_t u_t B_t)
with `tl.associative_scan`, then applies the carried chunk-boundary state: h_t = A_t h_0 + B_t.
So the dependent chain is L / CHUNK steps long rather than L, and each step is a
[BLOCK_D, N, CHUNK] tile of independent work. fp32 state in and out; u/delta/z/B/C bf16 or fp32.

`selective_scan_seq_kernel`: the plain recurrence, one time step per loop iteration; with L = 1 it
is the decode-time state update (`selective_state_update`), and it is TensorRT's second tactic.

Both take parameters in TensorRT's order: inputs (u, delta, A, B, C, D, z, delta_bias, state),
int32 extras (dim, seqlen, dstate), outputs (y, state_out). Grid: (cdiv(dim, BLOCK_D), batch)."""

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

INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "state")
EXTRAS = ("dim", "seqlen", "dstate")
OUTPUTS = ("y", "state_out")
# Tiles: a chunk step holds BLOCK_D x N x CHUNK fp32 pairs in registers. At N = 16, 16 x 16 x 16
# with 4 warps compiles to ~168 registers/thread on sm_90 (no spills); 16 x 32 x 16 hits 255.
# validate/gpu_check.py times alternatives on a GPU.
DEFAULTS = {"chunked": dict(BLOCK_D=16, CHUNK=16, num_warps=4), "seq": dict(BLOCK_D=64, num_warps=4)}


@triton.jit
def _affine_combine(a_l, b_l, a_r, b_r):
    # (h -> a_l h + b_l) followed by (h -> a_r h + b_r)
    return a_l * a_r, a_r * b_l + b_r


@triton.jit
def _softplus(x):
    # torch's softplus with threshold 20
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def selective_scan_chunked_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, state_ptr,
        dim, seqlen, dstate,
        y_ptr, state_out_ptr,
        N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
        HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr):
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)          # [BD]
    offs_n = tl.arange(0, N_PAD)                              # [NP]
    offs_t = tl.arange(0, CHUNK)                              # [CH]
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]

    A = tl.load(A_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    Dskip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    sdn = b * dim * dstate + offs_d[:, None] * dstate + offs_n[None, :]     # [BD,NP] offsets into state
    if HAS_STATE:
        h = tl.load(state_ptr + sdn, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)

    row_dl = b * dim * seqlen + offs_d[:, None] * seqlen                   # [BD,1]
    row_nl = b * dstate * seqlen + offs_n[:, None] * seqlen                # [NP,1]
    last = (offs_t == CHUNK - 1)[None, None, :]
    for t0 in range(0, seqlen, CHUNK):
        t = t0 + offs_t
        mask_t = t < seqlen
        m_dt = mask_d[:, None] & mask_t[None, :]                            # [BD,CH]
        m_nt = mask_n[:, None] & mask_t[None, :]                            # [NP,CH]
        u = tl.load(u_ptr + row_dl + t[None, :], mask=m_dt, other=0.0).to(tl.float32)
        dt = tl.load(delta_ptr + row_dl + t[None, :], mask=m_dt, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt = dt + bias[:, None]
        # padded steps get dt = 0: a = 1, b = 0, so they leave the state alone
        dt = tl.where(m_dt, _softplus(dt), 0.0)
        Bt = tl.load(B_ptr + row_nl + t[None, :], mask=m_nt, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + row_nl + t[None, :], mask=m_nt, other=0.0).to(tl.float32)

        a = tl.exp(dt[:, None, :] * A[:, :, None])                          # [BD,NP,CH]
        bx = (dt * u)[:, None, :] * Bt[None, :, :]                          # [BD,NP,CH]
        a_cum, b_cum = tl.associative_scan((a, bx), axis=2, combine_fn=_affine_combine)
        hs = a_cum * h[:, :, None] + b_cum                                  # h_t for every t of the chunk
        y = tl.sum(hs * Ct[None, :, :], axis=1) + Dskip[:, None] * u        # [BD,CH]
        if HAS_Z:
            z = tl.load(z_ptr + row_dl + t[None, :], mask=m_dt, other=0.0).to(tl.float32)
            y = y * (z * tl.sigmoid(z))
        tl.store(y_ptr + row_dl + t[None, :], y.to(y_ptr.dtype.element_ty), mask=m_dt)
        h = tl.sum(tl.where(last, hs, 0.0), axis=2)                         # carry h_{t0+CHUNK-1}
    tl.store(state_out_ptr + sdn, h, mask=mask_dn)


@triton.jit
def selective_scan_seq_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, state_ptr,
        dim, seqlen, dstate,
        y_ptr, state_out_ptr,
        N_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr):
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, N_PAD)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    Dskip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    sdn = b * dim * dstate + offs_d[:, None] * dstate + offs_n[None, :]
    if HAS_STATE:
        h = tl.load(state_ptr + sdn, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
    row_d = b * dim * seqlen + offs_d * seqlen                              # [BD]
    row_n = b * dstate * seqlen + offs_n * seqlen                           # [NP]
    for t in range(0, seqlen):
        u = tl.load(u_ptr + row_d + t, mask=mask_d, other=0.0).to(tl.float32)
        dt = tl.load(delta_ptr + row_d + t, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt = dt + bias
        dt = _softplus(dt)
        Bt = tl.load(B_ptr + row_n + t, mask=mask_n, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + row_n + t, mask=mask_n, other=0.0).to(tl.float32)
        h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
        y = tl.sum(h * Ct[None, :], axis=1) + Dskip * u
        if HAS_Z:
            z = tl.load(z_ptr + row_d + t, mask=mask_d, other=0.0).to(tl.float32)
            y = y * (z * tl.sigmoid(z))
        tl.store(y_ptr + row_d + t, y.to(y_ptr.dtype.element_ty), mask=mask_d)
    tl.store(state_out_ptr + sdn, h, mask=mask_dn)


# ---- launchers ---------------------------------------------------------------------------------
def selective_scan_launch(B, D, L, N: int, *, kind: str = "chunked", has_z: bool = True, has_bias: bool = True,
                          has_state: bool = True, block_d: int | None = None, chunk: int | None = None,
                          num_warps: int | None = None, cdiv=cdiv) -> Launch:
    """The launch of `selective_scan_<kind>_kernel` for u [B,D,L], A [D,N] (the d_state N sets a
    constexpr: an int; B, D, L may be shape expressions with their `cdiv`)."""
    cfg = DEFAULTS[kind]
    block_d = block_d or cfg["BLOCK_D"]
    constexprs = dict(N_PAD=next_pow2(N), BLOCK_D=block_d)
    if kind == "chunked":
        constexprs["CHUNK"] = chunk or cfg["CHUNK"]
    constexprs.update(HAS_Z=has_z, HAS_BIAS=has_bias, HAS_STATE=has_state)
    return Launch(f"selective_scan_{kind}_kernel", (cdiv(D, block_d), B, 1), (D, L, N), constexprs,
                  num_warps or cfg["num_warps"])


def _selective_scan(u, delta, A, Bm, Cm, Dskip, z=None, delta_bias=None, state=None, *, kind: str = "chunked",
                    block_d=None, chunk=None, num_warps=None, launch=direct):
    """The one launcher of both scan kernels: `launch` is `direct` (eager) or wrap_triton (traceable)."""
    Bsz, D, L = u.shape
    N = A.shape[1]
    c = lambda t: None if t is None else t.contiguous()          # noqa: E731
    u, delta, A, Bm, Cm, Dskip, z, delta_bias, state = map(c, (u, delta, A, Bm, Cm, Dskip, z, delta_bias, state))
    y = torch.empty((Bsz, D, L), dtype=u.dtype, device=u.device)
    state_out = torch.empty((Bsz, D, N), dtype=torch.float32, device=u.device)
    plan = selective_scan_launch(Bsz, D, L, N, kind=kind, has_z=z is not None, has_bias=delta_bias is not None,
                                 has_state=state is not None, block_d=block_d, chunk=chunk, num_warps=num_warps)
    kernel = selective_scan_chunked_kernel if kind == "chunked" else selective_scan_seq_kernel
    # absent optional inputs get a never-read stand-in (HAS_* is False) that is never an output, so
    # the functionalised kernel call has no input aliasing an output
    launch(kernel)[plan.grid](u, delta, A, Bm, Cm, Dskip, u if z is None else z,
                              Dskip if delta_bias is None else delta_bias, A if state is None else state,
                              *plan.extras, y, state_out, **plan.options())
    return y, state_out


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
                   Dskip: torch.Tensor, z: Optional[torch.Tensor] = None, delta_bias: Optional[torch.Tensor] = None,
                   state: Optional[torch.Tensor] = None, *, block_d: int | None = None, chunk: int | None = None,
                   num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature and result as `selective_scan_ref`: u, delta, z [B,D,L]; A [D,N]; Bm, Cm [B,N,L];
    Dskip, delta_bias [D]; state [B,D,N] fp32 or None -> (y [B,D,L] u.dtype, state [B,D,N] fp32)."""
    check_device(u, delta, A, Bm, Cm, Dskip, z, delta_bias, state)
    return _selective_scan(u, delta, A, Bm, Cm, Dskip, z, delta_bias, state, block_d=block_d, chunk=chunk,
                           num_warps=num_warps)


def selective_scan_traceable(u, delta, A, Bm, Cm, Dskip, z=None, delta_bias=None, state=None):
    """`selective_scan` for the compiler: the chunked kernel (every length) through wrap_triton; no
    device check (no guard on a symbolic size)."""
    from torch.library import wrap_triton
    return _selective_scan(u, delta, A, Bm, Cm, Dskip, z, delta_bias, state, launch=wrap_triton)


def selective_scan_sequential(u, delta, A, Bm, Cm, Dskip, z=None, delta_bias=None, state=None, *,
                              block_d: int | None = None, num_warps: int | None = None):
    """`selective_scan` through the one-step-per-iteration kernel (TensorRT's second tactic)."""
    check_device(u, delta, A, Bm, Cm, Dskip, z, delta_bias, state)
    return _selective_scan(u, delta, A, Bm, Cm, Dskip, z, delta_bias, state, kind="seq", block_d=block_d,
                           num_warps=num_warps)


def selective_state_update(state: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
                           Bm: torch.Tensor, Cm: torch.Tensor, Dskip: torch.Tensor,
                           z: Optional[torch.Tensor] = None, delta_bias: Optional[torch.Tensor] = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode: one token. state [B,D,N] fp32; u, delta, z [B,D]; A [D,N]; Bm, Cm [B,N]; Dskip,
    delta_bias [D] -> (y [B,D] u.dtype, new state [B,D,N] fp32). Equals selective_scan_ref at L = 1."""
    y, h = selective_scan_sequential(u[..., None], delta[..., None], A, Bm[..., None], Cm[..., None], Dskip,
                                     None if z is None else z[..., None], delta_bias, state)
    return y[..., 0], h


# ---- ahead-of-time description ---------------------------------------------------------------------
def kernel_spec(plan: Launch, act_dtype: str) -> KernelSpec:
    """The AOT variant of one launch (what TensorRT's SelectiveScan plugin compiles): activations
    (u, delta, z, B, C, y) in act_dtype; A, D, delta_bias, state fp32."""
    kind = "chunked" if plan.kernel == "selective_scan_chunked_kernel" else "seq"
    fn = selective_scan_chunked_kernel if kind == "chunked" else selective_scan_seq_kernel
    dt = {n: act_dtype for n in ("u", "delta", "B", "C", "z", "y")}
    dt.update({n: "float32" for n in ("A", "D", "delta_bias", "state", "state_out")})
    types = (pointer_types(INPUTS, dt) + ["i32"] * len(EXTRAS) + pointer_types(OUTPUTS, dt)
             + ["constexpr"] * len(plan.constexprs))
    return KernelSpec(
        name=f"selective_scan_{kind}.{act_dtype}", op="selective_scan", fn=fn, signature=named_signature(fn, types),
        constexprs=plan.constexprs, num_warps=plan.num_warps, grid="(cdiv(dim, BLOCK_D), batch, 1)",
        inputs=INPUTS, extras=EXTRAS, outputs=OUTPUTS,
        notes="chunked: parallel scan inside CHUNK-step chunks, state carried across chunks"
              if kind == "chunked" else "sequential over L; L = 1 is the decode state update")


def aot_kernels(act_dtypes=("bfloat16", "float32"), cfg=None) -> list[KernelSpec]:
    """The variants TensorRT's SelectiveScan plugin launches (every input present), at the config's
    d_state (Jamba's 16 without one)."""
    dstate = cfg.mamba_d_state if cfg is not None else 16
    return [kernel_spec(selective_scan_launch(1, 1, 1, dstate, kind=kind), dtype)
            for dtype in act_dtypes for kind in ("chunked", "seq")]


# ---- registered implementations (plugins/registry.py) ------------------------------------------------
implements("selective_scan", "gpu", traceable=selective_scan_traceable, kernels=("selective_scan_chunked_kernel",),
           aot=aot_kernels)(selective_scan)
implements("selective_scan", "gpu", variant=True)(selective_scan_sequential)
implements("selective_scan", "gpu", variant=True)(selective_state_update)
