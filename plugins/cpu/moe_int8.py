"""CPU kernel for jamba::moe_int8: fp32 softmax router, top-k without renormalisation, tokens
grouped by expert, SwiGLU experts with int8 weights and per-output-channel scales applied after
the fp32 dot product.

Built on torch's CPU kernels (zero-copy from numpy): at T=4096, H=128, I=256, E=4, top-2 it ran
~3x faster than the same algorithm in numpy (numpy's elementwise ops and gathers are single-threaded)
and ~2x faster than ONNX Runtime's QMoE (bench/kernels.json). Per expert and token group, one of:
- dequantise the int8 matrix to float32 (no scale: scales multiply the outputs) and run a GEMM: for
  small matrices (under ~1M weights) at any group size;
- `linear_int8` (plugins/cpu/linear_int8.py) for large ones: its int8 GEMV for up to 4 tokens (4x
  less memory traffic than a dequantised copy), else its integer GEMM on VNNI CPUs (float32-class
  error, 1.3-2.3x the float32 GEMM's speed at these sizes) or dequantised blocks + float32 GEMM.
A float32 decode step (one token, or a few tokens of small experts) runs whole in one numba call
(`_moe_few_tokens`) after the routing, on linear_int8's GEMV (native where the CPU has AVX512-VNNI or
AVX2): the ~25 small torch calls of the general path cost ~300 us at the bench preset's sizes, against
~20 us of arithmetic, and skipping them and the row gathers between them made the decode step 0.87-0.91x
as long at H 1024, I 2816, 8 experts top-2 (issue 18). With several tokens it would read a large expert once per token
routed to it, so a few tokens of large experts take the general path.
bfloat16 activations (torch path) take the general path, which rounds the SwiGLU activations to
bfloat16."""

from __future__ import annotations

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import njit

from jambatrt.export.ops.moe_int8 import routing_weights
from jambatrt.plugins.cpu.linear_int8 import gemv_int8_into, linear_int8
from jambatrt.plugins.cpu.native import gemv_int8_address
from jambatrt.plugins.cpu.selective_scan import swiglu_into
from jambatrt.plugins.registry import implements, session_op

_FEW_TOKENS = 4                    # up to here small experts run in one fused call (`_moe_few_tokens`)
_INT8_PATH_MIN_WEIGHTS = 1 << 20   # below ~1M weights dequantising costs less than the int8 GEMV


@njit(cache=True, error_model="numpy")
def _moe_few_tokens(x, experts, weights, w13, s13, w2, s2, expert_offset, y, native):
    """Every (token, slot) of a few tokens: x [T,H] float32; experts [T,k] int64 (global ids) and
    weights [T,k] float32 from routing_weights; w13 [G,2I,H], w2 [G,H,I] int8 with scales [G,2I],
    [G,H] for experts expert_offset..+G-1; y [T,H] float32 zeros -> y += weight * expert(x), the
    experts added in slot order. Each matrix product is linear_int8's GEMV (`native`: its native
    kernel's address, or 0), on both threads for matrices of >= _SERIAL_MAX_WEIGHTS; a chosen expert is
    read once per token routed to it."""
    T, k = experts.shape
    G, I2, H = w13.shape
    I = I2 // 2
    h = np.empty((1, I2), np.float32)
    a = np.empty((1, I), np.float32)
    o = np.empty((1, H), np.float32)
    for t in range(T):
        for j in range(k):
            e = experts[t, j] - expert_offset
            if e < 0 or e >= G:
                continue
            gemv_int8_into(x[t:t + 1], w13[e], s13[e], h, native)
            swiglu_into(h[0, :I], h[0, I:], a[0])       # exp32 in vector lanes (libm's expf is scalar)
            gemv_int8_into(a, w2[e], s2[e], o, native)
            wt = weights[t, j]
            for c in range(H):
                y[t, c] += o[0, c] * wt


def _few_tokens(x, experts, weights, w13, s13, w2, s2, expert_offset) -> np.ndarray:
    """`_moe_few_tokens` from Python: x and the int8 weights and fp32 scales as C-contiguous arrays, the
    routing (experts, weights) as routing_weights returns it; returns y [T,H] float32."""
    y = np.zeros(x.shape, np.float32)
    numba.get_num_threads()                 # starts numba's threads (gemv_int8_into's precondition)
    _moe_few_tokens(x, experts.numpy(), weights.contiguous().numpy(), w13, s13, w2, s2, expert_offset, y,
                    gemv_int8_address())
    return y


def _linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, compute: str = "float32") -> torch.Tensor:
    """x [n,H] float32 @ (int8 w [O,H]).T, then * scale [O] per output channel -> [n,O] float32.
    compute: linear_int8's GEMM precision for large experts (small ones stay float32)."""
    if w.numel() >= _INT8_PATH_MIN_WEIGHTS:
        # the --weights-int8 kernel: a GEMV on the int8 weights for a few rows, else its integer GEMM or
        # blocks dequantised on numba's threads into one reused buffer + torch's GEMM (w.float() is one
        # thread and a fresh array)
        return torch.from_numpy(linear_int8(x.contiguous().numpy(), w.contiguous().numpy(),
                                            scale.contiguous().numpy(), compute))
    return F.linear(x, w.float()) * scale


def moe_int8_torch(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
                   w2: torch.Tensor, w2_scale: torch.Tensor, top_k: int, expert_offset: int = 0,
                   compute: str = "float32") -> torch.Tensor:
    """x [T,H] (float32/bfloat16); router_logits [T,E]; w13 [G,2I,H] int8 (rows [0,I) gate, [I,2I) up);
    w13_scale [G,2I] float32; w2 [G,H,I] int8; w2_scale [G,H] float32 for experts expert_offset ..
    expert_offset+G-1 of the E the router ranks. Semantics of `moe_int8_ref`: y = sum over the top_k
    experts (those of this group) of weight * W2 (silu(G x) * (U x)), W = int8 * scale[row],
    fp32 accumulation, SwiGLU activations rounded to x.dtype. Returns y [T,H] in x.dtype (new).
    compute="bfloat16": the GEMMs of large experts' token groups in bfloat16 (linear_int8)."""
    if x.dim() != 2 or w13.dim() != 3 or w13.dtype != torch.int8 or w2.dtype != torch.int8:
        raise ValueError(f"moe_int8: x must be [T,H] and w13/w2 int8 [E,2I,H]/[E,H,I], got x {list(x.shape)}, "
                         f"w13 {list(w13.shape)} {w13.dtype}, w2 {list(w2.shape)} {w2.dtype}")
    T, H = x.shape
    G, I2 = w13.shape[:2]
    I = I2 // 2
    E = router_logits.shape[-1]
    expected = {"router_logits": (router_logits, (T, E)), "w13": (w13, (G, 2 * I, H)),
                "w13_scale": (w13_scale, (G, 2 * I)), "w2": (w2, (G, H, I)), "w2_scale": (w2_scale, (G, H))}
    bad = [f"{n} {list(t.shape)} (expected {list(s)})" for n, (t, s) in expected.items() if tuple(t.shape) != s]
    if not bad and not 1 <= top_k <= E:
        bad = [f"top_k {top_k} (expected 1..{E})"]
    if not bad and not (0 <= expert_offset and expert_offset + G <= E):
        bad = [f"experts {expert_offset}..{expert_offset + G - 1} (expert_offset {expert_offset}, {G} in the "
               f"weights) outside the router's {E}"]
    if bad:
        raise ValueError(f"moe_int8: {', '.join(bad)}")

    weights, experts = routing_weights(router_logits, top_k)        # [T,k] fp32, [T,k]: the ref's own
    small = w13[0].numel() < _INT8_PATH_MIN_WEIGHTS and w2[0].numel() < _INT8_PATH_MIN_WEIGHTS
    if x.dtype == torch.float32 and (T == 1 or (T <= _FEW_TOKENS and small)):
        return torch.from_numpy(_few_tokens(x.contiguous().numpy(), experts, weights, w13.contiguous().numpy(),
                                            w13_scale.float().contiguous().numpy(), w2.contiguous().numpy(),
                                            w2_scale.float().contiguous().numpy(), expert_offset))
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)                        # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat, minlength=E).tolist()
    start = sum(counts[:expert_offset])                             # pairs of experts before this group
    counts = counts[expert_offset:expert_offset + G]
    xf, s13, s2 = x.float(), w13_scale.float(), w2_scale.float()
    y = torch.zeros(T, H, dtype=torch.float32)
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        tok = pairs // top_k
        h = _linear(xf[tok], w13[e], s13[e], compute)                # [n,2I]
        a = (F.silu(h[:, :I]) * h[:, I:]).to(x.dtype).float()       # activations stay in x.dtype
        out = _linear(a, w2[e], s2[e], compute)                      # [n,H]
        y.index_add_(0, tok, out * weights.reshape(-1)[pairs, None])
    return y.to(x.dtype)


def moe_int8(x, router_logits, w13, w13_scale, w2, w2_scale, top_k, expert_offset=0, compute="float32") -> np.ndarray:
    """numpy twin of `moe_int8_torch`: floats of any dtype in (computed in float32), w13/w2 int8.
    Returns y [T,H] float32. A decode step's call (one float32 token, well-formed C-contiguous inputs)
    goes straight to `_moe_few_tokens`: the tensor conversions and checks of the general path cost
    ~100 us a call there, a tenth of the layer's time at the peer preset's sizes."""
    if _one_token_ready(x, router_logits, w13, w13_scale, w2, w2_scale, top_k, expert_offset):
        weights, experts = routing_weights(torch.from_numpy(router_logits), int(top_k))
        return _few_tokens(x, experts, weights, w13, w13_scale, w2, w2_scale, int(expert_offset))
    f32 = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
           for a in (x, router_logits, w13_scale, w2_scale)]
    w13, w2 = (torch.from_numpy(np.ascontiguousarray(w)) for w in (w13, w2))
    return moe_int8_torch(f32[0], f32[1], w13, f32[2], w2, f32[3], int(top_k), int(expert_offset), compute).numpy()


def _one_token_ready(x, router_logits, w13, w13_scale, w2, w2_scale, top_k, expert_offset) -> bool:
    """Whether moe_int8's arguments are one float32 token's, every array C-contiguous of the dtype and
    shape the general path would accept (anything else takes it, and its errors)."""
    arrays = (x, router_logits, w13, w13_scale, w2, w2_scale)
    if not all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays) or x.ndim != 2 or w13.ndim != 3:
        return False
    G, I2, H = w13.shape
    E = router_logits.shape[-1]
    return (x.shape[0] == 1 and x.dtype == np.float32 and router_logits.dtype == np.float32
            and w13.dtype == np.int8 and w2.dtype == np.int8 and w13_scale.dtype == np.float32
            and w2_scale.dtype == np.float32 and x.shape[1] == H and router_logits.shape == (1, E)
            and w13_scale.shape == (G, I2) and w2.shape == (G, H, I2 // 2) and w2_scale.shape == (G, H)
            and I2 % 2 == 0 and 1 <= int(top_k) <= E and 0 <= int(expert_offset) and int(expert_offset) + G <= E)


# ---- registered implementations (plugins/registry.py) ------------------------------------------------
implements("moe_int8", "cpu")(moe_int8_torch)
implements("moe_int8", "ort", out_shapes=lambda x, *_: [x.shape])(moe_int8)


@session_op("MoEInt8Mapped", inputs=("float32", "float32"),
            attributes={"top_k": int, "expert_offset": int, "weights": str}, out_shapes=lambda x, *_: [x.shape])
def moe_int8_mapped(x, router_logits, top_k, expert_offset, weights):
    """MoEInt8 whose (w13, w13_scale, w2, w2_scale) the engine mapped from the store and bound under
    `weights` (graph/passes/bind_weights.py): ONNX Runtime never loads or copies them."""
    from jambatrt.plugins.cpu.ort_ops import bound_weights
    (w13, w13_scale, w2, w2_scale), compute = bound_weights(weights)
    return moe_int8(x, router_logits, w13, w13_scale, w2, w2_scale, int(top_k), int(expert_offset), compute)
