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
  with their log-sum-exps, which the aten flash op returns."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_flash_with_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu   # -> (out, logsumexp)


def attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor | None = None,
                    past_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B,L,Hq,d]; k, v [B,L,Hkv,d]; past_k, past_v [B,P,Hkv,d] or None (P = 0 also means none).
    Query i sees keys 0..P+i; scale d^-0.5; computed in float32. Returns o [B,L,Hq,d] in q.dtype and
    present_k, present_v [B,P+L,Hkv,d] (new tensors, never views of the inputs)."""
    B, L, Hq, d = q.shape
    Hkv = k.shape[2]
    if k.shape != (B, L, Hkv, d) or v.shape != k.shape or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"attention: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} "
                         "(expected q [B,L,Hq,d], k = v [B,L,Hkv,d], Hq a multiple of Hkv)")
    P = 0 if past_k is None else past_k.shape[1]
    if past_k is not None and (past_k.shape != (B, P, Hkv, d) or past_v is None or past_v.shape != past_k.shape):
        raise ValueError(f"attention: past_k {list(past_k.shape)}, past_v "
                         f"{None if past_v is None else list(past_v.shape)} (expected both [B,P,{Hkv},{d}])")
    if P:
        present_k = torch.cat([past_k.to(k.dtype), k], dim=1)
        present_v = torch.cat([past_v.to(v.dtype), v], dim=1)
    else:
        present_k, present_v = k.clone(), v.clone()
    if L == 0:
        return q.new_empty(q.shape), present_k, present_v
    qf = q.float().transpose(1, 2)                                          # [B,Hq,L,d]
    kf, vf = present_k.float().transpose(1, 2), present_v.float().transpose(1, 2)   # [B,Hkv,S,d]
    if P == 0 or L == 1:
        o = F.scaled_dot_product_attention(qf, kf, vf, is_causal=P == 0 and L > 1, enable_gqa=True)
    else:
        o = _chunk_with_past(qf, kf, vf, P)
    return o.transpose(1, 2).to(q.dtype).contiguous(), present_k, present_v


def _chunk_with_past(qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, P: int) -> torch.Tensor:
    """qf [B,Hq,L,d]; kf, vf [B,Hkv,P+L,d] float32 -> o [B,Hq,L,d]: causal with offset P."""
    B, Hq, L, d = qf.shape
    Hkv = kf.shape[1]
    g = Hq // Hkv
    # past keys: visible to every query, so the g heads sharing a kv head become one query of g*L rows
    o_past, lse_past = _flash_with_lse(qf.reshape(B, Hkv, g * L, d), kf[:, :, :P], vf[:, :, :P])
    o_past, lse_past = o_past.reshape(B, Hq, L, d), lse_past.reshape(B, Hq, L)
    # new keys: query i sees new keys 0..i -- top-left causal; repeating them costs only O(L)
    k_new = kf[:, :, P:].repeat_interleave(g, dim=1)
    v_new = vf[:, :, P:].repeat_interleave(g, dim=1)
    o_new, lse_new = _flash_with_lse(qf, k_new, v_new, is_causal=True)
    m = torch.maximum(lse_past, lse_new)
    w_past = (lse_past - m).exp_().unsqueeze(-1)
    w_new = (lse_new - m).exp_().unsqueeze(-1)
    return (o_past * w_past + o_new * w_new) / (w_past + w_new)


def attention(q, k, v, past_k=None, past_v=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy in/out twin of `attention_torch`: q [B,L,Hq,d]; k, v [B,L,Hkv,d]; past [B,P,Hkv,d] or
    None. Computes in float32; returns float32 (o, present_k, present_v), freshly allocated."""
    t = [None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
         for a in (q, k, v, past_k, past_v)]
    o, pk, pv = attention_torch(*t)
    return o.numpy(), pk.numpy(), pv.numpy()
