"""Bind a MoE layer's expert weights outside the graph: every MoEInt8 node whose four weights
(w13, w13_scale, w2, w2_scale) are initializers becomes `<op_type>(x, router_logits; top_k,
expert_offset, weights=<key>)`, where `bind(node, [the four TensorProtos])` returns the key the
op's body finds the weights by; those initializers leave the graph (so ONNX Runtime never loads
them).

Not in a backend's pass list: the ONNX Runtime engine runs it on the graph it hands a session
(engines/ort.py `map_expert_weights`, op type `plugins.cpu.ort_ops.MAPPED_OP`); the engine file
on disk keeps the plain MoEInt8 nodes, the ONNX contract every other reader sees."""

from __future__ import annotations

from typing import Callable

import onnx
from onnx import helper

from jambatrt.export.ops import DOMAIN, SPECS
from jambatrt.graph.passes._build import drop_unused_initializers, replace_nodes


def bind_expert_weights(model: onnx.ModelProto, op_type: str,
                        bind: Callable[[onnx.NodeProto, list[onnx.TensorProto]], str]) -> onnx.ModelProto:
    """Rewrite `model` in place (and return it); `bind` is called once per rewritten node."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    moved: set[str] = set()

    def rewrite(node):
        names = list(node.input[2:6])
        if node.domain != DOMAIN or node.op_type != SPECS["moe_int8"].onnx_op_type or not all(n in inits for n in names):
            return None
        key = bind(node, [inits[n] for n in names])
        moved.update(names)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        return [helper.make_node(op_type, list(node.input[:2]), list(node.output), name=node.name, domain=DOMAIN,
                                 top_k=attrs["top_k"], expert_offset=attrs.get("expert_offset", 0), weights=key)]

    replace_nodes(g, rewrite)
    drop_unused_initializers(g, moved)
    return model
