"""TensorRT's MoE lowering checked end to end on CPU: the TensorRT pass list's MoE rewrites
(split_expert_groups, lower_moe_grouped) applied to the tiny model, the resulting graph run by ONNX
Runtime with the three grouped-pipeline ops (MoEInt8Route / GroupedUp / GroupedDown) executing the
very Triton kernels the TensorRT plugins launch, under Triton's interpreter — against the
unlowered graph on our CPU kernels. The rewritten graph's jamba nodes must also match the plugin
descriptors the way TensorRT's ONNX parser looks them up.

TRITON_INTERPRET=1 must be set before Triton kernels are defined, so the graphs run in a child
process (this file run as a script) that writes its measurements as JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LIMIT = 40_000       # tiny: one expert is 2I x H = 16,384 elements -> 2 groups of 2 experts
TOKENS = 21


# ---- child process --------------------------------------------------------------------------------
def _declare_grouped_ops():
    """The three plugins of the grouped lowering as ONNX Runtime Python ops, each calling the
    plugin's Triton kernel launcher (plugins/gpu/moe_int8.py) on CPU tensors."""
    import numpy as np
    import torch
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    from jambatrt.plugins.gpu import moe_int8 as k
    F, I8, I32 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int8, PyCustomOpDef.dt_int32
    t = torch.from_numpy

    @onnx_op(op_type="jamba::MoEInt8Route", inputs=[F], outputs=[F, I32, I32, I32],
             attrs={"top_k": PyCustomOpDef.dt_int64})
    def route(logits, top_k):
        return tuple(o.numpy() for o in k.route_align(t(logits), int(top_k)))

    @onnx_op(op_type="jamba::MoEInt8GroupedUp", inputs=[F, I8, F, I32, I32], outputs=[F],
             attrs={"top_k": PyCustomOpDef.dt_int64, "expert_offset": PyCustomOpDef.dt_int64})
    def up(x, w13, s13, sorted_ids, block_expert, top_k, expert_offset):
        return k.grouped_up(t(x), t(w13), t(s13), t(sorted_ids), t(block_expert), int(top_k),
                            int(expert_offset)).numpy()

    @onnx_op(op_type="jamba::MoEInt8GroupedDown", inputs=[F, I8, F, I32, I32, F], outputs=[F],
             attrs={"expert_offset": PyCustomOpDef.dt_int64})
    def down(act, w2, s2, sorted_ids, block_expert, topk_w, expert_offset):
        return k.grouped_down(t(np.ascontiguousarray(act)), t(w2), t(s2), t(sorted_ids), t(block_expert), t(topk_w),
                              int(expert_offset)).numpy()


def _child_main(artifact: str, out_path: str) -> None:
    import numpy as np
    import onnx
    import onnxruntime as ort

    from jambatrt.engines.ort import _session_options
    from jambatrt.graph.onnx_export import load_onnx
    from jambatrt.graph.passes import (PassSettings, lower_moe_grouped, materialize_optional_inputs, run_passes,
                                       split_expert_groups)
    from jambatrt.plugins.cpu.ort_ops import run_checked

    _declare_grouped_ops()
    so = _session_options()
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", artifact)
    source = Path(artifact) / "model.onnx"
    variants = {"reference": [materialize_optional_inputs],
                "grouped": [lower_moe_grouped, materialize_optional_inputs],
                "groups+grouped": [split_expert_groups, lower_moe_grouped, materialize_optional_inputs]}
    rng = np.random.default_rng(0)
    results, feed, want = {}, None, None
    for name, passes in variants.items():
        model = run_passes(load_onnx(source, load_external_data=False), PassSettings(tensor_limit=LIMIT), passes)
        session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        if feed is None:
            feed = {}
            for i in session.get_inputs():
                shape = [1 if d == "batch" else TOKENS if d == "seq" else 3 if d == "past" else d for d in i.shape]
                feed[i.name] = (rng.integers(0, 512, shape) if i.name == "input_ids"
                                else (rng.standard_normal(shape) * 0.5).astype(np.float32))
        names = [o.name for o in session.get_outputs()]
        outs = run_checked(session, names, feed)
        want = want or dict(zip(names, outs))
        results[name] = {
            "nodes": [[n.domain, n.op_type, {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute},
                       len(n.input), len(n.output)] for n in model.graph.node if n.domain == "jamba"],
            "max_abs_diff": {n: float(np.abs(o - want[n]).max()) for n, o in zip(names, outs)},
            "logit_scale": float(np.abs(outs[0]).max()),
            "top1_equal": bool((outs[0].argmax(-1) == want[names[0]].argmax(-1)).all())}
    Path(out_path).write_text(json.dumps(results, default=lambda b: b.decode() if isinstance(b, bytes) else str(b)))


# ---- the tests --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lowered(tiny_artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe-lowering") / "result.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(tiny_artifact), str(out)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0 and out.exists(), f"child failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("variant", ["grouped", "groups+grouped"])
def test_lowered_moe_matches_the_unlowered_graph(lowered, variant):
    """Logits and every state output of the rewritten graph == the original (fp32; the Triton dots
    run in IEEE fp32 under the interpreter), with 3 past tokens of random state."""
    r = lowered[variant]
    assert r["logit_scale"] > 0.1 and r["top1_equal"]
    for name, diff in r["max_abs_diff"].items():
        assert diff <= 2e-5, f"{variant}: {name} differs by {diff:.3g}"


def test_lowering_replaces_every_moe_node(lowered):
    ref = [n for n in lowered["reference"]["nodes"] if n[1] == "MoEInt8"]
    assert ref, "the tiny model has MoE layers"
    for variant, groups in (("grouped", 1), ("groups+grouped", 2)):
        types = [n[1] for n in lowered[variant]["nodes"]]
        assert "MoEInt8" not in types
        assert types.count("MoEInt8Route") == types.count("MoEInt8GroupedDown") == len(ref) * groups
        offsets = sorted({n[2]["expert_offset"] for n in lowered[variant]["nodes"] if n[1] == "MoEInt8GroupedUp"})
        assert offsets == ([0] if groups == 1 else [0, 2])


def test_lowered_nodes_find_their_plugins(lowered):
    """What TensorRT's ONNX parser checks: op_type == plugin name in namespace `jamba`, the same
    attributes, every input present, the number of outputs."""
    from jambatrt.plugins.tensorrt import descriptors
    table = descriptors()
    for domain, op_type, attrs, n_in, n_out in lowered["groups+grouped"]["nodes"]:
        d = table[op_type]
        assert d.namespace == domain and set(attrs) == set(d.attributes), op_type
        assert (n_in, n_out) == (len(d.inputs), len(d.outputs)), op_type


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    _child_main(sys.argv[1], sys.argv[2])
