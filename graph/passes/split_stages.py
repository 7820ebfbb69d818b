"""Split the step graph into pipeline stages: contiguous ranges of decoder layers, one graph each.

    stage 0          input_ids [B,L], past.layer{i}.* of its layers  -> hidden_out [B,L,H], present.layer{i}.*
    stage k (middle) hidden_in [B,L,H], past.layer{i}.*              -> hidden_out [B,L,H], present.layer{i}.*
    last stage       hidden_in [B,L,H], past.layer{i}.*              -> logits [B,L,V],    present.layer{i}.*
    (one stage: the graph as it is)

Which layer a node belongs to comes from the module path torch.export leaves in each node's
`namespace` metadata (`...model.model.layers.3.mamba...`); nodes the exporter adds without it (the
Splits of a chunk) take the layer of the node that feeds them. The tensor handed from stage to stage
is the one the residual stream crosses the cut with: the only non-shape tensor produced by layers
< b (or the embedding) and read by layers >= b (or the final norm). Shape arithmetic shared across
layers (torch.export computes [B, L, H] once and reuses it) is copied into every stage that needs
it, and a Shape of an input the stage does not have (input_ids, another layer's past) reads the
same symbolic dim from one it has (batch and seq from hidden_in, past from its own KV).
Initializers keep pointing into weights.safetensors: a stage holds only its layers' weights, and
nothing is copied. Anything that does not fit this picture raises ArtifactError naming the node.

Unlike the passes of the per-backend lists (`(model, settings) -> model`), this one makes N graphs
of one, so it runs first, on model.onnx; each stage graph then goes through the backend's own list
(engines/staged.py)."""

from __future__ import annotations

import re

import onnx
from onnx import TensorProto, helper

from jambatrt.errors import ArtifactError

HIDDEN_IN, HIDDEN_OUT = "hidden_in", "hidden_out"
_LAYER = re.compile(r"layers\.(\d+)\b")
_STATE = re.compile(r"^(past|present)\.layer(\d+)\.")
# ops that may be copied from another layer into a stage: integer shape arithmetic only
_SHAPE_OPS = {"Shape", "Concat", "Gather", "Unsqueeze", "Squeeze", "Slice", "Cast", "Constant", "Add", "Sub", "Mul",
              "Div", "Identity", "Reshape", "Expand", "Range", "ConstantOfShape", "Max", "Min", "Equal", "Where"}
_SMALL = 64          # an initializer read by shape arithmetic holds at most this many elements


def _namespace(node: onnx.NodeProto) -> str:
    return next((p.value for p in node.metadata_props if p.key == "namespace"), "")


def node_owners(model: onnx.ModelProto, n_layers: int) -> dict[str, int | None]:
    """node name -> layer index; -1 for the embedding, n_layers for the final norm and lm_head, None
    for global shape arithmetic (a Shape of a graph input)."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    owners: dict[str, int | None] = {}
    for n in g.node:
        ns = _namespace(n)
        found = _LAYER.findall(ns)
        if found:
            owners[n.name] = int(found[-1])
        elif "embed_tokens" in ns:
            owners[n.name] = -1
        elif "final_layernorm" in ns or "lm_head" in ns:
            owners[n.name] = n_layers
        else:    # no module path: the layer of what feeds it (exporter-made Splits), else global
            fed = [owners.get(producer[i].name) for i in n.input if i in producer]
            fed = [o for o in fed if o is not None]
            owners[n.name] = max(fed) if fed else None
    return owners


def _small_initializers(model: onnx.ModelProto) -> set[str]:
    import math
    return {t.name for t in model.graph.initializer if math.prod(t.dims) <= _SMALL}


def _shape_only(model: onnx.ModelProto) -> set[str]:
    """Tensors that depend on the inputs' shapes only (never on their values)."""
    small = _small_initializers(model)
    out: set[str] = set()
    for n in model.graph.node:
        if n.op_type == "Shape" or (n.op_type in _SHAPE_OPS and all(not i or i in out or i in small for i in n.input)):
            out.update(n.output)
    return out


def boundary_tensor(model: onnx.ModelProto, b: int, owners: dict, shape_only: set[str]) -> str:
    """The residual-stream tensor entering layer b (0 < b < n_layers)."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    crossing = []
    for n in g.node:
        o = owners[n.name]
        if o is None or o < b:
            continue
        for i in n.input:
            p = producer.get(i)
            if p is not None and owners[p.name] is not None and owners[p.name] < b and i not in shape_only \
                    and i not in crossing:
                crossing.append(i)
    if len(crossing) != 1:
        raise ArtifactError(f"cannot cut the step graph before layer {b}: {len(crossing)} tensors cross the cut "
                            f"({', '.join(crossing) or 'none'}); expected the residual stream alone")
    return crossing[0]


def _dim_sources(vi: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]


def stage_graph(model: onnx.ModelProto, a: int, b: int, n_layers: int, hidden_size: int, owners: dict | None = None,
                shape_only: set[str] | None = None) -> onnx.ModelProto:
    """The stage holding layers [a, b) of the step graph `model` (see the module docstring)."""
    g = model.graph
    owners = owners if owners is not None else node_owners(model, n_layers)
    shape_only = shape_only if shape_only is not None else _shape_only(model)
    graph_inputs = {vi.name: vi for vi in g.input}
    graph_outputs = {vi.name: vi for vi in g.output}

    def layer_of(name):
        m = _STATE.match(name)
        return int(m.group(2)) if m else None

    first, last = a == 0, b == n_layers
    src = "input_ids" if first else boundary_tensor(model, a, owners, shape_only)
    dst = "logits" if last else boundary_tensor(model, b, owners, shape_only)
    pasts = [n for n in graph_inputs if layer_of(n) is not None and a <= layer_of(n) < b]
    presents = [n for n in graph_outputs if layer_of(n) is not None and a <= layer_of(n) < b]
    available = set(pasts) | {src}
    inits = {t.name: t for t in g.initializer}

    # backward closure from the stage's outputs, stopping at what the stage is given
    producer = {o: n for n in g.node for o in n.output}
    need, keep, stack = set(), set(), [dst, *presents]
    while stack:
        t = stack.pop()
        if t in need or not t or t in available or t in inits:
            continue
        need.add(t)
        p = producer.get(t)
        if p is None:
            continue           # a graph input the stage lacks: only Shape may read it (checked below)
        if p.name not in keep:
            keep.add(p.name)
            stack.extend(p.input)
    nodes = [n for n in g.node if n.name in keep]

    # the hidden state's dims, to answer a Shape of an input this stage does not have
    dim_home: dict[str, tuple[str, int]] = {}
    if not first:
        dim_home.update({"batch": (HIDDEN_IN, 0), "seq": (HIDDEN_IN, 1)})
    else:
        dim_home.update({"batch": ("input_ids", 0), "seq": ("input_ids", 1)})
    for p in pasts:
        for j, d in enumerate(_dim_sources(graph_inputs[p])):
            if isinstance(d, str):
                dim_home.setdefault(d, (p, j))

    out_nodes: list[onnx.NodeProto] = []
    extra_inits: list[onnx.TensorProto] = []
    for n in nodes:
        o = owners[n.name]
        foreign = o is not None and not (a <= o < b or (first and o == -1) or (last and o == n_layers))
        if foreign and not all(x in shape_only for x in n.output):
            raise ArtifactError(f"stage of layers {a}-{b - 1} needs node {n.name} ({n.op_type}) of layer {o}: "
                                "only shape arithmetic may be shared between stages")
        missing = [i for i in n.input if i and i in graph_inputs and i not in available]
        if not missing:
            out_nodes.append(n)
            continue
        if n.op_type != "Shape":
            raise ArtifactError(f"stage of layers {a}-{b - 1}: node {n.name} ({n.op_type}) reads {missing[0]}, an "
                                "input of another stage")
        out_nodes.extend(_rewrite_shape(n, graph_inputs[missing[0]], dim_home, extra_inits, a, b))

    # the stage's own inputs and outputs
    hidden_dtype = g.output[0].type.tensor_type.elem_type            # logits: the model's float dtype
    hidden_dims = ["batch", "seq", hidden_size]
    ins, outs = [], []
    if first:
        ins.append(graph_inputs["input_ids"])
    else:
        ins.append(helper.make_tensor_value_info(HIDDEN_IN, hidden_dtype, hidden_dims))
        out_nodes.insert(0, helper.make_node("Identity", [HIDDEN_IN], [src], name=f"stage/{HIDDEN_IN}"))
    ins += [graph_inputs[p] for p in pasts]
    if last:
        outs.append(graph_outputs["logits"])
    else:
        outs.append(helper.make_tensor_value_info(HIDDEN_OUT, hidden_dtype, hidden_dims))
        out_nodes.append(helper.make_node("Identity", [dst], [HIDDEN_OUT], name=f"stage/{HIDDEN_OUT}"))
    outs += [graph_outputs[p] for p in presents]

    used = {i for n in out_nodes for i in n.input}
    graph = helper.make_graph(out_nodes, f"{g.name}_layers_{a}_{b}", ins, outs,
                              initializer=[t for t in g.initializer if t.name in used] + extra_inits,
                              value_info=[vi for vi in g.value_info if vi.name in need])
    stage = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                              producer_name=model.producer_name, producer_version=model.producer_version)
    stage.functions.extend(model.functions)
    for p in model.metadata_props:
        stage.metadata_props.add(key=p.key, value=p.value)
    stage.metadata_props.add(key="jambatrt.stage_layers", value=f"{a},{b}")
    return stage


def _rewrite_shape(node: onnx.NodeProto, vi: onnx.ValueInfoProto, dim_home: dict, extra_inits: list,
                   a: int, b: int) -> list[onnx.NodeProto]:
    """Shape(X)[start:end] of an input X this stage lacks, from the same symbolic dims of inputs it has."""
    dims = _dim_sources(vi)
    attrs = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    start, end = (start + len(dims) if start < 0 else start), (end + len(dims) if end < 0 else min(end, len(dims)))
    parts, nodes = [], []
    for j in range(start, end):
        d = dims[j]
        out = f"{node.output[0]}/dim{j}"
        if isinstance(d, int):
            extra_inits.append(helper.make_tensor(out, TensorProto.INT64, [1], [d]))
        elif d in dim_home:
            home, k = dim_home[d]
            nodes.append(helper.make_node("Shape", [home], [out], name=f"{node.name}/dim{j}", start=k, end=k + 1))
        else:
            raise ArtifactError(f"stage of layers {a}-{b - 1}: node {node.name} reads dim {d!r} of {vi.name}, and "
                                "no input of this stage has that dim")
        parts.append(out)
    if len(parts) == 1:
        nodes.append(helper.make_node("Identity", parts, list(node.output), name=node.name))
    else:
        nodes.append(helper.make_node("Concat", parts, list(node.output), name=node.name, axis=0))
    return nodes


def split_stages(model: onnx.ModelProto, ranges: list[tuple[int, int]], n_layers: int,
                 hidden_size: int) -> list[onnx.ModelProto]:
    """One graph per layer range; the ranges must cover [0, n_layers) in order."""
    flat = [x for r in ranges for x in r]
    if not ranges or flat[0] != 0 or flat[-1] != n_layers or any(
            ranges[i][1] != ranges[i + 1][0] for i in range(len(ranges) - 1)) or any(x >= y for x, y in ranges):
        raise ArtifactError(f"stage ranges {ranges} do not cover layers 0..{n_layers - 1} contiguously")
    if len(ranges) == 1:
        return [model]
    owners, shape_only = node_owners(model, n_layers), _shape_only(model)
    return [stage_graph(model, a, b, n_layers, hidden_size, owners, shape_only) for a, b in ranges]
