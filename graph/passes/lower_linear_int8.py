"""Lower the int8 linear layers of --weights-int8 (export.model.Int8Linear) for ONNX Runtime.

torch.export + the ONNX exporter write an Int8Linear as

    y = Mul(MatMul(x, Transpose(Cast(w int8 [N,K] -> float))), scale [N])

which ONNX Runtime would run as a dequantisation of the whole weight on every call, then a float
MatMul: four times the bytes of the int8 weight written and read again per decode step. This pass
replaces the four nodes by one `jamba::LinearInt8(x, w, scale) -> y` (same semantics: fp32
dot products, the scale after the K loop), run by plugins/cpu/linear_int8.py; the ORT engine then
maps w and scale from the weight store instead of passing them through the Python op boundary
(engines/ort.py `map_weights`).

Why not ONNX Runtime's own com.microsoft::MatMulNBits (bits=8)? Our per-row int8 maps onto it
exactly (uint8 = int8 + 128 against its default zero point 128; the row's scale repeated for every
block along K), so only the activations differ. Measured with ONNX Runtime 1.32 on this AVX2 CPU
(issue 18; 2 threads, shared machine, variants interleaved):
- accuracy_level 4 (activations quantised to int8 per block, like llama.cpp's Q8_0): 4-7e-3
  relative error per layer against the exact product, and no faster here: the 45 decode GEMVs of
  the peer preset (116 MB of int8) took 14.8-15.5 ms at block 128, 16.1-19.9 ms at block 32,
  against 12.9-15.3 ms for our kernel (minima of 25 runs); 512-row prefill GEMMs 36-107 ms
  against 41-102 ms for ours and 30-65 ms for a float32 MatMul (no AVX-VNNI on this CPU);
- accuracy_level 0 (float activations): the whole weight is dequantised on every call, 22-66x
  slower than our kernel at one row."""

from __future__ import annotations

import onnx
from onnx import helper

from jambatrt.graph.passes._build import LINEAR_INT8 as OP_TYPE
from jambatrt.graph.passes._build import GraphIndex, splice


def lower_linear_int8(model: onnx.ModelProto, settings) -> onnx.ModelProto:
    g = model.graph
    ix = GraphIndex(g)

    def only(name: str, op_type: str):
        c = ix.consumers.get(name, [])
        return c[0] if len(c) == 1 and c[0].op_type == op_type and c[0].domain == "" else None

    fusions = []
    for cast in g.node:
        w = cast.input[0] if cast.op_type == "Cast" and cast.input else None
        if w not in ix.inits or ix.inits[w].data_type != onnx.TensorProto.INT8 or len(ix.inits[w].dims) != 2:
            continue
        tr = only(cast.output[0], "Transpose")
        if tr is None or [a.ints for a in tr.attribute if a.name == "perm"] not in ([], [[1, 0]]):
            continue
        mm = only(tr.output[0], "MatMul")
        if mm is None or mm.input[1] != tr.output[0]:
            continue
        mul = only(mm.output[0], "Mul")
        scale = mul.input[1] if mul is not None and mul.input[0] == mm.output[0] else None
        if scale not in ix.inits or list(ix.inits[scale].dims) != [ix.inits[w].dims[0]]:
            continue
        fusions.append((helper.make_node(OP_TYPE, [mm.input[0], w, scale], [mul.output[0]],
                                         name=f"{mul.name or mm.name}/linear_int8", domain="jamba"), [cast, tr, mm, mul]))
    if fusions:
        splice(g, fusions)
    return model
