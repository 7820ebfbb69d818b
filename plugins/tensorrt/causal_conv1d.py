"""TensorRT plugin jamba::CausalConv1d (AOT): Triton's causal depthwise conv + SiLU with the K-1
input state. Kernel parameters: (x, weight, bias, state, dim, seqlen, y, state_out); grid
(cdiv(seqlen, BLOCK_L), cdiv(dim, BLOCK_D), batch). The width K is a build-time constant (the
weight's shape) and a constexpr of the kernel."""

from __future__ import annotations

from jambatrt.export.ops.causal_conv1d import SPEC
from jambatrt.plugins import tensorrt as P
from jambatrt.plugins.registry import implements

DESCRIPTORS = [P.descriptor_from_spec(SPEC, kernels=("causal_conv1d",), launchers={0: "causal_conv1d:causal_conv1d"},
                                      notes="every I/O in the activation type")]


@implements("causal_conv1d", "tensorrt", descriptors=DESCRIPTORS)
def register() -> None:
    trt, trtp = P.require_tensorrt()

    def describe(a):
        return a["x"].like(), a["state"].like()

    def aot_impl(a):
        from jambatrt.plugins.gpu import causal_conv1d as gpu
        x = a["x"].shape_expr
        act = P.dtype_name(trt, a["x"].dtype)
        plan = gpu.causal_conv1d_launch(x[0], x[1], x[2], P.constant(a["weight"].shape_expr[1],
                                                                     "conv width K (weight [D,K])"), cdiv=trtp.cdiv)
        return P.aot_launch(trtp, gpu.kernel_spec(plan, act), plan)

    P.define_plugin(trtp, DESCRIPTORS[0], describe, SPEC.io_types, aot_impl)
