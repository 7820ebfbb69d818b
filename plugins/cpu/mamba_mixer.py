"""The ORT engine's fused Mamba mixer of --weights-int8 artifacts: one session op per layer for what
the exported graph writes as ~22 nodes (five LinearInt8, the causal conv, the scan, three RMSNorms,
six transposes, two splits; graph/passes/fuse_mamba_mixer.py finds them). The math is
export/model.py's MambaMixer, composed of this package's kernels:

    x, z  = split(in_proj(h))                   [B,D,L] each
    x, cs = causal_conv1d(x, conv_w, conv_b, cs)
    dt, B, C = split(x_proj(x))                 then an RMSNorm each (weights dt/b/c_norm, eps)
    y, ss = selective_scan(x, dt_proj(dt), A, B, C, D, z, dt_bias, ss)
    out   = out_proj(y)

A decode step (L = 1) runs whole in one numba call (`_mixer_step`), which calls the same kernels
(the GEMVs, `_conv_step_kernel`, and mamba_step.c's scan step on AVX-512 or AVX2 CPUs, `_step_kernel`
elsewhere): the ~21 ONNX Runtime nodes and six Python op calls a layer costs in between (each run
with the caches just flushed by the weights streaming through) are what it saves. The ORT engine's
native decode step (decode_step.py) calls `_mixer_step` too, for int8 or float32 weights. Longer
chunks call the kernels from Python (their time is the GEMMs'), time-major: the conv reads in_proj's
output where it lies, the scan (mamba_step.c's chunk scan on AVX-512) reads the rows as they are, no
copies in between."""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from jambatrt.graph.passes.fuse_mamba_mixer import PARAMS, WEIGHTS
from jambatrt.plugins.cpu.causal_conv1d import _conv_kernel_tl, _conv_step_kernel
from jambatrt.plugins.cpu.linear_f32 import gemv_into
from jambatrt.plugins.cpu.linear_int8 import linear_int8
from jambatrt.plugins.cpu.native import call_native, gemv_int8_address, scan_chunk_address, scan_step_address
from jambatrt.plugins.cpu.selective_scan import (_SERIAL_MAX_UPDATES, _scan_kernel, _scan_kernel_serial,
                                                 _step_kernel, _step_kernel_serial)
from jambatrt.plugins.registry import session_op

_SCAN_CHANNELS = 512     # channels per job of the native scan step: D 2048 is four jobs on numba's threads



@njit(inline="always")
def _rms_norm_into(x, w, eps, out):
    """out = x / sqrt(mean(x^2) + eps) * w over the last axis of the rows of x [B, n] (fp32)."""
    B, n = x.shape
    for b in range(B):
        ss = np.float32(0.0)
        for i in range(n):
            ss += x[b, i] * x[b, i]
        r = np.sqrt(ss / np.float32(n) + eps)
        for i in range(n):
            out[b, i] = x[b, i] / r * w[i]


@njit(inline="always")
def _channel_job(job, parts, D):
    """Job `job` of the scans' split (parts ranges of _SCAN_CHANNELS channels a sequence): its sequence and
    channel range [d0, d1)."""
    d0 = (job % parts) * _SCAN_CHANNELS
    return job // parts, d0, min(D, d0 + _SCAN_CHANNELS)


@njit(cache=True, parallel=True)
def _scan_step_native(u, delta, A, Bm, Cm, Dskip, z, dt_bias, h0, y, h_out, address):
    """mamba_step.c's scan step (d_state 16) at `address` over the sequences and ranges of _SCAN_CHANNELS
    channels, on numba's threads; arrays as `_step_kernel` takes them, C-contiguous float32."""
    Bsz, D, _ = u.shape
    parts = (D + _SCAN_CHANNELS - 1) // _SCAN_CHANNELS
    for job in prange(Bsz * parts):
        b, d0, d1 = _channel_job(job, parts, D)
        r, s = b * D * 4, b * D * 16 * 4          # byte offsets of sequence b's rows: [D] and [D, 16]
        call_native(address, (u.ctypes.data + r, delta.ctypes.data + r, A.ctypes.data, Bm.ctypes.data + b * 64,
                              Cm.ctypes.data + b * 64, Dskip.ctypes.data, z.ctypes.data + r, 1, dt_bias.ctypes.data,
                              h0.ctypes.data + s, y.ctypes.data + r, h_out.ctypes.data + s, d0, d1))


@njit(cache=True, parallel=True)
def _scan_chunk_native(u, delta, xz, Bm, Cm, A, Dskip, dt_bias, h0, y, h_out, address):
    """mamba_step.c's prefill-chunk scan (d_state 16) at `address` over the sequences and ranges of
    _SCAN_CHANNELS channels, on numba's threads. Time-major, C-contiguous float32: u, delta, y [B,L,D];
    z is channels D.. of xz [B,L,2D]; Bm, Cm [B,L,16]; A [D,16]; h0, h_out [B,D,16]."""
    Bsz, L, D = u.shape
    parts = (D + _SCAN_CHANNELS - 1) // _SCAN_CHANNELS
    for job in prange(Bsz * parts):
        b, d0, d1 = _channel_job(job, parts, D)
        r, s, bc = b * L * D * 4, b * D * 16 * 4, b * L * 16 * 4     # byte offsets of sequence b
        call_native(address, (u.ctypes.data + r, D, delta.ctypes.data + r, D, xz.ctypes.data + 2 * r + D * 4, 2 * D,
                              Bm.ctypes.data + bc, Cm.ctypes.data + bc, 16, A.ctypes.data, Dskip.ctypes.data,
                              dt_bias.ctypes.data, h0.ctypes.data + s, y.ctypes.data + r, D, h_out.ctypes.data + s,
                              L, d0, d1))


@njit(cache=True, error_model="numpy")
def _mixer_step(h, conv_state, ssm_state, conv_w, conv_b, A, Dskip, dt_bias, dt_norm, b_norm, c_norm,
                in_w, in_s, x_w, x_s, dt_w, dt_s, out_w, out_s, eps, y, conv_out, ssm_out, natives, in_b=None,
                out_b=None):
    """One token of B sequences: h [B,H] -> y [B,H]; conv_state -> conv_out [B,D,K-1], ssm_state ->
    ssm_out [B,D,N]. All float32, C-contiguous; the weights int8 with their scales, or float32 (their scales
    not read): linear_f32.gemv_into. natives: the native kernels' addresses (0: none), (int8 GEMV, float32
    GEMV, scan step: mamba_step.c, taken for d_state 16).
    in_b [2D], out_b [H]: in_proj's and out_proj's biases (Jamba's mamba_proj_bias), or None."""
    B = h.shape[0]
    D, N = A.shape
    R = dt_w.shape[1]
    xz = np.empty((B, 2 * D), np.float32)
    gemv_into(h, in_w, in_s, xz, natives[0], natives[1])
    if in_b is not None:
        xz += in_b
    xs = np.empty((B, D, 1), np.float32)
    z = np.empty((B, D, 1), np.float32)
    for b in range(B):
        for d in range(D):
            xs[b, d, 0] = xz[b, d]
            z[b, d, 0] = xz[b, D + d]
    xc = np.empty((B, D, 1), np.float32)
    _conv_step_kernel(xs, conv_w, conv_b, conv_state, xc, conv_out)
    xdbl = np.empty((B, R + 2 * N), np.float32)
    gemv_into(xc.reshape(B, D), x_w, x_s, xdbl, natives[0], natives[1])
    dtn = np.empty((B, R), np.float32)
    Bm = np.empty((B, N), np.float32)
    Cm = np.empty((B, N), np.float32)
    _rms_norm_into(xdbl[:, :R], dt_norm, eps, dtn)
    _rms_norm_into(xdbl[:, R:R + N], b_norm, eps, Bm)
    _rms_norm_into(xdbl[:, R + N:], c_norm, eps, Cm)
    delta = np.empty((B, D), np.float32)
    gemv_into(dtn, dt_w, dt_s, delta, natives[0], natives[1])
    ys = np.empty((B, D, 1), np.float32)
    args = (xc, delta.reshape(B, D, 1), A, Bm.reshape(B, N, 1), Cm.reshape(B, N, 1), Dskip, z, True, dt_bias,
            ssm_state, ys, ssm_out)
    if natives[2] != 0 and N == 16:
        _scan_step_native(xc, delta.reshape(B, D, 1), A, Bm, Cm, Dskip, z, dt_bias, ssm_state, ys, ssm_out, natives[2])
    elif B * D * N <= _SERIAL_MAX_UPDATES:
        _step_kernel_serial(*args)
    else:
        _step_kernel(*args)
    gemv_into(ys.reshape(B, D), out_w, out_s, y, natives[0], natives[1])
    if out_b is not None:
        y += out_b


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * w


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def mamba_mixer_int8(h, conv_state, ssm_state, conv_weight, conv_bias, A, D, dt_bias, dt_norm, b_norm, c_norm,
                     in_proj, in_proj_scale, x_proj, x_proj_scale, dt_proj, dt_proj_scale, out_proj, out_proj_scale,
                     eps: float, compute: str = "float32") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """h [B,L,H] float32 -> (y [B,L,H], conv_state_out [B,D,K-1], ssm_state_out [B,D,N]), float32.
    conv_weight [D,K], conv_bias, D, dt_bias [D], A [D,N] (= -exp(A_log)), dt/b/c_norm [R]/[N]/[N];
    in_proj [2D,H], x_proj [R+2N,D], dt_proj [D,R], out_proj [H,D] int8 with per-row fp32 scales.
    compute: linear_int8's GEMM precision for in_proj and out_proj over chunks (a decode step is
    float32 throughout)."""
    h, conv_state, ssm_state = _f32(h), _f32(conv_state), _f32(ssm_state)
    Bsz, L, H = h.shape
    Dch, N = A.shape
    R = dt_proj.shape[1]
    K = conv_weight.shape[1]
    shapes = {"conv_state": (conv_state, (Bsz, Dch, K - 1)), "ssm_state": (ssm_state, (Bsz, Dch, N)),
              "in_proj": (in_proj, (2 * Dch, H)), "x_proj": (x_proj, (R + 2 * N, Dch)), "dt_proj": (dt_proj, (Dch, R)),
              "out_proj": (out_proj, (H, Dch)), "conv_weight": (conv_weight, (Dch, K))}
    bad = [f"{n} {list(a.shape)} (expected {list(s)})" for n, (a, s) in shapes.items() if a.shape != s]
    if bad:
        raise ValueError(f"mamba_mixer_int8: {', '.join(bad)}")
    params = [_f32(a) for a in (conv_weight, conv_bias, A, D, dt_bias, dt_norm, b_norm, c_norm)]
    weights = [np.ascontiguousarray(w) if i % 2 == 0 else _f32(w)
               for i, w in enumerate((in_proj, in_proj_scale, x_proj, x_proj_scale, dt_proj, dt_proj_scale,
                                      out_proj, out_proj_scale))]
    if L == 1:
        # _mixer_step calls parallel kernels from compiled code, which does not start numba's threads:
        # without this, a process whose first parallel kernel is one of those crashes (SIGSEGV)
        numba.get_num_threads()
        y = np.empty((Bsz, H), np.float32)
        conv_out = np.empty_like(conv_state)
        ssm_out = np.empty_like(ssm_state)
        _mixer_step(h.reshape(Bsz, H), conv_state, ssm_state, *params, *weights, np.float32(eps), y, conv_out, ssm_out,
                    (gemv_int8_address(), 0, scan_step_address()))
        return y.reshape(Bsz, 1, H), conv_out, ssm_out
    conv_w, conv_b, A, Dskip, dt_b, dt_n, b_n, c_n = params
    in_w, in_s, x_w, x_s, dt_w, dt_s, out_w, out_s = weights
    # Time-major throughout ([B,L,channels], as the linear layers take and give them): the conv reads x from
    # xz; the scan is mamba_step.c's chunk scan on AVX-512 (d_state 16), else numba's kernel, whose [B,D,L]
    # arguments may be strided, on transposed views (the seven [B,L,D] <-> [B,D,L] copies this replaces were
    # 8% of the peer preset's int8 prefill; the C scan takes 0.95x the prefill of numba's)
    xz = linear_int8(h, in_w, in_s, compute)                                             # [B,L,2D]
    x = np.empty((Bsz, L, Dch), np.float32)
    conv_out = np.empty_like(conv_state)
    _conv_kernel_tl(xz, 0, np.ascontiguousarray(conv_w.T), conv_b, conv_state, x, conv_out)
    # x_proj and dt_proj (5% of the weights) stay float32: they make the scan's dt, B and C
    xdbl = linear_int8(x, x_w, x_s)                                                      # [B,L,R+2N]
    dt = linear_int8(_rms_norm(xdbl[..., :R], dt_n, eps), dt_w, dt_s)                   # [B,L,D]
    Bm = _rms_norm(xdbl[..., R:R + N], b_n, eps)
    Cm = _rms_norm(xdbl[..., R + N:], c_n, eps)
    y = np.empty((Bsz, L, Dch), np.float32)
    ssm_out = np.empty_like(ssm_state)
    if N == 16 and (address := scan_chunk_address()):
        c = np.ascontiguousarray         # (they are: new arrays of the linear layers and norms)
        _scan_chunk_native(x, c(dt), c(xz), c(Bm), c(Cm), A, Dskip, dt_b, ssm_state, y, ssm_out, address)
    else:
        scan = _scan_kernel_serial if Bsz * Dch * L * N <= _SERIAL_MAX_UPDATES else _scan_kernel
        scan(_tv(x), _tv(dt), A, _tv(Bm), _tv(Cm), Dskip, _tv(xz[..., Dch:]), True, dt_b, ssm_state, _tv(y), ssm_out)
    return linear_int8(y, out_w, out_s, compute), conv_out, ssm_out


def _tv(a: np.ndarray) -> np.ndarray:
    """a [B,X,Y] seen as [B,Y,X] (a view: no copy)."""
    return a.transpose(0, 2, 1)


def _mixer_shapes(h, conv_state, ssm_state, *_):
    return [h.shape, conv_state.shape, ssm_state.shape]


session_op("MambaMixerInt8", inputs=("float32",) * (3 + len(PARAMS)) + ("int8", "float32") * 4,
           outputs=("float32",) * 3, attributes={"eps": float}, out_shapes=_mixer_shapes)(mamba_mixer_int8)


@session_op("MambaMixerInt8Mapped", inputs=("float32",) * (3 + len(PARAMS)), outputs=("float32",) * 3,
            attributes={"eps": float, "weights": str}, out_shapes=_mixer_shapes)
def mamba_mixer_int8_mapped(*inputs, eps, weights):
    """MambaMixerInt8 whose eight int8 weights and scales the engine mapped from the store and bound
    under `weights` (graph/passes/bind_weights.py)."""
    from jambatrt.plugins.cpu.ort_ops import bound_weights
    arrays, compute = bound_weights(weights)
    return mamba_mixer_int8(*inputs, *arrays, eps=eps, compute=compute)
