"""Bind layers' weights outside the graph: every MoEInt8 node whose four weights (w13, w13_scale,
w2, w2_scale) are initializers, and every LinearInt8 node (--weights-int8) whose weight and scale
are, becomes the op type `mapped` names for it, with its activation inputs, its attributes and
`weights=<key>`, where `bind(node, [its weight TensorProtos])` returns the key the op's body finds
the weights by; those initializers leave the graph (so ONNX Runtime never loads them).

Not in a backend's pass list: the ONNX Runtime engine runs it on the graph it hands a session
(engines/ort.py `map_expert_weights`, op types from plugins/cpu/ort_ops.py); the engine file on
disk keeps the plain nodes, the ONNX contract every other reader sees."""

from __future__ import annotations

from typing import Callable

import onnx
from onnx import helper

from jambatrt.export.ops import DOMAIN, SPECS
from jambatrt.graph.passes._build import drop_unused_initializers, replace_nodes

# op type -> (activation inputs, weight inputs, attribute defaults) of the nodes whose weights are bound
WEIGHTS = {SPECS["moe_int8"].onnx_op_type: (slice(0, 2), slice(2, 6), {"expert_offset": 0}),
           "LinearInt8": (slice(0, 1), slice(1, 3), {})}


def bind_weights(model: onnx.ModelProto, mapped: dict[str, str],
                 bind: Callable[[onnx.NodeProto, list[onnx.TensorProto]], str]) -> onnx.ModelProto:
    """Rewrite `model` in place (and return it); mapped: op type (a key of WEIGHTS) -> the op type
    that replaces it; `bind` is called once per rewritten node."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    moved: set[str] = set()

    def rewrite(node):
        if node.domain != DOMAIN or node.op_type not in mapped:
            return None
        acts, weights, defaults = WEIGHTS[node.op_type]
        names = list(node.input[weights])
        if not all(n in inits for n in names):
            return None
        key = bind(node, [inits[n] for n in names])
        moved.update(names)
        attrs = {**defaults, **{a.name: helper.get_attribute_value(a) for a in node.attribute}}
        return [helper.make_node(mapped[node.op_type], list(node.input[acts]), list(node.output), name=node.name,
                                 domain=DOMAIN, **attrs, weights=key)]

    replace_nodes(g, rewrite)
    drop_unused_initializers(g, moved)
    return model
