"""TensorRT plugin jamba::CausalConv1d (AOT): Triton's causal depthwise conv + SiLU with the K-1
input state. Kernel parameters: (x, weight, bias, state, dim, seqlen, y, state_out); grid
(cdiv(seqlen, BLOCK_L), cdiv(dim, BLOCK_D), batch). The width K is a build-time constant (the
weight's shape) and a constexpr of the kernel."""

from __future__ import annotations

from jambatrt.export.ops.causal_conv1d import SPEC
from jambatrt.plugins import tensorrt as P

DESCRIPTORS = [P.descriptor_from_spec(SPEC, kernels=("causal_conv1d",), launchers={0: "causal_conv1d:causal_conv1d"},
                                      notes="every I/O in the activation type")]


def kernel_spec(act: str, width: int):
    from jambatrt.plugins.gpu import causal_conv1d as gpu
    return next(k for k in gpu.aot_kernels((act,), width=width) if k.name == f"causal_conv1d.{act}")


def register() -> None:
    trt, trtp = P.require_tensorrt()

    def describe(a):
        return a["x"].like(), a["state"].like()

    def autotune(a):
        return [P.combination(trtp, SPEC.io_types(act)) for act in ("bfloat16", "float32")]

    def aot_impl(a):
        x, w = a["x"], a["weight"]
        act = P.dtype_name(trt, x.dtype)
        spec = kernel_spec(act, P.constant(w.shape_expr[1], "conv width K (weight [D,K])"))
        name, ptx, compiled = P.compile_for_trt(spec)
        c = spec.constexprs
        grid = P.launch(trtp, compiled, trtp.cdiv(x.shape_expr[2], c["BLOCK_L"]),
                        trtp.cdiv(x.shape_expr[1], c["BLOCK_D"]), x.shape_expr[0])
        return name, ptx, grid, P.sym_extras(trtp, [x.shape_expr[1], x.shape_expr[2]])

    P.define_plugin(trtp, DESCRIPTORS[0], describe, autotune, aot_impl)
