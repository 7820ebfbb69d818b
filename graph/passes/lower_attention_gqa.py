"""jamba::CausalAttention -> com.microsoft::GroupQueryAttention (ONNX Runtime contrib op).

Layouts: ours q [B,L,Hq,d], k/v/past [B,P,Hkv,d] (BSNH); GQA takes query/key/value [B,L,H*d] and
past/present KV in BNSH [B,Hkv,P,d], seqlens_k int32 [B] = P+L-1 and total_sequence_length int32
scalar. Same semantics (causal with past offset, scale d^-0.5, verified in tests), but the CPU
kernel holds a B*Hq*L*(P+L) fp32 probability buffer: memory-flat only when chunked."""

from __future__ import annotations

import onnx
from onnx import TensorProto

from jambatrt.errors import ArtifactError
from jambatrt.graph.passes._build import NodeBuilder


def _static_heads(model: onnx.ModelProto, name: str) -> tuple[int, int]:
    for vi in list(model.graph.value_info) + list(model.graph.input):
        if vi.name == name:
            dims = vi.type.tensor_type.shape.dim
            if len(dims) == 4 and dims[2].HasField("dim_value") and dims[3].HasField("dim_value"):
                return dims[2].dim_value, dims[3].dim_value
    raise ArtifactError(f"GQA lowering: no static [B,L,H,d] shape for {name!r} (run shape inference first)")


def lower_attention_gqa(model: onnx.ModelProto, settings=None) -> onnx.ModelProto:
    g = model.graph
    new_nodes = []
    for node in g.node:
        if node.domain != "jamba" or node.op_type != "CausalAttention":
            new_nodes.append(node)
            continue
        b = NodeBuilder(g, f"gqa/{node.name or node.output[0]}")
        q, k, v = node.input[:3]
        past = [i for i in node.input[3:5] if i]
        hq, d = _static_heads(model, q)
        hkv, _ = _static_heads(model, k)
        flat = b.const([0, 0, -1])
        q2, k2, v2 = (b.one("Reshape", [t, flat]) for t in (q, k, v))
        L = b.shape_slice(q, 1, 2)
        if past:
            pk, pv = (b.one("Transpose", [t], perm=[0, 2, 1, 3]) for t in past)
            total = b.one("Add", [L, b.shape_slice(past[0], 1, 2)])
        else:
            pk = pv = ""
            total = L
        seqlens = b.one("Cast", [b.one("Expand", [b.one("Sub", [total, b.const([1])]), b.shape_slice(q, 0, 1)])],
                        to=TensorProto.INT32)
        total_scalar = b.one("Cast", [b.one("Reshape", [total, b.const([], )])], to=TensorProto.INT32)
        out, pres_k, pres_v = b.op("GroupQueryAttention", [q2, k2, v2, pk, pv, seqlens, total_scalar], 3,
                                   domain="com.microsoft", num_heads=hq, kv_num_heads=hkv)
        b.nodes.append(onnx.helper.make_node("Reshape", [out, b.const([0, 0, hq, d])], [node.output[0]],
                                             name=b.name("out")))
        for pres, name in ((pres_k, node.output[1]), (pres_v, node.output[2])):
            if name:
                b.nodes.append(onnx.helper.make_node("Transpose", [pres], [name], perm=[0, 2, 1, 3],
                                                     name=b.name("present")))
        new_nodes += b.nodes
    del g.node[:]
    g.node.extend(new_nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model
