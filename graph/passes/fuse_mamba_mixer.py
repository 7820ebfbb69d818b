"""Fuse each Mamba mixer of a --weights-int8 graph into one `jamba::MambaMixerInt8` node (its body:
plugins/cpu/mamba_mixer.py), for ONNX Runtime.

After lower_linear_int8 and fuse_rms_norm the exporter's mixer (export/model.py MambaMixer) is

    xz = LinearInt8(h, in_proj);  x, z = Split(Transpose(xz))
    x, conv_state' = CausalConv1d(x, Squeeze(conv1d.weight), conv1d.bias, conv_state)
    dt, B, C = Split(LinearInt8(Transpose(x), x_proj));  dt, B, C = RMSNorm each
    y, ssm_state' = SelectiveScan(x, Transpose(LinearInt8(dt, dt_proj)), A, Transpose(B), Transpose(C),
                                  D, z, dt_proj.bias, ssm_state)
    out = LinearInt8(Transpose(y), out_proj)

(RMSNorm: Mul(w, Div(v, Sqrt(Add(ReduceMean(Pow(v, 2)), eps))))), 31 nodes. A layer matching exactly
that -- each intermediate read only inside it, the weights initializers, one eps -- becomes

    out, conv_state', ssm_state' = MambaMixerInt8(h, conv_state, ssm_state, conv_w, conv_b, A, D,
        dt_bias, dt_norm, b_norm, c_norm, in_proj, in_proj_scale, x_proj, ..., out_proj_scale; eps)

where conv_w (the Squeeze) and A (-exp(A_log)) stay nodes of their own, which ONNX Runtime folds
into constants when it loads the graph. Anything else (a proj bias, float weights, a conv lowered
to ONNX's Conv) is left as it is: the pass only ever removes what it can replace exactly. Runs
after fuse_rms_norm and before infer_shapes."""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from jambatrt.export.ops import DOMAIN
from jambatrt.graph.passes.lower_linear_int8 import OP_TYPE as LINEAR

OP_TYPE = "MambaMixerInt8"
# its inputs after h, conv_state, ssm_state: the small float parameters, then the int8 weights and
# their scales (the ORT engine maps those from the store: bind_weights.py)
PARAMS = ("conv_weight", "conv_bias", "A", "D", "dt_bias", "dt_norm", "b_norm", "c_norm")
WEIGHTS = ("in_proj", "in_proj_scale", "x_proj", "x_proj_scale", "dt_proj", "dt_proj_scale",
           "out_proj", "out_proj_scale")


class _NoMatch(Exception):
    pass


class _Graph:
    def __init__(self, g: onnx.GraphProto):
        self.inits = {t.name: t for t in g.initializer}
        self.consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}

    def node(self, name: str, op_type: str, domain: str = "") -> onnx.NodeProto:
        n = self.producer.get(name)
        if n is None or n.op_type != op_type or n.domain != domain:
            raise _NoMatch(f"{name} is not the output of a {op_type}")
        return n

    def init(self, name: str) -> str:
        if name not in self.inits:
            raise _NoMatch(f"{name} is not an initializer")
        return name

    def scalar(self, name: str) -> float:
        t = self.inits.get(name)
        if t is None and name in self.consts:
            t = next(a.t for a in self.consts[name].attribute if a.name == "value")
        if t is None:
            raise _NoMatch(f"{name} is not a constant")
        a = numpy_helper.to_array(t)
        if a.size != 1:
            raise _NoMatch(f"{name} is not a scalar")
        return float(a.reshape(()))

    def transposed(self, name: str) -> str:
        """The input of the Transpose(perm 0, 2, 1) that produces `name`."""
        t = self.node(name, "Transpose")
        if [list(a.ints) for a in t.attribute if a.name == "perm"] != [[0, 2, 1]]:
            raise _NoMatch(f"{t.name} is not a [0, 2, 1] transpose")
        return t.input[0]

    def linear(self, name: str) -> onnx.NodeProto:
        n = self.node(name, LINEAR, DOMAIN)
        self.init(n.input[1]), self.init(n.input[2])
        return n

    def rms_norm(self, name: str) -> tuple[str, str, float, list[onnx.NodeProto]]:
        """(input, weight, eps, nodes) of Mul(w, Div(v, Sqrt(Add(ReduceMean(Pow(v, 2)), eps))))."""
        mul = self.node(name, "Mul")
        w = next((i for i in mul.input if i in self.inits), None)
        if w is None:
            raise _NoMatch(f"{mul.name} has no weight")
        div = self.node(next(i for i in mul.input if i != w), "Div")
        sqrt = self.node(div.input[1], "Sqrt")
        add = self.node(sqrt.input[0], "Add")
        mean = self.producer.get(add.input[0])
        eps = add.input[1]
        if mean is None or mean.op_type != "ReduceMean":
            mean, eps = self.node(add.input[1], "ReduceMean"), add.input[0]
        pow_ = self.node(mean.input[0], "Pow")
        if pow_.input[0] != div.input[0] or self.scalar(pow_.input[1]) != 2.0:
            raise _NoMatch(f"{div.name} is not an RMSNorm")
        return div.input[0], w, self.scalar(eps), [mul, div, sqrt, add, mean, pow_]


def _match(G: _Graph, scan: onnx.NodeProto) -> tuple[onnx.NodeProto, list[onnx.NodeProto]]:
    """The fused node for the mixer around `scan`, and the nodes it replaces."""
    u, delta, A, Bt, Ct, Dskip, z, dt_bias, ssm_state = scan.input
    conv = G.node(u, "CausalConv1d", DOMAIN)
    x_in, conv_w, conv_b, conv_state = conv.input
    split = G.node(x_in, "Split")
    if list(split.output) != [x_in, z]:
        raise _NoMatch(f"{split.name} does not split x and z")
    tr_in = G.producer[split.input[0]]
    in_lin = G.linear(G.transposed(split.input[0]))
    # x_proj, its three-way split, the norms
    dt_lin = G.linear(G.transposed(delta))
    dt_x, dt_norm, eps, dt_nodes = G.rms_norm(dt_lin.input[0])
    b_x, b_norm, eps_b, b_nodes = G.rms_norm(G.transposed(Bt))
    c_x, c_norm, eps_c, c_nodes = G.rms_norm(G.transposed(Ct))
    split3 = G.node(dt_x, "Split")
    if list(split3.output) != [dt_x, b_x, c_x] or len({eps, eps_b, eps_c}) != 1:
        raise _NoMatch(f"{split3.name} does not split dt, B, C")
    xp_lin = G.linear(split3.input[0])
    if G.transposed(xp_lin.input[0]) != u:
        raise _NoMatch(f"{xp_lin.name} does not read the conv's output")
    # the output projection
    readers = G.consumers.get(scan.output[0], [])
    if len(readers) != 1 or readers[0].op_type != "Transpose":
        raise _NoMatch(f"{scan.name}'s output is read elsewhere")
    tr_y = readers[0]
    G.transposed(tr_y.output[0])             # checks the perm
    readers = G.consumers.get(tr_y.output[0], [])
    if len(readers) != 1 or readers[0].op_type != LINEAR or readers[0].input[0] != tr_y.output[0]:
        raise _NoMatch(f"{tr_y.name}'s output is read elsewhere")
    out_lin = G.linear(readers[0].output[0])
    gone = [in_lin, tr_in, split, conv, G.producer[xp_lin.input[0]], xp_lin, split3, *dt_nodes, *b_nodes, *c_nodes,
            dt_lin, G.producer[delta], G.producer[Bt], G.producer[Ct], scan, tr_y, out_lin]
    kept = {out_lin.output[0], conv.output[1], scan.output[1]}
    ids = {id(n) for n in gone}
    for n in gone:                          # no intermediate may be read outside the mixer
        for o in n.output:
            if o in kept:
                continue
            if o in G.outputs or any(id(c) not in ids for c in G.consumers.get(o, [])):
                raise _NoMatch(f"{o} is read outside the mixer")
    inputs = [in_lin.input[0], conv_state, ssm_state, conv_w, conv_b, A, Dskip, dt_bias, dt_norm, b_norm, c_norm]
    for lin in (in_lin, xp_lin, dt_lin, out_lin):
        inputs += [lin.input[1], lin.input[2]]
    fused = helper.make_node(OP_TYPE, inputs, [out_lin.output[0], conv.output[1], scan.output[1]],
                             name=f"{scan.name}/mamba_mixer", domain=DOMAIN, eps=eps)
    return fused, gone


def fuse_mamba_mixer(model: onnx.ModelProto, settings) -> onnx.ModelProto:
    g = model.graph
    G = _Graph(g)
    fused: dict[int, onnx.NodeProto] = {}     # id(out_proj node) -> the fused node in its place
    drop: set[int] = set()
    for scan in [n for n in g.node if n.domain == DOMAIN and n.op_type == "SelectiveScan"]:
        try:
            node, gone = _match(G, scan)
        except (_NoMatch, KeyError, StopIteration, ValueError):
            continue
        fused[id(gone[-1])] = node
        drop.update(id(n) for n in gone)
    if fused:
        nodes = [fused.get(id(n), n) for n in g.node if id(n) not in drop or id(n) in fused]
        del g.node[:]
        g.node.extend(nodes)
    return model
