"""Small helpers for passes: unique names, int64 constants, node replacement."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import helper, numpy_helper

from jambatrt.export.ops import DOMAIN

LINEAR_INT8 = "LinearInt8"      # lower_linear_int8.py's op
LINEAR_F32 = "LinearF32"        # lower_linear_f32.py's op


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


class NoMatch(Exception):
    """A fusion pass's pattern does not hold here (the nodes are left as they are)."""


class GraphIndex:
    """Producers, consumers and constants of a graph, and matchers over them for fusion passes
    (fuse_mamba_mixer.py); each raises NoMatch when the pattern does not hold."""

    def __init__(self, g: onnx.GraphProto):
        self.inits = {t.name: t for t in g.initializer}
        self.consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}

    def node(self, name: str, op_type: str, domain: str = "") -> onnx.NodeProto:
        n = self.producer.get(name)
        if n is None or n.op_type != op_type or n.domain != domain:
            raise NoMatch(f"{name} is not the output of a {op_type}")
        return n

    def init(self, name: str) -> str:
        if name not in self.inits:
            raise NoMatch(f"{name} is not an initializer")
        return name

    def scalar(self, name: str) -> float:
        t = self.inits.get(name)
        if t is None and name in self.consts:
            t = next(a.t for a in self.consts[name].attribute if a.name == "value")
        if t is None or t.data_location == onnx.TensorProto.EXTERNAL:
            raise NoMatch(f"{name} is not a constant held in the graph")
        a = numpy_helper.to_array(t)
        if a.size != 1:
            raise NoMatch(f"{name} is not a scalar")
        return float(a.reshape(()))

    def transposed(self, name: str) -> str:
        """The input of the Transpose(perm 0, 2, 1) that produces `name`."""
        t = self.node(name, "Transpose")
        if [list(a.ints) for a in t.attribute if a.name == "perm"] != [[0, 2, 1]]:
            raise NoMatch(f"{t.name} is not a [0, 2, 1] transpose")
        return t.input[0]

    def linear(self, name: str) -> onnx.NodeProto:
        n = self.node(name, LINEAR_INT8, DOMAIN)
        self.init(n.input[1]), self.init(n.input[2])
        return n

    def rms_norm(self, name: str) -> tuple[str, str, float, list[onnx.NodeProto]]:
        """(input, weight, eps, nodes) of Mul(w, Div(v, Sqrt(Add(ReduceMean(Pow(v, 2)), eps))))."""
        mul = self.node(name, "Mul")
        w = next((i for i in mul.input if i in self.inits), None)
        if w is None:
            raise NoMatch(f"{mul.name} has no weight")
        div = self.node(next(i for i in mul.input if i != w), "Div")
        sqrt = self.node(div.input[1], "Sqrt")
        add = self.node(sqrt.input[0], "Add")
        mean = self.producer.get(add.input[0])
        eps = add.input[1]
        if mean is None or mean.op_type != "ReduceMean":
            mean, eps = self.node(add.input[1], "ReduceMean"), add.input[0]
        pow_ = self.node(mean.input[0], "Pow")
        if pow_.input[0] != div.input[0] or self.scalar(pow_.input[1]) != 2.0:
            raise NoMatch(f"{div.name} is not an RMSNorm")
        return div.input[0], w, self.scalar(eps), [mul, div, sqrt, add, mean, pow_]

    def sole_reader(self, name: str, op_type: str, domain: str = "") -> onnx.NodeProto:
        """The one node that reads `name`, which must be a `op_type` reading it as its first input."""
        readers = self.consumers.get(name, [])
        if len(readers) != 1 or readers[0].op_type != op_type or readers[0].domain != domain or \
                readers[0].input[0] != name or name in self.outputs:
            raise NoMatch(f"{name} is read by other nodes than one {op_type}")
        return readers[0]

    def check_closed(self, nodes: list[onnx.NodeProto], results: set[str]) -> None:
        """No output of `nodes` but `results` is read outside them (or is a graph output)."""
        ids = {id(n) for n in nodes}
        for n in nodes:
            for o in n.output:
                if o not in results and (o in self.outputs or any(id(c) not in ids for c in self.consumers.get(o, []))):
                    raise NoMatch(f"{o} is read outside the nodes to fuse")


def splice(graph: onnx.GraphProto, fusions: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]]) -> None:
    """Replace each (fused node, the nodes it stands for) pair: the fused node takes the place of the
    last of its nodes in graph order (every input it reads is defined before that), the others go."""
    last, drop = {}, set()
    for fused, nodes in fusions:
        ids = {id(n) for n in nodes}
        last[id([n for n in graph.node if id(n) in ids][-1])] = fused
        drop |= ids
    kept = [last.get(id(n), n) for n in graph.node if id(n) not in drop or id(n) in last]
    del graph.node[:]
    graph.node.extend(kept)
