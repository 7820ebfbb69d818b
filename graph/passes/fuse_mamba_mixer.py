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
from onnx import helper

from jambatrt.export.ops import DOMAIN
from jambatrt.graph.passes._build import LINEAR_INT8 as LINEAR
from jambatrt.graph.passes._build import GraphIndex, NoMatch, splice

OP_TYPE = "MambaMixerInt8"
# its inputs after h, conv_state, ssm_state: the small float parameters, then the int8 weights and
# their scales (the ORT engine maps those from the store: bind_weights.py)
PARAMS = ("conv_weight", "conv_bias", "A", "D", "dt_bias", "dt_norm", "b_norm", "c_norm")
WEIGHTS = ("in_proj", "in_proj_scale", "x_proj", "x_proj_scale", "dt_proj", "dt_proj_scale",
           "out_proj", "out_proj_scale")


def _match(G: GraphIndex, scan: onnx.NodeProto) -> tuple[onnx.NodeProto, list[onnx.NodeProto]]:
    """The fused node for the mixer around `scan`, and the nodes it replaces."""
    u, delta, A, Bt, Ct, Dskip, z, dt_bias, ssm_state = scan.input
    conv = G.node(u, "CausalConv1d", DOMAIN)
    x_in, conv_w, conv_b, conv_state = conv.input
    split = G.node(x_in, "Split")
    if list(split.output) != [x_in, z]:
        raise NoMatch(f"{split.name} does not split x and z")
    tr_in = G.producer[split.input[0]]
    in_lin = G.linear(G.transposed(split.input[0]))
    # x_proj, its three-way split, the norms
    dt_lin = G.linear(G.transposed(delta))
    dt_x, dt_norm, eps, dt_nodes = G.rms_norm(dt_lin.input[0])
    b_x, b_norm, eps_b, b_nodes = G.rms_norm(G.transposed(Bt))
    c_x, c_norm, eps_c, c_nodes = G.rms_norm(G.transposed(Ct))
    split3 = G.node(dt_x, "Split")
    if list(split3.output) != [dt_x, b_x, c_x] or len({eps, eps_b, eps_c}) != 1:
        raise NoMatch(f"{split3.name} does not split dt, B, C")
    xp_lin = G.linear(split3.input[0])
    if G.transposed(xp_lin.input[0]) != u:
        raise NoMatch(f"{xp_lin.name} does not read the conv's output")
    # the output projection
    tr_y = G.sole_reader(scan.output[0], "Transpose")
    out_lin = G.linear(G.sole_reader(tr_y.output[0], LINEAR, DOMAIN).output[0])
    G.transposed(tr_y.output[0])             # checks the perm
    gone = [in_lin, tr_in, split, conv, G.producer[xp_lin.input[0]], xp_lin, split3, *dt_nodes, *b_nodes, *c_nodes,
            dt_lin, G.producer[delta], G.producer[Bt], G.producer[Ct], scan, tr_y, out_lin]
    G.check_closed(gone, {out_lin.output[0], conv.output[1], scan.output[1]})
    inputs = [in_lin.input[0], conv_state, ssm_state, conv_w, conv_b, A, Dskip, dt_bias, dt_norm, b_norm, c_norm]
    for lin in (in_lin, xp_lin, dt_lin, out_lin):
        inputs += [lin.input[1], lin.input[2]]
    fused = helper.make_node(OP_TYPE, inputs, [out_lin.output[0], conv.output[1], scan.output[1]],
                             name=f"{scan.name}/mamba_mixer", domain=DOMAIN, eps=eps)
    return fused, gone


def fuse_mamba_mixer(model: onnx.ModelProto, settings) -> onnx.ModelProto:
    G = GraphIndex(model.graph)
    fusions = []
    for scan in [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == "SelectiveScan"]:
        try:
            fusions.append(_match(G, scan))
        except (NoMatch, KeyError, StopIteration, ValueError):
            continue
    splice(model.graph, fusions)
    return model
