"""TensorRT plugin jamba::SelectiveScan (AOT): Triton's chunked scan, or the one-step-per-iteration
kernel as a second tactic (TensorRT times both per profile; the sequential one wins at L = 1,
decode). Kernel parameters: (u, delta, A, B, C, D, z, delta_bias, state, dim, seqlen, dstate,
y, state_out); grid (cdiv(dim, BLOCK_D), batch)."""

from __future__ import annotations

from jambatrt.export.ops.selective_scan import SPEC
from jambatrt.plugins import tensorrt as P
from jambatrt.plugins.registry import implements

TACTICS = {1: "selective_scan_chunked", 2: "selective_scan_seq"}
LAUNCHERS = {1: "selective_scan:selective_scan", 2: "selective_scan:selective_scan_sequential"}
DESCRIPTORS = [P.descriptor_from_spec(SPEC, kernels=tuple(TACTICS.values()), tactics=TACTICS, launchers=LAUNCHERS,
                                      notes="u/delta/z/B/C/y in the activation type; A, D, delta_bias, state fp32")]


@implements("selective_scan", "tensorrt", descriptors=DESCRIPTORS)
def register() -> None:
    trt, trtp = P.require_tensorrt()

    def describe(a):
        u, A = a["u"], a["A"]
        return u.like(), trtp.from_shape_expr((u.shape_expr[0], u.shape_expr[1], A.shape_expr[1]), dtype=trt.float32)

    def aot_impl(a):
        from jambatrt.plugins.gpu import selective_scan as gpu
        u = a["u"].shape_expr
        act = P.dtype_name(trt, a["u"].dtype)
        plan = gpu.selective_scan_launch(u[0], u[1], u[2], P.constant(a["A"].shape_expr[1], "d_state (A [D,N])"),
                                         kind="seq" if a["tactic"] == 2 else "chunked", cdiv=trtp.cdiv)
        return P.aot_launch(trtp, gpu.kernel_spec(plan, act), plan)

    P.define_plugin(trtp, DESCRIPTORS[0], describe, SPEC.io_types, aot_impl)
