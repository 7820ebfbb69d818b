"""Small helpers for passes that add nodes: unique names and int64 constants."""

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
