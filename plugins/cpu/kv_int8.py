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

import numpy as np
import torch
from numba import njit, prange

from jambatrt.plugins.cpu import serial_twin

KV_GROUP = 32
_Q = 127.0


def kv_group(d: int) -> int:
    """Channels per scale for head dimension d."""
    return KV_GROUP if d % KV_GROUP == 0 else d


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


class QuantizedKV:
    """A KV state tensor [B, P, Hkv, d] that an int8 cache hands out: views of its int8 values and
    scales, no float copy. Reads as float32 wherever numpy converts it (`np.asarray`), keeps
    `shape`/`dtype` (float32, what it stands for) for state checks, and slices on the batch and
    position axes without converting (`state[:, :keep]`)."""

    dtype = np.dtype(np.float32)
    ndim = 4

    def __init__(self, q: np.ndarray, s: np.ndarray):
        self.q, self.s = q, s

    @property
    def shape(self) -> tuple:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.s.nbytes

    def __len__(self) -> int:
        return self.q.shape[0]

    def __array__(self, dtype=None, copy=None):
        a = dequantize_kv(self.q, self.s)
        return a if dtype is None else a.astype(dtype, copy=False)

    def __getitem__(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) <= 2 and all(isinstance(i, slice) for i in idx):
            return QuantizedKV(self.q[idx], self.s[idx])
        return np.asarray(self)[idx]

    def astype(self, dtype, copy: bool = True) -> np.ndarray:
        return np.asarray(self).astype(dtype, copy=copy)

    def __repr__(self) -> str:
        return f"QuantizedKV(shape={list(self.shape)}, int8 + {self.s.shape[-1]} scales per head)"
