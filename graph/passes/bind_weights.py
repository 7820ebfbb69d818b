"""Bind layers' weights outside the graph: every MoEInt8 node whose four weights (w13, w13_scale,
w2, w2_scale) are initializers, every LinearInt8 node (--weights-int8) whose weight and scale are,
every LinearF32 whose weight is, and every fused MambaMixerInt8 whose eight int8 weights and scales
are, becomes the op type `mapped` names for it, with its activation inputs, its attributes and
`weights=<key>`, where `bind(node, [its weight TensorProtos])` returns the key the op's body finds
the weights by; those initializers leave the graph (so ONNX Runtime never loads them).

Not in a backend's pass list: the ONNX Runtime engine runs it on the graph it hands a session
(engines/ort.py `map_weights`; the mapped forms are session ops registered beside their kernels in
plugins/cpu/); the engine file on disk keeps the plain nodes, the ONNX contract every other reader
sees."""

from __future__ import annotations

from typing import Callable

import onnx
from onnx import helper

from jambatrt.export.ops import DOMAIN, SPECS
from jambatrt.graph.passes._build import drop_unused_initializers, replace_nodes
from jambatrt.graph.passes.fuse_mamba_mixer import OP_TYPE as MIXER
from jambatrt.graph.passes.lower_linear_f32 import OP_TYPE as LINEAR_F32
from jambatrt.graph.passes.lower_linear_int8 import OP_TYPE

# op type -> (the op type that replaces it, activation inputs, weight inputs, attribute defaults)
WEIGHTS = {SPECS["moe_int8"].onnx_op_type: ("MoEInt8Mapped", slice(0, 2), slice(2, 6), {"expert_offset": 0}),
           OP_TYPE: ("LinearInt8Mapped", slice(0, 1), slice(1, 3), {}),
           LINEAR_F32: ("LinearF32Mapped", slice(0, 1), slice(1, 2), {}),
           MIXER: ("MambaMixerInt8Mapped", slice(0, 11), slice(11, 19), {})}


def bind_weights(model: onnx.ModelProto, bind: Callable[[onnx.NodeProto, list[onnx.TensorProto]], str]
                 ) -> onnx.ModelProto:
    """Rewrite `model` in place (and return it); `bind` is called once per rewritten node."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    moved: set[str] = set()

    def rewrite(node):
        if node.domain != DOMAIN or node.op_type not in WEIGHTS:
            return None
        mapped, acts, weights, defaults = WEIGHTS[node.op_type]
        names = list(node.input[weights])
        if not all(n in inits for n in names):
            return None
        key = bind(node, [inits[n] for n in names])
        moved.update(names)
        attrs = {**defaults, **{a.name: helper.get_attribute_value(a) for a in node.attribute}}
        return [helper.make_node(mapped, list(node.input[acts]), list(node.output), name=node.name,
                                 domain=DOMAIN, **attrs, weights=key)]

    replace_nodes(g, rewrite)
    drop_unused_initializers(g, moved)
    return model
