"""jamba::moe_int8 -- ExpertsInt8 mixture of experts: fp32 softmax router, top-k without
renormalisation, SwiGLU experts whose int8 weights are dequantised per output channel.

`expert_offset` (default 0) lets one node hold a contiguous group of the experts: the router
still ranks all E experts (router_logits [T,E]), the weights hold experts
[expert_offset, expert_offset + E_group), and y is the part of the sum those experts
contribute. A graph pass (graph/passes/split_expert_groups.py) splits a layer whose stacked
expert weights exceed TensorRT's 2^31-element tensor limit into such groups and adds the parts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jambatrt.export.ops.spec import ACTIVATION as T
from jambatrt.export.ops.spec import OpSpec

SPEC = OpSpec(
    name="moe_int8",
    onnx_op_type="MoEInt8",
    inputs=("x", "router_logits", "w13", "w13_scale", "w2", "w2_scale"),
    optional_inputs=frozenset(),
    outputs=("y",),
    input_types=(T, T, "int8", "float32", "int8", "float32"),
    output_types=(T,),
    output_shapes=lambda s: [s["x"]],                                    # y like x [T,H]
    attributes={"top_k": int, "expert_offset": int},
    tolerances={torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2)},
)


def routing_weights(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over experts in fp32, then top-k; the k weights are NOT renormalised (Jamba).
    Returns (weights [T,k] fp32, expert ids [T,k] int64)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    return torch.topk(probs, top_k, dim=-1)


def moe_int8_ref(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
                 w2: torch.Tensor, w2_scale: torch.Tensor, top_k: int, expert_offset: int = 0) -> torch.Tensor:
    """x [T,H]; router_logits [T,E]; w13 [G,2I,H] int8 (rows [0,I) gate, [I,2I) up);
    w13_scale [G,2I] fp32; w2 [G,H,I] int8; w2_scale [G,H] fp32, for experts
    expert_offset .. expert_offset+G-1 of the E (G = E, offset 0 for a whole layer).
    expert_e(x) = (W2_e (silu(G_e x) * (U_e x))) with W = int8 * scale[row]. Returns y [T,H] x.dtype."""
    T, H = x.shape
    I = w13.shape[1] // 2
    weights, experts = routing_weights(router_logits, top_k)
    y = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        tok, slot = torch.where(experts == e + expert_offset)
        if tok.numel() == 0:
            continue
        xe = x[tok].float()
        h = (xe @ w13[e].float().t()) * w13_scale[e].float()           # scale after the K loop
        a = (F.silu(h[:, :I]) * h[:, I:]).to(x.dtype).float()           # activations stay in x.dtype
        out = (a @ w2[e].float().t()) * w2_scale[e].float()
        y.index_add_(0, tok, out * weights[tok, slot, None])
    return y.to(x.dtype)


@torch.library.custom_op("jamba::moe_int8", mutates_args=())
def moe_int8(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
             w2: torch.Tensor, w2_scale: torch.Tensor, top_k: int, expert_offset: int = 0) -> torch.Tensor:
    return moe_int8_ref(x, router_logits, w13, w13_scale, w2, w2_scale, top_k, expert_offset)


@moe_int8.register_fake
def _(x, router_logits, w13, w13_scale, w2, w2_scale, top_k, expert_offset=0):
    return x.new_empty(x.shape)
