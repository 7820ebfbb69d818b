"""Give every absent optional input of a jamba node the explicit zeros its SPEC says it stands for
(`zero_inputs`: a zero state for conv and SSM, an empty past KV for attention).

ONNX Runtime's Python custom ops (onnxruntime-extensions) and TensorRT plugins take a fixed
number of inputs. An absent optional input without a zero rule (the scan's z and delta_bias) has
no kernel that takes it absent and is refused."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from jambatrt.errors import ArtifactError
from jambatrt.export.ops import ACTIVATION, DOMAIN, SPECS
from jambatrt.graph.passes._build import NodeBuilder

_ELEM = {"float32": TensorProto.FLOAT, "bfloat16": TensorProto.BFLOAT16}


def _shape(b: NodeBuilder, dims, ins: dict[str, str]) -> str:
    """A 1-D int64 shape tensor from a zero rule: constants, and sizes of other inputs (adjacent axes
    of one input read by one Shape slice), concatenated."""
    parts, i = [], 0
    while i < len(dims):
        d = dims[i]
        if isinstance(d, int):
            parts.append(b.const([d]))
            i += 1
            continue
        name, axis = d[0], d[1]
        if len(d) > 2:                         # a size plus an offset: K - 1
            parts.append(b.one("Sub" if d[2] < 0 else "Add", [b.shape_slice(ins[name], axis, axis + 1),
                                                              b.const([abs(d[2])])]))
            i += 1
            continue
        end = axis + 1
        while i + 1 < len(dims) and isinstance(dims[i + 1], tuple) and len(dims[i + 1]) == 2 \
                and dims[i + 1][0] == name and dims[i + 1][1] == end:
            i, end = i + 1, end + 1
        parts.append(b.shape_slice(ins[name], axis, end))
        i += 1
    return parts[0] if len(parts) == 1 else b.one("Concat", parts, axis=0)


def materialize_optional_inputs(model: onnx.ModelProto, settings) -> onnx.ModelProto:
    g = model.graph
    b = NodeBuilder(g, "materialize")
    act = _ELEM[settings.dtype]
    by_type = {s.onnx_op_type: s for s in SPECS.values()}
    new_nodes = []

    for node in g.node:
        spec = by_type.get(node.op_type) if node.domain == DOMAIN else None
        if spec is None:
            new_nodes.append(node)
            continue
        ins = list(node.input) + [""] * (len(spec.inputs) - len(node.input))
        named = dict(zip(spec.inputs, ins))
        shapes = {}                            # one shape tensor per rule (past_k and past_v share it)
        for i, (name, t) in enumerate(zip(spec.inputs, spec.input_types)):
            if ins[i] or name not in spec.optional_inputs:
                continue
            rule = spec.zero_inputs.get(name)
            if rule is None:
                raise ArtifactError(f"{node.name}: {spec.onnx_op_type} without {name} is not produced by jambatrt "
                                    "export and has no kernel that takes it absent")
            if rule not in shapes:
                shapes[rule] = _shape(b, rule, named)
            elem = act if t == ACTIVATION else _ELEM[t]
            ins[i] = b.one("ConstantOfShape", [shapes[rule]], value=helper.make_tensor("zero", elem, [1], [0]))
        new_nodes += b.nodes
        b.nodes = []
        node = onnx.NodeProto.FromString(node.SerializeToString())
        del node.input[:]
        node.input.extend(ins)
        new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    return model
