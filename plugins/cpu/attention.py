"""CPU kernel for jamba::attention: causal GQA with an optional past KV cache, on torch's CPU
flash-attention kernel (blocked online softmax: memory linear in length, never an L x S matrix).

Measured (bench/kernels.json; 4 q heads, 2 kv heads, head_dim 32): 12-20x faster than the blocked
matmul + softmax of the oracle at 4K tokens, with memory flat in length (+64 MiB at 64K tokens:
the outputs). GQA goes in as strided views (enable_gqa): no repeated copy of the KV cache. Cases:
- P == 0: one call with is_causal (torch's causal mask is top-left aligned, which is ours when P == 0).
- L == 1 (decode): the query sees every key; no mask.
- P > 0, L > 1 (chunked prefill): torch's is_causal is top-left aligned but ours is offset by P, and an
  explicit mask costs 1.5-2x (the masked path is slower). So the keys are split in two: the past
  (fully visible: the g query heads of a kv head are folded into one longer query, no repeat of the
  cache) and the new keys (causal, top-left aligned again); the two partial softmaxes are merged
  with their log-sum-exps, which the aten flash op returns.

Decode (L == 1, P > 0, float32) skips torch: `decode_attention` is a numba kernel that reads the
[B,S,Hkv,d] cache once, in its own layout, for all q heads at once (split over keys across threads,
partial softmaxes merged at the end). torch's SDPA on the transposed cache views (strided GQA) took
4.5 ms at 64K keys (B 1, Hkv 2, d 32) where this takes 2.3 ms, about the time of reading the cache.
Each job runs attention_decode.c where the CPU and the cache's layout allow (`_native_fits`): on
AVX512-VNNI an int8 cache in groups of 32 channels goes through 16-bit integer dot products (the query
and the softmax weights rounded to 16 bits; see that file). There the engine's int8 cache is stored in the
order that kernel reads (kv_int8.py, the blocked layout: `_decode_blocked`), the same bits as in rows at
0.67x the time where the kernel computes more than it waits (the bench preset's decode step at 64K
positions: 0.31 against 0.46 ms); the time of reading it from memory is unchanged (the peer preset at
64K: 4.65 against 4.68 ms a step).

Copies of the KV cache. `attention_torch` must return fresh present tensors, so it concatenates
once (torch.cat) and computes over the result: no other copy of the cache (`.float()` is a no-op
on float32 and the transposes are views). The numpy `attention` does the same with one np.empty +
two slice writes, or, with scratch_inputs=True (the ONNX Runtime op, whose inputs are copies
onnxruntime-extensions makes for this one call), grows past_k/past_v in place into present
(realloc: mremap or in-place growth, no copy of the cache at batch 1) and writes the new keys."""

from __future__ import annotations

import ctypes
import functools

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange, types
from numba.extending import overload

from jambatrt.plugins.cpu import serial_twin
from jambatrt.plugins.cpu.kv_int8 import QuantizedKV, blocked_fits, blocked_read, dequantize_kv
from jambatrt.plugins.cpu.native import attention_decode_address, call_native
from jambatrt.plugins.cpu.selective_scan import exp32
from jambatrt.plugins.registry import implements, session_op

_flash_with_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu   # -> (out, logsumexp)


def _check_shapes(q, k, v, past_k, past_v) -> int:
    """ValueError unless q [B,L,Hq,d], k = v [B,L,Hkv,d] (Hq a multiple of Hkv), past_k = past_v
    [B,P,Hkv,d] or None. Returns P."""
    B, L, Hq, d = q.shape
    Hkv = k.shape[2]
    if tuple(k.shape) != (B, L, Hkv, d) or tuple(v.shape) != tuple(k.shape) or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"attention: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} "
                         "(expected q [B,L,Hq,d], k = v [B,L,Hkv,d], Hq a multiple of Hkv)")
    P = 0 if past_k is None else past_k.shape[1]
    if past_k is not None and (tuple(past_k.shape) != (B, P, Hkv, d) or past_v is None
                               or tuple(past_v.shape) != tuple(past_k.shape)):
        raise ValueError(f"attention: past_k {list(past_k.shape)}, past_v "
                         f"{None if past_v is None else list(past_v.shape)} (expected both [B,P,{Hkv},{d}])")
    return P


def attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor | None = None,
                    past_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B,L,Hq,d]; k, v [B,L,Hkv,d]; past_k, past_v [B,P,Hkv,d] or None (P = 0 also means none).
    Query i sees keys 0..P+i; scale d^-0.5; computed in float32. Returns o [B,L,Hq,d] in q.dtype and
    present_k, present_v [B,P+L,Hkv,d] (new tensors, never views of the inputs)."""
    P = _check_shapes(q, k, v, past_k, past_v)
    if P:
        present_k = torch.cat([past_k.to(k.dtype), k], dim=1)
        present_v = torch.cat([past_v.to(v.dtype), v], dim=1)
    else:
        present_k, present_v = k.clone(), v.clone()
    return _attend(q, present_k, present_v, P), present_k, present_v


def _attend(q: torch.Tensor, present_k: torch.Tensor, present_v: torch.Tensor, P: int) -> torch.Tensor:
    """o [B,L,Hq,d] in q.dtype for q [B,L,Hq,d] at positions P..P+L-1 over present [B,P+L,Hkv,d]."""
    L = q.shape[1]
    if L == 0:
        return q.new_empty(q.shape)
    if (L == 1 and P and q.dtype == present_k.dtype == present_v.dtype == torch.float32
            and present_k.is_contiguous() and present_v.is_contiguous()
            and not (q.requires_grad or present_k.requires_grad or present_v.requires_grad)):
        return torch.from_numpy(decode_attention(q.numpy(), present_k.numpy(), present_v.numpy()))
    qf = q.float().transpose(1, 2)                                          # [B,Hq,L,d]
    kf, vf = present_k.float().transpose(1, 2), present_v.float().transpose(1, 2)   # [B,Hkv,S,d]
    if P == 0 or L == 1:
        o = F.scaled_dot_product_attention(qf, kf, vf, is_causal=P == 0 and L > 1, enable_gqa=True)
    else:
        o = _chunk_with_past(qf, kf, vf, P)
    return o.transpose(1, 2).to(q.dtype).contiguous()


def _chunk_with_past(qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, P: int) -> torch.Tensor:
    """qf [B,Hq,L,d]; kf, vf [B,Hkv,P+L,d] float32 -> o [B,Hq,L,d]: causal with offset P."""
    return _attend_past_blocks(qf, [(kf[:, :, :P], vf[:, :, :P])], kf[:, :, P:], vf[:, :, P:])


def _merge_softmax(o_a, lse_a, o_b, lse_b):
    """Two partial attentions (outputs [..., L, d], log-sum-exps [..., L]) over disjoint keys as one."""
    m = torch.maximum(lse_a, lse_b)
    w_a, w_b = (lse_a - m).exp_(), (lse_b - m).exp_()
    w = w_a + w_b
    return (o_a * w_a.unsqueeze(-1) + o_b * w_b.unsqueeze(-1)) / w.unsqueeze(-1), m + w.log_()


def _attend_past_blocks(qf: torch.Tensor, past, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
    """qf [B,Hq,L,d] at the L positions after the past; past: (k, v) blocks [B,Hkv,n,d] float32 in order
    (the whole past in one, or an int8 cache's dequantised a block at a time); k_new, v_new [B,Hkv,L,d]
    -> o [B,Hq,L,d]: every query sees the whole past and new keys 0..i."""
    B, Hq, L, d = qf.shape
    Hkv = k_new.shape[1]
    g = Hq // Hkv
    o = lse = None
    for kb, vb in past:
        # past keys: visible to every query, so the g heads sharing a kv head become one query of g*L rows
        ob, lb = _flash_with_lse(qf.reshape(B, Hkv, g * L, d), kb, vb)
        o, lse = (ob, lb) if o is None else _merge_softmax(o, lse, ob, lb)
    # new keys: query i sees new keys 0..i -- top-left causal; repeating them costs only O(L)
    o_new, lse_new = _flash_with_lse(qf, k_new.repeat_interleave(g, dim=1), v_new.repeat_interleave(g, dim=1),
                                     is_causal=True)
    return _merge_softmax(o.reshape(B, Hq, L, d), lse.reshape(B, Hq, L), o_new, lse_new)[0]


_DEQUANT_BLOCK = 1 << 14      # positions of an int8 cache dequantised at a time by a prefill chunk


def _attend_int8(q: np.ndarray, rows, P: int) -> np.ndarray:
    """`_attend` for q [B,L,Hq,d] at positions P..P+L-1 over an int8 cache whose positions lo..hi-1
    rows(lo, hi) gives as (k8, ks, v8, vs) rows (kv_int8.py): the past dequantised _DEQUANT_BLOCK positions
    at a time, so a chunk's float32 copy is of one block, never of the whole cache (which would cost the
    memory the int8 cache saves)."""
    def deq(lo, hi):
        k8, ks, v8, vs = rows(lo, hi)
        return tuple(torch.from_numpy(dequantize_kv(a, s)).transpose(1, 2) for a, s in ((k8, ks), (v8, vs)))
    n = P + q.shape[1]
    if P == 0:
        k, v = deq(0, n)
        return _attend(torch.from_numpy(q), k.transpose(1, 2), v.transpose(1, 2), 0).numpy()
    past = (deq(lo, min(lo + _DEQUANT_BLOCK, P)) for lo in range(0, P, _DEQUANT_BLOCK))
    o = _attend_past_blocks(torch.from_numpy(q).transpose(1, 2), past, *deq(P, n))
    return o.transpose(1, 2).contiguous().numpy()


_TILE = 64            # keys per tile of the decode kernel (its scores stay in L1)
_SPLIT_MIN = 1024     # fewest keys per parallel job of the decode kernel


def _cache_row(k, ks, b, t, h, buf):
    """The [d] float32 row (b, t, h) of a cache: a view of a float32 cache, or an int8 cache's row
    dequantised into buf (numba only)."""
    raise NotImplementedError


# float32 or int8 cache (plugins/cpu/kv_int8.py, scales per group of d / G channels): numba compiles the
# kernel for each. The int8 row is converted once for the g query heads that read it; its loop runs from
# 0 (range(gs) + base, not range(lo, hi)): numba's negative-index wraparound on a non-zero start kept
# it from vectorising (5x slower).
@overload(_cache_row, inline="always")
def _cache_row_impl(k, ks, b, t, h, buf):
    if isinstance(ks, types.NoneType):
        return lambda k, ks, b, t, h, buf: k[b, t, h]

    def dequantized(k, ks, b, t, h, buf):
        G = ks.shape[3]
        gs = k.shape[3] // G
        for c in range(G):
            base = c * gs
            sc = ks[b, t, h, c]
            for x in range(gs):
                buf[base + x] = np.float32(k[b, t, h, base + x]) * sc
        return buf
    return dequantized


def _scales(ks, b, lo):
    """(address of ks[b, lo], its position stride in floats) of an int8 cache's scales; (0, 0) for a
    float32 cache (numba only)."""
    raise NotImplementedError


@overload(_scales, inline="always")
def _scales_impl(ks, b, lo):
    if isinstance(ks, types.NoneType):
        return lambda ks, b, lo: (0, 0)
    return lambda ks, b, lo: (ks.ctypes.data + b * ks.strides[0] + lo * ks.strides[1], ks.strides[1] // 4)


@njit(cache=True, inline="always")
def _split(S, s, nsplit):
    """Positions lo..hi-1 of split s of S: boundaries at multiples of the kernel's tile (_TILE, the blocked
    cache's value tile), so both layouts split alike and give the same bits."""
    lo = S * s // nsplit // _TILE * _TILE
    hi = S if s == nsplit - 1 else S * (s + 1) // nsplit // _TILE * _TILE
    return lo, hi


@njit(parallel=True, cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _decode_kernel(q, k, v, nsplit, o, ks=None, vs=None, native=0):
    """q [B,Hq,d] (already scaled by d^-0.5); k, v [B,S,Hkv,d]; o [B,Hq,d]; all float32,
    C-contiguous; 1 <= nsplit <= S. One job per (batch, split of the keys): online softmax over
    tiles of _TILE keys (scores [Hq, tile] so the exponentials vectorise), then the splits' partial
    softmaxes are merged. fastmath only lets the d-long dot products be reassociated (vectorised).
    An int8 cache (plugins/cpu/kv_int8.py): k, v int8 with scales ks, vs [B,S,Hkv,G] of groups of
    d / G channels, applied per group (numba compiles the float32 kernel without those branches).
    native: the address of attention_decode.c's kernel (native.attention_decode_address(); 0: these
    loops), which runs each job and needs d a multiple of 16, d / G / 16 a power of two, Hq / Hkv <= 16,
    Hq <= 64 and each position's [Hkv, d] contiguous (`_native_fits`)."""
    B, S, Hkv, d = k.shape
    Hq = q.shape[1]
    g = Hq // Hkv
    m_all = np.empty((B, nsplit, Hq), np.float32)       # running max of the scores
    l_all = np.empty((B, nsplit, Hq), np.float32)       # sum of exp(score - max)
    acc_all = np.empty((B, nsplit, Hq, d), np.float32)  # sum of exp(score - max) * v
    for job in prange(B * nsplit):
        b = job // nsplit
        s = job % nsplit
        lo, hi = _split(S, s, nsplit)
        if native != 0:
            for hq in range(Hq):
                m_all[b, s, hq] = -np.inf
                l_all[b, s, hq] = 0.0
                for x in range(d):
                    acc_all[b, s, hq, x] = 0.0
            ka, lds = _scales(ks, b, lo)
            va, _ = _scales(vs, b, lo)
            call_native(native, (q.ctypes.data + b * Hq * d * 4, Hkv, g, d,
                                 k.ctypes.data + b * k.strides[0] + lo * k.strides[1],
                                 v.ctypes.data + b * v.strides[0] + lo * v.strides[1],
                                 k.strides[1] // k.itemsize, ka, va, lds, 16 if ks is None else d // ks.shape[3],
                                 hi - lo, m_all.ctypes.data + (b * nsplit + s) * Hq * 4,
                                 l_all.ctypes.data + (b * nsplit + s) * Hq * 4,
                                 acc_all.ctypes.data + (b * nsplit + s) * Hq * d * 4, 0 if ks is None else 1))
            continue
        m = np.full(Hq, -np.inf, np.float32)
        l = np.zeros(Hq, np.float32)
        acc = np.zeros((Hq, d), np.float32)
        sc = np.empty((Hq, _TILE), np.float32)
        row = np.empty(d, np.float32)                   # an int8 cache's row, dequantised
        for t0 in range(lo, hi, _TILE):
            nt = min(_TILE, hi - t0)
            for i in range(nt):
                for h in range(Hkv):
                    kr = _cache_row(k, ks, b, t0 + i, h, row)
                    for j in range(g):
                        hq = h * g + j
                        a = np.float32(0.0)
                        for x in range(d):
                            a += q[b, hq, x] * kr[x]
                        sc[hq, i] = a
            for hq in range(Hq):
                mt = m[hq]
                for i in range(nt):
                    mt = max(mt, sc[hq, i])
                alpha = exp32(m[hq] - mt)                # exp(-inf) -> ~1e-38 x zeros on the first tile
                m[hq] = mt
                ls = np.float32(0.0)
                for i in range(nt):
                    p = exp32(sc[hq, i] - mt)
                    sc[hq, i] = p
                    ls += p
                l[hq] = l[hq] * alpha + ls
                for x in range(d):
                    acc[hq, x] *= alpha
            for i in range(nt):
                for h in range(Hkv):
                    vr = _cache_row(v, vs, b, t0 + i, h, row)
                    for j in range(g):
                        hq = h * g + j
                        p = sc[hq, i]
                        for x in range(d):
                            acc[hq, x] += p * vr[x]
        for hq in range(Hq):
            m_all[b, s, hq] = m[hq]
            l_all[b, s, hq] = l[hq]
            for x in range(d):
                acc_all[b, s, hq, x] = acc[hq, x]
    _merge_splits(m_all, l_all, acc_all, o)


@njit(cache=True, error_model="numpy", inline="always")
def _merge_splits(m_all, l_all, acc_all, o):
    """o [B,Hq,d] from the splits' partial softmaxes: running max m_all, sum l_all [B,nsplit,Hq] and
    acc_all [B,nsplit,Hq,d] (an empty split: m -inf, l and acc 0, weighs nothing)."""
    B, nsplit, Hq, d = acc_all.shape
    for b in range(B):
        for hq in range(Hq):
            mx = m_all[b, 0, hq]
            for s in range(1, nsplit):
                mx = max(mx, m_all[b, s, hq])
            den = np.float32(0.0)
            for x in range(d):
                o[b, hq, x] = 0.0
            for s in range(nsplit):
                w = exp32(m_all[b, s, hq] - mx)
                den += w * l_all[b, s, hq]
                for x in range(d):
                    o[b, hq, x] += w * acc_all[b, s, hq, x]
            for x in range(d):
                o[b, hq, x] /= den


# one job (a single sequence with few keys): the same kernel on the calling thread, without waking
# numba's workers (~75 us inside an ONNX Runtime step)
_decode_kernel_serial = serial_twin(_decode_kernel, cache=True, error_model="numpy", fastmath={"reassoc", "contract"})


@njit(parallel=True, cache=True, error_model="numpy", fastmath={"reassoc", "contract"})   # as _decode_kernel's merge
def _decode_blocked(q, k, v, ks, vs, S, nsplit, o, native):
    """_decode_kernel over the first S positions of a blocked int8 cache (k, v, ks, vs: kv_int8.py
    blocked_alloc) through attention_decode.c's AVX512-VNNI kernel at `native` (quant 2)."""
    B, Hq, d = q.shape
    Hkv = k.shape[2]
    lds = Hkv * ks.shape[3]
    m_all = np.empty((B, nsplit, Hq), np.float32)
    l_all = np.empty((B, nsplit, Hq), np.float32)
    acc_all = np.zeros((B, nsplit, Hq, d), np.float32)
    for job in prange(B * nsplit):
        b = job // nsplit
        s = job % nsplit
        lo, hi = _split(S, s, nsplit)
        for hq in range(Hq):
            m_all[b, s, hq] = -np.inf
            l_all[b, s, hq] = 0.0
        if hi > lo:            # bytes a position: Hkv * d of keys and of values, 4 * lds of scales
            call_native(native, (q.ctypes.data + b * Hq * d * 4, Hkv, Hq // Hkv, d,
                                 k.ctypes.data + b * k.strides[0] + lo * Hkv * d,
                                 v.ctypes.data + b * v.strides[0] + lo * Hkv * d, Hkv * d,
                                 ks.ctypes.data + b * ks.strides[0] + lo * lds * 4,
                                 vs.ctypes.data + b * vs.strides[0] + lo * lds * 4, lds, d // ks.shape[3],
                                 hi - lo, m_all.ctypes.data + (b * nsplit + s) * Hq * 4,
                                 l_all.ctypes.data + (b * nsplit + s) * Hq * 4,
                                 acc_all.ctypes.data + (b * nsplit + s) * Hq * d * 4, 2))
    _merge_splits(m_all, l_all, acc_all, o)


_decode_blocked_serial = serial_twin(_decode_blocked, cache=True, error_model="numpy", fastmath={"reassoc", "contract"})


@functools.cache
def blocked_kernel() -> int:
    """The address of attention_decode.c's AVX512-VNNI kernel where it is this CPU's decode kernel (the one
    that reads an int8 cache in the blocked layout, kv_int8.py); else 0 (the cache then stays in rows)."""
    address = attention_decode_address()
    return address if address and address == attention_decode_address("avx512vnni") else 0


def _heads_fit(Hq: int, Hkv: int) -> bool:
    """Whether attention_decode.c takes Hq query heads over Hkv kv heads (GMAX, HQMAX there)."""
    return Hq // Hkv <= 16 and Hq <= 64


def _native_fits(k, v, ks, vs, Hq: int) -> bool:
    """Whether attention_decode.c takes this cache (see _decode_kernel)."""
    d, Hkv = k.shape[3], k.shape[2]
    gs = 16 if ks is None else d // ks.shape[3]
    rows = all(a.strides[3] == a.itemsize and a.strides[2] == a.shape[3] * a.itemsize
               for a in (k, v) + (() if ks is None else (ks, vs)))
    return d % 16 == 0 and gs % 16 == 0 and (gs // 16) & (gs // 16 - 1) == 0 and _heads_fit(Hq, Hkv) and rows


def decode_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, ks: np.ndarray | None = None,
                     vs: np.ndarray | None = None) -> np.ndarray:
    """One query per sequence over all S keys (no mask): q [B,1,Hq,d]; k, v [B,S,Hkv,d] with S >= 1,
    float32, each sequence's [S,Hkv,d] contiguous (k, v are read in place: C-contiguous arrays, or
    the batch-strided views of the ORT engine's in-place cache); or int8 with scales ks, vs
    [B,S,Hkv,G] (plugins/cpu/kv_int8.py); or a blocked int8 cache's keys and values as QuantizedKV (ks, vs
    None). Returns o [B,1,Hq,d] float32 (fresh)."""
    B, L, Hq, d = q.shape
    S = k.shape[1]
    if L != 1 or S < 1:
        raise ValueError(f"decode_attention: q {list(q.shape)}, k {list(k.shape)} (expected L = 1, S >= 1)")
    qs = np.multiply(q.reshape(B, Hq, d), np.float32(d ** -0.5), dtype=np.float32)
    jobs_wanted = -(-4 * numba.get_num_threads() // B)        # a few jobs per thread, for balance
    nsplit = max(1, min(S // _SPLIT_MIN, jobs_wanted))
    o = np.empty((B, 1, Hq, d), np.float32)
    if isinstance(k, QuantizedKV):                    # a blocked int8 cache (KVCache.present): v is its values
        if blocked_fits(d) and _heads_fit(Hq, k.shape[2]) and (native := blocked_kernel()):
            (_decode_blocked_serial if B * nsplit == 1 else _decode_blocked)(qs, *k.layout, S, nsplit,
                                                                             o.reshape(B, Hq, d), native)
            return o
        k8, ks, v8, vs = blocked_read(k.layout, 0, S)        # no kernel takes this shape in blocks: rows
        return decode_attention(q, k8, v8, ks, vs)
    native = attention_decode_address() if _native_fits(k, v, ks, vs, Hq) else 0
    (_decode_kernel_serial if B * nsplit == 1 else _decode_kernel)(qs, k, v, nsplit, o.reshape(B, Hq, d), ks, vs,
                                                                   native)
    return o


def _growable(a, *others) -> bool:
    """a is a float32 C-contiguous array that owns its memory and does not overlap `others` (views
    of it elsewhere are the caller's promise, see scratch_inputs)."""
    return (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.base is None and a.flags.owndata
            and a.flags.c_contiguous and a.flags.writeable
            and not any(np.may_share_memory(a, o) for o in others))


def _grow(past: np.ndarray, new: np.ndarray) -> None:
    """past [B,P,H,d] (_growable) becomes [B,P+L,H,d] = concat(past, new) along dim 1, in place.
    ndarray.resize reallocs (mremap or in-place growth: no copy of the cache); rows of batch b > 0
    then move up by b*L tokens (memmove, in memory already touched) before the new rows go in."""
    B, P, H, d = past.shape
    L = new.shape[1]
    past.resize((B, P + L, H, d), refcheck=False)
    row = H * d * past.itemsize
    base = past.ctypes.data
    for b in range(B - 1, 0, -1):
        ctypes.memmove(base + b * (P + L) * row, base + b * P * row, P * row)
    past[:, P:] = new


def attention(q, k, v, past_k=None, past_v=None, *, scratch_inputs: bool = False
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy in/out twin of `attention_torch`: q [B,L,Hq,d]; k, v [B,L,Hkv,d]; past [B,P,Hkv,d] or
    None. Computes in float32; returns float32 (o, present_k, present_v), freshly allocated.

    scratch_inputs: the caller hands its input arrays over and drops them after the call (the ONNX
    Runtime op: onnxruntime-extensions copies every input out of ORT for that one call). Then
    past_k/past_v, when they own their float32 memory, are grown in place into present_k/present_v
    (no copy of the cache), and with no past, k and v themselves are returned as present."""
    q, k, v = (np.ascontiguousarray(a, dtype=np.float32) for a in (q, k, v))
    past_k, past_v = (None if a is None else np.asarray(a) for a in (past_k, past_v))
    P = _check_shapes(q, k, v, past_k, past_v)
    B, L, Hkv, d = k.shape
    if P and scratch_inputs and _growable(past_k, q, k, v, past_v) and _growable(past_v, q, k, v):
        shape = past_k.shape
        try:
            _grow(past_k, k)
            _grow(past_v, v)
            o = _attend(torch.from_numpy(q), torch.from_numpy(past_k), torch.from_numpy(past_v), P)
        except BaseException:
            for a in (past_k, past_v):        # back to the shapes an error path derives outputs from
                if a.shape != shape:
                    a.resize(shape, refcheck=False)
            raise
        return o.numpy(), past_k, past_v
    if P:
        present_k = np.empty((B, P + L, Hkv, d), np.float32)
        present_v = np.empty((B, P + L, Hkv, d), np.float32)
        present_k[:, :P], present_k[:, P:] = past_k, k
        present_v[:, :P], present_v[:, P:] = past_v, v
    elif scratch_inputs:
        present_k, present_v = k, v
    else:
        present_k, present_v = k.copy(), v.copy()
    o = _attend(torch.from_numpy(q), torch.from_numpy(present_k), torch.from_numpy(present_v), P)
    return o.numpy(), present_k, present_v


def attention_cached(q: np.ndarray, present_k: np.ndarray, present_v: np.ndarray, P: int,
                     ks: np.ndarray | None = None, vs: np.ndarray | None = None) -> np.ndarray:
    """o [B,L,Hq,d] float32 for q at positions P..P+L-1 over a cache that already holds them:
    present_k/present_v [B,P+L,Hkv,d] views of an in-place cache (engines/ort.py KVCache), float32 or
    int8 with scales ks/vs [B,P+L,Hkv,G]. Decode reads them in place; a chunk over an int8 cache
    dequantises it a block at a time (`_attend_int8`)."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    if q.shape[1] == 1 and P:       # decode: the numba kernel reads the views in place (strided at batch > 1)
        return decode_attention(q, present_k, present_v, ks, vs)
    if isinstance(present_k, QuantizedKV):          # a blocked int8 cache
        return _attend_int8(q, lambda lo, hi: blocked_read(present_k.layout, lo, hi), P)
    if ks is not None:
        return _attend_int8(q, lambda lo, hi: (present_k[:, lo:hi], ks[:, lo:hi], present_v[:, lo:hi], vs[:, lo:hi]), P)
    return _attend(torch.from_numpy(q), torch.from_numpy(present_k), torch.from_numpy(present_v), P).numpy()


# ---- registered implementations (plugins/registry.py) ------------------------------------------------
def attention_ort(q, k, v, past_k, past_v):
    """The ONNX Runtime op: its inputs are copies made for this call (onnxruntime-extensions'
    PyCustomOpKernel::Compute), so present grows from past in place (`scratch_inputs`)."""
    return attention(q, k, v, past_k, past_v, scratch_inputs=True)


def _attention_shapes(q, k, v, past_k, *_):
    kv = (k.shape[0], past_k.shape[1] + k.shape[1], k.shape[2], k.shape[3])
    return [q.shape, kv, kv]


implements("attention", "cpu")(attention_torch)
implements("attention", "ort", out_shapes=_attention_shapes)(attention_ort)


@session_op("CausalAttentionCached", inputs=("float32", "float32", "float32"), attributes={"cache": str},
            out_shapes=lambda q, *_: [q.shape])
def attention_cached_op(q, k, v, cache):
    """Attention whose past KV live in an in-place cache the engine bound under `cache`
    (graph/passes/bind_kv_caches.py; engines/ort.py KVCache: k, v [B, capacity, Hkv, d] buffers whose
    first `length` positions hold the past, room reserved before every run): the step's keys and
    values are appended and attended over in place, so no step copies the cache."""
    from jambatrt.plugins.cpu.ort_ops import bound
    return attend_in_cache(bound(cache), q, k, v, cache)


def attend_in_cache(c, q: np.ndarray, k: np.ndarray, v: np.ndarray, name: str = "") -> np.ndarray:
    """o [B,L,Hq,d] for q over the KVCache `c` (engines/ort.py) with the step's k, v [B,L,Hkv,d]
    appended to it in place; the cache then holds L more positions. The engine reserved the room."""
    P, L = c.length, k.shape[1]
    if c.k is None or P + L > c.capacity or k.shape[0] != c.k.shape[0]:
        raise ValueError(f"KV cache {name!r} holds {P} of {c.capacity} positions for "
                         f"batch {None if c.k is None else c.k.shape[0]}; the step brings {L} for batch "
                         f"{k.shape[0]} (the engine reserves room before every run)")
    c.append(k, v)
    pk, pv, ks, vs = c.present(P + L)
    o = attention_cached(q, pk, pv, P, ks, vs)
    c.length = P + L
    return o
