"""CPU kernel for the float32 linear layers of the default export on the ORT engine: y = x @ w^T,
w [N,K] float32 as stored (the exporter writes MatMul(x, Transpose(w)); graph/passes/lower_linear_f32.py
makes that `jamba::LinearF32` and the engine maps w from the weight store, so ONNX Runtime neither loads
nor transposes it).

- decode (up to GEMV_MAX_ROWS rows): gemv_int8.c's float32 GEMV (AVX-512 or AVX2 + FMA, native.py),
  the rows of w split over the threads. ONNX Runtime's MatMul streamed the peer preset's 465 MB of
  float32 decode weights at 24.7 GB/s, this kernel at 32.7 (issue 18). Elsewhere (no such CPU, no C
  compiler, JAMBATRT_NATIVE=0) torch's GEMV;
- prefill: on AVX2 CPUs without AVX-512, gemm.c's packed GEMM (linear_int8.native_gemm; AMD Zen 3, the
  peer preset's shapes, interleaved: 0.89-1.08x the time of oneDNN's, 0.93x the float32 peer engine's
  prefill of 512 tokens); elsewhere oneDNN's float32 GEMM through torch on the weights in place
  (`_onednn_linear`), else torch's."""

from __future__ import annotations

import functools

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload

from jambatrt.plugins.cpu import serial_twin
from jambatrt.plugins.cpu.linear_int8 import (_NATIVE_PARTS, _SERIAL_MAX_WEIGHTS, GEMV_MAX_ROWS, _gemm, gemv_int8_into,
                                              native_gemm)
from jambatrt.plugins.cpu.native import call_gemv_f32, gemv_f32_address
from jambatrt.plugins.registry import session_op

_NO_SCALE = np.ones(0, np.float32)      # gemm.c's scale for float32 weights: none


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def _gemv_f32(x, w, out, native):
    """out [M,N] = x [M,K] @ w[N,K]^T through the native kernel at `native`, rows of w in _NATIVE_PARTS
    contiguous ranges over the threads; all float32, C-contiguous. native 0: a numba loop (fastmath lets
    LLVM put the K-long sums in vector lanes)."""
    M, K = x.shape
    N = w.shape[0]
    if native != 0:
        parts = min(N, _NATIVE_PARTS)
        for p in prange(parts):
            call_gemv_f32(native, x, w, p * N // parts, (p + 1) * N // parts, out)
        return
    for n in prange(N):
        for m in range(M):
            acc = np.float32(0.0)
            for k in range(K):
                acc += x[m, k] * w[n, k]
            out[m, n] = acc


_gemv_f32_serial = serial_twin(_gemv_f32, cache=True, fastmath={"reassoc", "contract"})


@njit(inline="always")
def gemv_f32_into(x, w, out, native):
    """`_gemv_f32` from numba code, on the calling thread for matrices under _SERIAL_MAX_WEIGHTS (the
    precondition of linear_int8.gemv_int8_into holds here too)."""
    if w.shape[0] * w.shape[1] < _SERIAL_MAX_WEIGHTS:
        _gemv_f32_serial(x, w, out, native)
    else:
        _gemv_f32(x, w, out, native)


def linear_f32(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [..., K] float32, w [N,K] float32 -> y [..., N] float32 (a new array)."""
    if w.ndim != 2 or w.dtype != np.float32 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"linear_f32: x {list(x.shape)}, w {list(w.shape)} {w.dtype} "
                         "(expected x [..., K], w [N, K] float32)")
    N, K = w.shape
    x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, K)
    native = gemv_f32_address() if x2.shape[0] <= GEMV_MAX_ROWS and w.flags.c_contiguous else 0
    if native:
        out = np.empty((x2.shape[0], N), np.float32)
        (_gemv_f32_serial if N * K < _SERIAL_MAX_WEIGHTS else _gemv_f32)(x2, w, out, native)
    elif w.flags.c_contiguous and (gemm := native_gemm(int8=False))[0]:
        out = np.empty((x2.shape[0], N), np.float32)
        _gemm(x2, w, 1, _NO_SCALE, out, *gemm)
    elif _onednn_linear():
        out = torch.ops.mkldnn._linear_pointwise(torch.from_numpy(x2), torch.from_numpy(w), None, "none", [None],
                                                 "").numpy()
    else:
        out = (torch.from_numpy(x2) @ torch.from_numpy(w).t()).numpy()
    return out.reshape(*x.shape[:-1], N)


@functools.cache
def _onednn_linear() -> bool:
    """Whether torch has oneDNN's linear (torch.ops.mkldnn._linear_pointwise, the kernel torch.compile's CPU
    backend calls) and it computes x @ w^T here: 1.35-1.45x the rate of torch's `x @ w.t()` and ONNX Runtime's
    MatMul at 512 x 1024 x 4096 (AVX-512 Zen 4; issue 18). Elsewhere torch's matmul."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 40, generator=g), torch.randn(9, 40, generator=g)
    try:
        y = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [None], "")
    except (AttributeError, RuntimeError, TypeError):
        return False
    want = x.double() @ w.double().t()
    return y.shape == (7, 9) and bool(((y.double() - want).abs() <= 1e-4 * (x.abs().double() @ w.abs().double().t())).all())


def _linear_shape(x, w, *_):
    return [(*x.shape[:-1], w.shape[0])]


session_op("LinearF32", inputs=("float32", "float32"), out_shapes=_linear_shape)(linear_f32)


@session_op("LinearF32Mapped", inputs=("float32",), attributes={"weights": str},
            out_shapes=lambda x, *_: [(*x.shape[:-1], 0)])
def linear_f32_mapped(x, weights):
    """LinearF32 whose w the engine mapped from the store and bound under `weights`."""
    from jambatrt.plugins.cpu.ort_ops import bound_weights
    (w,), _ = bound_weights(weights)
    return linear_f32(x, w)


def gemv_into(x, w, scale, out, native8, native32):
    """out [M,N] = x [M,K] @ w [N,K]^T, times scale [N] when w is int8 (linear_int8's GEMV at the
    native kernel `native8`) or plain for float32 w (`_gemv_f32` at `native32`; scale is not read):
    one call for numba code that runs on either kind of weights (the decode step of an artifact with or
    without --weights-int8). Numba code only."""
    raise TypeError("gemv_into is called from numba code")


@overload(gemv_into)
def _gemv_into(x, w, scale, out, native8, native32):
    if isinstance(w, types.Array) and w.dtype == types.int8:
        return lambda x, w, scale, out, native8, native32: gemv_int8_into(x, w, scale, out, native8)
    if isinstance(w, types.Array) and w.dtype == types.float32:
        return lambda x, w, scale, out, native8, native32: gemv_f32_into(x, w, out, native32)
    return None
