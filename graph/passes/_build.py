"""Small helpers for passes: unique names, int64 constants, node replacement."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import helper, numpy_helper


class NodeBuilder:
    def __init__(self, graph: onnx.GraphProto, prefix: str):
        self.graph, self.prefix = graph, prefix
        self._ids = itertools.count()
        self.nodes: list[onnx.NodeProto] = []

    def name(self, hint: str) -> str:
        return f"{self.prefix}/{hint}_{next(self._ids)}"

    def const(self, values, dtype=np.int64) -> str:
        name = self.name("const")
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), domain=domain, **attrs))
        return outs

    def one(self, op_type: str, inputs: list[str], **attrs) -> str:
        return self.op(op_type, inputs, 1, **attrs)[0]

    def shape_slice(self, tensor: str, start: int, end: int) -> str:
        return self.one("Shape", [tensor], start=start, end=end)


def static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Every tensor whose shape is fully static: initializers, and (by ONNX shape inference, with the
    jamba schemas) values computed from them alone, such as a squeezed weight."""
    from jambatrt.graph.schemas import register_schemas

    register_schemas()
    out = {t.name: list(t.dims) for t in model.graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    for vi in inferred.graph.value_info:
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = [d.dim_value for d in dims]
    return out


def replace_nodes(graph: onnx.GraphProto, rewrite) -> None:
    """Rebuild graph.node in order: rewrite(node) returns the nodes to put in its place, or None to
    keep it as it is."""
    new = []
    for node in graph.node:
        out = rewrite(node)
        new.extend([node] if out is None else out)
    del graph.node[:]
    graph.node.extend(new)


def drop_unused_initializers(graph: onnx.GraphProto, names) -> None:
    """Remove the initializers among `names` that no node reads any more."""
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name not in names or t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
