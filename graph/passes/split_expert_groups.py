"""Split MoEInt8 nodes whose stacked expert weights reach TensorRT's tensor limit.

TensorRT tensor volumes are 32-bit: no tensor, weights included, may hold 2^31 elements. A
Jamba-1.5-Large MoE layer stacks 16 experts of 2 x 24576 x 8192 int8 gate/up weights in one
w13 [E,2I,H] (6.4e9 elements). This pass replaces such a node by one MoEInt8 node per contiguous
expert group (export/plan.py `expert_groups`: fewest groups under the limit), each with its slice
of w13 / w13_scale / w2 / w2_scale, the full router logits and attribute expert_offset, and sums
their outputs (ONNX Sum) into the original output. Routing still ranks all experts in every group.

Slicing is free for weights kept as external data: a group of experts [a, b) of a C-contiguous
[E, ...] tensor is one contiguous byte range of the same file, so the new initializers point at
offset + a * bytes_per_expert and nothing is read or copied; in-memory weights are sliced."""

from __future__ import annotations

import math

import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from jambatrt.errors import ArtifactError
from jambatrt.export.plan import expert_groups
from jambatrt.graph.passes._build import drop_unused_initializers, replace_nodes

_ITEMSIZE = {onnx.TensorProto.INT8: 1, onnx.TensorProto.FLOAT: 4, onnx.TensorProto.BFLOAT16: 2,
             onnx.TensorProto.FLOAT16: 2}
_WEIGHTS = (2, 3, 4, 5)   # MoEInt8 inputs sliced per group: w13, w13_scale, w2, w2_scale


def slice_experts(t: onnx.TensorProto, start: int, end: int, name: str) -> onnx.TensorProto:
    """Experts [start, end) of a stacked [E, ...] initializer, as a new initializer `name`."""
    if uses_external_data(t):
        info = ExternalDataInfo(t)
        per = math.prod(t.dims[1:]) * _ITEMSIZE[t.data_type]
        if info.length is not None and info.length != t.dims[0] * per:
            raise ArtifactError(f"initializer {t.name}: external data length {info.length} != {list(t.dims)} x "
                                f"{_ITEMSIZE[t.data_type]} bytes")
        out = onnx.TensorProto(name=name, data_type=t.data_type, dims=[end - start, *t.dims[1:]],
                               data_location=onnx.TensorProto.EXTERNAL)
        entries = {"location": info.location, "offset": str((info.offset or 0) + start * per),
                   "length": str((end - start) * per)}
        for k, v in entries.items():
            out.external_data.add(key=k, value=v)
        return out
    return numpy_helper.from_array(numpy_helper.to_array(t)[start:end], name)


def split_expert_groups(model: onnx.ModelProto, settings) -> onnx.ModelProto:
    g = model.graph
    limit = settings.tensor_limit
    inits = {t.name: t for t in g.initializer}
    dropped = set()

    def rewrite(node):
        if node.domain != "jamba" or node.op_type != "MoEInt8":
            return None
        weights = [inits.get(node.input[i]) for i in _WEIGHTS]
        if any(w is None for w in weights):
            missing = [node.input[i] for i, w in zip(_WEIGHTS, weights) if w is None]
            raise ArtifactError(f"{node.name}: expert weights {missing} are not initializers; cannot split experts")
        w13, _, w2, _ = weights
        if max(math.prod(w13.dims), math.prod(w2.dims)) <= limit:
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("expert_offset", 0):
            raise ArtifactError(f"{node.name}: already an expert group (expert_offset {attrs['expert_offset']})")
        groups = expert_groups(w13.dims[0], max(math.prod(w13.dims[1:]), math.prod(w2.dims[1:])), limit)
        parts, out = [], []
        for a, b in groups:
            ins = list(node.input)
            for i, w in zip(_WEIGHTS, weights):
                ins[i] = f"{w.name}.experts{a}-{b - 1}"
                g.initializer.append(slice_experts(w, a, b, ins[i]))
            parts.append(f"{node.output[0]}.experts{a}-{b - 1}")
            out.append(helper.make_node("MoEInt8", ins, [parts[-1]], name=f"{node.name}/experts{a}-{b - 1}",
                                        domain="jamba", **{**attrs, "expert_offset": a}))
        out.append(helper.make_node("Sum", parts, [node.output[0]], name=f"{node.name}/sum_groups"))
        dropped.update(node.input[i] for i in _WEIGHTS)
        return out

    replace_nodes(g, rewrite)
    drop_unused_initializers(g, dropped)
    return model
