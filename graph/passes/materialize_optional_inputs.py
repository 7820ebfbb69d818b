"""Give every absent optional state input of a jamba node an explicit zero tensor.

ONNX Runtime's Python custom ops (onnxruntime-extensions) and TensorRT plugins take a fixed
number of inputs; an absent incoming state means "zeros" (conv, SSM) or "empty" (past KV)."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from jambatrt.errors import ArtifactError
from jambatrt.graph.passes._build import NodeBuilder

_ELEM = {"float32": TensorProto.FLOAT, "bfloat16": TensorProto.BFLOAT16}


def materialize_optional_inputs(model: onnx.ModelProto, settings) -> onnx.ModelProto:
    g = model.graph
    b = NodeBuilder(g, "materialize")
    act = _ELEM[settings.dtype]
    new_nodes = []

    def zeros(shape_tensor: str, elem: int) -> str:
        return b.one("ConstantOfShape", [shape_tensor], value=helper.make_tensor("zero", elem, [1], [0]))

    for node in g.node:
        if node.domain != "jamba":
            new_nodes.append(node)
            continue
        ins = list(node.input)
        if node.op_type == "CausalConv1d":
            ins += [""] * (4 - len(ins))
            if not ins[3]:   # [B, D, K-1]: B, D from x [B,D,L]; K from weight [D,K]
                k_minus_1 = b.one("Sub", [b.shape_slice(ins[1], 1, 2), b.const([1])])
                shape = b.one("Concat", [b.shape_slice(ins[0], 0, 2), k_minus_1], axis=0)
                ins[3] = zeros(shape, act)
        elif node.op_type == "SelectiveScan":
            ins += [""] * (9 - len(ins))
            if not ins[6] or not ins[7]:
                raise ArtifactError(f"{node.name}: SelectiveScan without z or delta_bias is not produced by "
                                    "jambatrt export and has no ONNX Runtime kernel")
            if not ins[8]:   # [B, D, N] fp32: B, D from u [B,D,L]; N from B [B,N,L]
                shape = b.one("Concat", [b.shape_slice(ins[0], 0, 2), b.shape_slice(ins[3], 1, 2)], axis=0)
                ins[8] = zeros(shape, TensorProto.FLOAT)
        elif node.op_type == "CausalAttention":
            ins += [""] * (5 - len(ins))
            if not ins[3]:   # empty past [B, 0, Hkv, d] from k [B,L,Hkv,d]
                shape = b.one("Concat", [b.shape_slice(ins[1], 0, 1), b.const([0]), b.shape_slice(ins[1], 2, 4)],
                              axis=0)
                ins[3] = zeros(shape, act)
                ins[4] = zeros(shape, act)
        new_nodes += b.nodes
        b.nodes = []
        node = onnx.NodeProto.FromString(node.SerializeToString())
        del node.input[:]
        node.input.extend(ins)
        new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    return model
