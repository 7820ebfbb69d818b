"""CPU kernel for a weight-only int8 linear layer (--weights-int8; `export.model.Int8Linear`):
y = (x @ w^T) * scale, w [N,K] int8, one fp32 scale per output channel, fp32 activations and
accumulation. The ORT pass list lowers Cast(int8) -> Transpose -> MatMul -> Mul(scale) to it
(graph/passes/lower_linear_int8.py); the ORT engine then hands it the weights mapped from the store.

Two regimes, like llama.cpp's CPU matmul (a vector-dot loop for a few rows, a GEMM for many):
- decode (a few rows): `_gemv_int8` reads the int8 weights once (a quarter of the bytes of the
  float32 layer); output channels are split over the threads. On CPUs with AVX512-VNNI or AVX2 it
  runs gemv_int8.c (native.py), which takes x as 31-bit fixed point and sums exact integer products:
  31.5 against 22.3 GB/s for the numba loop, which widens the weights to float32 and accumulates in
  fp32 lanes and was compute-bound at that (AVX512-VNNI, 2 threads, 12 matrices of 16 MB, interleaved;
  reading one byte per cache line: 35.3 GB/s). Decode is bound by the bytes read, so this is where int8 pays;
- prefill (many rows), on CPUs with integer dot products (AVX512-VNNI, AVX-VNNI): each row of x
  becomes 24-bit fixed point, three int8 limbs (x ~ xs * (65536 q0 + 256 q1 + q2)), and one integer
  GEMM (torch._int_mm, oneDNN's VNNI kernel, 4-5x the fp32 GEMM rate here) multiplies the three
  against the int8 weights as stored; the int32 sums are exact, and are combined in int64 and scaled
  in float64. Error <= 1.008 * 2^-24 * max|x_m| * sum_k |w_nk| * scale_n plus one float32 rounding:
  the float32 GEMM's own class (its bound is K * 2^-24 * sum |x w|), at 1.4-1.6x its speed (issue 18).
  On AVX2 CPUs without VNNI (oneDNN's int8 kernels then saturate 16-bit pair sums) and without
  AVX-512 (where oneDNN's float32 GEMM has twice the vector width), gemm.c: a packed float32 GEMM
  that converts the int8 weights as it packs them, fp32 products and sums, the scale on the finished
  sums: 0.80-0.92x the time of the dequantise + torch path on AMD Zen 3 at 512 rows, 0.64-0.71x at 128
  (a MoE expert's share of a 512-token chunk).
  Elsewhere (NaN/inf rows on the limb path, no C compiler, JAMBATRT_NATIVE=0) the rows of w are
  dequantised a block at a time (no scale: it multiplies the outputs) and multiplied by torch's fp32
  GEMM; a block is read once per call, so the dequantisation costs O(N*K) against the GEMM's O(M*N*K).
  compute="bfloat16" (the ORT engine's `--prefill-compute bfloat16`, for CPUs with AVX512-BF16 or
  AMX): the blocks are dequantised to bfloat16 (exact: an int8 has at most 8 significant bits), the
  activations rounded to bfloat16 and the GEMM run in bfloat16 with fp32 accumulation, its outputs
  rounded to bfloat16 before the scale: 2.7-2.8x the float32 GEMM rate on an AMD Zen 4 (issue 18),
  at ~2^-8 relative error per output (as llama.cpp's Q8_0 quantises the activations to 8 bits).
  Decode's GEMV stays float32."""

from __future__ import annotations

import functools
import os

import numba
import numpy as np
import torch
from numba import njit, prange

from jambatrt.plugins.cpu import serial_twin
from jambatrt.plugins.cpu.native import (call_gemv_int8, call_native, gemm_address, gemm_scratch, gemv_int8_address,
                                         host_has)
from jambatrt.plugins.cpu.prefetch import AHEAD, prefetch_rows_nta
from jambatrt.plugins.registry import session_op

GEMV_MAX_ROWS = 4            # up to here the int8 dot loop; beyond, dequantised blocks + GEMM
_GEMM_BLOCK_WEIGHTS = 1 << 21  # weights dequantised at a time for the GEMM path (8 MB of float32)
_NATIVE_PARTS = 32            # row ranges of the native GEMV; numba gives each thread a contiguous run of them
_LIMB_BLOCK_BYTES = 1 << 25   # the integer GEMM's int32 outputs (3 per output) held at a time
_LIMB_TOP = 127 * 65536        # |x| max -> this fixed-point value: the top limb stays within int8
_LIMB_MIN_N, _LIMB_MIN_K = 256, 128   # below, the float32 path: the int8 GEMM is slow on narrow outputs
                                      # (N 96: 0.6x), and combining the limbs costs as much as a short-K GEMM
_LIMB_MAX_K = 1 << 17          # int32 sums of K products of two int8 stay exact below this
COMPUTES = ("float32", "bfloat16")   # the GEMM path's precision (`compute`)
_SERIAL_MAX_WEIGHTS = 1 << 19  # below this one thread: waking the second costs ~15-20 us, as much as it saves
                               # (idle machine, 2 cores: 512K weights 38 vs 40 us, 1M 93 vs 66 us, 4M 349 vs
                               # 239 us = 12 vs 17.5 GB/s); both threads for the peer preset's large GEMVs make
                               # its int8 decode step 0.86x the all-serial one (issue 18)


@njit(inline="always")
def _row_fixed_point(x, m, full, xs):
    """Row m of x in fixed point whose largest |value| is `full`: sets xs[m] (the value of one unit, float64)
    and returns the factor that takes x to units (0 for a row of zeros), or -1 when the row holds a NaN or an
    infinity."""
    top = 0.0
    for k in range(x.shape[1]):
        a = abs(np.float64(x[m, k]))
        if not a <= 3.5e38:
            return -1.0
        top = max(top, a)
    xs[m] = top / full
    return full / top if top > 0.0 else 0.0


@njit(inline="always")
def _fixed_point_rows(x, xh, xl, xs):
    """Each row of x [M,K] float32 as 31-bit fixed point for gemv_int8.c: x = xs[m] * (65536 * xh + xl)
    rounded (xh, xl int16 [M, Kp], zero past K; xs float64). False, with nothing promised of the outputs,
    when a row holds a NaN or an infinity (the float32 loop then runs, and propagates them)."""
    M, K = x.shape
    for m in range(M):
        inv = _row_fixed_point(x, m, 1073741824.0, xs)
        if inv < 0.0:
            return False
        for k in range(K):
            q = np.int64(np.rint(np.float64(x[m, k]) * inv))
            hi = (q + 32768) >> 16
            xh[m, k] = hi
            xl[m, k] = q - (hi << 16)
    return True


@njit(cache=True, fastmath={"reassoc", "contract"}, parallel=True)
def _gemv_int8(x, w, scale, out, native=0):
    """out[m, n] = scale[n] * sum_k x[m, k] * w[n, k]; x [M,K] float32, w [N,K] int8, scale [N] float32.
    native: the address of gemv_int8.c's kernel (native.gemv_int8_address(); 0: none), which takes x as
    31-bit fixed point and splits the rows of w over the threads in contiguous ranges (w, scale and out
    C-contiguous; others run the loop below).
    Else fastmath lets LLVM reassociate the K-long sums into vector lanes (fp32 throughout), and the rows
    ahead are prefetched non-temporally (prefetch.py: the weights do not evict the rest of the step)."""
    M, K = x.shape
    N = w.shape[0]
    if native != 0 and w.flags.c_contiguous and scale.flags.c_contiguous and out.flags.c_contiguous:
        Kp = (K + 31) // 32 * 32
        xh = np.zeros((M, Kp), np.int16)
        xl = np.zeros((M, Kp), np.int16)
        xs = np.empty(M, np.float64)
        if _fixed_point_rows(x, xh, xl, xs):
            parts = min(N, _NATIVE_PARTS)
            for p in prange(parts):
                call_gemv_int8(native, xh, xl, xs, Kp, w, scale, p * N // parts, (p + 1) * N // parts, out)
            return
    for n in prange(N):
        if n + AHEAD < N:
            prefetch_rows_nta(w, (n + AHEAD) * K, K)
        for m in range(M):
            acc = np.float32(0.0)
            for k in range(K):
                acc += x[m, k] * np.float32(w[n, k])
            out[m, n] = acc * scale[n]


# the same kernel on the calling thread (prange runs as range)
_gemv_int8_serial = serial_twin(_gemv_int8, cache=True, fastmath={"reassoc", "contract"})


@njit(inline="always")
def gemv_int8_into(x, w, scale, out, native):
    """`_gemv_int8` from numba code, on the calling thread for matrices under _SERIAL_MAX_WEIGHTS.
    A process must have called numba.get_num_threads() before its first call: numba code calling a
    parallel kernel does not start numba's threads (without them it crashes, SIGSEGV)."""
    if w.shape[0] * w.shape[1] < _SERIAL_MAX_WEIGHTS:
        _gemv_int8_serial(x, w, scale, out, native)
    else:
        _gemv_int8(x, w, scale, out, native)


@njit(cache=True, parallel=True)
def _dequant_rows(w, out):
    """out[n, k] = float32(w[n, k]) (no scale: it multiplies the GEMM's outputs)."""
    for n in prange(w.shape[0]):
        for k in range(w.shape[1]):
            out[n, k] = np.float32(w[n, k])


# the bfloat16 bits of every int8 value v, at v + 128 (exact: the float32 bits' upper half)
_BF16_OF_INT8 = (np.arange(-128, 128, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.int16)


@njit(cache=True, parallel=True)
def _dequant_rows_bf16(w, table, out):
    """out[n, k] = the bfloat16 bits (int16) of w[n, k] (table: _BF16_OF_INT8)."""
    for n in prange(w.shape[0]):
        for k in range(w.shape[1]):
            out[n, k] = table[np.int32(w[n, k]) + 128]


@njit(cache=True, parallel=True)
def _limbs(x, q, xs):
    """Each row of x [M,K] float32 as 24-bit fixed point in three int8 limbs: x[m] ~ xs[m] * (65536 q[m] +
    256 q[M+m] + q[2M+m]) (q [3M, K] int8, rounded to nearest; xs [M] float64). False, with nothing
    promised of the outputs, when a row holds a NaN or an infinity."""
    M, K = x.shape
    bad = np.zeros(M, np.bool_)
    for m in prange(M):
        inv = _row_fixed_point(x, m, np.float64(_LIMB_TOP), xs)
        if inv < 0.0:
            bad[m] = True
            continue
        for k in range(K):
            v = np.int64(np.rint(np.float64(x[m, k]) * inv))
            lo = ((v + 128) & 255) - 128
            v = (v - lo) >> 8
            mid = ((v + 128) & 255) - 128
            q[2 * M + m, k] = lo
            q[M + m, k] = mid
            q[m, k] = (v - mid) >> 8
    return not bad.any()


@njit(cache=True, parallel=True)
def _combine_limbs(y, xs, scale, out, c0):
    """out[m, c0 + j] = xs[m] * scale[c0 + j] * (65536 y[m, j] + 256 y[M+m, j] + y[2M+m, j]): the integer
    GEMM's exact int32 sums of the three limbs (y [3M, n]) combined in int64, scaled in float64."""
    M = xs.shape[0]
    n = y.shape[1]
    for m in prange(M):
        for j in range(n):
            v = np.int64(y[m, j]) * 65536 + np.int64(y[M + m, j]) * 256 + np.int64(y[2 * M + m, j])
            out[m, c0 + j] = np.float32(np.float64(v) * xs[m] * np.float64(scale[c0 + j]))


def _limb_gemm(x: np.ndarray, w: np.ndarray, scale: np.ndarray, out: np.ndarray) -> bool:
    """out = (x @ w.T) * scale through the integer GEMM on x's 24-bit fixed-point limbs (see the module
    docstring); x [M,K], out [M,N] float32 and scale C-contiguous. False (out untouched) for a NaN/inf row."""
    M, K = x.shape
    N = w.shape[0]
    q = np.empty((3 * M, K), np.int8)
    xs = np.empty(M, np.float64)
    if not _limbs(x, q, xs):
        return False
    qt, wt = torch.from_numpy(q), torch.from_numpy(w)
    step = max(16, min(N, _LIMB_BLOCK_BYTES // (12 * M)))
    for c in range(0, N, step):
        y = torch._int_mm(qt, wt[c:c + step].t())          # [3M, n] int32, exact (VNNI: no saturation)
        _combine_limbs(y.numpy(), xs, scale, out, c)
    return True


@functools.cache
def _integer_gemm_exact() -> bool:
    """Whether this CPU has integer dot products without saturation (AVX512-VNNI or AVX-VNNI, as LLVM
    reads the host) and torch's int8 GEMM is exact on it for the extreme limb values (checked once)."""
    if not (host_has("avx512vnni") or host_has("avxvnni")) or not hasattr(torch, "_int_mm"):
        return False
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (48, 1100), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (40, 1100), dtype=torch.int8, generator=g)
    a[:, ::2], b[:, ::3] = -128, 127                          # the largest products, runs of them
    try:
        got = torch._int_mm(a, b.t())
    except RuntimeError:
        return False
    return bool(torch.equal(got.long(), a.long() @ b.long().t()))


def integer_gemm() -> bool:
    """Whether linear_int8's GEMM path runs on integer limbs here (JAMBATRT_NATIVE=0 turns it off)."""
    return os.environ.get("JAMBATRT_NATIVE", "1") != "0" and _integer_gemm_exact()


@njit(cache=True, parallel=True)
def _gemm(x, w, w_f32, scale, out, native, scratch):
    """out [M,N] = x [M,K] @ w [N,K]^T through gemm.c at `native`, times scale [N] (int8 w; w_f32 0) or plain
    (float32 w, w_f32 1: scale is empty and not read): the columns split over scratch.shape[0] parts in
    multiples of 16 (its register tile's width), each part with its row of scratch (its packed blocks).
    All C-contiguous."""
    M, K = x.shape
    N = w.shape[0]
    parts = scratch.shape[0]
    sp = np.int64(scale.ctypes.data) if scale.shape[0] > 0 else np.int64(0)    # uint64 | int would be float64
    for p in prange(parts):
        n0 = min(N, (p * N // parts + 15) // 16 * 16)
        n1 = N if p == parts - 1 else min(N, ((p + 1) * N // parts + 15) // 16 * 16)
        if n0 < n1:
            call_native(native, (x.ctypes.data, M, K, w.ctypes.data, w_f32, sp, n0, n1, out.ctypes.data, N,
                                 scratch[p].ctypes.data))


_scratch: dict = {}      # numba's thread count -> gemm.c's scratch, one row a thread (kept: ~2.3 MB a row)


def native_gemm(int8: bool = True) -> tuple[int, np.ndarray | None]:
    """(gemm.c's address, the scratch for numba's threads) where the float32 GEMM path of linear_int8 (int8:
    where the integer limb GEMM does not run) or of linear_f32 (int8 False) runs it: AVX2 without AVX-512
    (JAMBATRT_NATIVE=avx2 picks it there too); (0, None) elsewhere."""
    forced = os.environ.get("JAMBATRT_NATIVE") == "avx2"
    if (int8 and integer_gemm()) or (host_has("avx512f") and not forced) or not (address := gemm_address()):
        return 0, None
    threads = numba.get_num_threads()
    if threads not in _scratch:
        _scratch[threads] = np.empty((threads, gemm_scratch()), np.float32)
    return address, _scratch[threads]


def linear_int8(x: np.ndarray, w: np.ndarray, scale: np.ndarray, compute: str = "float32") -> np.ndarray:
    """x [..., K] float32; w [N,K] int8; scale [N] float32 -> y [..., N] float32 (a new array).
    compute: the precision of the GEMM path (more than GEMV_MAX_ROWS rows), one of COMPUTES."""
    if compute not in COMPUTES:
        raise ValueError(f"linear_int8: compute {compute!r} (accepted: {', '.join(COMPUTES)})")
    if w.ndim != 2 or w.dtype != np.int8 or scale.shape != (w.shape[0],) or x.shape[-1] != w.shape[1]:
        raise ValueError(f"linear_int8: x {list(x.shape)}, w {list(w.shape)} {w.dtype}, scale {list(scale.shape)} "
                         "(expected x [..., K], w [N, K] int8, scale [N])")
    N, K = w.shape
    x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, K)
    M = x2.shape[0]
    s = np.ascontiguousarray(scale, dtype=np.float32)
    out = np.empty((M, N), np.float32)
    if M <= GEMV_MAX_ROWS:
        (_gemv_int8_serial if N * K < _SERIAL_MAX_WEIGHTS else _gemv_int8)(x2, w, s, out, gemv_int8_address())
    elif compute == "float32" and _LIMB_MIN_N <= N and _LIMB_MIN_K <= K < _LIMB_MAX_K and integer_gemm() \
            and _limb_gemm(x2, w, s, out):
        pass
    elif compute == "float32" and w.flags.c_contiguous and (gemm := native_gemm())[0]:
        _gemm(x2, w, 0, s, out, *gemm)
    else:
        step = max(1, min(N, _GEMM_BLOCK_WEIGHTS // K))
        xt, ot = torch.from_numpy(x2), torch.from_numpy(out)
        if compute == "bfloat16":
            bt = torch.empty((step, K), dtype=torch.bfloat16)
            buf, xt = bt.view(torch.int16).numpy(), xt.to(torch.bfloat16)
            dequant = lambda rows, into: _dequant_rows_bf16(rows, _BF16_OF_INT8, into)   # noqa: E731
        else:
            buf = np.empty((step, K), np.float32)       # torch's int8 -> float cast is single-threaded
            bt, dequant = torch.from_numpy(buf), _dequant_rows
        for r in range(0, N, step):
            n = min(step, N - r)
            dequant(w[r:r + n], buf[:n])
            ot[:, r:r + n] = xt @ bt[:n].t()
        ot.mul_(torch.from_numpy(s))
    return out.reshape(*x.shape[:-1], N)


def _linear_shape(x, w, *_):
    return [(*x.shape[:-1], w.shape[0])]


session_op("LinearInt8", inputs=("float32", "int8", "float32"), out_shapes=_linear_shape)(linear_int8)


@session_op("LinearInt8Mapped", inputs=("float32",), attributes={"weights": str},
            out_shapes=lambda x, *_: [(*x.shape[:-1], 0)])
def linear_int8_mapped(x, weights):
    """LinearInt8 whose (w, scale) the engine mapped from the store and bound under `weights`."""
    from jambatrt.plugins.cpu.ort_ops import bound_weights
    (w, scale), compute = bound_weights(weights)
    return linear_int8(x, w, scale, compute)


def linear_int8_torch(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Tensor-level twin (float32 or bfloat16 x, computed in float32, returned in x.dtype)."""
    y = linear_int8(x.detach().float().contiguous().numpy(), w.contiguous().numpy(), scale.float().contiguous().numpy())
    return torch.from_numpy(y).to(x.dtype)
