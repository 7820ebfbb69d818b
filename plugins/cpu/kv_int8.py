"""An int8 KV cache (`jambatrt build --backend ort --kv-cache int8`): keys and values stored as int8
with one float32 scale per token, kv head and group of KV_GROUP channels (the whole head when its
dimension is not a multiple of KV_GROUP): x ~ q * s, s = max|x| / 127 over the group, q = rint(x * 127 /
max|x|) in [-127, 127]. 4 bytes per element become 1 + 4 / KV_GROUP (1.125 at groups of 32, like
llama.cpp's Q8_0 cache): the cache a decode step streams, and its memory at 256K tokens, are 3.6x smaller.

The quantisation happens once, when a position enters the cache, and attention then reads only the
quantised values: the step's own keys too, so a chunked prefill and token-by-token decode attend
over the same numbers. `fake_quant_kv` is the same rounding in torch, for the eager reference the
engine is validated against (validate/reference.py). Elements within a float rounding of a
rounding boundary can round apart in two computations of the same key (k_proj on another kernel):
one step of 1/127 of the group's max, which validate allows on K/V states (`quant_step`)."""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from jambatrt.plugins.cpu import serial_twin

KV_GROUP = 32
_Q = 127.0


def kv_group(d: int) -> int:
    """Channels per scale for head dimension d."""
    return KV_GROUP if d % KV_GROUP == 0 else d


def kv_groups(d: int) -> int:
    """Scales a position and kv head for head dimension d."""
    return d // kv_group(d)


@njit(cache=True, parallel=True, error_model="numpy")
def _quantize(x, q, s):
    """x [R, G, g] float32 -> q [R, G, g] int8, s [R, G] float32. A group holding a NaN or inf gets
    scale NaN (its dequantised values are NaN: the engine's health check sees them)."""
    R, G, g = x.shape
    for r in prange(R):
        for j in range(G):
            m = np.float32(0.0)
            for i in range(g):
                m = max(m, abs(x[r, j, i]))
            ok = m < np.float32(np.inf)                   # False for inf and NaN
            for i in range(g):
                ok = ok and x[r, j, i] == x[r, j, i]
            if not ok:
                s[r, j] = np.float32(np.nan)
                for i in range(g):
                    q[r, j, i] = 0
                continue
            s[r, j] = m / np.float32(_Q)
            inv = np.float32(_Q) / m if m > 0 else np.float32(0.0)
            for i in range(g):
                q[r, j, i] = np.int8(min(max(np.rint(x[r, j, i] * inv), -np.float32(_Q)), np.float32(_Q)))


# a decode step's few rows on the calling thread: waking numba's threads costs more than they save
_quantize_serial = serial_twin(_quantize, cache=True, error_model="numpy")
_SERIAL_MAX = 1 << 16           # elements


def quantize_kv(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [..., d] float32 -> (q [..., d] int8, s [..., G] float32), G = d / kv_group(d)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    d = x.shape[-1]
    g = kv_group(d)
    q = np.empty(x.shape, np.int8)
    s = np.empty(x.shape[:-1] + (d // g,), np.float32)
    if x.size:
        (_quantize_serial if x.size <= _SERIAL_MAX else _quantize)(
            x.reshape(-1, d // g, g), q.reshape(-1, d // g, g), s.reshape(-1, d // g))
    return q, s


def dequantize_kv(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    """(q [..., d] int8, s [..., G]) -> float32 [..., d]: q * s, one float32 product per element."""
    d, G = q.shape[-1], s.shape[-1]
    out = q.reshape(q.shape[:-1] + (G, d // G)).astype(np.float32)
    out *= s[..., None]
    return out.reshape(q.shape)


def fake_quant_kv(x: torch.Tensor) -> torch.Tensor:
    """`dequantize_kv(*quantize_kv(x))` in torch (float32 result): the eager reference's keys and
    values when the engine has an int8 KV cache. Same float32 operations, so the same numbers
    wherever x is the same."""
    d = x.shape[-1]
    g = kv_group(d)
    xg = x.float().reshape(*x.shape[:-1], d // g, g)
    m = xg.abs().amax(-1, keepdim=True)
    inv = torch.where(m > 0, torch.tensor(_Q, dtype=torch.float32) / m, torch.zeros_like(m))
    q = torch.round(xg * inv).clamp_(-_Q, _Q)
    s = m / torch.tensor(_Q, dtype=torch.float32)
    bad = ~torch.isfinite(xg).all(-1, keepdim=True)
    return torch.where(bad, torch.full_like(xg, float("nan")), q * s).reshape(x.shape)


def quant_step(x: np.ndarray) -> np.ndarray:
    """The rounding step of every element of an int8 cache's float32 contents x [..., d]: its group's
    max|x| / 127 (validate allows one: an element within a float rounding of a rounding boundary can
    round apart in two computations of the same key)."""
    x = np.abs(np.asarray(x, np.float32))
    d = x.shape[-1]
    g = kv_group(d)
    m = x.reshape(*x.shape[:-1], d // g, g).max(-1, keepdims=True, initial=0.0) / np.float32(_Q)
    return np.broadcast_to(m, m.shape[:-1] + (g,)).reshape(x.shape)


# ---- the blocked layout (AVX512-VNNI) ------------------------------------------------------------------
# attention_decode.c's AVX512-VNNI kernel takes 16 positions a vector. In rows (t, head, channel) it
# transposes every 16 keys and scale columns and interleaves pairs of value rows before its dot products; a
# cache stored in that order spares them: keys in blocks of 16 positions, a line per 4 channels of the 16
# ([B, C/16, Hkv, d/4, 16, 4]); values in tiles of 64 positions, a line per pair of positions and 32
# channels, a channel's two values side by side ([B, C/64, Hkv, G, 32, 32, 2]); scales in blocks of 16
# ([B, C/16, Hkv, G, 16]). The same bits go in and come out, in another order (the results are identical:
# tests/test_kv_int8.py). AMD Zen 5, 64K positions, 8 query heads of 128 over 2 kv heads, one thread, L2:
# 18.0 ns a position against 24.3 in rows; from memory, two threads, the L3 flushed: the same (~1.05 ms:
# there the memory's throughput bounds both).
BLOCK, TILE = 16, 64          # positions of a key / scale block and of a value tile (attention_decode.c)


def blocked_fits(d: int) -> bool:
    """Whether an int8 cache of head dimension d can take the blocked layout (the kernel's int8 path:
    groups of 32 channels, d <= 256)."""
    return kv_group(d) == 32 and d <= 256


def blocked_alloc(B: int, cap: int, Hkv: int, d: int) -> tuple:
    """(k, v, ks, vs) of a blocked cache with room for cap positions (rounded up to a tile)."""
    C, G = -(-cap // TILE) * TILE, d // 32
    return (np.empty((B, C // BLOCK, Hkv, d // 4, BLOCK, 4), np.int8),
            np.empty((B, C // TILE, Hkv, G, TILE // 2, 32, 2), np.int8),
            np.empty((B, C // BLOCK, Hkv, G, BLOCK), np.float32), np.empty((B, C // BLOCK, Hkv, G, BLOCK), np.float32))


def _where(a: np.ndarray, t) -> tuple:
    """The index of positions t in a blocked array (keys, values or scales, told by its rank) and the shape
    that index selects: [len(t), B, Hkv] + the rest of a row; for one position t (an int) plain indexing,
    [B, Hkv] + the rest."""
    lead = () if isinstance(t, int) else (len(t),)
    if a.ndim == 7:                                     # values
        return np.s_[:, t // TILE, :, :, (t % TILE) // 2, :, t % 2], lead + (a.shape[0], a.shape[2], a.shape[3], 32)
    if a.ndim == 6:                                     # keys
        return np.s_[:, t // BLOCK, :, :, t % BLOCK, :], lead + (a.shape[0], a.shape[2], a.shape[3], 4)
    return np.s_[:, t // BLOCK, :, :, t % BLOCK], lead + (a.shape[0], a.shape[2], a.shape[3])


def blocked_write(arrays: tuple, P: int, qk, sk, qv, sv) -> None:
    """Positions P..P+L-1 of a blocked cache (k, v, ks, vs) from rows: q [B, L, Hkv, d] int8, s [B, L, Hkv, G]."""
    one = qk.shape[1] == 1          # a decode step: plain indexing (4 us; fancy indexing cost ~30 us)
    t = int(P) if one else np.arange(P, P + qk.shape[1])
    for a, r in zip(arrays, (qk, qv, sk, sv)):
        idx, shape = _where(a, t)
        a[idx] = (r if one else np.moveaxis(r, 1, 0)).reshape(shape)


def _rows(a: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Positions lo..hi-1 of one blocked array as rows [B, n, Hkv, d or G] (a copy)."""
    idx, shape = _where(a, np.arange(lo, hi))
    return np.ascontiguousarray(np.moveaxis(a[idx].reshape(shape[:3] + (math.prod(shape[3:]),)), 0, 1))


def blocked_read(arrays: tuple, lo: int, hi: int) -> tuple:
    """Rows (qk, sk, qv, sv) of positions lo..hi-1 of a blocked cache: q [B, n, Hkv, d] int8, s [B, n, Hkv, G]."""
    k, v, ks, vs = arrays
    return _rows(k, lo, hi), _rows(ks, lo, hi), _rows(v, lo, hi), _rows(vs, lo, hi)


class QuantizedKV:
    """A KV state tensor [B, P, Hkv, d] that an int8 cache hands out: views of its int8 values and
    scales, no float copy. Reads as float32 wherever numpy converts it (`np.asarray`), keeps
    `shape`/`dtype` (float32, what it stands for) for state checks, and slices on the batch and
    position axes without converting (`state[:, :keep]`). Over a blocked cache (`QuantizedKV.blocked`)
    it holds that cache's arrays and its length; `q` and `s` are then rows read out of them (a copy)."""

    dtype = np.dtype(np.float32)
    ndim = 4

    def __init__(self, q: np.ndarray, s: np.ndarray):
        self._q, self._s, self.layout = q, s, None

    @classmethod
    def blocked(cls, arrays: tuple, n: int, values: bool) -> "QuantizedKV":
        """The keys (values: the values) of the first n positions of a blocked cache (k, v, ks, vs)."""
        self = cls.__new__(cls)
        self.layout, self.n, self.values = arrays, n, values
        return self

    @property
    def q(self) -> np.ndarray:
        return self._q if self.layout is None else self.rows()[0]

    @property
    def s(self) -> np.ndarray:
        return self._s if self.layout is None else self.rows()[1]

    def rows(self, lo: int = 0, hi: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(q, s) of positions lo..hi-1 in rows."""
        hi = self.shape[1] if hi is None else hi
        if self.layout is None:
            return self._q[:, lo:hi], self._s[:, lo:hi]
        q, s = (self.layout[1], self.layout[3]) if self.values else (self.layout[0], self.layout[2])
        return _rows(q, lo, hi), _rows(s, lo, hi)

    @property
    def groups(self) -> int:
        """Scales a position and kv head."""
        return (self._s if self.layout is None else self.layout[2]).shape[3]

    @property
    def shape(self) -> tuple:
        if self.layout is None:
            return self._q.shape
        k = self.layout[0]
        return (k.shape[0], self.n, k.shape[2], 4 * k.shape[3])

    @property
    def nbytes(self) -> int:
        B, n, Hkv, d = self.shape
        return B * n * Hkv * (d + 4 * (d // kv_group(d)))

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        a = dequantize_kv(*self.rows())
        return a if dtype is None else a.astype(dtype, copy=False)

    def __getitem__(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) <= 2 and all(isinstance(i, slice) for i in idx):
            if self.layout is None:
                return QuantizedKV(self._q[idx], self._s[idx])
            kept = range(self.n)[idx[1] if len(idx) == 2 else slice(None)]
            if kept.step == 1 and (not kept or kept.start == 0):         # a prefix: still the cache's arrays
                return QuantizedKV.blocked(tuple(a[idx[0]] for a in self.layout), len(kept), self.values)
            return QuantizedKV(*(r[idx] for r in self.rows()))
        return np.asarray(self)[idx]

    def astype(self, dtype, copy: bool = True) -> np.ndarray:
        return np.asarray(self).astype(dtype, copy=copy)

    def __repr__(self) -> str:
        B, n, Hkv, d = self.shape
        where = "" if self.layout is None else ", blocked"
        return f"QuantizedKV(shape={[B, n, Hkv, d]}, int8 + {d // kv_group(d)} scales per head{where})"
