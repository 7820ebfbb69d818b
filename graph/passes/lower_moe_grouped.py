"""Lower each MoEInt8 node to the grouped pipeline of three TensorRT plugins (plugins/tensorrt/
moe_int8.py, "split" lowering) plus native ops:

    MoEInt8Route(router_logits; top_k)        -> topk_weights [T,k] f32, topk_ids [T,k] i32,
                                                 sorted_ids [NB*64] i32, block_expert [NB] i32
    MoEInt8GroupedUp(x, w13, w13_scale, sorted_ids, block_expert; top_k, expert_offset) -> act [T*k, I]
    MoEInt8GroupedDown(act, w2, w2_scale, sorted_ids, block_expert, topk_weights; expert_offset)
                                              -> out [T*k, H] f32
    Reshape [T, k, H] -> ReduceSum(axis 1) -> Cast(activation type) = y

The single-node plugin (moe_int8_fused_kernel) recomputes the gate/up GEMM for every block of
output columns: H / 64 times the gate/up work (64x for Jamba-1.5-Mini's H = 4096), which is what a
long prefill chunk cannot afford. The grouped GEMMs read each weight tile once per 64 tokens routed
to its expert. Runs after split_expert_groups: a group node keeps its expert_offset."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from jambatrt.graph.passes._build import NodeBuilder, replace_nodes

_ELEM = {"float32": TensorProto.FLOAT, "bfloat16": TensorProto.BFLOAT16}


def lower_moe_grouped(model: onnx.ModelProto, settings) -> onnx.ModelProto:
    g = model.graph
    dims = {t.name: list(t.dims) for t in g.initializer}
    b = NodeBuilder(g, "moe_grouped")

    def rewrite(node):
        if node.domain != "jamba" or node.op_type != "MoEInt8":
            return None
        x, logits, w13, s13, w2, s2 = node.input
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, offset = int(attrs["top_k"]), int(attrs.get("expert_offset", 0))
        hidden = dims[w2][1]                       # w2 [G, H, I] is an initializer (the weights)
        topk_w, _, sorted_ids, block_expert = b.op("MoEInt8Route", [logits], 4, domain="jamba", top_k=k)
        act = b.op("MoEInt8GroupedUp", [x, w13, s13, sorted_ids, block_expert], 1, domain="jamba",
                   top_k=k, expert_offset=offset)[0]
        out = b.op("MoEInt8GroupedDown", [act, w2, s2, sorted_ids, block_expert, topk_w], 1, domain="jamba",
                   expert_offset=offset)[0]
        per_slot = b.one("Reshape", [out, b.const([-1, k, hidden])])
        summed = b.one("ReduceSum", [per_slot, b.const([1])], keepdims=0)
        b.nodes.append(helper.make_node("Cast", [summed], [node.output[0]], name=b.name("Cast"),
                                        to=_ELEM[settings.dtype]))
        out_nodes, b.nodes = b.nodes, []
        return out_nodes

    replace_nodes(g, rewrite)
    return model
