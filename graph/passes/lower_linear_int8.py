"""Lower the int8 linear layers of --weights-int8 (export.model.Int8Linear) for ONNX Runtime.

torch.export + the ONNX exporter write an Int8Linear as

    y = Mul(MatMul(x, Transpose(Cast(w int8 [N,K] -> float))), scale [N])

which ONNX Runtime would run as a dequantisation of the whole weight on every call, then a float
MatMul: four times the bytes of the int8 weight written and read again per decode step. This pass
replaces the four nodes by one `jamba::LinearInt8(x, w, scale) -> y` (same semantics: fp32
dot products, the scale after the K loop), run by plugins/cpu/linear_int8.py; the ORT engine then
maps w and scale from the weight store instead of passing them through the Python op boundary
(engines/ort.py `map_weights`).

Why not ONNX Runtime's own com.microsoft::MatMulNBits (bits=8)? Its fast CPU path
(accuracy_level=4) quantises the activations to int8 per block, which is not this model's
semantics (activations stay float32); with float activations (accuracy_level 0) ONNX Runtime 1.32
dequantised the whole weight per call: 20-100x slower than a float MatMul at one token (measured,
see the note in the module docstring of plugins/cpu/linear_int8.py)."""

from __future__ import annotations

import onnx
from onnx import helper

from jambatrt.graph.passes._build import drop_unused_initializers

OP_TYPE = "LinearInt8"


def lower_linear_int8(model: onnx.ModelProto, settings) -> onnx.ModelProto:
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def only(name: str, op_type: str):
        c = consumers.get(name, [])
        return c[0] if len(c) == 1 and c[0].op_type == op_type and c[0].domain == "" else None

    drop, replace = set(), {}
    for cast in g.node:
        w = cast.input[0] if cast.op_type == "Cast" and cast.input else None
        if w not in inits or inits[w].data_type != onnx.TensorProto.INT8 or len(inits[w].dims) != 2:
            continue
        tr = only(cast.output[0], "Transpose")
        if tr is None or [a.ints for a in tr.attribute if a.name == "perm"] not in ([], [[1, 0]]):
            continue
        mm = only(tr.output[0], "MatMul")
        if mm is None or mm.input[1] != tr.output[0]:
            continue
        mul = only(mm.output[0], "Mul")
        scale = mul.input[1] if mul is not None and mul.input[0] == mm.output[0] else None
        if scale not in inits or list(inits[scale].dims) != [inits[w].dims[0]]:
            continue
        drop.update(id(n) for n in (cast, tr, mm))
        replace[id(mul)] = helper.make_node(OP_TYPE, [mm.input[0], w, scale], [mul.output[0]],
                                            name=f"{mul.name or mm.name}/linear_int8", domain="jamba")
    if not replace:
        return model
    nodes = [replace.get(id(n), n) for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(nodes)
    drop_unused_initializers(g, set())
    return model
