"""TensorRT plugin jamba::CausalAttention (AOT): Triton causal GQA flash attention with the past
KV offset; it also writes present_k/v = cat(past, new), so one node is one launch. Kernel
parameters: (q, k, v, past_k, past_v, seqlen, past, n_heads, n_kv_heads, o, present_k,
present_v); grid (cdiv(seqlen, BLOCK_M), batch * n_heads).

Why not TensorRT's own attention layer (ONNX Attention opset 23 -> IAttention, TensorRT >= 10.14):
it takes no past_key/past_value and returns one output, so chunked prefill and decode — where
queries start at position P > 0 — would need the KV concatenated outside and a bottom-right
causal mask given as an explicit [L, P+L] tensor (at a 4096-token chunk of a 262,144-token
context that mask alone is 2^30 elements). The plugin handles P natively."""

from __future__ import annotations

from jambatrt.export.ops.attention import SPEC
from jambatrt.plugins import tensorrt as P
from jambatrt.plugins.registry import implements

DESCRIPTORS = [P.descriptor_from_spec(SPEC, kernels=("attention_fwd",), launchers={0: "attention:attention"},
                                      notes="past_k/past_v required (an empty [B,0,Hkv,d] past when there is none)")]


@implements("attention", "tensorrt", descriptors=DESCRIPTORS)
def register() -> None:
    trt, trtp = P.require_tensorrt()

    def describe(a):
        k, pk = a["k"], a["past_k"]
        present = (k.shape_expr[0], pk.shape_expr[1] + k.shape_expr[1], k.shape_expr[2], k.shape_expr[3])
        return (a["q"].like(), trtp.from_shape_expr(present, dtype=k.dtype),
                trtp.from_shape_expr(present, dtype=a["v"].dtype))

    def aot_impl(a):
        from jambatrt.plugins.gpu import attention as gpu
        q, k, pk = a["q"].shape_expr, a["k"].shape_expr, a["past_k"].shape_expr
        act = P.dtype_name(trt, a["q"].dtype)
        plan = gpu.attention_launch(q[0], q[1], q[2], k[2], P.constant(q[3], "head_dim (q [B,L,H,d])"), pk[1],
                                    dtype=act, cdiv=trtp.cdiv)
        return P.aot_launch(trtp, gpu.kernel_spec(plan, act), plan)

    P.define_plugin(trtp, DESCRIPTORS[0], describe, SPEC.io_types, aot_impl)
