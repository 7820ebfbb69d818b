"""CPU kernel for jamba::causal_conv1d (numba): depthwise causal conv + bias + SiLU, carrying the
last K-1 inputs as state. One parallel job per (batch, channel) row; the row is contiguous in time."""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from jambatrt.plugins.cpu import np32, serial_twin
from jambatrt.plugins.cpu.selective_scan import silu32
from jambatrt.plugins.registry import implements


@njit(parallel=True, cache=True, error_model="numpy", fastmath=False)
def _conv_kernel(x, weight, bias, state, y, state_out):
    """float32, C-contiguous: x, y [B,D,L]; weight [D,K]; bias [D]; state, state_out [B,D,K-1].
    Each output is bias + w[0] x[t-K+1] + ... + w[K-1] x[t], added in that order. The taps are the
    outer loop and time the inner one, so every pass over the row is one vector loop (no
    reassociation: the sums are the same as tap by tap per output)."""
    Bsz, D, L = x.shape
    K = weight.shape[1]
    for row in prange(Bsz * D):
        b = row // D
        d = row % D
        xr, yr, sr = x[b, d], y[b, d], state[b, d]      # contiguous rows
        yr[:] = bias[d]
        for k in range(K):
            wk = weight[d, k]
            shift = K - 1 - k                  # output t reads input t - shift
            for t in range(min(shift, L)):     # reaches back into the carried state
                yr[t] += wk * sr[K - 1 - shift + t]
            ys = yr[shift:]                    # indices that are loop counters: numba adds no
            for t in range(L - shift):         # negative-index fix-up, so LLVM vectorises the loop
                ys[t] += wk * xr[t]
        for t in range(L):
            yr[t] = silu32(yr[t])
        # new state = last K-1 entries of cat(state, x)
        for i in range(K - 1):
            j = L - (K - 1) + i
            state_out[b, d, i] = xr[j] if j >= 0 else sr[K - 1 + j]


@njit(cache=True, error_model="numpy", fastmath=False)
def _conv_step_kernel(x, weight, bias, state, y, state_out):
    """`_conv_kernel` for L = 1 (a decode step) on the calling thread: one pass over the channels,
    then SiLU as one vector loop (per-row views cost more than a one-token row's arithmetic)."""
    Bsz, D, _ = x.shape
    K = weight.shape[1]
    for b in range(Bsz):
        for d in range(D):
            acc = bias[d]
            for k in range(K - 1):
                acc += weight[d, k] * state[b, d, k]
            y[b, d, 0] = acc + weight[d, K - 1] * x[b, d, 0]
            for i in range(K - 2):
                state_out[b, d, i] = state[b, d, i + 1]
            if K > 1:
                state_out[b, d, K - 2] = x[b, d, 0]
        yb = y.reshape(Bsz, D)[b]      # a C-contiguous row (y[b, :, 0] is typed as strided: no vector loop, 3x slower)
        for d in range(D):
            yb[d] = silu32(yb[d])


@njit(parallel=True, cache=True, error_model="numpy", fastmath=False)
def _conv_kernel_tl(x, c0, weight_t, bias, state, y, state_out):
    """`_conv_kernel` on time-major rows, so the fused Mamba mixer's prefill needs no transposes: the
    input is channels c0 .. c0+D-1 of x [B,L,C] (in_proj's output, C-contiguous), y [B,L,D]; weight_t
    [K,D] (the weight transposed); bias [D]; state, state_out [B,D,K-1]. The same sums in the same
    order (bias, then tap 0 .. K-1), so the same bits; one vector loop over the channels per tap."""
    Bsz, L, D = y.shape
    K = weight_t.shape[0]
    nb = (L + 63) // 64
    for job in prange(Bsz * nb):
        b = job // nb
        t0 = (job % nb) * 64
        for t in range(t0, min(t0 + 64, L)):
            yr = y[b, t]
            yr[:] = bias
            for k in range(K):
                s = t - (K - 1 - k)            # output t reads input s
                wk = weight_t[k]
                if s >= 0:
                    for d in range(D):
                        yr[d] += wk[d] * x[b, s, c0 + d]
                else:                          # reaches back into the carried state
                    for d in range(D):
                        yr[d] += wk[d] * state[b, d, K - 1 + s]
            for d in range(D):
                yr[d] = silu32(yr[d])
    for b in range(Bsz):
        for d in range(D):
            for i in range(K - 1):
                j = L - (K - 1) + i
                state_out[b, d, i] = x[b, j, c0 + d] if j >= 0 else state[b, d, K - 1 + j]


# the same kernel on the calling thread, for decode-sized calls
_conv_kernel_serial = serial_twin(_conv_kernel, cache=True, error_model="numpy", fastmath=False)
_SERIAL_MAX_ELEMENTS = 1 << 15     # B*D*L below which waking the second thread costs more than it saves


def causal_conv1d(x, weight, bias, state=None) -> tuple[np.ndarray, np.ndarray]:
    """x [B,D,L]; weight [D,K]; bias [D]; state [B,D,K-1] (the K-1 inputs before x; zeros if None).
    Any float dtype in (converted to float32). Returns (y [B,D,L] = silu(conv(x) + bias),
    state_out [B,D,K-1]), float32, freshly allocated -- the semantics of `causal_conv1d_ref`."""
    x, weight, bias = (np.ascontiguousarray(a, dtype=np.float32) for a in (x, weight, bias))
    if x.ndim != 3 or weight.ndim != 2 or weight.shape[0] != x.shape[1] or weight.shape[1] < 1:
        raise ValueError(f"causal_conv1d: x must be [B,D,L] and weight [D,K>=1], got {list(x.shape)} "
                         f"and {list(weight.shape)}")
    Bsz, D, L = x.shape
    K = weight.shape[1]
    if bias.shape != (D,):
        raise ValueError(f"causal_conv1d: bias has shape {list(bias.shape)}, expected [{D}]")
    if state is None:
        state = np.zeros((Bsz, D, K - 1), np.float32)
    state = np.ascontiguousarray(state, dtype=np.float32)
    if state.shape != (Bsz, D, K - 1):
        raise ValueError(f"causal_conv1d: state has shape {list(state.shape)}, expected {[Bsz, D, K - 1]}")
    y = np.empty((Bsz, D, L), np.float32)
    state_out = np.empty((Bsz, D, K - 1), np.float32)
    if L == 1:
        kernel = _conv_step_kernel
    else:
        kernel = _conv_kernel_serial if Bsz * D * L < _SERIAL_MAX_ELEMENTS else _conv_kernel
    kernel(x, weight, bias, state, y, state_out)
    return y, state_out


def causal_conv1d_update(x, weight, bias, state) -> tuple[np.ndarray, np.ndarray]:
    """One decode step: x [B,D], state [B,D,K-1] -> (y [B,D], new_state [B,D,K-1]), float32."""
    y, state_out = causal_conv1d(np.asarray(x)[:, :, None], weight, bias, state)
    return y[:, :, 0], state_out


# ---- registered implementations (plugins/registry.py) ------------------------------------------------
def causal_conv1d_torch(x, weight, bias, state=None):
    """torch.ops.jamba.causal_conv1d on CPU: `causal_conv1d` in float32, y and the state in x.dtype."""
    if state is not None:
        state = state.to(x.dtype)          # as the ref: the carried inputs live in x's dtype
    y, s = causal_conv1d(np32(x), np32(weight), np32(bias), np32(state))
    return torch.from_numpy(y).to(x.dtype), torch.from_numpy(s).to(x.dtype)


implements("causal_conv1d", "cpu")(causal_conv1d_torch)
implements("causal_conv1d", "ort", out_shapes=lambda x, weight, *_: [x.shape, (x.shape[0], x.shape[1], weight.shape[1] - 1)]
           )(causal_conv1d)
