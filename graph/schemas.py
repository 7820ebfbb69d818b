"""ONNX schemas for the `jamba` domain, each built from its op's SPEC (export/ops/<op>.py: input and
output types, shape rules), with type-and-shape inference. Registered once per process, before any
onnxscript Opset("jamba", 1) is created."""

from __future__ import annotations

import onnx
from onnx import TensorProto, defs

from jambatrt.export.ops import ACTIVATION, DOMAIN, DOMAIN_VERSION, SPECS

FLOAT_T = ["tensor(float)", "tensor(bfloat16)", "tensor(float16)"]


# dtype name -> (ONNX element type, schema type string)
_ONNX_TYPES = {"float32": (TensorProto.FLOAT, "tensor(float)"), "bfloat16": (TensorProto.BFLOAT16, "tensor(bfloat16)"),
               "float16": (TensorProto.FLOAT16, "tensor(float16)"), "int8": (TensorProto.INT8, "tensor(int8)"),
               "int32": (TensorProto.INT32, "tensor(int32)"), "int64": (TensorProto.INT64, "tensor(int64)")}


def _type_string(t: str) -> str:
    """A SPEC type (ACTIVATION or a dtype name) as a schema type: the constraint "T" or "tensor(int8)"..."""
    return t if t == ACTIVATION else _ONNX_TYPES[t][1]


def _elem(t: str, activation: int) -> int:
    return activation if t == ACTIVATION else _ONNX_TYPES[t][0]


def _dims(t: onnx.TypeProto):
    """A shape as the SPEC's shape rules take it: a list of int (known), the Dimension proto itself
    (symbolic: passed through) or None (unknown); None when the rank is unknown."""
    if not t.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else d if d.HasField("dim_param") else None
            for d in t.tensor_type.shape.dim]


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


def _infer(spec):
    def infer(ctx) -> None:
        present = {n: ctx.get_input_type(i) for i, n in enumerate(spec.inputs[:ctx.get_num_inputs()])
                   if ctx.has_input(i)}
        t0 = present.get(spec.inputs[0])
        if t0 is None:
            return
        shapes = spec.output_shapes({n: _dims(t) for n, t in present.items()})
        for i, (t, dims) in enumerate(zip(spec.output_types, shapes)):
            ctx.set_output_type(i, _tensor_type(_elem(t, t0.tensor_type.elem_type), dims))
    return infer


def build_schema(name: str) -> defs.OpSchema:
    spec = SPECS[name]
    opt = defs.OpSchema.FormalParameterOption
    inputs = [defs.OpSchema.FormalParameter(n, _type_string(t), param_option=opt.Optional
                                            if n in spec.optional_inputs else opt.Single)
              for n, t in zip(spec.inputs, spec.input_types)]
    outputs = [defs.OpSchema.FormalParameter(n, _type_string(t)) for n, t in zip(spec.outputs, spec.output_types)]
    attrs = [defs.OpSchema.Attribute(a, defs.OpSchema.AttrType.INT if t is int else defs.OpSchema.AttrType.FLOAT,
                                     "", required=True) for a, t in spec.attributes.items()]
    schema = defs.OpSchema(spec.onnx_op_type, DOMAIN, DOMAIN_VERSION, doc=f"{spec.qualname} (see jambatrt.export.ops)",
                           inputs=inputs, outputs=outputs, type_constraints=[(ACTIVATION, FLOAT_T, "activations")],
                           attributes=attrs)
    schema.set_type_and_shape_inference_function(_infer(spec))
    return schema


def _infer_linear(ctx) -> None:
    """y [..., N] of x [..., K] and w [N, K] (the lowered linear layers)."""
    tx, tw = ctx.get_input_type(0), ctx.get_input_type(1)
    dx, dw = _dims(tx), _dims(tw)
    n = dw[0] if dw else None
    ctx.set_output_type(0, _tensor_type(tx.tensor_type.elem_type, None if dx is None else [*dx[:-1], n]))


def _linear_int8_schema() -> defs.OpSchema:
    """jamba::LinearInt8(x [..., K], w [N,K] int8, scale [N] fp32) -> y [..., N]: not an exported op but
    the ORT pass list's lowering of --weights-int8 linear layers (graph/passes/lower_linear_int8.py)."""
    P = defs.OpSchema.FormalParameter
    schema = defs.OpSchema("LinearInt8", DOMAIN, DOMAIN_VERSION, doc="(x @ w^T) * scale, w int8 per output channel",
                           inputs=[P("x", "T"), P("w", _ONNX_TYPES["int8"][1]), P("scale", _ONNX_TYPES["float32"][1])],
                           outputs=[P("y", "T")],
                           type_constraints=[("T", FLOAT_T, "activations")])

    schema.set_type_and_shape_inference_function(_infer_linear)
    return schema


def _linear_f32_schema() -> defs.OpSchema:
    """jamba::LinearF32(x [..., K], w [N,K] fp32) -> y [..., N] = x @ w^T: the ORT pass list's lowering of
    float32 linear layers (graph/passes/lower_linear_f32.py)."""
    P = defs.OpSchema.FormalParameter
    schema = defs.OpSchema("LinearF32", DOMAIN, DOMAIN_VERSION, doc="x @ w^T, w [N, K] as stored",
                           inputs=[P("x", "T"), P("w", "T")], outputs=[P("y", "T")],
                           type_constraints=[("T", FLOAT_T, "activations and weights")])

    schema.set_type_and_shape_inference_function(_infer_linear)
    return schema


def _mamba_mixer_int8_schema() -> defs.OpSchema:
    """jamba::MambaMixerInt8: the ORT pass list's fusion of an int8 Mamba mixer
    (graph/passes/fuse_mamba_mixer.py; inputs in plugins/cpu/mamba_mixer.py's order): h, conv_state,
    ssm_state, eight float parameters, four (int8 weight, fp32 scale) pairs -> y [like h],
    conv_state', ssm_state' [like the states]."""
    from jambatrt.graph.passes.fuse_mamba_mixer import PARAMS, WEIGHTS
    P = defs.OpSchema.FormalParameter
    f32, i8 = _ONNX_TYPES["float32"][1], _ONNX_TYPES["int8"][1]
    inputs = [P(n, "T") for n in ("h", "conv_state", "ssm_state")] + [P(n, f32) for n in PARAMS]
    inputs += [P(n, f32 if n.endswith("scale") else i8) for n in WEIGHTS]
    schema = defs.OpSchema("MambaMixerInt8", DOMAIN, DOMAIN_VERSION, doc="a Mamba mixer with int8 linear layers",
                           inputs=inputs, outputs=[P(n, "T") for n in ("y", "conv_state_out", "ssm_state_out")],
                           type_constraints=[("T", FLOAT_T, "activations")],
                           attributes=[defs.OpSchema.Attribute("eps", defs.OpSchema.AttrType.FLOAT, "RMSNorm epsilon")])

    def infer(ctx) -> None:
        for i in range(3):
            t = ctx.get_input_type(i)
            ctx.set_output_type(i, _tensor_type(t.tensor_type.elem_type, _dims(t)))

    schema.set_type_and_shape_inference_function(infer)
    return schema


def register_schemas() -> None:
    """Idempotent: registers every jamba op schema with onnx.defs (and the ORT lowerings' own ops)."""
    for name, spec in SPECS.items():
        if not defs.has(spec.onnx_op_type, DOMAIN):
            defs.register_schema(build_schema(name))
    if not defs.has("LinearInt8", DOMAIN):
        defs.register_schema(_linear_int8_schema())
    if not defs.has("LinearF32", DOMAIN):
        defs.register_schema(_linear_f32_schema())
    if not defs.has("MambaMixerInt8", DOMAIN):
        defs.register_schema(_mamba_mixer_int8_schema())
