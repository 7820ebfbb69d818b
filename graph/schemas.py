"""ONNX schemas for the `jamba` domain, built from each op's SPEC, with type-and-shape inference.
Registered once per process, before any onnxscript Opset("jamba", 1) is created."""

from __future__ import annotations

import onnx
from onnx import TensorProto, defs

from jambatrt.export.ops import DOMAIN, DOMAIN_VERSION, SPECS

FLOAT_T = ["tensor(float)", "tensor(bfloat16)", "tensor(float16)"]
F32 = "tensor(float)"
I8 = "tensor(int8)"

# Per op: input/output type strings ("T" = the activation type) and output shape rules
# (output index -> (input index, dims to take from it, or None for "same as that input")).
_TYPES = {
    "causal_conv1d": (["T", "T", "T", "T"], ["T", "T"]),
    "selective_scan": (["T", "T", F32, "T", "T", F32, "T", F32, F32], ["T", F32]),
    "moe_int8": (["T", "T", I8, F32, I8, F32], ["T"]),
    "attention": (["T", "T", "T", "T", "T"], ["T", "T", "T"]),
}


def _dims(t: onnx.TypeProto):
    return list(t.tensor_type.shape.dim) if t.tensor_type.HasField("shape") else None


def _tensor_type(elem: int, dims) -> onnx.TypeProto:
    """dims: None (rank unknown) or a list of Dimension protos (copied), ints, or None (unknown dim)."""
    tp = onnx.TypeProto()
    tp.tensor_type.elem_type = elem
    if dims is not None:
        shape = tp.tensor_type.shape
        shape.SetInParent()
        for d in dims:
            nd = shape.dim.add()
            if isinstance(d, onnx.TensorShapeProto.Dimension):
                nd.CopyFrom(d)
            elif isinstance(d, int):
                nd.dim_value = d
    return tp


def _infer(name: str):
    def infer(ctx) -> None:
        t_in = [ctx.get_input_type(i) if ctx.has_input(i) else None for i in range(ctx.get_num_inputs())]
        t0 = t_in[0]
        if t0 is None:
            return
        elem = t0.tensor_type.elem_type
        d0 = _dims(t0)
        if name == "causal_conv1d":
            ks = _dims(t_in[1]) if t_in[1] is not None else None
            k = ks[1].dim_value - 1 if ks and ks[1].HasField("dim_value") else None
            ctx.set_output_type(0, _tensor_type(elem, d0))
            ctx.set_output_type(1, _tensor_type(elem, None if d0 is None else [d0[0], d0[1], k]))
        elif name == "selective_scan":
            a = _dims(t_in[2])
            ctx.set_output_type(0, _tensor_type(elem, d0))
            ctx.set_output_type(1, _tensor_type(TensorProto.FLOAT, None if d0 is None or a is None
                                                else [d0[0], d0[1], a[1]]))
        elif name == "moe_int8":
            ctx.set_output_type(0, _tensor_type(elem, d0))
        elif name == "attention":
            ctx.set_output_type(0, _tensor_type(elem, d0))
            dk = _dims(t_in[1])
            has_past = len(t_in) > 3 and t_in[3] is not None
            kv = None if dk is None else [dk[0], None if has_past else dk[1], dk[2], dk[3]]
            ctx.set_output_type(1, _tensor_type(elem, kv))
            ctx.set_output_type(2, _tensor_type(elem, kv))
    return infer


def build_schema(name: str) -> defs.OpSchema:
    spec = SPECS[name]
    tin, tout = _TYPES[name]
    opt = defs.OpSchema.FormalParameterOption
    inputs = [defs.OpSchema.FormalParameter(n, t, param_option=opt.Optional if n in spec.optional_inputs
                                            else opt.Single) for n, t in zip(spec.inputs, tin)]
    outputs = [defs.OpSchema.FormalParameter(n, t) for n, t in zip(spec.outputs, tout)]
    attrs = [defs.OpSchema.Attribute(a, defs.OpSchema.AttrType.INT if t is int else defs.OpSchema.AttrType.FLOAT,
                                     "", required=True) for a, t in spec.attributes.items()]
    schema = defs.OpSchema(spec.onnx_op_type, DOMAIN, DOMAIN_VERSION, doc=f"{spec.qualname} (see jambatrt.export.ops)",
                           inputs=inputs, outputs=outputs, type_constraints=[("T", FLOAT_T, "activations")],
                           attributes=attrs)
    schema.set_type_and_shape_inference_function(_infer(name))
    return schema


def _linear_int8_schema() -> defs.OpSchema:
    """jamba::LinearInt8(x [..., K], w [N,K] int8, scale [N] fp32) -> y [..., N]: not an exported op but
    the ORT pass list's lowering of --weights-int8 linear layers (graph/passes/lower_linear_int8.py)."""
    P = defs.OpSchema.FormalParameter
    schema = defs.OpSchema("LinearInt8", DOMAIN, DOMAIN_VERSION, doc="(x @ w^T) * scale, w int8 per output channel",
                           inputs=[P("x", "T"), P("w", I8), P("scale", F32)], outputs=[P("y", "T")],
                           type_constraints=[("T", FLOAT_T, "activations")])

    def infer(ctx) -> None:
        tx, tw = ctx.get_input_type(0), ctx.get_input_type(1)
        dx, dw = _dims(tx), _dims(tw)
        n = dw[0] if dw else None
        ctx.set_output_type(0, _tensor_type(tx.tensor_type.elem_type, None if dx is None else [*dx[:-1], n]))

    schema.set_type_and_shape_inference_function(infer)
    return schema


def register_schemas() -> None:
    """Idempotent: registers every jamba op schema with onnx.defs (and the ORT lowering's LinearInt8)."""
    for name, spec in SPECS.items():
        if not defs.has(spec.onnx_op_type, DOMAIN):
            defs.register_schema(build_schema(name))
    if not defs.has("LinearInt8", DOMAIN):
        defs.register_schema(_linear_int8_schema())
