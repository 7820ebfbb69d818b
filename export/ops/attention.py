"""jamba::attention -- causal grouped-query attention (no positional encoding in Jamba), with an
optional past KV cache. Never builds an L x L matrix: the reference works in blocks of queries."""

from __future__ import annotations

from typing import Optional

import torch

from jambatrt.export.ops.spec import ACTIVATION as T
from jambatrt.export.ops.spec import OpSpec


def _output_shapes(s):
    """o like q; present_k/v [B,P+L,Hkv,d]: the length is L without a past, unknown with one."""
    k = s.get("k")
    kv = None if k is None else [k[0], None if "past_k" in s else k[1], k[2], k[3]]
    return [s["q"], kv, kv]


SPEC = OpSpec(
    name="attention",
    onnx_op_type="CausalAttention",
    inputs=("q", "k", "v", "past_k", "past_v"),
    optional_inputs=frozenset({"past_k", "past_v"}),
    outputs=("o", "present_k", "present_v"),
    input_types=(T, T, T, T, T),
    output_types=(T, T, T),
    output_shapes=_output_shapes,
    zero_inputs={"past_k": (("k", 0), 0, ("k", 2), ("k", 3)),             # an empty past [B,0,Hkv,d]
                 "past_v": (("k", 0), 0, ("k", 2), ("k", 3))},
    tolerances={torch.float32: (2e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2)},
)

_SCORE_BUDGET = 1 << 24   # score elements per block: bounds reference memory at any length


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: Optional[torch.Tensor] = None,
                  past_v: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B,L,Hq,d]; k, v [B,L,Hkv,d]; past_k, past_v [B,P,Hkv,d] or None.
    Query i (absolute position P+i) sees keys 0..P+i. Softmax in fp32, scale d^-0.5.
    Returns o [B,L,Hq,d] (q.dtype), present_k, present_v [B,P+L,Hkv,d]."""
    if past_k is not None:
        k = torch.cat([past_k.to(k.dtype), k], dim=1)
        v = torch.cat([past_v.to(v.dtype), v], dim=1)
    B, L, Hq, d = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    P = S - L
    g = Hq // Hkv
    qf = q.float().reshape(B, L, Hkv, g, d).permute(0, 2, 3, 1, 4)     # [B,Hkv,g,L,d]
    kf = k.float().permute(0, 2, 3, 1)                                 # [B,Hkv,d,S]
    vf = v.float().permute(0, 2, 1, 3)                                 # [B,Hkv,S,d]
    o = torch.empty(B, Hkv, g, L, d, dtype=torch.float32, device=q.device)
    block = max(1, _SCORE_BUDGET // max(1, B * Hq * S))
    key_pos = torch.arange(S, device=q.device)
    for i0 in range(0, L, block):
        i1 = min(L, i0 + block)
        s = torch.matmul(qf[:, :, :, i0:i1], kf[:, :, None]) * d ** -0.5    # [B,Hkv,g,c,S]
        visible = key_pos[None, :] <= (P + torch.arange(i0, i1, device=q.device))[:, None]   # [c,S]
        s = s.masked_fill(~visible, float("-inf"))
        o[:, :, :, i0:i1] = torch.matmul(torch.softmax(s, dim=-1), vf[:, :, None])
    o = o.permute(0, 3, 1, 2, 4).reshape(B, L, Hq, d)
    return o.to(q.dtype).contiguous(), k.contiguous(), v.contiguous()


@torch.library.custom_op("jamba::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: Optional[torch.Tensor] = None,
              past_v: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    o, present_k, present_v = attention_ref(q, k, v, past_k, past_v)
    if past_k is None:   # custom ops may not return an alias of an input
        present_k, present_v = present_k.clone(), present_v.clone()
    return o, present_k, present_v


@attention.register_fake
def _(q, k, v, past_k=None, past_v=None):
    if past_k is None:
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    B, L, H, d = k.shape
    S = past_k.shape[1] + L
    return q.new_empty(q.shape), k.new_empty(B, S, H, d), v.new_empty(B, S, H, d)
