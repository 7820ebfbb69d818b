"""TensorRT plugins for jamba::MoEInt8 (AOT).

`MoEInt8` — the op's own plugin, one per ONNX node: `moe_int8_fused_kernel`, routing (fp32
softmax, top-k, no renormalisation), int8 dequantisation in registers, SwiGLU and the weighted
sum in one launch (an AOT plugin launches one kernel and has no workspace). It recomputes the
gate/up GEMM for every block of output columns: right for decode and short chunks, slow for long
prefill. Kernel parameters: (x, router_logits, w13, w13_scale, w2, w2_scale, n_tokens, hidden,
inter, n_experts, expert_offset, n_local, y); grid (cdiv(T, BLOCK_T), cdiv(H, BLOCK_N)). A node of
an expert group (attribute expert_offset, weights of n_local experts; graph/passes/
split_expert_groups.py) computes its group's part of y.

The split lowering (lowering="split"; graph/passes/lower_moe_grouped.py, the TensorRT default,
`build --moe grouped`) runs the grouped pipeline as three plugins in place of one MoEInt8 node,
each one launch:
    MoEInt8Route(router_logits; top_k) -> topk_weights [T,k] f32, topk_ids [T,k] i32,
                                          sorted_ids [NB*BM] i32, block_expert [NB] i32
    MoEInt8GroupedUp(x, w13, w13_scale, sorted_ids, block_expert; top_k, expert_offset) -> act [T*k, I]
    MoEInt8GroupedDown(act, w2, w2_scale, sorted_ids, block_expert, topk_weights; expert_offset)
                                          -> out [T*k, H] f32 (0 in rows of other expert groups)
    then native: Reshape [T,k,H] -> ReduceSum(axis 1) -> Cast(activation type) = y
with NB = cdiv(T*k + E*(BM-1), BM), BM = BLOCK_M (64). Every weight tile is then read once per
block of BM tokens routed to its expert (a grouped GEMM), not once per output block."""

from __future__ import annotations

import functools

from jambatrt.export.ops.moe_int8 import SPEC
from jambatrt.plugins import tensorrt as P
from jambatrt.plugins.registry import implements
from jambatrt.plugins.tensorrt import PluginDescriptor


def _split(name, inputs, outputs, kernel, launcher, attrs=("top_k",), notes=""):
    return PluginDescriptor(op=SPEC.name, name=f"{SPEC.plugin_name}{name}", namespace=P.NAMESPACE,
                            version=P.QDP_VERSION, attributes={a: "int" for a in attrs}, inputs=inputs,
                            outputs=outputs, kernels=(kernel,), launchers={0: f"moe_int8:{launcher}"},
                            lowering="split", notes=notes)


DESCRIPTORS = [
    P.descriptor_from_spec(SPEC, kernels=("moe_int8_fused",), launchers={0: "moe_int8:moe_int8_fused"},
                           notes="one launch; suits decode / short chunks"),
    _split("Route", ("router_logits",), ("topk_weights", "topk_ids", "sorted_ids", "block_expert"),
           "moe_route_align", "route_align", notes="one program: softmax, top-k, counting sort by expert"),
    _split("GroupedUp", ("x", "w13", "w13_scale", "sorted_ids", "block_expert"), ("act",), "moe_gemm1",
           "grouped_up", attrs=("top_k", "expert_offset"), notes="grouped gate/up GEMM + SwiGLU"),
    _split("GroupedDown", ("act", "w2", "w2_scale", "sorted_ids", "block_expert", "topk_weights"), ("out",),
           "moe_gemm2", "grouped_down", attrs=("expert_offset",),
           notes="grouped down GEMM x routing weight; fp32 rows [T*k, H]"),
]


@implements("moe_int8", "tensorrt", descriptors=DESCRIPTORS)
def register() -> None:
    from jambatrt.plugins.gpu import moe_int8 as gpu
    trt, trtp = P.require_tensorrt()
    main, route, up, down = DESCRIPTORS
    BLOCK_M = gpu.DEFAULTS["gemm1"]["BLOCK_M"]       # the route kernel's alignment, which the GEMMs read

    define = functools.partial(P.define_plugin, trtp)     # (desc, describe, io_types, aot_impl)

    # ---- MoEInt8: the fused kernel ----
    def main_aot(a):
        x, w13, lg = a["x"].shape_expr, a["w13"].shape_expr, a["router_logits"]
        act = P.dtype_name(trt, a["x"].dtype)
        E = P.constant(lg.shape_expr[1], "number of experts (router_logits [T,E])")
        plan = gpu.fused_launch(x[0], x[1], w13[1] // 2, E, a["expert_offset"], w13[0], top_k=a["top_k"], dtype=act,
                                cdiv=trtp.cdiv)
        return P.aot_launch(trtp, gpu.kernel_spec(plan, act, P.dtype_name(trt, lg.dtype)), plan)

    define(main, lambda a: a["x"].like(),
           SPEC.io_types, main_aot)

    # ---- split lowering ----
    def route_describe(a):
        lg, k = a["router_logits"], a["top_k"]
        T, E = lg.shape_expr[0], lg.shape_expr[1]
        nb = gpu.n_blocks(T, k, E, BLOCK_M, cdiv=trtp.cdiv)
        return (trtp.from_shape_expr((T, k), dtype=trt.float32), trtp.from_shape_expr((T, k), dtype=trt.int32),
                trtp.from_shape_expr((nb * BLOCK_M,), dtype=trt.int32), trtp.from_shape_expr((nb,), dtype=trt.int32))

    def route_aot(a):
        lg = a["router_logits"]
        act = P.dtype_name(trt, lg.dtype)
        plan = gpu.route_align_launch(lg.shape_expr[0], P.constant(lg.shape_expr[1], "number of experts"), a["top_k"])
        return P.aot_launch(trtp, gpu.kernel_spec(plan, act), plan)

    define(route, route_describe, lambda act: [act, "float32", "int32", "int32", "int32"], route_aot)

    def up_describe(a):
        x, w13 = a["x"], a["w13"]
        return trtp.from_shape_expr((x.shape_expr[0] * a["top_k"], w13.shape_expr[1] // 2), dtype=x.dtype)

    def up_aot(a):
        x, w13 = a["x"].shape_expr, a["w13"].shape_expr
        act = P.dtype_name(trt, a["x"].dtype)
        plan = gpu.grouped_up_launch(a["block_expert"].shape_expr[0], x[0] * a["top_k"], x[1], w13[1] // 2,
                                     a["expert_offset"], w13[0], top_k=a["top_k"], dtype=act, cdiv=trtp.cdiv)
        return P.aot_launch(trtp, gpu.kernel_spec(plan, act), plan)

    define(up, up_describe, lambda act: [act, "int8", "float32", "int32", "int32", act], up_aot)

    def down_describe(a):
        act, w2 = a["act"], a["w2"]
        return trtp.from_shape_expr((act.shape_expr[0], w2.shape_expr[1]), dtype=trt.float32)

    def down_aot(a):
        act_t, w2 = a["act"].shape_expr, a["w2"].shape_expr
        act = P.dtype_name(trt, a["act"].dtype)
        plan = gpu.grouped_down_launch(a["block_expert"].shape_expr[0], act_t[0], w2[1], act_t[1], a["expert_offset"],
                                       w2[0], dtype=act, cdiv=trtp.cdiv)
        return P.aot_launch(trtp, gpu.kernel_spec(plan, act), plan)

    define(down, down_describe, lambda act: [act, "int8", "float32", "int32", "int32", "float32", "float32"], down_aot)
