"""ExpertsInt8 and --weights-int8: int8 symmetric weights, one fp32 scale per output channel (per expert)."""

from __future__ import annotations

import torch


def quantize_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E,O,I] float -> (q [E,O,I] int8, scale [E,O] fp32), scale = max|W| / 127 over the input dim.
    All-zero rows get scale 0 (and dequantise to 0)."""
    wf = w.float()
    scale = wf.abs().amax(dim=-1) / 127.0                                  # [E,O]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(wf / safe[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_experts(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[..., None]).to(dtype)


def quantize_linear(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear layer's w [O,I] (or a block of its rows) -> (q [O,I] int8, scale [O] fp32): the
    ExpertsInt8 rule per output channel."""
    q, s = quantize_experts(w[None])
    return q[0], s[0]


def dequantize_linear(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize_experts(q[None], scale[None], dtype)[0]
