"""Take the attention layers' KV caches out of the graph: every jamba CausalAttention node whose
past KV are graph inputs and present KV graph outputs becomes `CausalAttentionCached(q, k, v;
cache=<key>) -> o`, where `bind(node)` returns the key the op's body finds the layer's in-place
cache by; those inputs and outputs leave the graph, so ONNX Runtime and the Python op boundary
never copy the cache (decode time then stays flat in the context).

Not in a backend's pass list: the ONNX Runtime engine runs it on the graph it hands a session
(engines/ort.py), like bind_weights.py; the engine file on disk keeps the plain nodes."""

from __future__ import annotations

from typing import Callable

import onnx
from onnx import helper

from jambatrt.export.ops import DOMAIN, SPECS
from jambatrt.graph.passes._build import replace_nodes

CACHED = "CausalAttentionCached"      # plugins/cpu/attention.py registers its body


def bind_kv_caches(model: onnx.ModelProto, bind: Callable[[onnx.NodeProto], str]) -> dict[str, tuple[str, str]]:
    """Rewrite `model` in place; returns {past input name: (key, "k" | "v")} for every cache bound.
    A node is left as it is when its past/present are not graph inputs/outputs, or when anything but
    the exporter's batch-size Shape reads its past."""
    g = model.graph
    ins, outs = {i.name for i in g.input}, {o.name for o in g.output}
    attention = SPECS["attention"].onnx_op_type
    cached: dict[str, tuple[str, str]] = {}
    gone: set[str] = set()
    others: dict[str, list] = {}         # other readers of a past input (the exporter's Shape for the batch)
    for n in g.node:
        if not (n.domain == DOMAIN and n.op_type == attention):
            for i in n.input:
                others.setdefault(i, []).append(n)

    def batch_shape(n) -> bool:          # Shape(past)[0:1]: the batch, which input_ids [B,L] gives too
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        return n.op_type == "Shape" and a.get("start", 0) == 0 and a.get("end") == 1

    def rewrite(node):
        if (node.domain != DOMAIN or node.op_type != attention or len(node.input) < 5
                or not {node.input[3], node.input[4]} <= ins or not {node.output[1], node.output[2]} <= outs
                or not all(batch_shape(n) for i in node.input[3:5] for n in others.get(i, []))):
            return None
        for i in node.input[3:5]:
            for n in others.get(i, []):
                n.input[0] = "input_ids"
        key = bind(node)
        cached[node.input[3]], cached[node.input[4]] = (key, "k"), (key, "v")
        gone.update([node.input[3], node.input[4], node.output[1], node.output[2]])
        return [helper.make_node(CACHED, list(node.input[:3]), [node.output[0]], name=node.name, domain=DOMAIN,
                                 cache=key)]

    replace_nodes(g, rewrite)
    for field in (g.input, g.output):
        keep = [v for v in field if v.name not in gone]
        del field[:]
        field.extend(keep)
    return cached
