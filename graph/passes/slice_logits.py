"""Compute the logits of only the positions a run needs: the ONNX Runtime engine's graph gets an
int64 [1] input `logits_positions` (n), and the output layer reads the last n positions of its
input (a Slice on axis 1), so `logits` is [B, n, V].

A prefill of L tokens for generation (`prefill_last`: `generate`, `profile`, serving) needs the last
position's logits only, yet the exported step computes all L: the output layer is one of the
largest matrices of a model (32000 x 1024 on the peer preset, 18% of a prefill's GEMM work) and its
[B, L, V] float32 result the largest activation. llama.cpp computes the last position only for a
prompt, as llama-bench's prefill test measures. The engine feeds n = L where every position's
logits are wanted (`validate`), 1 otherwise (engines/ort.py).

The producer of the graph output `logits` must be a position-wise linear layer whose first input
is the [B, L, H] hidden state (MatMul, LinearInt8); anything else is an ArtifactError."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from jambatrt.errors import ArtifactError
from jambatrt.graph.passes._build import LINEAR_F32, LINEAR_INT8, NodeBuilder

LOGITS = "logits"
POSITIONS = "logits_positions"
_LINEAR = {("", "MatMul"), ("jamba", LINEAR_INT8), ("jamba", LINEAR_F32)}


def slice_logits(model: onnx.ModelProto, settings) -> onnx.ModelProto:
    g = model.graph
    if any(i.name == POSITIONS for i in g.input):
        return model
    at = next((k for k, n in enumerate(g.node) if LOGITS in n.output), None)
    head = g.node[at] if at is not None else None
    if head is None or (head.domain, head.op_type) not in _LINEAR:
        found = "none" if head is None else f"{head.domain or 'ai.onnx'}::{head.op_type}"
        raise ArtifactError(f"slice_logits: `{LOGITS}` must come from a linear layer (MatMul, jamba::{LINEAR_F32} or jamba::{LINEAR_INT8}); "
                            f"its producer is {found}")
    b = NodeBuilder(g, "slice_logits")
    g.input.append(helper.make_tensor_value_info(POSITIONS, TensorProto.INT64, [1]))
    start = b.one("Neg", [POSITIONS])
    hidden = b.one("Slice", [head.input[0], start, b.const([2 ** 62]), b.const([1])])
    head.input[0] = hidden
    for k, n in enumerate(b.nodes):
        g.node.insert(at + k, n)
    out = next(o for o in g.output if o.name == LOGITS)
    out.type.tensor_type.shape.dim[1].dim_param = POSITIONS
    return model
