"""Lower the float32 linear layers of the default export for ONNX Runtime: the exporter writes a
bias-free nn.Linear as

    y = MatMul(x, Transpose(w float32 [N,K]))

which ONNX Runtime runs by transposing w into a copy once at load and multiplying with its MatMul,
whose one-row GEMVs streamed the peer preset's decode weights at 24.7 GB/s. This pass writes one
`jamba::LinearF32(x, w) -> y` instead (same semantics), run by plugins/cpu/linear_f32.py (a native
GEMV at 32.7 GB/s for decode, torch's GEMM for prefill); the ORT engine then maps w from the weight
store (bind_weights.py), so no copy of it is made."""

from __future__ import annotations

import onnx
from onnx import helper

from jambatrt.graph.passes._build import LINEAR_F32 as OP_TYPE
from jambatrt.graph.passes._build import GraphIndex, splice


def lower_linear_f32(model: onnx.ModelProto, settings) -> onnx.ModelProto:
    g = model.graph
    ix = GraphIndex(g)
    fusions = []
    for tr in g.node:
        w = tr.input[0] if tr.op_type == "Transpose" and tr.domain == "" and tr.input else None
        if w not in ix.inits or ix.inits[w].data_type != onnx.TensorProto.FLOAT or len(ix.inits[w].dims) != 2:
            continue
        if [a.ints for a in tr.attribute if a.name == "perm"] not in ([], [[1, 0]]):
            continue
        t, users = tr.output[0], ix.consumers.get(tr.output[0], [])
        if not users or t in ix.outputs or any(
                u.op_type != "MatMul" or u.domain != "" or list(u.input) != [u.input[0], t] or u.input[0] == t
                for u in users):
            continue
        fusions += [(helper.make_node(OP_TYPE, [mm.input[0], w], list(mm.output), domain="jamba",
                                      name=f"{mm.name or tr.name}/linear_f32"), [tr, mm]) for mm in users]
    if fusions:
        splice(g, fusions)
    return model
