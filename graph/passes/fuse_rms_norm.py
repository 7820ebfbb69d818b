"""Let ONNX Runtime fuse the model's RMSNorms into its SimplifiedLayerNormalization kernel.

The exporter writes RMSNorm (export/model.py: x * rsqrt(mean(x^2) + eps), times the weight) as

    r = Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2)), eps)));  y = Mul(weight, Mul(x, r))

seven ONNX Runtime kernels per norm, 38 norms per step on the peer preset (two per decoder layer,
three inside each Mamba mixer, the final one): ~266 tiny ops of ~10 us each at one token. ONNX
Runtime's own SimplifiedLayerNormFusion recognises the pattern only with a Div, so this pass
rewrites Mul(x, Reciprocal(Sqrt(v))) into Div(x, Sqrt(v)) where x is the Pow's base (an RMSNorm,
nothing else); at session creation (ORT_ENABLE_ALL, engines/ort.py) the norm then becomes one
SimplifiedLayerNormalization node (fp32: x * 1/sqrt(mean(x^2) + eps) * weight, the same math;
rounding differs in the last bits). The graph stays plain ONNX for every other reader."""

from __future__ import annotations

import onnx

from jambatrt.graph.passes._build import replace_nodes


def fuse_rms_norm(model: onnx.ModelProto, settings) -> onnx.ModelProto:
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def base(name: str, *path: str):
        """The first input at the end of the producer chain `path` (op types, outermost first) from
        `name`, or None where the chain differs."""
        for op_type in path:
            n = producer.get(name)
            if n is None or n.op_type != op_type or n.domain != "":
                return None
            name = n.input[0]
        return name

    rewritten: set[str] = set()         # the outputs of the Reciprocals replaced

    def rewrite(node):
        if node.op_type != "Mul" or node.domain != "" or len(node.input) != 2:
            return None
        for x, r in (node.input, node.input[::-1]):
            recip = producer.get(r)
            if (recip is not None and len(consumers.get(r, [])) == 1
                    and base(r, "Reciprocal", "Sqrt", "Add", "ReduceMean", "Pow") == x):
                rewritten.add(r)
                return [onnx.helper.make_node("Div", [x, recip.input[0]], list(node.output), name=node.name)]
        return None

    replace_nodes(g, rewrite)
    replace_nodes(g, lambda n: [] if n.op_type == "Reciprocal" and n.output[0] in rewritten else None)
    return model
