"""Graph passes, one per file, each `(model: onnx.ModelProto, settings: PassSettings) -> ModelProto`,
run from one explicit ordered list per backend. Two rewrites are not build passes:
`bind_weights.py` and `bind_kv_caches.py`, which the ONNX Runtime engine runs on the graph it hands
a session (weights and KV caches kept outside the graph)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx

from jambatrt.export.plan import TENSOR_LIMIT
from jambatrt.graph.passes.check_memory_flat import check_memory_flat
from jambatrt.graph.passes.fuse_mamba_mixer import fuse_mamba_mixer
from jambatrt.graph.passes.fuse_rms_norm import fuse_rms_norm
from jambatrt.graph.passes.infer_shapes import infer_shapes
from jambatrt.graph.passes.lower_attention_gqa import lower_attention_gqa
from jambatrt.graph.passes.lower_conv_native import lower_conv_native
from jambatrt.graph.passes.lower_linear_f32 import lower_linear_f32
from jambatrt.graph.passes.lower_linear_int8 import lower_linear_int8
from jambatrt.graph.passes.lower_moe_grouped import lower_moe_grouped
from jambatrt.graph.passes.materialize_optional_inputs import materialize_optional_inputs
from jambatrt.graph.passes.set_plugin_namespace import set_plugin_namespace
from jambatrt.graph.passes.slice_logits import slice_logits
from jambatrt.graph.passes.split_expert_groups import split_expert_groups


@dataclass(frozen=True)
class PassSettings:
    # "kernel": jamba::CausalAttention runs our memory-flat CPU kernel;
    # "gqa": com.microsoft::GroupQueryAttention (its CPU kernel holds a B*heads*L*(P+L) fp32
    #        probability matrix, so it is memory-flat only for short chunks).
    attention: str = "kernel"
    dtype: str = "float32"
    # ONNX Runtime's causal conv: "kernel" = jamba::CausalConv1d on our numba kernel (a decode step
    # ~30 us + the op call at D 2048, against ~150 us for ONNX Runtime's depthwise Conv);
    # "native" = Concat + depthwise Conv + SiLU + Slice (its own kernels; lower_conv_native.py)
    conv: str = "kernel"
    # largest tensor (elements) a backend accepts; TensorRT's volumes are int32
    tensor_limit: int = TENSOR_LIMIT
    # TensorRT's MoE: "grouped" = route + grouped GEMM plugins (prefill-sized chunks);
    # "fused" = the one-launch MoEInt8 plugin (recomputes gate/up per output block: decode only)
    moe: str = "grouped"
    # ONNX Runtime's single-session engine: logits for only the last `logits_positions` positions of a
    # run (a graph input; slice_logits.py). Stage graphs keep the exported interface.
    slice_logits: bool = False


Pass = Callable[[onnx.ModelProto, PassSettings], onnx.ModelProto]


def ort_passes(settings: PassSettings) -> list[Pass]:
    passes: list[Pass] = []
    if settings.attention == "gqa":
        passes.append(lower_attention_gqa)
    passes.append(materialize_optional_inputs)
    if settings.conv == "native":
        passes.append(lower_conv_native)
    # float32 linear layers on our GEMV, their weights mapped as stored (not transposed into a copy);
    # --weights-int8 artifacts: int8 weights read as int8 by our kernel, not dequantised per call;
    # RMSNorms in the form ONNX Runtime fuses into one kernel each; then each int8 Mamba mixer one node
    # (a fused dense MLP was measured too: 0.99x the decode step, not worth its code)
    passes += [lower_linear_f32, lower_linear_int8, fuse_rms_norm, fuse_mamba_mixer]
    if settings.slice_logits:
        passes.append(slice_logits)
    return passes + [infer_shapes, check_memory_flat]


def tensorrt_passes(settings: PassSettings) -> list[Pass]:
    # attention stays jamba::CausalAttention (our Triton flash kernel as an AOT plugin); MoE layers
    # whose stacked experts reach 2^31 elements become expert groups, then (by default) grouped GEMMs;
    # last, every jamba node gets the attributes the ONNX parser finds its plugin by
    passes: list[Pass] = [split_expert_groups]
    if settings.moe == "grouped":
        passes.append(lower_moe_grouped)
    return passes + [materialize_optional_inputs, infer_shapes, check_memory_flat, set_plugin_namespace]


def run_passes(model: onnx.ModelProto, settings: PassSettings, passes: list[Pass]) -> onnx.ModelProto:
    for p in passes:
        model = p(model, settings)
    return model


__all__ = ["PassSettings", "ort_passes", "tensorrt_passes", "run_passes", "check_memory_flat", "fuse_mamba_mixer", "fuse_rms_norm", "infer_shapes",
           "lower_attention_gqa", "lower_conv_native", "lower_linear_int8", "lower_moe_grouped", "materialize_optional_inputs", "set_plugin_namespace",
           "slice_logits", "split_expert_groups"]
